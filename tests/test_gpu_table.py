"""The GPU pass's table of correctness checks (benchmarks/gpu_correctness.py), held on the CPU against what each
backend accepts, so that an entry its backend refuses is found here, not on a lease; and its summary
(benchmarks/gpu_summary.py) read from the logs as a GPU writes them."""
import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_correctness  # noqa: E402
import gpu_summary  # noqa: E402

BACKENDS = ["triton"] + (["cuda"] if importlib.util.find_spec("melt_kernels._cuda") else [])


@pytest.mark.parametrize("quick", [False, True])
def test_every_gpu_check_is_accepted_by_its_backend(quick):
    checks = gpu_correctness.gpu_table(BACKENDS, quick)
    assert {c.backend for c in checks} == set(BACKENDS)
    assert len({c.name for c in checks}) == len(checks), "two checks share a name (results are keyed by it)"
    assert gpu_correctness.unrunnable(checks) == []


@pytest.mark.parametrize("backend, head_dim", [("triton", 512), ("cuda", 80)])
def test_a_refused_check_is_reported(backend, head_dim):
    """The check itself can fail: a head_dim the op (16..256) or the CUDA kernels (64, 128) refuse is named with
    its reason."""
    if backend not in BACKENDS:
        pytest.skip("melt_kernels._cuda is not built (MELT_BUILD_CUDA=1)")
    check = gpu_correctness.Check("forward", backend, "bf16", 1, 4, 2, head_dim, (64, 1, 63))
    (refused,) = gpu_correctness.unrunnable([check])
    assert refused.startswith(check.name) and "head_dim" in refused


# The sanitizer step's log as benchmarks/gpu_check.sh writes it: each tool's banner, then its output, whose last
# line is the tool's summary (racecheck's its own form).
CLEAN_LOG = """--- compute-sanitizer --tool memcheck
========= COMPUTE-SANITIZER
========= ERROR SUMMARY: 0 errors
--- compute-sanitizer --tool racecheck
========= COMPUTE-SANITIZER
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
--- compute-sanitizer --tool synccheck
========= COMPUTE-SANITIZER
========= ERROR SUMMARY: 0 errors
"""
# Errors from memcheck and racecheck; synccheck cut by the time limit before its summary.
FAILED_LOG = """--- compute-sanitizer --tool memcheck
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 2 bytes
========= ERROR SUMMARY: 1 error
--- compute-sanitizer --tool racecheck
========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at _fwd_kernel+0x1a0
========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)
--- compute-sanitizer --tool synccheck
========= COMPUTE-SANITIZER
"""


@pytest.mark.parametrize("log, counts, numbers", [
    (CLEAN_LOG, dict(memcheck=dict(errors=0), racecheck=dict(errors=0, hazards=0, warnings=0),
                     synccheck=dict(errors=0)),
     "memcheck: 0 errors, racecheck: 0 errors, synccheck: 0 errors"),
    (FAILED_LOG, dict(memcheck=dict(errors=1), racecheck=dict(errors=2, hazards=3, warnings=1),
                      synccheck=dict(errors=None)),
     "memcheck: 1 errors, racecheck: 2 errors (1 warnings), synccheck: no summary"),
], ids=["clean", "failed"])
def test_gpu_summary_reads_every_sanitizer_tools_summary(tmp_path, log, counts, numbers):
    """racecheck ends with 'RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)', not the others'
    'ERROR SUMMARY: N errors': its count is read all the same, into results.json and the summary's row."""
    assert gpu_summary.sanitizer_errors(log) == counts
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "sanitizer.log").write_text(log)
    status = "passed" if log is CLEAN_LOG else "failed"
    (work / "steps.tsv").write_text(f"sanitizer\t{0 if log is CLEAN_LOG else 1}\t42\t{status}\t60\n")
    gpu_summary.main(["--work", str(work), "--out", str(out), "--steps", str(work / "steps.tsv")])
    assert json.loads((out / "results.json").read_text())["sanitizer"] == counts
    assert f"| sanitizer | {status} | 42 | 60 | {numbers} |" in (out / "summary.md").read_text()


def _shape_summary(label, winner, us, failed=(), default_us=None):
    ratios = dict(graph_x_flash=0.9, graph_x_cudnn=1.1, graph_x_composition=0.8, eager_x_flash=1.5,
                  eager_x_composition=None)
    return dict(regime=label.split()[0], label=label, ranked_by="graph_us", timed="graph: one call",
                winner=winner, winner_us=us, winner_ratios=ratios, triton_default_us=default_us,
                triton_default_ratios=ratios, failed=list(failed))


def test_tune_key_numbers_count_the_winners_and_the_failures():
    summary = [_shape_summary("decode B=1", "triton (fwd fold_merge=True)", 9.5, default_us=10.0),
               _shape_summary("chunk B=4", "composition (default plan)", 40.0, ["triton (fwd block_n=128)"]),
               _shape_summary("chunk B=1", "triton (default plan)", 150.0),
               _shape_summary("training B=1", None, None)]
    text = gpu_summary.key_numbers("tune", dict(tune=dict(summary=summary)))
    assert text == ("4 shapes; auto runs triton at 2, composition at 1, none passed at 1; failed checks: "
                    "chunk B=4: triton (fwd block_n=128) (the winners below)")
    assert gpu_summary.key_numbers("tune", dict(tune=None)) == "no shape finished"


def test_gpu_summary_shows_the_tournament_and_hands_back_the_table(tmp_path):
    """The tune step's rows, winners and table reach results.json, the summary's winners table and
    OUT/auto_table.py; a pass without the step has none of them."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    summary = [_shape_summary("decode B=1 M=1 L=8191", "triton (fwd fold_merge=True)", 29.1, default_us=30.2)]
    table = {"GPU": dict(measured={}, rows=[])}
    (work / "tournament.json").write_text(json.dumps(dict(meta={}, rows=[dict(candidate="x")], summary=summary,
                                                          auto_table=table)))
    (work / "auto_table.py").write_text("TABLE = {}\n")
    (work / "steps.tsv").write_text("tune\t0\t120\tpassed\t240\n")
    gpu_summary.main(["--work", str(work), "--out", str(out), "--steps", str(work / "steps.tsv")])
    results = json.loads((out / "results.json").read_text())
    assert results["tune"] == dict(rows=[dict(candidate="x")], summary=summary, auto_table=table)
    text = (out / "summary.md").read_text()
    assert "| decode | decode B=1 M=1 L=8191 | triton (fwd fold_merge=True) | 29.1 | 0.90 | 1.10 | 0.80 | 1.50 | n/a " \
           "| 30.2 | none |" in text
    assert (out / "auto_table.py").read_text() == "TABLE = {}\n"
    (work / "tournament.json").unlink()
    (work / "auto_table.py").unlink()
    gpu_summary.main(["--work", str(work), "--out", str(tmp_path / "out2"), "--steps", str(work / "steps.tsv")])
    assert "Tournament" not in (tmp_path / "out2" / "summary.md").read_text()
    assert not (tmp_path / "out2" / "auto_table.py").exists()
