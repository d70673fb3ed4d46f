"""Validation of ``gated_kv_attention``'s arguments (docs/op.md#bad-input).

Every backend goes through :func:`check_inputs`, and it runs before anything
is written, so a rejected call leaves both caches bit-identical.  Checks that
would need a device-to-host sync (the values of a CUDA ``cache_seqlens``) are
skipped; the kernels mask every access instead.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEQLEN_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "triton", "cuda", "composition", "reference")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
PAGE_MULTIPLE, MAX_PAGE_SIZE = 16, 256

Gate = Union[None, float, torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """A validated call: the tensors as given plus the derived sizes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor  # (B,) int32 on q.device
    gate: Gate  # retention for keys, as given (tensor, float or None)
    gate_v: Gate  # retention for values: gate_v if given, else gate
    softmax_scale: float
    causal: bool
    # max_b(L_b) + M when the lengths are known on the host, else None.
    max_seqlen_k: Optional[int]
    # The caller's max_seqlen_k (clamped to [M, S]) when the lengths are not on the host, else None: it sizes
    # the kernels' work split and may be wrong (they stay correct); the reference does not use it.
    seqlen_k_hint: Optional[int] = None
    # Paged caches (docs/op.md#paged-caches): (B, max_blocks) int32 on q's device; the caches are then
    # (num_blocks, page_size, Hkv, D) pools.
    block_table: Optional[torch.Tensor] = None
    # min_b(L_b) + M when the lengths are known on the host, else None (equal to max_seqlen_k when every row has
    # the same length: one mask for all rows, as PyTorch's attention takes it).
    min_seqlen_k: Optional[int] = None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_q(self) -> int:
        return self.q.shape[2]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def cache_len(self) -> int:
        """S: the positions a row can hold (max_blocks * page_size for paged caches)."""
        return cache_capacity(self.k_cache, self.block_table)

    @property
    def kv_shape(self) -> tuple:
        """(B, M, Hkv, D): the shape every gate broadcasts to."""
        return tuple(self.k.shape)


def cache_capacity(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """The logical positions of one row: S, or max_blocks * page_size through a block table."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")


def _check_gate(name: str, gate, kv_shape: tuple, device: torch.device) -> Gate:
    if gate is None:
        return None
    if isinstance(gate, bool):
        raise TypeError(f"{name} must be None, a float or a floating-point tensor, got bool")
    if isinstance(gate, numbers.Real):
        if not math.isfinite(float(gate)):
            raise ValueError(f"{name} must be finite, got {gate}")
        return float(gate)
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"{name} must be None, a float or a floating-point tensor, got {type(gate).__name__}")
    if gate.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {_dtype_name(gate.dtype)}")
    if gate.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {gate.device}")
    # PyTorch's rule, by hand: torch.broadcast_shapes costs tens of microseconds per call.
    shape = gate.shape
    if len(shape) > 4 or any(g != 1 and g != t for g, t in zip(reversed(shape), reversed(kv_shape))):
        raise ValueError(f"{name} of shape {tuple(shape)} does not broadcast to (B, M, Hkv, D) = {kv_shape}")
    return gate


def _check_cache_writable(name: str, cache: torch.Tensor) -> None:
    strides = cache.stride()
    if 0 in strides and any(st == 0 and sz > 1 for st, sz in zip(strides, cache.shape)):
        raise ValueError(f"{name} has a stride-0 (expanded) dimension: it is updated in place, so its "
                         f"elements must not alias; got strides {cache.stride()}")
    if torch.is_grad_enabled() and cache.requires_grad:
        base = cache._base if cache._is_view() else cache
        if base.is_leaf:
            raise ValueError(f"{name} is (a view of) a leaf tensor that requires grad and cannot be updated in "
                             f"place; pass a non-leaf (e.g. {name}.clone()) to differentiate through its values")


def lengths_on_host(cache_seqlens: torch.Tensor) -> bool:
    """Whether the lengths' values can be read without a device-to-host sync (then they are checked and give
    the exact max_seqlen_k)."""
    return cache_seqlens.device.type == "cpu"


def _check_block_table(block_table, batch: int, device: torch.device) -> None:
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be None or an int32 tensor of shape (B={batch}, max_blocks), "
                        f"got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {_dtype_name(block_table.dtype)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape (B={batch}, max_blocks) with max_blocks >= 1, "
                         f"got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
    if block_table.stride(1) != 1 and block_table.shape[1] > 1:
        raise ValueError(f"block_table must have a contiguous last dimension, got strides {block_table.stride()}")


def _check_pools(k_cache: torch.Tensor, v_cache: torch.Tensor, heads_kv: int, head_dim: int) -> None:
    num_blocks, page_size = k_cache.shape[:2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(t.shape) != (num_blocks, page_size, heads_kv, head_dim) or num_blocks < 1:
            raise ValueError(f"with a block_table, {name} must be a pool of shape (num_blocks, page_size, "
                             f"Hkv={heads_kv}, D={head_dim}) shared by both caches, got {tuple(t.shape)} "
                             f"(k_cache {tuple(k_cache.shape)})")
    check_page_size(page_size, "page_size (k_cache.shape[1])")


def check_page_size(page_size, name: str = "page_size") -> None:
    """Raises ValueError unless ``page_size`` is an int multiple of PAGE_MULTIPLE in [PAGE_MULTIPLE,
    MAX_PAGE_SIZE] (the op's pools and :class:`melt_kernels.PagePool` share the rule)."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size % PAGE_MULTIPLE or \
            not PAGE_MULTIPLE <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"{name} must be a multiple of {PAGE_MULTIPLE} in [{PAGE_MULTIPLE}, {MAX_PAGE_SIZE}], "
                         f"got {page_size!r}")


