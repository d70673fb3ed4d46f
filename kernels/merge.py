"""Merging split results (flash-decoding): out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s.

The decode and chunk launches cut a row's keys into P splits and write, per split, the normalised output
(float32) and its lse into a workspace laid out [B * Hkv, P, R, D] and [B * Hkv, P, R] (R = M * G rows of a
kv head).  A split a row does not reach holds lse = -inf and weighs 0.  :func:`merge_rows` is the merge of a
block of rows; :func:`merge_kernel` runs it as its own launch, and the decode kernel can run it in the split
that finishes last (kernels/decode.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from melt_kernels.kernels.tile_ops import round_to


@triton.jit
def merge_rows(O_PART, LSE_PART, O, LSE, i_bh, o_r, s_ob, s_om, s_oh, s_lb, s_lh, M, HKV, P,
               G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               FIX_BF16: tl.constexpr, BYPASS_L1: tl.constexpr):
    """Merges the P splits of rows ``o_r`` (BLOCK_R of them) of (b, kv head) ``i_bh`` and stores out and lse.
    BYPASS_L1: the partial results were written by other programs of the running launch: read from L2."""
    R = M * G
    i_b, i_h = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    m_r = o_r < R
    o_d = tl.arange(0, BLOCK_D)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i_s in range(0, P):
        p_part = (i_bh.to(tl.int64) * P + i_s) * R + o_r
        if BYPASS_L1:
            b_lse = tl.load(LSE_PART + p_part, mask=m_r, other=float("-inf"), cache_modifier=".cg")
            b_o = tl.load(O_PART + p_part[:, None] * D + o_d[None, :], mask=m_rd, other=0., cache_modifier=".cg")
        else:
            b_lse = tl.load(LSE_PART + p_part, mask=m_r, other=float("-inf"))
            b_o = tl.load(O_PART + p_part[:, None] * D + o_d[None, :], mask=m_rd, other=0.)
        b_m_new = tl.maximum(b_m, b_lse)
        # Until a row meets a split it reaches, exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
        b_m_use = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_w = tl.exp(b_lse - b_m_use)
        b_r = tl.exp(b_m - b_m_use)
        acc = acc * b_r[:, None] + b_w[:, None] * b_o
        b_l = b_l * b_r + b_w
        b_m = b_m_new
    # Every row reaches key 0, in split 0: l > 0 for every row that is stored.
    b_l = tl.where(m_r, b_l, 1.)
    o_i, o_g = o_r // G, o_r % G
    o_q = i_h * G + o_g
    p_o = O + i_b * s_ob + o_i.to(tl.int64)[:, None] * s_om + o_q[:, None] * s_oh + o_d[None, :]
    tl.store(p_o, round_to(acc / b_l[:, None], O.dtype.element_ty, FIX_BF16), mask=m_rd)
    tl.store(LSE + i_b * s_lb + o_q * s_lh + o_i, b_m + tl.log(b_l), mask=m_r)


@triton.jit
def merge_kernel(O_PART, LSE_PART, O, LSE, s_ob, s_om, s_oh, s_lb, s_lh, M, HKV, P, NRB,
                 G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 FIX_BF16: tl.constexpr):
    """One program per block of BLOCK_R rows of a (b, kv head): grid (B * Hkv * NRB,)."""
    i_bh, i_rb = tl.program_id(0) // NRB, tl.program_id(0) % NRB
    o_r = i_rb * BLOCK_R + tl.arange(0, BLOCK_R)
    merge_rows(O_PART, LSE_PART, O, LSE, i_bh, o_r, s_ob, s_om, s_oh, s_lb, s_lh, M, HKV, P, G, D, BLOCK_R,
               BLOCK_D, FIX_BF16, False)


def merge_block_rows(rows: int) -> int:
    """Rows per merge program: 16 (a few rows' partial tiles in flight per thread), fewer for decode."""
    return min(16, triton.next_power_of_2(max(rows, 1)))


def merge_grid(batch: int, heads_kv: int, rows: int) -> tuple:
    return (batch * heads_kv * triton.cdiv(rows, merge_block_rows(rows)),)
