"""benchmarks/attention.py and attention_bwd.py on the CPU (--dry-run: the Triton kernels under the
interpreter): every row of the op is measured, and the script fails when one is not.  The GPU pass once lost
its backward rows to a timing closure that could not run twice; the CPU path now runs each closure twice, as
the GPU's timing loop does, so this test sees such a bug."""
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
