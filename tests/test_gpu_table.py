"""The GPU pass's table of correctness checks (benchmarks/gpu_correctness.py), held on the CPU against what each
backend accepts, so that an entry its backend refuses is found here, not on a lease."""
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_correctness  # noqa: E402

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