def _check_table_values(block_table: torch.Tensor, lengths: Optional[torch.Tensor], seqlen_q: int,
                        page_size: int, num_blocks: int) -> None:
    """Host-side table checks: the entries each row reads are in [0, num_blocks), and no two rows write the
    same physical slot.  Entries past a row's last needed block are never read and may hold anything (e.g.
    -1 padding).  Without the lengths on the host every entry is checked."""
    max_blocks = block_table.shape[1]
    if lengths is None:
        needed = torch.full((block_table.shape[0],), max_blocks, dtype=torch.int64)
    else:
        needed = (lengths.long() + seqlen_q + page_size - 1) // page_size
    used = torch.arange(max_blocks)[None, :] < needed[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is outside [0, num_blocks) = "
                         f"[0, {num_blocks}) and row {b} needs it")
    if lengths is None or block_table.shape[0] == 1:
        return
    # Two rows writing one physical slot would race; FlashAttention leaves that undefined, here it is cheap to
    # see on the host (B * M slots).  A row reading another's active slot is left undefined (documented).
    pos = lengths.long()[:, None] + torch.arange(seqlen_q)  # [B, M]
    slots = block_table.long().gather(1, pos // page_size) * page_size + pos % page_size
    if slots.unique().numel() != slots.numel():
        raise ValueError("block_table maps active positions of two rows to the same physical slot of the pools; "
                         "the rows' active pages must not alias")


def _check_seqlens(cache_seqlens, batch: int, seqlen_q: int, cache_len: int,
                   device: torch.device, page_size: Optional[int] = None) -> tuple[torch.Tensor, Optional[tuple]]:
    """Returns (lengths as an int32 (B,) tensor on ``device``, (min L_b + M, max L_b + M) or None)."""
    limit = cache_len - seqlen_q
    if page_size is not None and limit < 0:
        raise ValueError(f"block_table holds {cache_len // page_size} blocks of page_size {page_size} per row "
                         f"({cache_len} positions), fewer than the M={seqlen_q} active tokens")
    if limit < 0:
        raise ValueError(f"k_cache/v_cache hold S={cache_len} positions, fewer than the M={seqlen_q} active tokens")
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (numbers.Integral, torch.Tensor)):
        raise TypeError(f"cache_seqlens must be a Python int or an int32/int64 tensor of shape ({batch},), "
                        f"got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, numbers.Integral):
        length = int(cache_seqlens)
        if not 0 <= length <= limit:
            raise ValueError(f"cache_seqlens must be in [0, S - M] = [0, {limit}] (cache length S={cache_len}, "
                             f"M={seqlen_q} active tokens), got {length}")
        return torch.full((batch,), length, dtype=torch.int32, device=device), (length + seqlen_q,) * 2
    if cache_seqlens.dtype not in SEQLEN_DTYPES:
        raise TypeError(f"cache_seqlens must be int32 or int64, got {_dtype_name(cache_seqlens.dtype)}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device.type != "cpu" and cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on {device} like q (or on the CPU), got {cache_seqlens.device}")
    bounds = None
    if lengths_on_host(cache_seqlens):
        lo, hi = (int(x) for x in cache_seqlens.aminmax())
        if lo < 0 or hi > limit:
            bad = int(((cache_seqlens < 0) | (cache_seqlens > limit)).nonzero()[0, 0])
            where = "" if page_size is None else (f"; row {bad} needs more blocks of page_size {page_size} "
                                                  f"than block_table's {cache_len // page_size}")
            raise ValueError(f"cache_seqlens[{bad}] = {int(cache_seqlens[bad])} is outside [0, S - M] = "
                             f"[0, {limit}] (cache length S={cache_len}, M={seqlen_q} active tokens){where}")
        bounds = (lo + seqlen_q, hi + seqlen_q)
    lengths = cache_seqlens.to(device=device, dtype=torch.int32)
    return lengths, bounds


def _check_hint(max_seqlen_k, seqlen_q: int, cache_len: int) -> int:
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, numbers.Integral):
        raise TypeError(f"max_seqlen_k must be a Python int or None, got {type(max_seqlen_k).__name__}")
    # A bound outside [M, S] cannot be true; clamped, it still sizes the plan (a hint is never trusted).
    return min(max(int(max_seqlen_k), seqlen_q), cache_len)


