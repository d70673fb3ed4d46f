"""Shared test set-up: hypothesis profiles, NaN-poisoned allocations, GPU marker."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# `ci`: few examples from a fixed seed, so that a CI verdict is reproducible; `dev` (the default
# elsewhere) and `nightly` (many): fresh random examples every run.  Pick one with HYPOTHESIS_PROFILE.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=8, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("nightly", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_report_header(config):
    """The versions this run resolved, first in the log: a fresh install takes the newest releases the ranges
    admit, so a break that an upstream release caused shows which one it was."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    names = ("torch", "triton", "numpy", "transformers", "kernels", "hypothesis")
    return "versions: " + ", ".join(f"{name} {version(name)}" for name in names)


def pytest_configure(config):
    """Under TRITON_INTERPRET=1, an interpreter that cannot run the kernels stops the run at once, saying why
    (the kernel tests would otherwise each fail deep inside Triton)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from melt_kernels.backends import triton_cpu_problem
    reason = triton_cpu_problem()
    if reason is not None:
        raise pytest.UsageError(reason)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_EMPTY_FACTORIES = ("empty", "empty_like", "empty_strided")


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        elif not t.is_complex() and t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min if t.dtype.is_signed else torch.iinfo(t.dtype).max)
        return t
    return make


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty* allocation starts as NaN (floats) or an extreme integer, so unwritten elements show."""
    for name in _EMPTY_FACTORIES:
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))


@pytest.fixture
def one_thread():
    """One intra-op thread, restored afterwards: the model tests' tensors are tiny, and on a shared CPU a second
    spinning OpenMP thread makes small ops up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
