"""The blend of the active slots (docs/op.md#the-cache-update) as launches of their own, and its backward.

* :func:`blend_kernel`, the chunk path's first launch: one program per (b, kv head, block of BLOCK_SLOTS
  active slots) blends the fresh keys and values into the caches, rounded once, and writes what the backward
  reads of the slots (their values after and, for a gate's gradient, before the update) as (B, M, Hkv, D)
  side outputs.  Each slot has one writer, and the attention launch that follows on the same stream only
  reads: the update is race-free by stream order.  Compiled without FMA contraction, so that alpha*old and
  (1-alpha)*fresh are rounded separately, as PyTorch does; the attention kernel keeps it.
* :func:`blend_bwd_kernel`, the training call's last launch (docs/op.md#gradients): from attention's gradient
  of the slots' new values (the dK/dV kernel's) plus what later uses gave them (read from the caches'
  gradient), the fresh values' gradient ((1 - alpha) d), the old values' (alpha d, written into the caches'
  gradient in place) and the gate's (d (old - fresh), summed over channels for a gate per head).  Folding
  this into the dK/dV kernel's epilogue kept five more [128, D] tiles live beside its two accumulators: 2 KB
  of spills per thread (sm_90); alone it is an elementwise pass over a few slot-sized tensors.

Both are memory-bound and move a few (B, M, Hkv, D) tensors, never a cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from melt_kernels.kernels.tile_ops import GATE_NONE, GATE_SCALAR, GATE_TENSOR, blend_tile, cache_offsets, round_to

BLOCK_SLOTS = 16  # slots per program: 16 x D tiles keep a few loads in flight per thread at every head_dim


@triton.jit
def blend_kernel(
    K, V, KC, VC, SEQLENS, BT, GK, GV, KN, VN, KO, VO,
    s_kb, s_km, s_kh, s_vb, s_vm, s_vh, s_kcb, s_kcn, s_kch, s_vcb, s_vcn, s_vch, s_btb,
    s_gkb, s_gkm, s_gkh, s_gkd, s_gvb, s_gvm, s_gvh, s_gvd, s_nb, s_nm, s_nh,
    gk_alpha, gk_beta, gv_alpha, gv_beta, M, S, HKV, NTILES, PAGE, NB,
    D: tl.constexpr, GATE_K: tl.constexpr, GATE_V: tl.constexpr, SAVE_NEW_K: tl.constexpr,
    SAVE_NEW_V: tl.constexpr, SAVE_OLD_K: tl.constexpr, SAVE_OLD_V: tl.constexpr, PAGED: tl.constexpr,
    WIDE: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Active slots [L_b + n * BLOCK_N, ... + BLOCK_N) of (b, h) per program: grid (B * Hkv * NTILES,)."""
    i_bh, i_n = tl.program_id(0) // NTILES, tl.program_id(0) % NTILES
    i_b, i_h = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    # The attention launch clamps the same way, so both see the same slots, and a bad CUDA length never moves
    # an access outside [0, S).
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), tl.maximum(S - M, 0))
    o_i = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_i = o_i < M
    BT = BT + i_b * s_btb
    KC = KC + i_h * s_kch
    VC = VC + i_h * s_vch
    if not PAGED:
        KC = KC + i_b * s_kcb
        VC = VC + i_b * s_vcb
    p_n = i_b * s_nb + i_h * s_nh
    blend_tile(KC, K + i_b * s_kb + i_h * s_kh, GK + i_b * s_gkb + i_h * s_gkh, KN + p_n, KO + p_n, BT,
               gk_alpha, gk_beta, o_i, m_i, L, S, s_kcb, s_kcn, s_km, s_gkm, s_gkd, s_nm, PAGE, NB,
               GATE_K, SAVE_NEW_K, SAVE_OLD_K, PAGED, WIDE, D, BLOCK_D, FIX_BF16)
    blend_tile(VC, V + i_b * s_vb + i_h * s_vh, GV + i_b * s_gvb + i_h * s_gvh, VN + p_n, VO + p_n, BT,
               gv_alpha, gv_beta, o_i, m_i, L, S, s_vcb, s_vcn, s_vm, s_gvm, s_gvd, s_nm, PAGE, NB,
               GATE_V, SAVE_NEW_V, SAVE_OLD_V, PAGED, WIDE, D, BLOCK_D, FIX_BF16)


