"""Backend discovery and dispatch (docs/op.md#backends).

A backend is a pair of launchers with the signatures of the reference's ``gated_kv_attention_ref_fwd``/``_bwd``:
"triton" and "cuda", this package's kernels (imported lazily, on first use, so ``import melt_kernels`` never
needs Triton or a built CUDA extension), "composition" (the blend, then PyTorch's own attention:
melt_kernels/composition_backend.py) and "reference", the definition the others are tested against.

How ``backend="auto"`` decides.  CPU tensors get the reference (the Triton kernels under TRITON_INTERPRET=1).
On a GPU, the call's row of the committed table melt_kernels/auto_table.py decides (melt_kernels/dispatch_table.py
says how a row is found: by GPU name, regime, dtype, head_dim and query heads per kv head, then the measured
batch and keys nearest to the call's): the call runs the first implementation of the row's ranking that can run
it (the composition cannot with lengths on the device, say, nor cuDNN's plan with a settled prefix), with that
implementation's plan (keyword overrides of its launchers).  Under ``torch.use_deterministic_algorithms(True)`` a
backward plan that is not deterministic gives way to the backend's default, which then is.  Where the table has
no row for the call (a GPU the tournament never ran on, another dtype or head_dim), or no ranked implementation
can run it: the fixed order, KERNEL_BACKENDS, then the reference.

``explain_backend`` says, per backend, why it would not run a call, and what "auto" picks and which row
decided; ``melt_kernels.which_backend`` says it for the op's own arguments.  The table is regenerated on a GPU
by the GPU pass's tournament: ``bash benchmarks/gpu_check.sh OUT --steps build,tune`` writes OUT/auto_table.py
(this GPU's rows replaced, the other GPUs' kept), to be copied over melt_kernels/auto_table.py.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from melt_kernels.checks import Problem, check_inputs
from melt_kernels.dispatch_table import AutoTable, Choice, Row, plan_text
from melt_kernels.reference import gated_kv_attention_ref_bwd, gated_kv_attention_ref_fwd

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# "auto"'s order where the table has no row, fastest first, as the GPU pass measured it (H100, Triton 3.6,
# 2026-12-06, benchmarks/results/gpu-2026-12-06): the Triton forward took 0.71-0.85x the CUDA one's time at all 7
# decode shapes (1k-128k keys, batch 1 and 64) and 0.67-0.73x at 500-token chunks after a prefix; the CUDA one
# was faster only at a chunk with no prefix (0.59x Triton's).  Both passed every correctness check; the backward
# is Triton's for both.
KERNEL_BACKENDS = ("triton", "cuda")
_MODULES = {"triton": "melt_kernels.triton_backend", "cuda": "melt_kernels.cuda_backend",
            "composition": "melt_kernels.composition_backend"}


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
    # The plan fwd and bwd were given: keyword overrides of the launchers, as sorted (key, value) pairs.
    fwd_plan: tuple = ()
    bwd_plan: tuple = ()


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
    """Imports a backend; raises RuntimeError saying why it is unavailable."""
    backend = _LOADED.get(name)
    if backend is None:
        try:
            backend = _LOADED[name] = importlib.import_module(_MODULES[name]).BACKEND
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
    """The kernel backends that can run on this machine, fastest first, "reference" last.  ("composition",
    PyTorch's own attention after the blend, runs wherever PyTorch does, for the problems it handles.)"""
    return [name for name in KERNEL_BACKENDS if _usable(name) is None] + ["reference"]


def why_not(name: str, problem: Problem, impl: Optional[Backend] = None) -> Optional[str]:
    """Why backend ``name`` cannot run ``problem`` here, or None; ``impl``: that backend with a plan
    (:func:`planned`), whose refusals count too."""
    reason = _usable(name)
    if reason is not None:
        return reason
    impl = impl or _load(name)
    if name == "composition":  # PyTorch's attention: its own rules of dtype and device
        return impl.unsupported(problem)
    if problem.q.dtype not in KERNEL_DTYPES:
        return f"backend {name!r} supports float16, bfloat16 and float32, got {problem.q.dtype}"
    device = problem.q.device.type
    if name == "cuda" and device != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device != "cuda":
        reason = triton_cpu_problem() if device == "cpu" else f"backend 'triton' needs CUDA tensors, got {device}"
        if reason is not None:
            return reason
    return impl.unsupported(problem)


# --- plans -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _triton_plan_refusal(fwd_plan: tuple, seqlen_q: int, heads_q: int, heads_kv: int, head_dim: int,
                         elem_size: int) -> Optional[str]:
    """Why the Triton forward's planner refuses the overrides ``fwd_plan`` for a call of these sizes (a decode
    tile too short for the rows of a kv head, a path that cannot hold them), or None.  Its refusals depend on
    the rows and tiles only, so batch and lengths are left out and the verdict is cached."""
    p = _fwd_module()
    try:
        p.plan_forward(1, seqlen_q, heads_q, heads_kv, head_dim, 0, 1, elem_size, **dict(fwd_plan))
    except ValueError as e:
        return f"backend 'triton' with the plan {dict(fwd_plan)}: {e}"
    return None


