"""The CUDA C++ backend: the kernels of ``csrc/`` (extension ``melt_kernels._cuda``) behind the shared
validation (``melt_kernels.checks``) and autograd (``melt_kernels.autograd``).

Forward (``csrc/gated_kv_attention.cuh`` has the details and the ownership rule of the active slots):

* decode path, M * G <= 64 packed query rows (token, query head of a kv head): one attention launch; the
  block whose key split holds positions L_b .. L_b+M-1 blends them in registers, stores them and is the only
  block that reads them;
* chunk path (more rows, e.g. M = 512): a small blend launch (one writer per slot), then the attention launch;
* when the keys are cut into splits (flash-decoding, chosen by :func:`num_splits`), a combine launch merges
  the partial results by their log-sum-exp, in split order (deterministic).

Backward: the Triton backend's kernels (``melt_kernels.triton_backend.BACKEND.bwd``), imported when first
needed: the CUDA backend has no backward kernels of its own.

Runs float16/bfloat16 with head_dim 64 or 128 and 16-byte aligned rows on a GPU the build has code for;
:func:`unsupported` gives the reason otherwise, and "auto" then picks the Triton backend.  Python passes
pointers, element strides and the current stream; the extension never sees a torch tensor.  It is compiled
only with ``MELT_BUILD_CUDA=1``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

try:
    from melt_kernels import _cuda
except ImportError as e:  # not built (ModuleNotFoundError), or built but not loadable
    raise ModuleNotFoundError(
        f"melt_kernels._cuda could not be imported ({e}); reinstall with MELT_BUILD_CUDA=1, e.g. "
        f"`MELT_BUILD_CUDA=1 pip install --no-build-isolation -e .` (needs nvcc, pybind11 and ninja)",
        name="melt_kernels._cuda") from e

from melt_kernels.backends import Backend
from melt_kernels.checks import Problem, cache_capacity
from melt_kernels.reference import read_active

HEAD_DIMS = (64, 128)
_DTYPES = {torch.float16: _cuda.FLOAT16, torch.bfloat16: _cuda.BFLOAT16}
_GATE_DTYPES = {torch.float16: _cuda.GATE_FLOAT16, torch.bfloat16: _cuda.GATE_BFLOAT16,
                torch.float32: _cuda.GATE_FLOAT32, torch.float64: _cuda.GATE_FLOAT64}
# Blocks of 128 threads per multiprocessor that the split heuristic counts on (shared memory allows 2 at D=128).
_BLOCKS_PER_SM = 2
MAX_SPLITS = 64
_INT_MAX = 2**31 - 1


def _row_strides(t: torch.Tensor) -> tuple:
    """(batch, seq, head) strides, 0 on size-1 dimensions (never stepped along, so their stride is free)."""
    return tuple(st if sz > 1 else 0 for st, sz in zip(t.stride()[:3], t.shape[:3]))


def _kernel_reason(q, k, v, k_cache, v_cache) -> Optional[str]:
    """Why the kernels cannot take these tensors (device aside), or None."""
    batch, seqlen_q, heads_q, _ = q.shape
    if k_cache.shape[1] > _INT_MAX or batch * heads_q * seqlen_q > _INT_MAX:
        return (f"backend 'cuda' indexes cache positions and query rows in 32 bits; S = {k_cache.shape[1]} "
                f"positions and B * Hq * M = {batch * heads_q * seqlen_q} rows must stay below 2**31")
    if q.dtype not in _DTYPES:
        return (f"backend 'cuda' runs float16 and bfloat16, got {str(q.dtype).replace('torch.', '')} "
                f"(backend 'triton' runs it)")
    if q.shape[3] not in HEAD_DIMS:
        return (f"backend 'cuda' is built for head_dim 64 and 128, got {q.shape[3]} "
                f"(backend 'triton' runs every head_dim from 16 to 256)")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16 or any(st % 8 for st in _row_strides(t)):
            return (f"backend 'cuda' needs 16-byte aligned rows (data pointer and batch/seq/head strides in "
                    f"multiples of 8 elements); {name} has pointer offset {t.data_ptr() % 16} bytes and strides "
                    f"{tuple(t.stride())}")
    return None


def _parse_target(target: str) -> tuple[str, int, int, bool]:
    """"sm_90a" -> ("sm", 9, 0, True): kind, compute capability, arch-specific suffix."""
    kind, _, number = target.partition("_")
    digits = number.rstrip("af")
    major, minor = divmod(int(digits), 10)
    return kind, major, minor, digits != number


@functools.lru_cache(maxsize=None)
def _arch_reason(device: torch.device) -> Optional[str]:
    """Why this build has no code for the GPU of ``device``, or None (asked at every call: cached)."""
    cap = torch.cuda.get_device_capability(device)
    for target in _cuda.built_archs():
        kind, major, minor, specific = _parse_target(target)
        if kind == "sm" and ((major, minor) == cap if specific else (major == cap[0] and minor <= cap[1])):
            return None
        if kind == "compute" and (major, minor) <= cap:  # PTX, compiled by the driver
            return None
    return (f"melt_kernels._cuda holds code for {', '.join(_cuda.built_archs())}, not for this GPU "
            f"(sm_{cap[0]}{cap[1]}): rebuild with MELT_CUDA_ARCHS={cap[0]}{cap[1]}")


def unsupported(problem: Problem) -> Optional[str]:
    """Why the CUDA kernels cannot run ``problem`` (None when they can)."""
    p = problem
    reason = _kernel_reason(p.q, p.k, p.v, p.k_cache, p.v_cache)
    if reason is None and p.q.device.type == "cuda":
        reason = _arch_reason(p.q.device)
    return reason


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(blocks: int, max_tiles: int, sms: int) -> int:
    """Key splits per block (flash-decoding), FlashAttention's rule: the fewest splits whose waves fill the
    GPU within 85% of the best, counting only split counts that change the tiles per split."""
    slots = _BLOCKS_PER_SM * sms
    if blocks >= 0.8 * slots or max_tiles <= 1:
        return 1
    limit = min(MAX_SPLITS, slots, max_tiles)
    candidates = [s for s in range(1, limit + 1)
                  if s == 1 or math.ceil(max_tiles / s) != math.ceil(max_tiles / (s - 1))]

    def efficiency(s):
        waves = blocks * s / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in candidates)
    return next(s for s in candidates if efficiency(s) >= 0.85 * best)


def _gate_arg(gate, kv_shape: tuple) -> tuple:
    """(kind, pointer, (B, M, Hkv, D) strides, alpha, 1 - alpha) for a gate given as None, float or tensor."""
    if gate is None:
        return _cuda.GATE_NONE, 0, (0, 0, 0, 0), 0.0, 1.0
    if isinstance(gate, float):
        # 1 - alpha in double, then rounded to float32, as PyTorch does with a Python scalar.
        return _cuda.GATE_SCALAR, 0, (0, 0, 0, 0), gate, 1.0 - gate
    view = gate.expand(kv_shape)  # stride 0 on the broadcast dimensions: no copy
    return _GATE_DTYPES[gate.dtype], view.data_ptr(), tuple(view.stride()), 0.0, 1.0


def _launch(entry, q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal, max_seqlen_k,
            splits: Optional[int], sms: int, block_table: Optional[torch.Tensor] = None, **extra):
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    cache_len = cache_capacity(k_cache, block_table)
    # Only the number of splits depends on it: each split takes its share of its row's true key tiles.
    max_prefix = max(0, min(cache_len if max_seqlen_k is None else max_seqlen_k, cache_len) - seqlen_q)
    block_m, block_n = _cuda.BLOCK_M, _cuda.BLOCK_N
    row_tiles = -(-seqlen_q * (heads_q // heads_kv) // block_m)
    if splits is None:
        splits = num_splits(batch * heads_kv * row_tiles, -(-max_prefix // block_n) + -(-seqlen_q // block_n), sms)
    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    o_part = lse_part = None
    if splits > 1:
        rows = batch * heads_q * seqlen_q
        o_part = torch.empty((splits, rows, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
    seqlens = cache_seqlens.to(dtype=torch.int32).contiguous()  # (B,): tiny
    kv_shape = tuple(k.shape)

    def arg(t):
        return t.data_ptr(), _row_strides(t)

    # Pools: the table gives the page; their batch stride is the page stride (kept when num_blocks is 1: 0).
    table = (0, 0, 0, 0) if block_table is None else (block_table.data_ptr(), block_table.stride(0),
                                                      k_cache.shape[1], k_cache.shape[0])

    entry(q=arg(q), k=arg(k), v=arg(v), k_cache=arg(k_cache), v_cache=arg(v_cache), out=arg(out),
          seqlens=seqlens.data_ptr(), lse=lse.data_ptr(),
          o_part=0 if o_part is None else o_part.data_ptr(), lse_part=0 if lse_part is None else lse_part.data_ptr(),
          sizes=(batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len),
          gate=_gate_arg(gate, kv_shape), gate_v=_gate_arg(gate_v, kv_shape), softmax_scale=float(softmax_scale),
          causal=bool(causal), num_splits=splits, dtype=_DTYPES[q.dtype], block_table=table, **extra)
    return out, lse


def gated_kv_attention_fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                           max_seqlen_k=None, *, block_table: Optional[torch.Tensor] = None,
                           splits: Optional[int] = None, k_new=None, v_new=None, k_old=None, v_old=None):
    """In-place gated update of the active slots and attention over the updated caches
    (docs/op.md#the-cache-update, docs/op.md#the-attention-read).

    Same signature and result as ``melt_kernels.reference.gated_kv_attention_ref_fwd``: returns
    (out (B, M, Hq, D) in q.dtype, lse (B, Hq, M) float32), launched on the current stream of q's device;
    the active slots' values before and after the update are copied into ``k_old``/``v_old`` and
    ``k_new``/``v_new`` when given (the kernels do not write them).  ``block_table``: paged caches
    (docs/op.md#paged-caches).  ``splits`` forces the number of key splits (tests and tuning).
    """
    if q.device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got tensors on {q.device.type}")
    reason = _kernel_reason(q, k, v, k_cache, v_cache) or _arch_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    with torch.cuda.device(q.device):
        read_active(k_cache, cache_seqlens, block_table, k_old)
        read_active(v_cache, cache_seqlens, block_table, v_old)
        out, lse = _launch(_cuda.fwd, q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                           max_seqlen_k, splits, _num_sms(q.device), block_table,
                           stream=torch.cuda.current_stream(q.device).cuda_stream)
        read_active(k_cache, cache_seqlens, block_table, k_new)
        read_active(v_cache, cache_seqlens, block_table, v_new)
    return out, lse


def gated_kv_attention_fwd_emulated(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                                    max_seqlen_k=None, *, block_table: Optional[torch.Tensor] = None,
                                    splits: Optional[int] = None, sms: int = 4,
                                    order="forward", record: bool = False, fault: Optional[str] = None):
    """:func:`gated_kv_attention_fwd` on CPU tensors: the same launches, the kernels' own source run by the
    host emulator of ``csrc/emulate.h`` (one std::thread per GPU thread; slow, for small tests).  ``sms`` is
    the multiprocessor count the split heuristic assumes.

    The blocks of each launch run one at a time in ``order``: "forward", "reverse", or an int, the seed of a
    shuffle (another permutation per launch).  With ``record``, returns (out, lse, launches): per launch a dict
    (kernel, blocks, reads, writes: the global accesses made, conflict_bytes, conflicts) where ``conflicts``
    lists (address, tensor, writer block, other block, "write"/"read") for the first bytes of global memory
    that one block writes and another block of the same launch reads or writes: a race on a GPU, where blocks
    run in any order and at once.  ``fault="non_owner_reads_active"`` plants such a race (tests only).
    """
    if q.device.type != "cpu":
        raise RuntimeError(f"the emulator runs on CPU tensors, got tensors on {q.device.type}")
    reason = _kernel_reason(q, k, v, k_cache, v_cache)
    if reason is not None:
        raise RuntimeError(reason)
    if isinstance(order, bool) or not (order in ("forward", "reverse") or isinstance(order, int)):
        raise ValueError(f"order must be 'forward', 'reverse' or an int (the seed of a shuffle), got {order!r}")
    faults = {None: _cuda.FAULT_NONE, "non_owner_reads_active": _cuda.FAULT_NON_OWNER_READS_ACTIVE}
    if fault not in faults:
        raise ValueError(f"fault must be one of {sorted(f for f in faults if f)} or None, got {fault!r}")
    options = dict(order={"forward": _cuda.ORDER_FORWARD, "reverse": _cuda.ORDER_REVERSE}.get(order,
                                                                                             _cuda.ORDER_SHUFFLE),
                   seed=0 if isinstance(order, str) else order % 2**64, record=record, fault=faults[fault])
    call = {}

    def entry(**kwargs):
        call.update(kwargs)
        call["launches"] = _cuda.fwd_emulated(**kwargs, **options)

    out, lse = _launch(entry, q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                       max_seqlen_k, splits, sms, block_table)
    if not record:
        return out, lse
    named = dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, out=out, lse=lse, cache_seqlens=cache_seqlens,
                 gate=gate, gate_v=gate_v, block_table=block_table)
    spans = [(name, t.data_ptr(), t.data_ptr() + _extent_bytes(t)) for name, t in named.items()
             if isinstance(t, torch.Tensor)]
    splits, rows, head_dim = call["num_splits"], q.shape[0] * q.shape[1] * q.shape[2], q.shape[3]
    if call["o_part"]:  # the float32 workspaces of the splits' partial results
        spans += [("o_part", call["o_part"], call["o_part"] + 4 * splits * rows * head_dim),
                  ("lse_part", call["lse_part"], call["lse_part"] + 4 * splits * rows)]

    def tensor_at(address):
        return next((name for name, lo, hi in spans if lo <= address < hi), "?")

    launches = [dict(launch, conflicts=[(address, tensor_at(address), writer, other, "write" if writes else "read")
                                        for address, writer, other, writes in launch["conflicts"]])
                for launch in call["launches"]]
    return out, lse, launches


def _extent_bytes(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to just past its last (strides honoured)."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def gated_kv_attention_bwd(*args, **kwargs):
    """The backward for this backend: the Triton backend's kernels, imported on first use."""
    from melt_kernels.triton_backend import BACKEND as TRITON

    return TRITON.bwd(*args, **kwargs)


BACKEND = Backend("cuda", gated_kv_attention_fwd, gated_kv_attention_bwd, unsupported)
