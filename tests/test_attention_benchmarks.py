"""benchmarks/attention.py, attention_bwd.py and tournament.py on the CPU (--dry-run: the Triton kernels under
the interpreter): every row of the op is measured, and the script fails when one is not.  The GPU pass once lost
its backward rows to a timing closure that could not run twice; the CPU path now runs each closure twice, as
the GPU's timing loop does, so this test sees such a bug.  The tournament's dry run writes a table that the
dispatch reads back, with a row per regime ranking only implementations that passed their check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["attention.py", "attention_bwd.py"])
def test_dry_run_measures_every_row_of_the_op(tmp_path, script):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["us"] is not None and r["error"] is None for r in rows), rows


def test_tournament_dry_run_checks_every_implementation_and_writes_a_table(tmp_path):
    from melt_kernels.dispatch_table import read_table
    from melt_kernels.table_check import table_problems

    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out, table = tmp_path / "tournament.json", tmp_path / "auto_table.py"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "tournament.py"), "--dry-run", "--out", str(out),
                           "--table", str(table)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    implementations = [r for r in result["rows"] if r["backend"] in ("triton", "composition")]
    assert {r["regime"] for r in implementations} == {"decode", "chunk", "training"}
    assert all(r["check"]["passed"] and r["graph_us"] and r["eager_us"] for r in implementations), implementations
    assert len({r["candidate"] for r in implementations if r["backend"] == "triton"}) >= 3  # default + alternatives
    written = read_table(str(table))
    assert table_problems(written) == [] and list(written) == ["cpu-interpreter"]
    rows = written["cpu-interpreter"]["rows"]
    assert [r["regime"] for r in rows] == ["chunk", "decode", "training"]
    assert all({c["backend"] for c in r["ranking"]} <= {"triton", "composition"} for r in rows)
    assert written["cpu-interpreter"] == result["auto_table"]["cpu-interpreter"]


def test_a_failing_row_fails_the_script(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import fused_failures
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert fused_failures([dict(label="x", backend="triton", error=None, us=1.0)]) == 0
    assert fused_failures([dict(label="x", backend="triton", error=None, us=1.0),
                           dict(label="y", backend="cuda", error="boom", us=None)]) == 1
    assert "y cuda: boom" in capsys.readouterr().err


def test_a_plan_that_fails_its_check_is_never_ranked():
    """The table ranks only implementations that passed their check, by their regime's timing; peers and rows
    that could not run are reported, never ranked."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import tournament
    finally:
        sys.path.remove(str(BENCHMARKS))
    base = dict(regime="chunk", label="chunk B=4", dtype="bfloat16", head_dim=128, heads_q=16, heads_kv=16,
                batch=4, keys=5000, timed="graph: one call; eager: one call", fwd={}, bwd={})
    rows = [dict(base, candidate="triton (default plan)", backend="triton", check=dict(passed=True),
                 graph_us=300.0, eager_us=330.0),
            dict(base, candidate="triton (fwd block_n=128)", backend="triton", fwd={"block_n": 128},
                 check=dict(passed=False), graph_us=200.0, eager_us=230.0),
            dict(base, candidate="composition (default plan)", backend="composition", check=dict(passed=True),
                 graph_us=280.0, eager_us=400.0),
            dict(base, candidate="cuda (default plan)", backend="cuda", error="not built"),
            dict(base, candidate="sdpa_flash", backend=None, graph_us=250.0, eager_us=260.0)]
    assert [(c["backend"], c["us"]) for c in tournament.ranking(rows)] == [("composition", 280.0),
                                                                           ("triton", 300.0)]
    m = tournament.summary(rows)
    assert m["winner"] == "composition (default plan)" and m["failed"] == ["triton (fwd block_n=128)"]
    assert m["winner_ratios"]["graph_x_flash"] == 280.0 / 250.0 and m["triton_default_us"] == 300.0
    training = [dict(r, regime="training") for r in rows]
    assert tournament.ranking(training)[0] == dict(backend="triton", fwd={}, bwd={}, us=330.0)  # eager ranks
    entry = tournament.table_entry(dict(date="2026-12-10T10:00:00", commit="0" * 40, torch="2.11", triton="3.6"),
                                   [rows, training])
    assert [(r["regime"], r["timing"], len(r["ranking"])) for r in entry["rows"]] == [("chunk", "graph", 2),
                                                                                     ("training", "eager", 2)]