def _planned_reason(base: Backend, fwd_plan: tuple, problem: Problem) -> Optional[str]:
    if base.name == "composition":  # its plan is the attention kernel, which has rules of its own
        return base.unsupported(problem, **dict(fwd_plan))
    reason = base.unsupported(problem)
    if reason is None and base.name == "triton" and fwd_plan:
        q = problem.q
        reason = _triton_plan_refusal(fwd_plan, q.shape[1], q.shape[2], problem.k.shape[2], q.shape[3],
                                      q.element_size())
    return reason


@functools.lru_cache(maxsize=None)
def planned(name: str, fwd_plan: tuple = (), bwd_plan: tuple = ()) -> Backend:
    """Backend ``name`` with keyword overrides of its forward and backward launchers (sorted (key, value) pairs,
    melt_kernels.dispatch_table.plan_items), e.g. ``planned("triton", (("block_n", 128),))``; its
    ``unsupported`` also refuses problems the plan cannot run.  Built once per plan: dispatch builds nothing
    per call.  Raises RuntimeError when the backend is not available here."""
    base = _load(name)
    if not fwd_plan and not bwd_plan:
        return base
    fwd, bwd = dict(fwd_plan), dict(bwd_plan)
    return dataclasses.replace(base, fwd=functools.partial(base.fwd, **fwd), bwd=functools.partial(base.bwd, **bwd),
                               unsupported=functools.partial(_planned_reason, base, fwd_plan), fwd_plan=fwd_plan,
                               bwd_plan=bwd_plan)


def _nondeterministic(key: str, value) -> bool:
    """Whether a backward override asks for a plan that is not deterministic (an atomic dQ)."""
    return (key == "deterministic" and not value) or (key == "dq_atomic" and bool(value))


def _choice_backend(choice: Choice, regime: str) -> Backend:
    bwd = choice.bwd
    if regime == "training" and torch.are_deterministic_algorithms_enabled():
        bwd = tuple((k, v) for k, v in bwd if not _nondeterministic(k, v))
    return planned(choice.backend, choice.fwd, bwd)


# --- the table --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def auto_table() -> AutoTable:
    """The committed table (melt_kernels/auto_table.py), read once."""
    from melt_kernels.auto_table import TABLE
    return AutoTable(TABLE)


@functools.lru_cache(maxsize=None)
def gpu_name(device: torch.device) -> Optional[str]:
    """The name the table knows a device by (``torch.cuda.get_device_name``); None off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _fwd_module():
    """melt_kernels.kernels.fwd (Triton's forward launcher), imported once, when a table row is first looked up."""
    return importlib.import_module("melt_kernels.kernels.fwd")


def needs_grad(problem: Problem) -> bool:
    """Whether the call records gradients (then it runs forward and backward: the "training" regime)."""
    p = problem
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (p.q, p.k, p.v, p.k_cache, p.v_cache, p.gate, p.gate_v))


