"""Backend discovery and dispatch (docs/op.md#backends).

A backend is a pair of launchers with the signatures of the reference's
``gated_kv_attention_ref_fwd``/``_bwd``.  Kernel modules are imported lazily,
on first use, so ``import melt_kernels`` never needs Triton or a built CUDA
extension.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from melt_kernels.checks import Problem
from melt_kernels.reference import gated_kv_attention_ref_bwd, gated_kv_attention_ref_fwd

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# "auto"'s order, fastest first, as the GPU pass measured it (H100, Triton 3.6, 2026-12-06,
# benchmarks/results/gpu-2026-12-06): the Triton forward took 0.71-0.85x the CUDA one's time at all 7 decode
# shapes (1k-128k keys, batch 1 and 64) and 0.67-0.73x at 500-token chunks after a prefix; the CUDA one was
# faster only at a chunk with no prefix (0.59x Triton's).  Both passed every correctness check; the backward
# is Triton's for both.
KERNEL_BACKENDS = ("triton", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    fwd: Callable
    bwd: Callable
    # Why the backend cannot run a problem, or None when it can.
    unsupported: Callable[[Problem], Optional[str]] = lambda problem: None
    # Whether fwd/bwd need max_seqlen_k to bound the lengths (the reference cuts its window there); kernels
    # only size their work split by it, so they also take the caller's hint.
    needs_true_bound: bool = False


REFERENCE = Backend("reference", gated_kv_attention_ref_fwd, gated_kv_attention_ref_bwd, needs_true_bound=True)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def interpreter_incompatibility(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why this Triton's interpreter cannot run the kernels beside this NumPy, or None.

    The interpreter of Triton < 3.7 turns a scalar kernel argument (a 1-element array) into a Python int with
    ``int(array)``, which NumPy >= 2.4 refuses for arrays of one dimension, so every kernel that loops up to a
    runtime bound fails (Triton 3.7 squeezes the array first).  torch 2.11 pins Triton 3.6.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"backend 'triton' under TRITON_INTERPRET=1: the interpreter of Triton {triton_version} fails "
                f"with NumPy {numpy_version} (NumPy >= 2.4 no longer converts 1-element arrays to int); "
                f"install 'numpy<2.4' or Triton >= 3.7")
    return None


def triton_cpu_problem() -> Optional[str]:
    """Why the Triton backend cannot run CPU tensors here (under Triton's interpreter), or None."""
    if not triton_interpreted():
        return "backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU tensors"
    try:
        import triton
    except ModuleNotFoundError as e:
        return f"backend 'triton' is not available here: {e}"
    import numpy
    return interpreter_incompatibility(triton.__version__, numpy.__version__)


_LOADED: dict = {}  # name -> Backend, once imported (dispatch runs at every call)


def _load(name: str) -> Backend:
    """Imports a kernel backend; raises RuntimeError saying why it is unavailable."""
    backend = _LOADED.get(name)
    if backend is None:
        module = {"triton": "melt_kernels.triton_backend", "cuda": "melt_kernels.cuda_backend"}[name]
        try:
            backend = _LOADED[name] = importlib.import_module(module).BACKEND
        except ModuleNotFoundError as e:
            raise RuntimeError(f"backend {name!r} is not available here: {e}") from e
    return backend


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _usable(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run on this machine, or None."""
    if name == "reference":
        return None
    try:
        _load(name)
    except RuntimeError as e:
        return str(e)
    return _machine_reason(name)


def _machine_reason(name: str) -> Optional[str]:
    if name == "triton" and not _cuda_available():
        return triton_cpu_problem()
    if name == "cuda" and not _cuda_available():
        return "backend 'cuda' needs a CUDA device"
    return None


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first, "reference" last."""
    return [name for name in KERNEL_BACKENDS if _usable(name) is None] + ["reference"]


def _why_not(name: str, problem: Problem) -> Optional[str]:
    reason = _usable(name)
    if reason is not None:
        return reason
    if problem.q.dtype not in KERNEL_DTYPES:
        return f"backend {name!r} supports float16, bfloat16 and float32, got {problem.q.dtype}"
    device = problem.q.device.type
    if name == "cuda" and device != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device != "cuda":
        reason = triton_cpu_problem() if device == "cpu" else f"backend 'triton' needs CUDA tensors, got {device}"
        if reason is not None:
            return reason
    return _load(name).unsupported(problem)


def select_backend(name: str, problem: Problem) -> Backend:
    """The backend that runs ``problem``: ``name``, or the fastest that can when ``name`` is "auto"."""
    if name == "reference":
        return REFERENCE
    if name != "auto":
        reason = _why_not(name, problem)
        if reason is not None:
            raise RuntimeError(reason)
        return _load(name)
    if problem.q.device.type == "cpu" and not triton_interpreted():
        return REFERENCE
    for candidate in KERNEL_BACKENDS:
        if _why_not(candidate, problem) is None:
            return _load(candidate)
    return REFERENCE


def explain_backend(problem: Problem) -> dict[str, Optional[str]]:
    """For each kernel backend, why it would not run ``problem`` (None: it would)."""
    return {name: _why_not(name, problem) for name in KERNEL_BACKENDS}
