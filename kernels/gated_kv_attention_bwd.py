"""Attention's backward for the fused gated KV op (SPEC §2.3), FlashAttention-2 style.

The probabilities are recomputed from the forward's log-sum-exp; the (M x N)
attention matrix is never materialised.  Three kernels:

* ``_bwd_preprocess_kernel``: delta = rowsum(dout * out) - dlse.  With lse an
  output, ds = p * (dp - rowsum(dout * out)) + p * dlse, so folding dlse into
  delta leaves one formula for both kernels below.
* ``_bwd_dkdv_kernel``: one program per key block per (b, kv head); it walks
  the query blocks of every query head of the GQA group, so dK/dV accumulate
  in registers without atomics.
* ``_bwd_dq_kernel``: one program per query block per (b, query head) and
  per split of the prefix; the splits' partial dQ (float32) are summed
  afterwards, which keeps the pass atomics-free and deterministic while a
  short chunk over a long cache still fills the GPU.

The keys of row b are its settled prefix, positions 0 .. L_b - 1 of the live
caches, and its M active slots, read from ``k_new`` / ``v_new`` (B, M, Hkv, D):
the values the forward attended to, which later loops may since have
overwritten in the caches.  Both kernels treat the two apart, as the forward
does: key blocks never straddle them, every active token sees the whole
prefix (no mask there), and the causal mask (bottom-right aligned) only
compares active slot j with active token i (j <= i).  Prefix blocks only
feed the cache gradient, which is added into buffers the caller owns (the
gradient the caches' later uses gave them), and are skipped without one.

Grids are 1-D (CUDA caps y and z at 65535, which B * H alone can exceed) and
checked before the first launch; batch, head and split offsets are 64-bit,
offsets inside a (b, h) slice 32-bit unless a slice spans 2**31 elements
(WIDE).  The work is split by a bound on the lengths that may be too small
(a max_seqlen_k hint): the last prefix block and the last dQ split of each
row reach its true L_b.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from melt_kernels.kernels.gated_kv_attention_fwd import _round
from melt_kernels.kernels.launch import aligned, check_grids, device_guard, num_sms

LOG2E = math.log2(math.e)


@triton.jit
def _tile(p, o_r, stride, o_d, WIDE: tl.constexpr):
    """Pointers to rows ``o_r`` of a (rows, D) slice starting at ``p`` with row stride ``stride``: [BR, BD].

    ``p`` carries the 64-bit (batch, head) offset; offsets inside the slice are 32-bit unless WIDE (a
    slice spanning 2**31 elements), as 64-bit offsets per element cost registers enough to spill."""
    if WIDE:
        o_r = o_r.to(tl.int64)
    return p + (o_r[:, None] * stride + o_d[None, :])


@triton.jit
def _load_rows(p, o_r, r_hi, stride, o_d, m_d, WIDE: tl.constexpr):
    """Rows ``o_r`` of a (rows, D) slice, zero at rows >= r_hi: [BR, BD]."""
    return tl.load(_tile(p, o_r, stride, o_d, WIDE), mask=(o_r < r_hi)[:, None] & m_d[None, :], other=0.)


@triton.jit
def _kv_rows(p, o_n, n_hi, stride, o_d, m_d, BT, stride_page, PAGE, NB, on_pages,
             PAGED: tl.constexpr, WIDE: tl.constexpr):
    """Rows ``o_n`` (zero at rows >= n_hi) of a key/value source at ``p``: [BN, BD].  With PAGED and
    ``on_pages`` the source is a pool (``p`` carries the head offset only) and row n is slot n % PAGE of page
    BT[n // PAGE] (BT: the row of the block table), the entry clamped into [0, NB) (SPEC 2.6)."""
    m_rows = (o_n < n_hi)[:, None] & m_d[None, :]
    if PAGED:
        return tl.load(p + (_pool_rows(BT, o_n, o_n < n_hi, stride_page, stride, PAGE, NB, on_pages, WIDE)[:, None]
                            + o_d[None, :]), mask=m_rows, other=0.)
    return tl.load(_tile(p, o_n, stride, o_d, WIDE), mask=m_rows, other=0.)


@triton.jit
def _pool_rows(BT, o_n, m_n, stride_page, stride, PAGE, NB, on_pages, WIDE: tl.constexpr):
    """Offsets of rows ``o_n``: through the block table when ``on_pages``, else ``o_n * stride``; 32-bit unless
    WIDE (a pool or slice spanning 2**31 elements), as in :func:`_tile`."""
    i_pg = tl.load(BT + o_n // PAGE, mask=tl.where(on_pages, m_n, False), other=0)
    i_pg = tl.minimum(tl.maximum(i_pg, 0), NB - 1)
    o_in = o_n % PAGE
    if WIDE:
        i_pg, o_in, o_n = i_pg.to(tl.int64), o_in.to(tl.int64), o_n.to(tl.int64)
    return tl.where(on_pages, i_pg * stride_page + o_in * stride, o_n * stride)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32.  The interpreter multiplies bfloat16 blocks as their raw uint16 bits, so
    there they are widened first: bf16 x bf16 products are exact in float32, as on tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _bwd_preprocess_kernel(out, dout, dlse, delta,
                           stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                           M, Hq, m_blocks,
                           D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_DLSE: tl.constexpr,
                           WIDE: tl.constexpr):
    """One program per query block of a (b, query head): grid (m_blocks * B * Hq,)."""
    i_m, i_bh = tl.program_id(0) % m_blocks, tl.program_id(0) // m_blocks
    i_b, i_h = (i_bh // Hq).to(tl.int64), (i_bh % Hq).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    b_o = _load_rows(out + i_b * stride_ob + i_h * stride_oh, o_m, M, stride_om, o_d, m_d,
                     WIDE).to(tl.float32)  # [BM, BD]
    b_do = _load_rows(dout + i_b * stride_dob + i_h * stride_doh, o_m, M, stride_dom, o_d, m_d,
                      WIDE).to(tl.float32)  # [BM, BD]
    b_delta = tl.sum(b_o * b_do, axis=1)  # [BM]
    # dlse and delta are contiguous (B, Hq, M).
    o_row = i_bh.to(tl.int64) * M + o_m
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_row, mask=m_m, other=0.)
    tl.store(delta + o_row, b_delta, mask=m_m)


@triton.jit
def _bwd_dkdv_kernel(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, dout, lse, delta,
                     dk_cache, dv_cache, dk_new, dv_new,
                     stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     stride_dnb, stride_dns, stride_dnh,
                     stride_btb, stride_kcp, stride_vcp, stride_dkp, stride_dvp, PAGE, NB,
                     softmax_scale, qk_scale, S, M, Hq, Hkv, G, prefix_blocks, key_blocks,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, PREFIX_DK: tl.constexpr, PREFIX_DV: tl.constexpr,
                     PAGED: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr):
    """One program per key block of a (b, kv head): grid (key_blocks * B * Hkv,).

    Programs [0, prefix_blocks) take blocks of the settled prefix (rows of the live cache) and add their dK/dV
    into dk_cache/dv_cache (PREFIX_DK/PREFIX_DV); the others take a block of the active slots (rows of
    k_new / v_new) and store dK/dV into dk_new/dv_new.  The last prefix program also takes every block past
    its own up to L_b: prefix_blocks comes from a bound on the lengths that may have been too small.
    PAGED: the caches and their gradient buffers are pools read through ``block_table`` (their batch strides
    are passed as 0; ``stride_*p`` are their page strides).
    """
    i_n, i_bh = tl.program_id(0) % key_blocks, tl.program_id(0) // key_blocks
    i_b, i_hk = (i_bh // Hkv).to(tl.int64), (i_bh % Hkv).to(tl.int64)
    # Clamped like the forward: a bad CUDA cache_seqlens (not checked on the host) never leads outside [0, S).
    L = tl.minimum(tl.maximum(tl.load(cache_seqlens + i_b), 0), S - M)
    is_prefix = i_n < prefix_blocks
    n_lo = tl.where(is_prefix, i_n, i_n - prefix_blocks) * BN
    n_hi = tl.where(is_prefix, L, M)
    n_stop = tl.where(i_n == prefix_blocks - 1, n_hi, tl.minimum(n_lo + BN, n_hi))
    p_k = tl.where(is_prefix, k_cache + i_b * stride_kcb + i_hk * stride_kch,
                   k_new + i_b * stride_knb + i_hk * stride_knh)
    p_v = tl.where(is_prefix, v_cache + i_b * stride_vcb + i_hk * stride_vch,
                   v_new + i_b * stride_vnb + i_hk * stride_vnh)
    stride_k = tl.where(is_prefix, stride_kcs, stride_kns)
    stride_v = tl.where(is_prefix, stride_vcs, stride_vns)
    p_bt = block_table + i_b * stride_btb
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    for n0 in range(n_lo, n_stop, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_hi
        b_k = _kv_rows(p_k, o_n, n_hi, stride_k, o_d, m_d, p_bt, stride_kcp, PAGE, NB, is_prefix, PAGED,
                       WIDE)  # [BN, BD]
        b_v = _kv_rows(p_v, o_n, n_hi, stride_v, o_d, m_d, p_bt, stride_vcp, PAGE, NB, is_prefix, PAGED,
                       WIDE)  # [BN, BD]
        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)

        # Every active token sees the prefix; with IS_CAUSAL active slot j is seen by active tokens i >= j.
        m_lo = 0
        if IS_CAUSAL:
            m_lo = tl.where(is_prefix, 0, n0 // BM * BM)
        for i_g in range(G):
            i_hq = i_hk * G + i_g
            p_q = q + i_b * stride_qb + i_hq * stride_qh
            p_do = dout + i_b * stride_dob + i_hq * stride_doh
            p_row = (i_b * Hq + i_hq) * M
            for m0 in range(m_lo, M, BM):
                o_m = m0 + tl.arange(0, BM)
                m_m = o_m < M
                b_q = _load_rows(p_q, o_m, M, stride_qm, o_d, m_d, WIDE)  # [BM, BD]
                b_do = _load_rows(p_do, o_m, M, stride_dom, o_d, m_d, WIDE)  # [BM, BD]
                b_lse = tl.load(lse + p_row + o_m, mask=m_m, other=0.)  # [BM]
                b_delta = tl.load(delta + p_row + o_m, mask=m_m, other=0.)  # [BM]

                b_sT = _dot(b_k, tl.trans(b_q), UPCAST)  # [BN, BM]
                b_pT = tl.exp2(b_sT * qk_scale - b_lse[None, :] * 1.4426950408889634)
                m_vis = m_n[:, None] & m_m[None, :]
                if IS_CAUSAL:
                    m_vis = m_vis & (is_prefix | (o_n[:, None] <= o_m[None, :]))
                # where, not a product: masked lanes may hold inf.
                b_pT = tl.where(m_vis, b_pT, 0.)
                b_dv += _dot(_round(b_pT, b_do.dtype, UPCAST), b_do, UPCAST)
                b_dpT = _dot(b_v, tl.trans(b_do), UPCAST)  # [BN, BM]
                b_dsT = b_pT * (b_dpT - b_delta[None, :])
                b_dk += _dot(_round(b_dsT, b_q.dtype, UPCAST), b_q, UPCAST)
        b_dk *= softmax_scale

        m_nd = m_n[:, None] & m_d[None, :]
        if is_prefix:
            # Added to the gradient the caches' later uses gave these positions (one program per position),
            # rounded to nearest (under the interpreter .to(bfloat16) truncates, and every call of a chain
            # rounds the same buffer again).
            if PREFIX_DK:
                if PAGED:
                    p_dk = dk_cache + i_hk * stride_dkh + (_pool_rows(p_bt, o_n, m_n, stride_dkp, stride_dks, PAGE,
                                                                      NB, m_n, WIDE)[:, None] + o_d[None, :])
                else:
                    p_dk = dk_cache + _tile(i_b * stride_dkb + i_hk * stride_dkh, o_n, stride_dks, o_d, WIDE)
                b_dk += tl.load(p_dk, mask=m_nd, other=0.).to(tl.float32)
                tl.store(p_dk, _round(b_dk, dk_cache.dtype.element_ty, UPCAST), mask=m_nd)
            if PREFIX_DV:
                if PAGED:
                    p_dv = dv_cache + i_hk * stride_dvh + (_pool_rows(p_bt, o_n, m_n, stride_dvp, stride_dvs, PAGE,
                                                                      NB, m_n, WIDE)[:, None] + o_d[None, :])
                else:
                    p_dv = dv_cache + _tile(i_b * stride_dvb + i_hk * stride_dvh, o_n, stride_dvs, o_d, WIDE)
                b_dv += tl.load(p_dv, mask=m_nd, other=0.).to(tl.float32)
                tl.store(p_dv, _round(b_dv, dv_cache.dtype.element_ty, UPCAST), mask=m_nd)
        else:
            o_a = _tile(i_b * stride_dnb + i_hk * stride_dnh, o_n, stride_dns, o_d, WIDE)
            tl.store(dk_new + o_a, b_dk.to(dk_new.dtype.element_ty), mask=m_nd)
            tl.store(dv_new + o_a, b_dv.to(dv_new.dtype.element_ty), mask=m_nd)


@triton.jit
def _dq_over(b_dq, b_q, b_do, b_lse2, b_delta, o_m, p_k, p_v, stride_k, stride_v, lo, hi, qk_scale, o_d, m_d,
             p_bt, stride_kp, stride_vp, PAGE, NB,
             MASK_CAUSAL: tl.constexpr, BN: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr,
             WIDE: tl.constexpr):
    """Adds to dq [BM, BD] the keys/values at rows [lo, hi) of one source; with MASK_CAUSAL (the active
    slots) row j is seen by active tokens i >= j only; PAGED: the source is a pool read through the table."""
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < hi
        on_pages = o_n >= 0  # all true: a paged source is paged throughout (a tensor, as a mask needs)
        b_k = _kv_rows(p_k, o_n, hi, stride_k, o_d, m_d, p_bt, stride_kp, PAGE, NB, on_pages, PAGED,
                       WIDE)  # [BN, BD]
        b_v = _kv_rows(p_v, o_n, hi, stride_v, o_d, m_d, p_bt, stride_vp, PAGE, NB, on_pages, PAGED,
                       WIDE)  # [BN, BD]
        b_s = _dot(b_q, tl.trans(b_k), UPCAST)  # [BM, BN]
        b_p = tl.exp2(b_s * qk_scale - b_lse2[:, None])
        m_vis = m_n[None, :]
        if MASK_CAUSAL:
            m_vis = m_vis & (o_n[None, :] <= o_m[:, None])
        b_p = tl.where(m_vis, b_p, 0.)
        b_dp = _dot(b_do, tl.trans(b_v), UPCAST)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _dot(_round(b_ds, b_k.dtype, UPCAST), b_k, UPCAST)
    return b_dq


@triton.jit
def _bwd_dq_kernel(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, dout, lse, delta, dq,
                   stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
                   stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                   stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
                   stride_dqs, stride_dqb, stride_dqm, stride_dqh,
                   stride_btb, stride_kcp, stride_vcp, PAGE, NB,
                   softmax_scale, qk_scale, S, M, Hq, G, split_len, m_blocks, batch_heads, splits,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   PAGED: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr):
    """One program per query block per (b, query head) per prefix split: grid (m_blocks * B * Hq * splits,)."""
    i_m, i_r = tl.program_id(0) % m_blocks, tl.program_id(0) // m_blocks
    i_bh, i_s = i_r % batch_heads, i_r // batch_heads
    i_b, i_hq = (i_bh // Hq).to(tl.int64), (i_bh % Hq).to(tl.int64)
    i_hk = i_hq // G
    L = tl.minimum(tl.maximum(tl.load(cache_seqlens + i_b), 0), S - M)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    b_q = _load_rows(q + i_b * stride_qb + i_hq * stride_qh, o_m, M, stride_qm, o_d, m_d, WIDE)  # [BM, BD]
    b_do = _load_rows(dout + i_b * stride_dob + i_hq * stride_doh, o_m, M, stride_dom, o_d, m_d, WIDE)
    p_row = i_bh.to(tl.int64) * M
    b_lse2 = tl.load(lse + p_row + o_m, mask=m_m, other=0.) * 1.4426950408889634  # [BM]
    b_delta = tl.load(delta + p_row + o_m, mask=m_m, other=0.)  # [BM]

    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    # Split i_s takes its slice of the prefix (the last one up to L_b, whatever bound sized the splits); split 0
    # also takes the active slots.
    p_lo = i_s * split_len
    p_hi = tl.where(i_s == splits - 1, L, tl.minimum(p_lo + split_len, L))
    p_bt = block_table + i_b * stride_btb
    b_dq = _dq_over(b_dq, b_q, b_do, b_lse2, b_delta, o_m,
                    k_cache + i_b * stride_kcb + i_hk * stride_kch, v_cache + i_b * stride_vcb + i_hk * stride_vch,
                    stride_kcs, stride_vcs, p_lo, p_hi, qk_scale, o_d, m_d, p_bt, stride_kcp, stride_vcp, PAGE, NB,
                    False, BN, PAGED, UPCAST, WIDE)
    a_hi = M
    if IS_CAUSAL:
        a_hi = tl.minimum((i_m + 1) * BM, M)
    b_dq = _dq_over(b_dq, b_q, b_do, b_lse2, b_delta, o_m,
                    k_new + i_b * stride_knb + i_hk * stride_knh, v_new + i_b * stride_vnb + i_hk * stride_vnh,
                    stride_kns, stride_vns, 0, tl.where(i_s == 0, a_hi, 0), qk_scale, o_d, m_d, p_bt, 0, 0, PAGE,
                    NB, IS_CAUSAL, BN, False, UPCAST, WIDE)
    b_dq *= softmax_scale
    p_dq = dq + i_s.to(tl.int64) * stride_dqs + i_b * stride_dqb + i_hq * stride_dqh
    tl.store(_tile(p_dq, o_m, stride_dqm, o_d, WIDE), _round(b_dq, dq.dtype.element_ty, UPCAST),
             mask=m_m[:, None] & m_d[None, :])


# (head_dim padded) -> (BM, BN, warps, stages) of the dK/dV kernel and of the dQ kernel, for 16-bit and
# float32 inputs.  Chosen without a GPU: the largest tiles that ptxas (CUDA 13, sm_90a, Triton 3.9) compiles
# without spilling registers, given the 16-divisible pointers and strides a launch specializes on, and the
# tiles of Triton's fused-attention tutorial where those fit.  float32 dots run in IEEE float32 on FMA units:
# small tiles.  Without the causal mask at G = 1, dK/dV with two stages spilled 388, 448 and 9756 bytes at
# head_dim 64, 128 and 256 (32-key tiles at 256 still 232 with one), and dQ with 32-row tiles at 128 1676
# (one stage fixes that one too, but spills 656 bytes on unaligned tensors): one stage for dK/dV, 16-key
# tiles at 256, 16-row dQ tiles at 128 (sm_90, Triton 3.9; benchmarks/aot_problems.py).  Not tuned on a GPU.
_TILES_16BIT = {64: ((32, 128, 8, 3), (128, 64, 8, 3)),
                128: ((32, 64, 8, 3), (128, 32, 8, 3)),
                256: ((16, 32, 8, 2), (128, 32, 8, 2))}
_TILES_FP32 = {64: ((16, 64, 8, 1), (32, 64, 8, 2)),
               128: ((16, 32, 8, 1), (16, 64, 8, 2)),
               256: ((16, 16, 8, 1), (16, 16, 4, 2))}


@functools.lru_cache(maxsize=1024)
def _tiles(head_dim_p2: int, seqlen_q: int, dtype: torch.dtype, interpreted: bool, aligned: bool = True,
           paged: bool = False) -> dict:
    """Tile sizes, warps and pipeline stages of the two main kernels.  The interpreter takes the smallest
    tiles so that tiny test shapes run every loop more than once.  16-bit tensors that are not ``aligned``
    (kernels/launch.py) load narrower and hold more registers: smaller tiles keep them within 64 bytes of
    spills (ptxas, sm_90, Triton 3.6 and 3.9; ``benchmarks/aot_compile.py``); so do ``paged`` caches, whose
    key rows are addressed through the block table (half the key tile of the dK/dV kernel)."""
    if interpreted:
        return dict(BM_KV=16, BN_KV=16, BM_Q=16, BN_Q=16, BM_PRE=16, warps_kv=1, warps_q=1, stages_kv=1, stages_q=1)
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    (bm_kv, bn_kv, warps_kv, stages_kv), (bm_q, bn_q, warps_q, stages_q) = table[max(64, head_dim_p2)]
    bm_pre = 32
    if not aligned and dtype != torch.float32:
        bn_kv = min(bn_kv, 32) if head_dim_p2 >= 128 else bn_kv
        if head_dim_p2 >= 256:
            # The preprocess's two [32, 256] rows of out and dout spilled 172 bytes (Triton 3.9).
            bm_q, bn_q, warps_q, bm_pre = 32, 32, 4, 16
    if paged:
        bn_kv = max(16, bn_kv // 2)
        if head_dim_p2 >= 256 and dtype != torch.float32:
            bm_q, bn_q, warps_q = 32, 32, 4
    # Query tiles no taller than the chunk (tl.dot needs 16 rows).
    m_cap = max(16, triton.next_power_of_2(seqlen_q))
    if m_cap < bm_kv:
        # A chunk shorter than the row tile: one stage for dK/dV.  Triton 3.6's software pipeliner fails
        # ("PassManager::run failed") on the 16-bit causal-free 16-row tile with 2 or 3 stages (AOT, sm_90).
        stages_kv = 1
    return dict(BM_KV=min(bm_kv, m_cap), BN_KV=bn_kv, BM_Q=min(bm_q, m_cap), BN_Q=bn_q, BM_PRE=min(bm_pre, m_cap),
                warps_kv=warps_kv, warps_q=warps_q, stages_kv=stages_kv, stages_q=stages_q)


def _key_splits(max_prefix: int, block_n: int, q_programs: int, device: torch.device) -> int:
    """How many slices the dQ pass cuts the prefix into: enough programs for about two waves."""
    key_blocks = max(1, triton.cdiv(max_prefix, block_n))
    if device.type == "cpu":
        # The interpreter: two slices whenever possible, so the tests cover the partial-sum path.  Meta tensors
        # (launches inspected, not run) get the GPU's split, as in the launcher's tiles.
        return min(2, key_blocks)
    wanted = triton.cdiv(2 * num_sms(device), q_programs)
    # Each slice keeps at least four key blocks, or the reduction costs more than it saves.
    return max(1, min(wanted, triton.cdiv(key_blocks, 4)))


def _needs_wide_offsets(tensors, block: int) -> bool:
    """Whether an offset inside some (b, h) slice of one of ``tensors`` (B, rows, H, D), up to a block of rows
    past its end, can reach 2**31 elements.  Batch, head and split offsets are 64-bit in every kernel; what
    stays 32-bit without WIDE is ``row * row_stride + channel`` inside a slice."""
    return max((t.shape[1] + block) * t.stride(1) + t.shape[3] for t in tensors) >= 2**31


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when its last dimension is not contiguous (autograd may hand an expanded
    gradient); gradients are O(B*M*H*D), never a cache."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _row_strides(t: torch.Tensor, pool: bool) -> tuple:
    """(batch, seq, head) strides; a pool's batch stride is 0 (its rows are found through the table)."""
    strides = t.stride()[:3]
    return (0,) + tuple(strides[1:]) if pool else tuple(strides)


def bwd_grids(batch: int, seqlen_q: int, heads_q: int, heads_kv: int, prefix_blocks: int, splits: int,
              tiles: dict) -> dict:
    """The 1-D grid of each of the three launches (the kernels decompose the program id)."""
    return {
        "_bwd_preprocess_kernel": (triton.cdiv(seqlen_q, tiles["BM_PRE"]) * batch * heads_q,),
        "_bwd_dkdv_kernel": ((prefix_blocks + triton.cdiv(seqlen_q, tiles["BN_KV"])) * batch * heads_kv,),
        "_bwd_dq_kernel": (triton.cdiv(seqlen_q, tiles["BM_Q"]) * batch * heads_q * splits,),
    }


def gated_kv_attention_bwd(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout,
                           dlse: Optional[torch.Tensor], softmax_scale: float, causal: bool,
                           dk_cache: Optional[torch.Tensor] = None, dv_cache: Optional[torch.Tensor] = None,
                           max_seqlen_k: Optional[int] = None, block_table: Optional[torch.Tensor] = None):
    """Attention's backward by recomputation from ``lse``; signature of ``gated_kv_attention_ref_bwd``.

    Keys/values at positions < L_b come from the live ``k_cache``/``v_cache``
    (B, S, Hkv, D), those at L_b .. L_b+M-1 from ``k_new``/``v_new``
    (B, M, Hkv, D).  ``dk_cache``/``dv_cache``: None, or (B, S, Hkv, D)
    buffers (any strides, a floating dtype) to which attention's gradient at
    positions < L_b is added in place; nothing else of them is read or
    written.  ``max_seqlen_k`` sizes the work split (the capacity when None);
    it need not bound the lengths.  Returns (dq, dk_new, dv_new): dq in q's
    dtype, dk_new/dv_new in float32 (they are blended in float32 next).  With ``block_table`` (SPEC 2.6) the
    caches and the cache gradient buffers are (num_blocks, page_size, Hkv, D) pools; rows must not share
    settled pages when a cache gradient is asked for (two programs would add into one slot).
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    cache_len = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    groups = heads_q // heads_kv
    # What the work is split by: max_b(L_b) as far as the caller knows, else the most the cache allows.
    max_prefix = max(0, min(cache_len if max_seqlen_k is None else max_seqlen_k, cache_len) - seqlen_q)
    device = q.device
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    # CPU tensors run under the interpreter; meta tensors (launches inspected, not run) get the GPU's plan.
    interpreted = device.type == "cpu"
    tiles = _tiles(head_dim_p2, seqlen_q, q.dtype, interpreted, aligned(q, k_cache, v_cache, k_new, v_new, dout),
                   paged)
    cache_seqlens = cache_seqlens.to(device=device, dtype=torch.int32)
    dout = _unit_last(dout)
    # (B, Hq, M) float32 rows, read by flat index: tiny, so made contiguous here.
    lse = lse.float().contiguous()
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else None

    # Key blocks: those of the prefix first (only for a cache gradient; at least one, which reaches L_b
    # whatever the bound), then those of the active slots.
    need_prefix = dk_cache is not None or dv_cache is not None
    prefix_blocks = max(1, triton.cdiv(max_prefix, tiles["BN_KV"])) if need_prefix else 0
    q_blocks = triton.cdiv(seqlen_q, tiles["BM_Q"])
    splits = _key_splits(max_prefix, tiles["BN_Q"], q_blocks * batch * heads_q, device)
    split_len = max(1, triton.cdiv(triton.cdiv(max_prefix, tiles["BN_Q"]), splits)) * tiles["BN_Q"]
    grids = bwd_grids(batch, seqlen_q, heads_q, heads_kv, prefix_blocks, splits, tiles)
    check_grids(grids)

    dk_new = torch.empty(tuple(k_new.shape), dtype=torch.float32, device=device)
    dv_new = torch.empty(tuple(v_new.shape), dtype=torch.float32, device=device)
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=device)
    dq = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=device)
    partial = dq if splits == 1 else torch.empty((splits,) + tuple(dq.shape), dtype=torch.float32, device=device)
    # Never-written stand-ins for the cache gradients that are not wanted.
    dkc = dk_new if dk_cache is None else dk_cache
    dvc = dv_new if dv_cache is None else dv_cache
    qk_scale = softmax_scale * LOG2E
    upcast = q.dtype == torch.bfloat16 and interpreted
    blocks = max(tiles[name] for name in ("BM_KV", "BN_KV", "BM_Q", "BN_Q"))
    sliced = [t for t in (q, dout, out, k_cache, v_cache, k_new, v_new, dk_cache, dv_cache, partial)
              if t is not None]
    wide = _needs_wide_offsets(sliced, blocks)
    if paged:  # an offset inside a pool (or its gradient) reaches its whole extent
        pools = [t for t in (k_cache, v_cache, dk_cache, dv_cache) if t is not None]
        wide = wide or max(t.shape[0] * t.stride(0) for t in pools) >= 2**31
    # Pools are addressed through the table: batch strides 0, page strides apart (unused when not paged).
    kv_strides = (*_row_strides(k_cache, paged), *_row_strides(v_cache, paged), *k_new.stride()[:3],
                  *v_new.stride()[:3])
    qdo_strides = (*q.stride()[:3], *dout.stride()[:3])
    table = block_table if paged else cache_seqlens
    page_args = (block_table.stride(0) if paged else 0, k_cache.stride(0), v_cache.stride(0))

    with device_guard(device):
        _bwd_preprocess_kernel[grids["_bwd_preprocess_kernel"]](
            out, dout, delta if dlse is None else dlse, delta, *out.stride()[:3], *dout.stride()[:3],
            seqlen_q, heads_q, triton.cdiv(seqlen_q, tiles["BM_PRE"]), D=head_dim, BM=tiles["BM_PRE"],
            BD=head_dim_p2, HAS_DLSE=has_dlse, WIDE=wide, num_warps=4)
        _bwd_dkdv_kernel[grids["_bwd_dkdv_kernel"]](
            q, k_cache, v_cache, k_new, v_new, cache_seqlens, table, dout, lse, delta, dkc, dvc, dk_new, dv_new,
            *qdo_strides, *kv_strides, *_row_strides(dkc, paged and dk_cache is not None),
            *_row_strides(dvc, paged and dv_cache is not None), *dk_new.stride()[:3],
            *page_args, dkc.stride(0), dvc.stride(0), page_size, k_cache.shape[0],
            softmax_scale, qk_scale, cache_len, seqlen_q, heads_q, heads_kv, groups, prefix_blocks,
            prefix_blocks + triton.cdiv(seqlen_q, tiles["BN_KV"]),
            D=head_dim, BM=tiles["BM_KV"], BN=tiles["BN_KV"], BD=head_dim_p2, IS_CAUSAL=causal,
            PREFIX_DK=dk_cache is not None, PREFIX_DV=dv_cache is not None, PAGED=paged, UPCAST=upcast, WIDE=wide,
            num_warps=tiles["warps_kv"], num_stages=tiles["stages_kv"])
        _bwd_dq_kernel[grids["_bwd_dq_kernel"]](
            q, k_cache, v_cache, k_new, v_new, cache_seqlens, table, dout, lse, delta, partial,
            *qdo_strides, *kv_strides, 0 if splits == 1 else partial.stride(0), *partial.stride()[-4:-1],
            *page_args, page_size, k_cache.shape[0],
            softmax_scale, qk_scale, cache_len, seqlen_q, heads_q, groups, split_len, q_blocks,
            batch * heads_q, splits,
            D=head_dim, BM=tiles["BM_Q"], BN=tiles["BN_Q"], BD=head_dim_p2, IS_CAUSAL=causal, PAGED=paged,
            UPCAST=upcast,
            WIDE=wide, num_warps=tiles["warps_q"], num_stages=tiles["stages_q"])
    if splits > 1:
        dq = partial.sum(0).to(q.dtype)
    return dq, dk_new, dv_new