def blend_grid(batch: int, heads_kv: int, seqlen_q: int) -> tuple:
    return (batch * heads_kv * triton.cdiv(seqlen_q, BLOCK_SLOTS),)


def gate_args(gate, like: torch.Tensor, kv_shape: tuple):
    """(kind, pointer, strides (b, m, h, d), alpha, 1 - alpha) of a gate given as None, a float or a tensor;
    ``like`` stands in for the pointer of a gate that is not a tensor."""
    if gate is None:
        return GATE_NONE, like, (0, 0, 0, 0), 0., 0.
    if isinstance(gate, float):
        # 1 - alpha in double, then rounded, as PyTorch does for a Python scalar.
        return GATE_SCALAR, like, (0, 0, 0, 0), gate, 1. - gate
    # The strides of gate.expand(kv_shape), without building the view: 0 on broadcast dimensions.
    pad = (0,) * (4 - gate.dim())
    strides = pad + tuple(st if sz > 1 else 0 for st, sz in zip(gate.stride(), gate.shape))
    return GATE_TENSOR, gate, strides, 0., 0.


@triton.jit
def blend_grad_tile(b_d, p_buf, FRESH, OLD, GATE, DX, DGATE, g_alpha, g_beta, o_i, m_i, s_xm, s_gm, s_gd, s_row,
                s_grow, o_d, m_d, GATE_KIND: tl.constexpr, GRAD_IN: tl.constexpr, UPDATE: tl.constexpr,
                NEED_DGATE: tl.constexpr, DGATE_ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """The blend's backward at active slots ``o_i`` of one (b, kv head) (``m_i``: those that exist), given
    ``b_d`` [BN, BD], attention's gradient of the slots' new values (docs/op.md#gradients).

    ``p_buf`` [BN, BD]: the slots in the cache's gradient buffer, which holds what later uses gave the new
    values (GRAD_IN) and receives the old values' gradient (UPDATE).  FRESH (row stride ``s_xm``) and GATE
    point at the (b, h) slices of the fresh values and the gate; OLD and DX at those of the old values and of
    the fresh values' gradient, contiguous (B, M, Hkv, D) (row stride ``s_row`` = Hkv * D); DGATE at the
    gate's gradient, float32, (B, M, Hkv) summed over channels with DGATE_ROWS, else (B, M, Hkv, D) (row
    stride ``s_grow``).
    """
    m_x = m_i[:, None] & m_d[None, :]
    o_i64 = o_i.to(tl.int64)
    if GRAD_IN:
        b_d += tl.load(p_buf, mask=m_x, other=0.).to(tl.float32)
    if GATE_KIND == 2:
        b_a = tl.load(GATE + o_i64[:, None] * s_gm + o_d[None, :] * s_gd, mask=m_x, other=0.).to(tl.float32)
        b_dx = (1. - b_a) * b_d
        b_dold = b_a * b_d
        if NEED_DGATE:
            b_old = tl.load(OLD + o_i64[:, None] * s_row + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
            b_fresh = tl.load(FRESH + o_i64[:, None] * s_xm + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
            b_da = b_d * (b_old - b_fresh)
            if DGATE_ROWS:
                tl.store(DGATE + o_i64 * s_grow, tl.sum(b_da, 1), mask=m_i)
            else:
                tl.store(DGATE + o_i64[:, None] * s_grow + o_d[None, :], b_da, mask=m_x)
    elif GATE_KIND == 1:
        b_dx = g_beta * b_d
        b_dold = g_alpha * b_d
    else:
        # Write-through: the old value never reaches the output.
        b_dx = b_d
        b_dold = tl.zeros_like(b_d)
    tl.store(DX + o_i64[:, None] * s_row + o_d[None, :], round_to(b_dx, DX.dtype.element_ty, UPCAST), mask=m_x)
    if UPDATE:
        tl.store(p_buf, round_to(b_dold, p_buf.dtype.element_ty, UPCAST), mask=m_x)


@triton.jit
def blend_bwd_kernel(
    DK_ATTN, DV_ATTN, BUF_K, BUF_V, SEQLENS, BT, K, V, KO, VO, GK, GV, DK, DV, DGK, DGV,
    s_kb, s_km, s_kh, s_vb, s_vm, s_vh, s_bkb, s_bkn, s_bkh, s_bvb, s_bvn, s_bvh, s_btb,
    s_gkb, s_gkm, s_gkh, s_gkd, s_gvb, s_gvm, s_gvh, s_gvd,
    gk_alpha, gk_beta, gv_alpha, gv_beta, M, S, HKV, NTILES, PAGE, NB,
    D: tl.constexpr, GATE_K: tl.constexpr, GATE_V: tl.constexpr, GRAD_IN_K: tl.constexpr,
    GRAD_IN_V: tl.constexpr, UPDATE_K: tl.constexpr, UPDATE_V: tl.constexpr, NEED_DGATE_K: tl.constexpr,
    NEED_DGATE_V: tl.constexpr, DGATE_ROWS_K: tl.constexpr, DGATE_ROWS_V: tl.constexpr, PAGED: tl.constexpr,
    WIDE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Active slots [n * BLOCK_N, ... + BLOCK_N) of (b, h) per program: grid (B * Hkv * NTILES,).

    DK_ATTN/DV_ATTN (float32), KO/VO, DK/DV and the per-channel gate gradients DGK/DGV are contiguous
    (B, M, Hkv, D), per-row gate gradients (B, M, Hkv); BUF_K/BUF_V are the caches' gradient buffers (pools
    through the table when PAGED); K, V and the gates have the strides given.
    """
    i_bh, i_n = tl.program_id(0) // NTILES, tl.program_id(0) % NTILES
    i_b, i_h = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), tl.maximum(S - M, 0))
    o_i = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_i = o_i < M
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_x = m_i[:, None] & m_d[None, :]
    BT = BT + i_b * s_btb
    o_slot = cache_offsets(BT, L + o_i, m_i & (L + o_i < S), s_bkb, s_bkn, PAGE, NB, PAGED, WIDE)
    p_bk = BUF_K + i_h * s_bkh + o_slot[:, None] + o_d[None, :]
    o_slot = cache_offsets(BT, L + o_i, m_i & (L + o_i < S), s_bvb, s_bvn, PAGE, NB, PAGED, WIDE)
    p_bv = BUF_V + i_h * s_bvh + o_slot[:, None] + o_d[None, :]
    if not PAGED:
        p_bk += i_b * s_bkb
        p_bv += i_b * s_bvb
    # Side tensors: contiguous (B, M, Hkv, D) from row (b, 0, h); per-row gate gradients (B, M, Hkv).
    p_rows = i_b * M * HKV + i_h
    p_side = p_rows * D
    row_len = HKV * D  # their row stride: a few thousand elements, no index in it
    o_x = o_i.to(tl.int64)[:, None] * row_len + o_d[None, :]
    b_dk = tl.load(DK_ATTN + p_side + o_x, mask=m_x, other=0.)
    blend_grad_tile(b_dk, p_bk, K + i_b * s_kb + i_h * s_kh, KO + p_side, GK + i_b * s_gkb + i_h * s_gkh, DK + p_side,
                    DGK + (p_rows if DGATE_ROWS_K else p_side), gk_alpha, gk_beta, o_i, m_i, s_km, s_gkm, s_gkd,
                    row_len, HKV if DGATE_ROWS_K else row_len, o_d, m_d, GATE_K, GRAD_IN_K, UPDATE_K, NEED_DGATE_K,
                    DGATE_ROWS_K, UPCAST)
    b_dv = tl.load(DV_ATTN + p_side + o_x, mask=m_x, other=0.)
    blend_grad_tile(b_dv, p_bv, V + i_b * s_vb + i_h * s_vh, VO + p_side, GV + i_b * s_gvb + i_h * s_gvh, DV + p_side,
                    DGV + (p_rows if DGATE_ROWS_V else p_side), gv_alpha, gv_beta, o_i, m_i, s_vm, s_gvm, s_gvd,
                    row_len, HKV if DGATE_ROWS_V else row_len, o_d, m_d, GATE_V, GRAD_IN_V, UPDATE_V, NEED_DGATE_V,
                    DGATE_ROWS_V, UPCAST)
