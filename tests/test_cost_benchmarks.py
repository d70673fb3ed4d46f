"""benchmarks/host_cost.py and benchmarks/backward_memory.py in --quick mode: they run and write what they
document (in subprocesses: host_cost.py replaces Triton's launch for its whole process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_host_cost_quick(tmp_path):
    result = _run("host_cost.py", tmp_path / "host.json")
    for row in result["per_call"]:
        assert row["launches"] >= 1 and all(row[k] > 0 for k in ("op_us", "checks_us", "dispatch_us", "launcher_us"))
    assert {"import_torch_s", "import_torch_melt_s", "import_melt_added_s"} <= set(result["imports"])


def test_backward_memory_quick(tmp_path):
    rows = _run("backward_memory.py", tmp_path / "memory.json")["rows"]
    assert {(r["sweep"], r["length"], r["capacity"]) for r in rows} == \
        {("length", 16, 16), ("length", 32, 32), ("capacity", 16, 64)}
    for r in rows:
        assert r["step_peak_bytes"] >= r["backward_peak_bytes"] > 0 and r["backward_allocated_bytes"] > 0
        assert r["cache_bytes"] > 0
