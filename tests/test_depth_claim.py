"""examples/depth_claim.py --quick: every row, the claim's test, and the same answers in 1 and 2 processes (the
issue's CI check of the example: CI runs this suite)."""
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "depth_claim.py"
ROWS = ["standard", "standard-deep", "looplm", "last-step", "melt-latent", "melt-kv-head", "melt-latent-4x"]

pytestmark = pytest.mark.usefixtures("one_thread")


def agree(one: dict, two: dict) -> None:
    """The rows of two runs name the same models with the same answers' losses (up to rounding) and accuracies
    (up to one answer whose argmax rounding flipped)."""
    assert [r["model"] for r in one["rows"]] == [r["model"] for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        for key in ("bits_served", "bits_chunks"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (a["model"], key, a[key], b[key])
        for key in ("acc_served_per_difficulty", "acc_chunks_per_difficulty", "acc_decode_per_difficulty"):
            assert all(abs(x - y) <= 1 / n + 1e-12 for x, y, n in zip(a[key], b[key], a["answers_per_difficulty"])), \
                (a["model"], key, a[key], b[key])


def test_quick_rows_claim_and_two_processes(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    main = runpy.run_path(str(EXAMPLE))["main"]
    one = main(["--quick", "--rows", *ROWS, "--json", str(tmp_path / "one.json")])
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads(json.dumps(one))
    rows = {r["model"]: r for r in one["rows"]}
    assert list(rows) == ROWS
    hardest = one["task"]["steps"]
    per_pass = rows["standard"]["kv_bytes_per_token"]
    for name, row in rows.items():
        assert len(row["acc_served_per_difficulty"]) == len(row["acc_chunks_per_difficulty"]) == hardest
        assert len(row["acc_served_per_loop_per_difficulty"]) == row["loops"]
        assert row["kv_bytes_per_token"] == per_pass * (4 if name in ("looplm", "standard-deep") else 1)
        assert (row["gate_retention_per_loop"] is None) == (row["cache"] != "melt")
        assert 0 <= row["acc_served"] <= 1
    # A LoopLM cache does not depend on the chunking: in chunks and token by token, the same answers.
    for name in ("standard", "standard-deep", "looplm"):
        assert rows[name]["acc_chunks_per_difficulty"] == rows[name]["acc_decode_per_difficulty"]
    assert rows["last-step"]["gate_retention_per_loop"] == pytest.approx([1 / (1 + math.exp(10))] * 3, rel=1e-3)
    assert rows["melt-latent"]["steps"] == {"transition": 3, "distill": 3}
    assert rows["melt-latent-4x"]["steps"] == {"transition": 12, "distill": 12}
    assert rows["standard-deep"]["layers"] == 4 * rows["standard"]["layers"]
    claim = one["claim"]
    assert claim["lead"] == pytest.approx(rows["looplm"]["acc_served"] - rows["standard"]["acc_served"])
    assert set(claim["melt"]) == {"last-step", "melt-latent", "melt-kv-head", "melt-latent-4x"}
    assert claim["melt"]["melt-latent"]["kv_vs_looplm"] == 0.25

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLE), "--quick", "--rows", *ROWS, "--json", str(tmp_path / "two.json")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["environment"]["processes"] == 2
    agree(one, two)


def test_quick_chains_task(monkeypatch):
    """--task chains (the calibration's first task) runs its rows, its difficulty the hops of a query."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main(["--quick", "--task", "chains", "--rows", "standard", "looplm"])
    assert result["task"]["name"] == "chains" and result["task"]["difficulty"] == "hops"
    assert [len(r["acc_served_per_difficulty"]) for r in result["rows"]] == [result["task"]["max_hops"]] * 2