def regime(problem: Problem) -> str:
    """The table's regime of a call: "training", else the Triton forward's path, "decode" or "chunk"."""
    if needs_grad(problem):
        return "training"
    return _fwd_module().path_of(problem.q.shape[1], problem.q.shape[2], problem.k.shape[2],
                                 problem.q.element_size())


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def _table_row(problem: Problem) -> Optional[Row]:
    p = problem
    gpu = gpu_name(p.q.device)
    table = auto_table()
    if not table.has(gpu):
        return None
    batch, _, heads_q, head_dim = p.q.shape
    keys = p.max_seqlen_k or p.seqlen_k_hint or p.cache_len
    return table.row(gpu, regime(p), _DTYPE_NAMES[p.q.dtype], head_dim, heads_q // p.k.shape[2], batch, keys)


# --- dispatch ---------------------------------------------------------------------------------------------------

def _auto(problem: Problem, skipped: Optional[list] = None) -> tuple[Backend, Optional[Row]]:
    """"auto"'s backend for ``problem`` and the table row that decided (None: the fixed order); the row's choices
    passed over are appended to ``skipped`` as (choice, why)."""
    if problem.q.device.type == "cpu" and not triton_interpreted():
        return REFERENCE, None
    row = _table_row(problem)
    if row is not None:
        for choice in row.ranking:
            reason = _usable(choice.backend)
            if reason is None:
                impl = _choice_backend(choice, row.regime)
                reason = why_not(choice.backend, problem, impl)
                if reason is None:
                    return impl, row
            if skipped is not None:
                skipped.append((choice, reason))
    for candidate in KERNEL_BACKENDS:
        if why_not(candidate, problem) is None:
            return _load(candidate), None
    return REFERENCE, None


def select_backend(name: str, problem: Problem) -> Backend:
    """The backend that runs ``problem``: ``name``, or "auto"'s choice (module docstring)."""
    if name == "reference":
        return REFERENCE
    if name != "auto":
        reason = why_not(name, problem)
        if reason is not None:
            raise RuntimeError(reason)
        return _load(name)
    return _auto(problem)[0]


@dataclass(frozen=True)
class BackendChoice:
    """What a call of the op runs (:func:`which_backend`): the backend, its plan (keyword overrides of its
    launchers, empty for the defaults) and why."""

    backend: str
    fwd_plan: dict
    bwd_plan: dict
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}{plan_text(tuple(self.fwd_plan.items()), tuple(self.bwd_plan.items()))}: {self.reason}"


def choose(name: str, problem: Problem) -> BackendChoice:
    """:func:`select_backend`'s choice, said in words; raises RuntimeError as the op would."""
    if name != "auto":
        return BackendChoice(select_backend(name, problem).name, {}, {}, "asked for by name")
    skipped = []
    impl, row = _auto(problem, skipped)
    passed = "".join(f"; passed over {choice}: {why}" for choice, why in skipped)
    if row is not None:
        reason = f"the table's row for {row} ({row.timing} timings){passed}"
    elif problem.q.device.type == "cpu" and not triton_interpreted():
        reason = "CPU tensors run on the reference (the Triton kernels under TRITON_INTERPRET=1)"
    else:
        gpu, row = gpu_name(problem.q.device), _table_row(problem)
        if row is not None:
            where = f"no implementation ranked by the table's row for {row} can run this call"
        elif gpu is not None:
            where = f"no row of melt_kernels/auto_table.py for {gpu} fits this call"
        else:
            where = f"no table for {problem.q.device.type} tensors"
        reason = f"{where}{passed}: the fixed order {KERNEL_BACKENDS + ('reference',)}"
    return BackendChoice(impl.name, dict(impl.fwd_plan), dict(impl.bwd_plan), reason)


def explain_backend(problem: Problem) -> dict[str, Optional[str]]:
    """Per backend, why it would not run ``problem`` (None: it would), and under "auto" what "auto" runs and
    which row of the table decided (:class:`BackendChoice` in words)."""
    reasons = {name: why_not(name, problem) for name in (*KERNEL_BACKENDS, "composition")}
    reasons["auto"] = str(choose("auto", problem))
    return reasons


def which_backend(q, k, v, k_cache, v_cache, cache_seqlens, gate=None, gate_v=None, *, softmax_scale=None,
                  causal=True, backend="auto", max_seqlen_k=None, block_table=None) -> BackendChoice:
    """Which implementation ``melt_kernels.gated_kv_attention`` runs for these arguments, with which plan, and
    why (the table row that decided, or the fixed order): a :class:`BackendChoice`.  Runs and writes nothing.

    Takes the op's own arguments and reads them as the op does, in the current grad mode (a call that records
    gradients is the table's "training" regime).  Bad input raises as the op's does; a backend asked for by
    name that cannot run the call raises RuntimeError, as the op would.
    """
    problem = check_inputs(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale=softmax_scale,
                           causal=causal, backend=backend, max_seqlen_k=max_seqlen_k, block_table=block_table)
    return choose(backend, problem)