def check_inputs(q, k, v, k_cache, v_cache, cache_seqlens, gate=None, gate_v=None, *,
                 softmax_scale=None, causal=True, backend="auto", max_seqlen_k=None, block_table=None) -> Problem:
    """Validates a call of ``gated_kv_attention``; raises ValueError/TypeError naming the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {_dtype_name(q.dtype)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {_dtype_name(q.dtype)}, got {_dtype_name(t.dtype)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")

    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    if batch < 1 or seqlen_q < 1:
        raise ValueError(f"q must have at least one row and one active token, got shape {tuple(q.shape)}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[3]) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"the number of query heads (q.shape[2] = {heads_q}) must be a multiple of the number "
                         f"of kv heads (k.shape[2] = {heads_kv})")
    kv_shape = (batch, seqlen_q, heads_kv, head_dim)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != kv_shape:
            raise ValueError(f"{name} must have shape (B, M, Hkv, D) = {kv_shape} to match q, got {tuple(t.shape)}")
    if block_table is None:
        cache_shape = (batch, k_cache.shape[1], heads_kv, head_dim)
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if tuple(t.shape) != cache_shape:
                raise ValueError(f"{name} must have shape (B, S, Hkv, D) = (B={batch}, S, Hkv={heads_kv}, "
                                 f"D={head_dim}) with S shared by both caches, got {tuple(t.shape)}")
    else:
        _check_block_table(block_table, batch, q.device)
        _check_pools(k_cache, v_cache, heads_kv, head_dim)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache_writable(name, t)
    cache_len = cache_capacity(k_cache, block_table)
    if k_cache.untyped_storage().data_ptr() == v_cache.untyped_storage().data_ptr() and \
            k_cache.storage_offset() == v_cache.storage_offset():
        raise ValueError("k_cache and v_cache must be distinct tensors, got the same memory for both")

    hint = None if max_seqlen_k is None else _check_hint(max_seqlen_k, seqlen_q, cache_len)
    lengths, bounds = _check_seqlens(cache_seqlens, batch, seqlen_q, cache_len, q.device,
                                     None if block_table is None else k_cache.shape[1])
    shortest, exact = bounds or (None, None)
    if block_table is not None and lengths_on_host(block_table):
        _check_table_values(block_table, lengths if exact is not None else None, seqlen_q, k_cache.shape[1],
                            k_cache.shape[0])

    if gate is None and gate_v is not None:
        raise ValueError("gate_v was given without gate: pass gate (the key retention) as well")
    gate = _check_gate("gate", gate, kv_shape, q.device)
    gate_v = gate if gate_v is None else _check_gate("gate_v", gate_v, kv_shape, q.device)

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    elif not math.isfinite(float(softmax_scale)):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    return Problem(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths, gate=gate,
                   gate_v=gate_v, softmax_scale=float(softmax_scale), causal=causal, max_seqlen_k=exact,
                   seqlen_k_hint=hint if exact is None else None, block_table=block_table, min_seqlen_k=shortest)
