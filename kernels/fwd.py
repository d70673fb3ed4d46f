"""The forward launcher: the gated in-place update of the active slots and attention over the updated caches
(docs/op.md#the-cache-update, docs/op.md#the-attention-read), by one of two paths.

* decode (M * G <= DECODE_ROWS rows per kv head, DECODE_ROWS_FP32 in float32): one launch blends and attends (kernels/decode.py), and a
  merge launch (kernels/merge.py) combines its splits unless one split covers the row or the last split
  merges them itself;
* chunk: a blend launch (kernels/blend.py), then FlashAttention-2's attention over the cache
  (kernels/chunk_fwd.py), then the merge when its rows' keys are cut into splits.

Either path writes, when asked, the active slots' values after the update (``k_new``/``v_new``) and before it
(``k_old``/``v_old``) into (B, M, Hkv, D) buffers: what the backward reads (melt_kernels/autograd.py).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import triton

from melt_kernels.kernels.blend import BLOCK_SLOTS, blend_grid, blend_kernel, gate_args
from melt_kernels.kernels.chunk_fwd import ChunkPlan, chunk_attention_kernel, chunk_grid, plan_chunk
from melt_kernels.kernels.decode import DecodePlan, decode_grid, decode_kernel, decode_rows, plan_decode
from melt_kernels.kernels.launch import (aligned, arrival_counters, check_grids, device_guard, needs_wide_offsets,
                                         num_sms)
from melt_kernels.kernels.merge import merge_block_rows, merge_grid, merge_kernel
from melt_kernels.kernels.tile_ops import LOG2E

Plan = Union[DecodePlan, ChunkPlan]
PATHS = ("decode", "chunk")
# The plans are pure functions of a few ints, asked for at every call with the same few shapes.
_plan_decode = functools.lru_cache(maxsize=4096)(plan_decode)
_plan_chunk = functools.lru_cache(maxsize=4096)(plan_chunk)


def path_of(seqlen_q: int, heads_q: int, heads_kv: int, elem_size: int = 2) -> str:
    """The path a call takes by default: decode when one program holds the rows of a kv head (for elements of
    ``elem_size`` bytes)."""
    return "decode" if seqlen_q * (heads_q // heads_kv) <= decode_rows(elem_size) else "chunk"


def plan_forward(batch: int, seqlen_q: int, heads_q: int, heads_kv: int, head_dim: int, max_prefix: int, sms: int,
                 elem_size: int = 2, *, aligned: bool = True, path: Optional[str] = None, **overrides) -> Plan:
    """The plan of a call: its path (``path`` forces one) and that path's planner's choices."""
    path = path or path_of(seqlen_q, heads_q, heads_kv, elem_size)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "decode" and seqlen_q * (heads_q // heads_kv) > decode_rows(elem_size):
        raise ValueError(f"the decode path holds at most {decode_rows(elem_size)} rows (M * Hq / Hkv) per program "
                         f"for {elem_size}-byte elements, got {seqlen_q * (heads_q // heads_kv)}")
    planner = _plan_decode if path == "decode" else _plan_chunk
    return planner(batch, seqlen_q, heads_q, heads_kv, head_dim, max_prefix, sms, elem_size, aligned=aligned,
                   **overrides)


def fwd_grids(batch: int, heads_kv: int, seqlen_q: int, rows: int, plan: Plan) -> dict:
    """The grid of each launch of a call, in launch order."""
    if isinstance(plan, DecodePlan):
        grids = {"decode_kernel": decode_grid(batch, heads_kv, plan)}
        merged_in_place = plan.fold_merge
    else:
        grids = {"blend_kernel": blend_grid(batch, heads_kv, seqlen_q),
                 "chunk_attention_kernel": chunk_grid(batch, heads_kv, plan)}
        merged_in_place = False
    if not plan.direct and not merged_in_place:
        grids["merge_kernel"] = merge_grid(batch, heads_kv, rows)
    return grids


def gated_kv_attention_fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                           max_seqlen_k=None, *, block_table=None, k_new=None, v_new=None, k_old=None, v_old=None,
                           input_precision=None, path=None, **overrides):
    """In-place gated update of the active slots and attention over the updated caches.

    Same signature and result as ``melt_kernels.reference.gated_kv_attention_ref_fwd``: returns
    (out (B, M, Hq, D) in q.dtype, lse (B, Hq, M) float32), launched on q's device and its current stream.
    ``max_seqlen_k`` sizes the split-KV plan (the cache capacity when None); it need not bound the lengths:
    the last split of each row reaches its true length.  ``block_table``: paged caches
    (docs/op.md#paged-caches), the caches then being pools.  ``k_new``, ``v_new``, ``k_old``, ``v_old``:
    None or contiguous (B, M, Hkv, D) buffers of the cache dtype that receive the active slots' values after
    and before the update (``k_old``/``v_old`` only with a gate).  Keyword overrides (tests and tuning):
    ``path`` ("decode" or "chunk"), the planner's ``block_r``/``block_n`` (powers of two >= 16),
    ``split_len``, ``num_warps``, ``num_stages``, and for decode ``fold_merge``; ``input_precision`` of
    float32 dot products ("ieee" by default; "tf32" opts into TF32).
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    cache_len = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    groups = heads_q // heads_kv
    rows = seqlen_q * groups
    max_prefix = max(0, min(cache_len if max_seqlen_k is None else max_seqlen_k, cache_len) - seqlen_q)
    device = q.device
    plan = plan_forward(batch, seqlen_q, heads_q, heads_kv, head_dim, max_prefix, num_sms(device),
                        q.element_size(), aligned=aligned(q, k, v, k_cache, v_cache), path=path, **overrides)
    grids = fwd_grids(batch, heads_kv, seqlen_q, rows, plan)
    check_grids(grids)
    precision = (input_precision or "ieee") if q.dtype == torch.float32 else None  # ignored for 16-bit operands
    fix_bf16 = q.dtype == torch.bfloat16 and device.type == "cpu"  # the interpreter
    wide = needs_wide_offsets([q, k_cache, v_cache] if not paged else [q], plan.block_n,
                              pools=[k_cache, v_cache] if paged else ())

    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=device)
    if plan.direct:
        o_part = lse_part = lse  # unused
    else:
        # One allocation for both: the partial outputs (parts, D), then their lse (parts,).
        parts = batch * heads_kv * plan.splits * rows
        workspace = torch.empty(parts * (head_dim + 1), dtype=torch.float32, device=device)
        o_part, lse_part = workspace[:parts * head_dim], workspace[parts * head_dim:]
    kv_shape = (batch, seqlen_q, heads_kv, head_dim)
    gk_kind, gk, s_gk, gk_alpha, gk_beta = gate_args(gate, k, kv_shape)
    gv_kind, gv, s_gv, gv_alpha, gv_beta = gate_args(gate_v, v, kv_shape)
    # The side outputs share one layout: contiguous (B, M, Hkv, D); absent ones point at k (never written).
    side = [t if t is not None else k for t in (k_new, v_new, k_old, v_old)]
    s_side = (seqlen_q * heads_kv * head_dim, heads_kv * head_dim, head_dim)
    table = block_table if paged else cache_seqlens
    blend_args = (k, v, k_cache, v_cache, cache_seqlens, table, gk, gv, *side,
                  *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
                  block_table.stride(0) if paged else 0, *s_gk, *s_gv, *s_side, gk_alpha, gk_beta, gv_alpha, gv_beta)
    blend_flags = dict(D=head_dim, GATE_K=gk_kind, GATE_V=gv_kind, SAVE_NEW_K=k_new is not None,
                       SAVE_NEW_V=v_new is not None, SAVE_OLD_K=k_old is not None, SAVE_OLD_V=v_old is not None,
                       PAGED=paged, WIDE=wide, FIX_BF16=fix_bf16)
    out_args = (*out.stride()[:3], lse.stride(0), lse.stride(1))
    qk_scale = softmax_scale * LOG2E

    with device_guard(device):
        if isinstance(plan, DecodePlan):
            counters = arrival_counters(device, batch * heads_kv) if plan.fold_merge else lse
            (q_b, q_m, q_h) = q.stride()[:3]
            # decode_kernel's arguments: blend_args with q, out, lse and the workspace spliced in.
            decode_kernel[grids["decode_kernel"]](
                q, *blend_args[:12], out, lse, o_part, lse_part, counters, q_b, q_m, q_h, *blend_args[12:],
                *out_args, qk_scale, seqlen_q, cache_len, heads_kv, plan.splits, plan.split_len, page_size,
                k_cache.shape[0], G=groups, CAUSAL=causal, DIRECT=plan.direct, FOLD_MERGE=plan.fold_merge,
                PRECISION=precision, BLOCK_R=plan.block_r, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d,
                num_warps=plan.num_warps, num_stages=plan.num_stages, enable_fp_fusion=False, **blend_flags)
        else:
            blend_kernel[grids["blend_kernel"]](
                *blend_args, seqlen_q, cache_len, heads_kv, triton.cdiv(seqlen_q, BLOCK_SLOTS), page_size,
                k_cache.shape[0], BLOCK_N=BLOCK_SLOTS, BLOCK_D=plan.block_d, num_warps=4,
                # alpha*old and (1-alpha)*fresh rounded separately, as PyTorch does: no FMA contraction.
                enable_fp_fusion=False, **blend_flags)
            chunk_attention_kernel[grids["chunk_attention_kernel"]](
                q, k_cache, v_cache, cache_seqlens, table, out, lse, o_part, lse_part, *q.stride()[:3],
                *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0) if paged else 0, *out_args,
                qk_scale, seqlen_q, cache_len, heads_kv, batch * heads_kv, plan.row_blocks, plan.splits,
                plan.split_len, page_size, k_cache.shape[0],
                G=groups, D=head_dim, CAUSAL=causal, DIRECT=plan.direct, PAGED=paged, WIDE=wide,
                PRECISION=precision, FIX_BF16=fix_bf16, BLOCK_R=plan.block_r, BLOCK_N=plan.block_n,
                BLOCK_D=plan.block_d, num_warps=plan.num_warps, num_stages=plan.num_stages,
                # Only the blend must round alpha*old and (1-alpha)*fresh separately: the attention contracts.
                enable_fp_fusion=True)
        if "merge_kernel" in grids:
            merge_kernel[grids["merge_kernel"]](
                o_part, lse_part, out, lse, *out_args, seqlen_q, heads_kv, plan.splits,
                triton.cdiv(rows, merge_block_rows(rows)), G=groups, D=head_dim, BLOCK_R=merge_block_rows(rows),
                BLOCK_D=plan.block_d, FIX_BF16=fix_bf16, num_warps=4, enable_fp_fusion=True)
    return out, lse
