"""The backward of the fused op (docs/op.md#gradients), FlashAttention-2's structure.

The probabilities are recomputed from the forward's log-sum-exp; the (M x N) attention matrix is never
materialised.  A training call is three or four launches:

* ``bwd_preprocess_kernel``: delta = rowsum(dout * out) - dlse (with lse an output, ds = p * (dp - rowsum(dout
  * out)) + p * dlse, so folding dlse into delta leaves one formula), and the zeros dQ is accumulated into.
* ``bwd_dkdv_kernel``: one program per key block of a (b, kv head); it walks the query blocks of every query
  head of the GQA group, so dK/dV accumulate in registers without atomics: S^T, dP^T, dV, dK, and (DQ_ATOMIC)
  dQ += dS K added atomically into a float32 accumulator: five GEMMs, FlashAttention-2's count.  Its MMA
  layouts put no two warps on the same rows (benchmarks/ttgir_check.py checks the compiled layouts).  The
  query blocks run in up to three loops: those on the causal diagonal (masked), those below it with every
  row and key in range (no mask), and the tail (masked).  Prefix key blocks add their dK/dV into the caches'
  gradient; active ones store attention's gradient of the slots' new values (float32).
* ``bwd_dq_kernel`` (deterministic mode, no DQ_ATOMIC): one program per query block per (b, query head) per
  split of the prefix, recomputing S and dP (seven GEMMs in all, no atomics: bit-identical reruns); the
  splits' float32 partial sums are added afterwards.
* With a :class:`~melt_kernels.reference.BlendGrad` (a training call through the op): the blend's backward,
  ``blend_bwd_kernel`` (kernels/blend.py), turns the slots' gradient into those of the fresh values, the
  gates and the caches before the call.

``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``) picks the mode, as PyTorch's
own attention backward does: atomics make dQ's float additions run in any order.

The keys of row b are its settled prefix, positions 0 .. L_b - 1 of the live caches, and its M active slots,
read from ``k_new`` / ``v_new`` (B, M, Hkv, D): the values the forward attended to, which later loops may
since have overwritten in the caches.  Prefix key blocks feed the cache gradient and, with DQ_ATOMIC, dQ;
without either they are skipped.  Grids are 1-D and checked before the first launch; batch, head and split offsets are 64-bit,
offsets inside a (b, h) slice 32-bit unless WIDE (WIDE_Q for the query side's tensors, which the dK/dV kernel's
inner loop reads).  The work is split by a bound on the lengths that may be too small (a max_seqlen_k hint):
the last prefix block and the last dQ split of each row reach its true L_b.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from melt_kernels.kernels.launch import aligned, check_grids, device_guard, needs_wide_offsets, num_sms
from melt_kernels.kernels.blend import BLOCK_SLOTS, blend_bwd_kernel, blend_grid, gate_args
from melt_kernels.kernels.tile_ops import GATE_TENSOR, cache_offsets, round_to
from melt_kernels.reference import BlendGrad

LOG2E = math.log2(math.e)


@triton.jit
def _tile(p, o_r, stride, o_d, WIDE: tl.constexpr):
    """Pointers to rows ``o_r`` of a (rows, D) slice starting at ``p`` with row stride ``stride``: [BR, BD].
    ``p`` carries the 64-bit (batch, head) offset; offsets inside the slice are 32-bit unless WIDE."""
    if WIDE:
        o_r = o_r.to(tl.int64)
    return p + (o_r[:, None] * stride + o_d[None, :])


@triton.jit
def _load_rows(p, o_r, r_hi, stride, o_d, m_d, MASKED: tl.constexpr, EVEN_D: tl.constexpr, WIDE: tl.constexpr):
    """Rows ``o_r`` of a (rows, D) slice: [BR, BD], zero at rows >= r_hi (MASKED) and past D."""
    if MASKED:
        b_x = tl.load(_tile(p, o_r, stride, o_d, WIDE), mask=(o_r < r_hi)[:, None] & m_d[None, :], other=0.)
    elif EVEN_D:
        b_x = tl.load(_tile(p, o_r, stride, o_d, WIDE))
    else:
        b_x = tl.load(_tile(p, o_r, stride, o_d, WIDE), mask=m_d[None, :], other=0.)
    return b_x


@triton.jit
def _kv_rows(p, o_n, n_hi, stride, o_d, m_d, BT, stride_page, PAGE, NB, on_pages,
             PAGED: tl.constexpr, WIDE: tl.constexpr):
    """Rows ``o_n`` (zero at rows >= n_hi) of a key/value source at ``p``: [BN, BD].  With PAGED and
    ``on_pages`` the source is a pool (``p`` carries the head offset only) read through the block table row
    ``BT`` (docs/op.md#paged-caches); otherwise rows are ``o_n * stride`` apart."""
    m_rows = (o_n < n_hi)[:, None] & m_d[None, :]
    if PAGED:
        o_pool = cache_offsets(BT, o_n, tl.where(on_pages, o_n < n_hi, False), stride_page, stride, PAGE, NB, True,
                               WIDE)
        o_flat = o_n * stride
        if WIDE:
            o_flat = o_n.to(tl.int64) * stride
        return tl.load(p + (tl.where(on_pages, o_pool, o_flat)[:, None] + o_d[None, :]), mask=m_rows, other=0.)
    return tl.load(_tile(p, o_n, stride, o_d, WIDE), mask=m_rows, other=0.)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32.  The interpreter multiplies bfloat16 blocks as their raw uint16 bits, so
    there they are widened first: bf16 x bf16 products are exact in float32, as on tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def bwd_preprocess_kernel(out, dout, dlse, delta, dq_acc,
                          stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                          M, Hq, m_blocks,
                          D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_DLSE: tl.constexpr,
                          ZERO_DQ: tl.constexpr, WIDE: tl.constexpr):
    """One program per query block of a (b, query head): grid (m_blocks * B * Hq,).  ZERO_DQ: also zeroes
    those rows of the float32 dQ accumulator (B, M, Hq, D), contiguous."""
    i_m, i_bh = tl.program_id(0) % m_blocks, tl.program_id(0) // m_blocks
    i_b, i_h = (i_bh // Hq).to(tl.int64), (i_bh % Hq).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    b_o = _load_rows(out + i_b * stride_ob + i_h * stride_oh, o_m, M, stride_om, o_d, m_d, True, False,
                     WIDE).to(tl.float32)  # [BM, BD]
    b_do = _load_rows(dout + i_b * stride_dob + i_h * stride_doh, o_m, M, stride_dom, o_d, m_d, True, False,
                      WIDE).to(tl.float32)  # [BM, BD]
    b_delta = tl.sum(b_o * b_do, axis=1)  # [BM]
    # dlse and delta are contiguous (B, Hq, M).
    o_row = i_bh.to(tl.int64) * M + o_m
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_row, mask=m_m, other=0.)
    tl.store(delta + o_row, b_delta, mask=m_m)
    if ZERO_DQ:
        p_dq = dq_acc + (i_b * M * Hq + i_h) * D
        tl.store(_tile(p_dq, o_m, Hq * D, o_d, WIDE), tl.zeros([BM, BD], tl.float32),
                 mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _dkdv_steps(b_dk, b_dv, b_k, b_v, o_n, m_n, p_q, p_do, p_lse, p_delta, p_dq, stride_qm, stride_dom, stride_dqm,
                o_d, m_d, lo, hi, M, qk_scale, softmax_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, EVEN_D: tl.constexpr,
                BM: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr):
    """Adds to dK/dV [BN, BD] of the key block (rows ``o_n``, ``m_n`` those in range) the query rows [lo, hi)
    of one query head.  MASKED: rows past M and keys out of range are masked, and with CAUSAL active key j is
    seen by active tokens i >= j only; unmasked steps have every row and key in range.  DQ_ATOMIC: also adds
    dS K * scale into the float32 dQ accumulator at ``p_dq``."""
    for m0 in range(lo, hi, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < M
        b_q = _load_rows(p_q, o_m, M, stride_qm, o_d, m_d, MASKED, EVEN_D, WIDE)  # [BM, BD]
        b_do = _load_rows(p_do, o_m, M, stride_dom, o_d, m_d, MASKED, EVEN_D, WIDE)  # [BM, BD]
        if MASKED:
            b_lse2 = tl.load(p_lse + o_m, mask=m_m, other=0.) * 1.4426950408889634  # [BM]
            b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.)  # [BM]
        else:
            b_lse2 = tl.load(p_lse + o_m) * 1.4426950408889634
            b_delta = tl.load(p_delta + o_m)
        b_sT = _dot(b_k, tl.trans(b_q), UPCAST)  # [BN, BM]
        b_pT = tl.exp2(b_sT * qk_scale - b_lse2[None, :])
        if MASKED:
            m_vis = m_n[:, None] & m_m[None, :]
            if CAUSAL:
                m_vis = m_vis & (o_n[:, None] <= o_m[None, :])
            # where, not a product: masked lanes may hold inf.
            b_pT = tl.where(m_vis, b_pT, 0.)
        b_dv += _dot(round_to(b_pT, b_do.dtype, UPCAST), b_do, UPCAST)
        b_dpT = _dot(b_v, tl.trans(b_do), UPCAST)  # [BN, BM]
        b_dsT = round_to(b_pT * (b_dpT - b_delta[None, :]), b_q.dtype, UPCAST)
        b_dk += _dot(b_dsT, b_q, UPCAST)
        if DQ_ATOMIC:
            b_dq = _dot(tl.trans(b_dsT), b_k, UPCAST) * softmax_scale  # [BM, BD]
            tl.atomic_add(_tile(p_dq, o_m, stride_dqm, o_d, WIDE), b_dq, mask=m_m[:, None] & m_d[None, :],
                          sem="relaxed")
    return b_dk, b_dv


@triton.jit
def bwd_dkdv_kernel(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, dout, lse, delta,
                    dk_cache, dv_cache, dk_new, dv_new, dq_acc,
                    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
                    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
                    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                    stride_btb, stride_kcp, stride_vcp, stride_dkp, stride_dvp, PAGE, NB,
                    softmax_scale, qk_scale, S, M, Hq, Hkv, G, prefix_blocks, key_blocks,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, PREFIX_DK: tl.constexpr, PREFIX_DV: tl.constexpr,
                    DQ_ATOMIC: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
                    WIDE_Q: tl.constexpr):
    """One program per key block of a (b, kv head): grid (key_blocks * B * Hkv,).

    Programs [0, prefix_blocks) take blocks of the settled prefix (rows of the live cache) and add their dK/dV
    into dk_cache/dv_cache (PREFIX_DK/PREFIX_DV); the others take a block of the active slots (rows of
    k_new / v_new) and store dK/dV into dk_new/dv_new (float32, B x M x Hkv x D, contiguous).  The last prefix
    program also takes every block past its own up to L_b: prefix_blocks comes from a bound on the lengths
    that may have been too small.  PAGED: the caches and their gradient buffers are pools read through
    ``block_table`` (their batch strides are passed as 0; ``stride_*p`` are their page strides).
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
    EVEN_D: tl.constexpr = BD == D
    M_full = M // BM * BM
    for n0 in range(n_lo, n_stop, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_hi
        b_k = _kv_rows(p_k, o_n, n_hi, stride_k, o_d, m_d, p_bt, stride_kcp, PAGE, NB, is_prefix, PAGED,
                       WIDE)  # [BN, BD]
        b_v = _kv_rows(p_v, o_n, n_hi, stride_v, o_d, m_d, p_bt, stride_vcp, PAGE, NB, is_prefix, PAGED,
                       WIDE)  # [BN, BD]
        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)
        # Query rows [0, diag_lo) see none of these keys (causal, active), [diag_lo, diag_hi) some (masked),
        # [diag_hi, M) all: unmasked up to the last whole query block when the key block is whole.
        diag_lo = 0
        diag_hi = 0
        if IS_CAUSAL:
            diag_lo = tl.where(is_prefix, 0, n0 // BM * BM)
            diag_hi = tl.where(is_prefix, 0, tl.minimum(tl.cdiv(n0 + BN, BM) * BM, M))
        whole = n0 + BN <= n_hi
        body_hi = tl.where(whole, tl.maximum(diag_hi, M_full), diag_hi)
        for i_g in range(G):
            i_hq = i_hk * G + i_g
            p_q = q + i_b * stride_qb + i_hq * stride_qh
            p_do = dout + i_b * stride_dob + i_hq * stride_doh
            p_row = (i_b * Hq + i_hq) * M
            p_dq = dq_acc + (i_b * M * Hq + i_hq) * D
            b_dk, b_dv = _dkdv_steps(b_dk, b_dv, b_k, b_v, o_n, m_n, p_q, p_do, lse + p_row, delta + p_row, p_dq,
                                     stride_qm, stride_dom, Hq * D, o_d, m_d, diag_lo, diag_hi, M, qk_scale,
                                     softmax_scale, True, IS_CAUSAL, DQ_ATOMIC, EVEN_D, BM, UPCAST, WIDE_Q)
            b_dk, b_dv = _dkdv_steps(b_dk, b_dv, b_k, b_v, o_n, m_n, p_q, p_do, lse + p_row, delta + p_row, p_dq,
                                     stride_qm, stride_dom, Hq * D, o_d, m_d, diag_hi, body_hi, M, qk_scale,
                                     softmax_scale, False, False, DQ_ATOMIC, EVEN_D, BM, UPCAST, WIDE_Q)
            b_dk, b_dv = _dkdv_steps(b_dk, b_dv, b_k, b_v, o_n, m_n, p_q, p_do, lse + p_row, delta + p_row, p_dq,
                                     stride_qm, stride_dom, Hq * D, o_d, m_d, body_hi, M, M, qk_scale,
                                     softmax_scale, True, False, DQ_ATOMIC, EVEN_D, BM, UPCAST, WIDE_Q)
        b_dk *= softmax_scale

        m_nd = m_n[:, None] & m_d[None, :]
        if is_prefix:
            # Added to the gradient the caches' later uses gave these positions (one program per position),
            # rounded to nearest (under the interpreter .to(bfloat16) truncates, and every call of a chain
            # rounds the same buffer again).
            if PREFIX_DK:
                o_dk = cache_offsets(p_bt, o_n, m_n, stride_dkp, stride_dks, PAGE, NB, PAGED, WIDE)
                p_dk = dk_cache + i_b * stride_dkb + i_hk * stride_dkh + (o_dk[:, None] + o_d[None, :])
                b_dk += tl.load(p_dk, mask=m_nd, other=0.).to(tl.float32)
                tl.store(p_dk, round_to(b_dk, dk_cache.dtype.element_ty, UPCAST), mask=m_nd)
            if PREFIX_DV:
                o_dv = cache_offsets(p_bt, o_n, m_n, stride_dvp, stride_dvs, PAGE, NB, PAGED, WIDE)
                p_dv = dv_cache + i_b * stride_dvb + i_hk * stride_dvh + (o_dv[:, None] + o_d[None, :])
                b_dv += tl.load(p_dv, mask=m_nd, other=0.).to(tl.float32)
                tl.store(p_dv, round_to(b_dv, dv_cache.dtype.element_ty, UPCAST), mask=m_nd)
        else:
            o_a = _tile((i_b * M * Hkv + i_hk) * D, o_n, Hkv * D, o_d, WIDE)
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
        b_dq += _dot(round_to(b_ds, b_k.dtype, UPCAST), b_k, UPCAST)
    return b_dq


@triton.jit
def bwd_dq_kernel(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, dout, lse, delta, dq,
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
    b_q = _load_rows(q + i_b * stride_qb + i_hq * stride_qh, o_m, M, stride_qm, o_d, m_d, True, False,
                     WIDE)  # [BM, BD]
    b_do = _load_rows(dout + i_b * stride_dob + i_hq * stride_doh, o_m, M, stride_dom, o_d, m_d, True, False, WIDE)
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
    tl.store(_tile(p_dq, o_m, stride_dqm, o_d, WIDE), round_to(b_dq, dq.dtype.element_ty, UPCAST),
             mask=m_m[:, None] & m_d[None, :])


@dataclass(frozen=True)
class BwdPlan:
    """Tiles, warps and stages of the backward's launches."""

    block_m_kv: int  # query rows per step of the dK/dV kernel
    block_n_kv: int  # keys per dK/dV program
    warps_kv: int
    stages_kv: int
    block_m_q: int  # query rows per dQ program (deterministic mode)
    block_n_q: int  # keys per step of the dQ kernel
    warps_q: int
    stages_q: int
    block_m_pre: int  # rows per preprocess program
    dq_atomic: bool  # dQ accumulated atomically by the dK/dV kernel (five GEMMs; no dQ kernel)


# (head_dim padded) -> (BM, BN, warps, stages) of the dK/dV kernel and of the dQ kernel, for 16-bit and
# float32 inputs.  16-bit: 128-key tiles with two warpgroups of 64 rows (no replicated MMA) and 32-row query
# steps up to head_dim 128, as FlashAttention-2 and Triton's tutorial on Hopper; with the atomic dQ at 128,
# 16-row steps (32 spilled 148 bytes: the dQ tile beside the two [128, 128] accumulators).  At 256, 32-key
# tiles and 16-row steps (64 keys spilled 264-5116 bytes with 4 or 8 warps), and 64-row dQ tiles on 8 warps.
# float32 dots run in IEEE float32 on FMA units: small tiles (one stage for dK/dV, 16-key tiles at 256, 16-row
# dQ tiles at 128).  sm_90, Triton 3.9; registers of the headline plans: benchmarks/NOTES.md.
_TILES_16BIT = {64: ((32, 128, 8, 2), (128, 64, 8, 2)),
                128: ((32, 128, 8, 2), (128, 64, 8, 2)),
                256: ((32, 16, 4, 2), (32, 32, 4, 2))}
_TILES_FP32 = {64: ((16, 64, 8, 1), (32, 64, 8, 2)),
               128: ((16, 32, 8, 1), (16, 64, 8, 2)),
               256: ((16, 16, 8, 1), (16, 16, 4, 2))}


def plan_bwd(head_dim: int, seqlen_q: int, dtype: torch.dtype, interpreted: bool, aligned: bool = True,
             paged: bool = False, deterministic: bool = False, *, block_m_kv: Optional[int] = None,
             block_n_kv: Optional[int] = None, warps_kv: Optional[int] = None, stages_kv: Optional[int] = None,
             block_m_q: Optional[int] = None, block_n_q: Optional[int] = None, warps_q: Optional[int] = None,
             stages_q: Optional[int] = None, dq_atomic: Optional[bool] = None) -> BwdPlan:
    """The backward's plan.  The interpreter takes the smallest tiles so that tiny test shapes run every loop
    more than once.  16-bit tensors that are not ``aligned`` (kernels/launch.py) load narrower and hold more
    registers: smaller key tiles; so do ``paged`` caches, whose key rows are addressed through the block table.
    Each choice stays within 64 bytes of spills for sm_90 with Triton 3.6 and the newest
    (benchmarks/aot_compile.py).  ``dq_atomic`` defaults to not ``deterministic``, except for 16-bit head_dims
    over 128 on a GPU."""
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    if dq_atomic is None:
        # At head_dim 256 the atomic dQ's [32, 256] float32 tile beside dK and dV spilled 200-560 bytes (16-bit,
        # 4 warps, sm_90): dQ by its own kernel there.
        dq_atomic = not deterministic and (interpreted or dtype == torch.float32 or head_dim_p2 < 256)
    if interpreted:
        tiles = dict(block_m_kv=16, block_n_kv=16, warps_kv=1, stages_kv=1, block_m_q=16, block_n_q=16, warps_q=1,
                     stages_q=1, block_m_pre=16)
    else:
        table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
        (bm_kv, bn_kv, w_kv, s_kv), (bm_q, bn_q, w_q, s_q) = table[max(64, head_dim_p2)]
        if dq_atomic and dtype != torch.float32 and head_dim_p2 == 128:
            bm_kv = 16
        bm_pre = 32
        if paged:
            bn_kv = max(16, bn_kv // 2)
        if (paged or not aligned) and dtype != torch.float32 and head_dim_p2 >= 128:
            # 64-key tiles on 4 warps (one warpgroup) spilled 68-716 bytes there: their two [64, D] float32
            # accumulators beside the narrower loads' or the table's addresses.
            bn_kv = min(bn_kv, 32)
        if not aligned and dtype != torch.float32 and head_dim_p2 >= 256:
            # The preprocess's two [32, 256] rows of out and dout spilled 172 bytes (Triton 3.9).
            bm_pre = 16
        # Query tiles no taller than the chunk (tl.dot needs 16 rows).
        m_cap = max(16, triton.next_power_of_2(seqlen_q))
        if m_cap == 16:
            # A chunk within one 16-row tile: dK/dV's loop over query tiles runs once, nothing to pipeline: one
            # stage.  Triton 3.6's software pipeliner fails ("PassManager::run failed") on the 16-bit causal-free
            # 16-row tile with 2 or 3 stages (AOT, sm_90): at M = 1 with the atomic dQ's 16-row tiles too.
            s_kv = 1
        tiles = dict(block_m_kv=min(bm_kv, m_cap), block_n_kv=bn_kv, warps_kv=w_kv, stages_kv=s_kv,
                     block_m_q=min(bm_q, m_cap), block_n_q=bn_q, warps_q=w_q, stages_q=s_q,
                     block_m_pre=min(bm_pre, m_cap))
    overrides = dict(block_m_kv=block_m_kv, block_n_kv=block_n_kv, warps_kv=warps_kv, stages_kv=stages_kv,
                     block_m_q=block_m_q, block_n_q=block_n_q, warps_q=warps_q, stages_q=stages_q)
    tiles.update({name: value for name, value in overrides.items() if value is not None})
    if not interpreted and dtype != torch.float32:
        # A 16-bit tile of R rows (keys for dK/dV, queries for dQ) is one wgmma per 16 rows and warp: more
        # warps than R / 16 issue the same instructions twice (benchmarks/ttgir_check.py), unless asked for.
        if tiles["block_n_kv"] >= 64:
            if warps_kv is None:
                tiles["warps_kv"] = min(tiles["warps_kv"], max(4, tiles["block_n_kv"] // 16))
        elif block_m_kv is None:
            # Key tiles under 64 rows take mma v2, its warps along the query columns, 8 columns each: fewer
            # would issue another warp's instructions.  Taller steps than a short chunk needs cost masked rows.
            tiles["block_m_kv"] = max(tiles["block_m_kv"], 8 * tiles["warps_kv"])
        if warps_q is None:
            tiles["warps_q"] = min(tiles["warps_q"], max(4, tiles["block_m_q"] // 16))
    return BwdPlan(**tiles, dq_atomic=dq_atomic)


_plan = functools.lru_cache(maxsize=1024)(plan_bwd)


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


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when its last dimension is not contiguous (autograd may hand an expanded
    gradient); gradients are O(B*M*H*D), never a cache."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _row_strides(t: torch.Tensor, pool: bool) -> tuple:
    """(batch, seq, head) strides; a pool's batch stride is 0 (its rows are found through the table)."""
    strides = t.stride()[:3]
    return (0,) + tuple(strides[1:]) if pool else tuple(strides)


def bwd_grids(batch: int, seqlen_q: int, heads_q: int, heads_kv: int, prefix_blocks: int, splits: int,
              plan: BwdPlan, blend: bool) -> dict:
    """The 1-D grid of each launch, in launch order (the kernels decompose the program id)."""
    grids = {
        "bwd_preprocess_kernel": (triton.cdiv(seqlen_q, plan.block_m_pre) * batch * heads_q,),
        "bwd_dkdv_kernel": ((prefix_blocks + triton.cdiv(seqlen_q, plan.block_n_kv)) * batch * heads_kv,),
    }
    if not plan.dq_atomic:
        grids["bwd_dq_kernel"] = (triton.cdiv(seqlen_q, plan.block_m_q) * batch * heads_q * splits,)
    if blend:
        grids["blend_bwd_kernel"] = blend_grid(batch, heads_kv, seqlen_q)
    return grids


def gated_kv_attention_bwd(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout,
                           dlse: Optional[torch.Tensor], softmax_scale: float, causal: bool,
                           dk_cache: Optional[torch.Tensor] = None, dv_cache: Optional[torch.Tensor] = None,
                           max_seqlen_k: Optional[int] = None, block_table: Optional[torch.Tensor] = None, *,
                           blend: Optional[BlendGrad] = None, deterministic: Optional[bool] = None, **overrides):
    """The backward by recomputation from ``lse``; signature of ``gated_kv_attention_ref_bwd``.

    Keys/values at positions < L_b come from the live ``k_cache``/``v_cache`` (B, S, Hkv, D), those at
    L_b .. L_b+M-1 from ``k_new``/``v_new`` (B, M, Hkv, D), the values the forward attended to.

    Without ``blend``: attention's backward.  ``dk_cache``/``dv_cache``: None, or (B, S, Hkv, D) buffers (any
    strides, a floating dtype) to which attention's gradient at positions < L_b is added in place; nothing
    else of them is read or written.  Returns (dq, dk_new, dv_new): dq in q's dtype, dk_new/dv_new (attention's
    gradient at the new slot values) in float32.

    With ``blend`` (``melt_kernels.reference.BlendGrad``): the gradients of the op's inputs.  The buffers then hold, on entry,
    the gradient of the caches after the call (None: zero), and on return, where ``blend.update_*``, the
    gradient of the caches before it.  Returns (dq, dk, dv, dgate, dgate_v): dk/dv in k's dtype, the gates'
    in their own dtype and shape (None where not wanted).

    ``max_seqlen_k`` sizes the work split (the capacity when None); it need not bound the lengths.  With
    ``block_table`` (docs/op.md#paged-caches) the caches and the buffers are (num_blocks, page_size, Hkv, D)
    pools; rows must not share settled pages when a cache gradient is asked for (two programs would add
    into one slot).  ``deterministic``: see the module docstring; ``overrides``: :func:`plan_bwd`'s.
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
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = _plan(head_dim, seqlen_q, q.dtype, interpreted, aligned(q, k_cache, v_cache, k_new, v_new, dout), paged,
                 deterministic, **overrides)
    cache_seqlens = cache_seqlens.to(device=device, dtype=torch.int32)
    dout = _unit_last(dout)
    # (B, Hq, M) float32 rows, read by flat index: tiny, so made contiguous here.
    lse = lse.float().contiguous()
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else None

    if blend is None:
        prefix_dk, prefix_dv = dk_cache is not None, dv_cache is not None
    else:
        prefix_dk, prefix_dv = blend.update_k, blend.update_v
    # Key blocks: those of the prefix first (for a cache gradient, or for dQ when the dK/dV kernel makes it; at
    # least one, which reaches L_b whatever the bound), then those of the active slots.  Without a cache
    # gradient the prefix blocks' dK/dV are made and dropped: only the first call of a chain lacks one.
    need_prefix = prefix_dk or prefix_dv or plan.dq_atomic
    prefix_blocks = max(1, triton.cdiv(max_prefix, plan.block_n_kv)) if need_prefix else 0
    q_blocks = triton.cdiv(seqlen_q, plan.block_m_q)
    splits = 1 if plan.dq_atomic else _key_splits(max_prefix, plan.block_n_q, q_blocks * batch * heads_q, device)
    split_len = max(1, triton.cdiv(triton.cdiv(max_prefix, plan.block_n_q), splits)) * plan.block_n_q
    grids = bwd_grids(batch, seqlen_q, heads_q, heads_kv, prefix_blocks, splits, plan, blend is not None)
    check_grids(grids)

    kv_shape = (batch, seqlen_q, heads_kv, head_dim)
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=device)
    dq = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=device)
    if plan.dq_atomic:
        partial = torch.empty(dq.shape, dtype=torch.float32, device=device)  # zeroed by the preprocess
    else:
        partial = dq if splits == 1 else torch.empty((splits,) + tuple(dq.shape), dtype=torch.float32,
                                                     device=device)
    # Attention's gradient at the active slots' new values, float32.
    dk_new = torch.empty(kv_shape, dtype=torch.float32, device=device)
    dv_new = torch.empty(kv_shape, dtype=torch.float32, device=device)
    # Never-written stand-ins for the cache gradients that are not given.
    dkc = dk_new if dk_cache is None else dk_cache
    dvc = dv_new if dv_cache is None else dv_cache
    qk_scale = softmax_scale * LOG2E
    upcast = q.dtype == torch.bfloat16 and interpreted
    blocks = max(plan.block_m_kv, plan.block_n_kv, plan.block_m_q, plan.block_n_q)
    # 64-bit offsets where a slice needs them, told apart for the query side (what the dK/dV kernel's inner
    # loop loads: 64-bit offsets of its [BM, BD] tiles spilled 72-248 bytes) and for the caches.
    wide_q = needs_wide_offsets([q, dout, out, k_new, v_new, partial], blocks)
    wide = wide_q or needs_wide_offsets([] if paged else [k_cache, v_cache, dk_cache, dv_cache], blocks,
                                        pools=[k_cache, v_cache, dk_cache, dv_cache] if paged else ())
    # Pools are addressed through the table: batch strides 0, page strides apart (unused when not paged).
    kv_strides = (*_row_strides(k_cache, paged), *_row_strides(v_cache, paged), *k_new.stride()[:3],
                  *v_new.stride()[:3])
    qdo_strides = (*q.stride()[:3], *dout.stride()[:3])
    table = block_table if paged else cache_seqlens
    page_args = (block_table.stride(0) if paged else 0, k_cache.stride(0), v_cache.stride(0))

    with device_guard(device):
        bwd_preprocess_kernel[grids["bwd_preprocess_kernel"]](
            out, dout, delta if dlse is None else dlse, delta, partial, *out.stride()[:3], *dout.stride()[:3],
            seqlen_q, heads_q, triton.cdiv(seqlen_q, plan.block_m_pre), D=head_dim, BM=plan.block_m_pre,
            BD=head_dim_p2, HAS_DLSE=has_dlse, ZERO_DQ=plan.dq_atomic, WIDE=wide_q, num_warps=4,
            enable_fp_fusion=True)
        bwd_dkdv_kernel[grids["bwd_dkdv_kernel"]](
            q, k_cache, v_cache, k_new, v_new, cache_seqlens, table, dout, lse, delta, dkc, dvc, dk_new, dv_new,
            partial, *qdo_strides, *kv_strides, *_row_strides(dkc, paged and dk_cache is not None),
            *_row_strides(dvc, paged and dv_cache is not None), *page_args, dkc.stride(0), dvc.stride(0), page_size,
            k_cache.shape[0], softmax_scale, qk_scale, cache_len, seqlen_q, heads_q, heads_kv, groups, prefix_blocks,
            prefix_blocks + triton.cdiv(seqlen_q, plan.block_n_kv),
            D=head_dim, BM=plan.block_m_kv, BN=plan.block_n_kv, BD=head_dim_p2, IS_CAUSAL=causal,
            PREFIX_DK=prefix_dk, PREFIX_DV=prefix_dv, DQ_ATOMIC=plan.dq_atomic, PAGED=paged, UPCAST=upcast,
            WIDE=wide, WIDE_Q=wide_q, num_warps=plan.warps_kv, num_stages=plan.stages_kv, enable_fp_fusion=True)
        if not plan.dq_atomic:
            bwd_dq_kernel[grids["bwd_dq_kernel"]](
                q, k_cache, v_cache, k_new, v_new, cache_seqlens, table, dout, lse, delta, partial,
                *qdo_strides, *kv_strides, 0 if splits == 1 else partial.stride(0), *partial.stride()[-4:-1],
                *page_args, page_size, k_cache.shape[0],
                softmax_scale, qk_scale, cache_len, seqlen_q, heads_q, groups, split_len, q_blocks,
                batch * heads_q, splits,
                D=head_dim, BM=plan.block_m_q, BN=plan.block_n_q, BD=head_dim_p2, IS_CAUSAL=causal, PAGED=paged,
                UPCAST=upcast, WIDE=wide, num_warps=plan.warps_q, num_stages=plan.stages_q, enable_fp_fusion=True)
    if plan.dq_atomic or splits > 1:
        dq = (partial if plan.dq_atomic else partial.sum(0)).to(q.dtype)
    if blend is None:
        return dq, dk_new, dv_new
    return (dq, *_blend_bwd(blend, dk_new, dv_new, dk_cache, dv_cache, cache_seqlens, block_table, cache_len,
                            page_size, k_cache.shape[0], wide, upcast, grids["blend_bwd_kernel"]))


def _blend_bwd(blend: BlendGrad, dk_new, dv_new, dk_cache, dv_cache, cache_seqlens, block_table, cache_len: int,
               page_size: int, num_blocks: int, wide: bool, upcast: bool, grid: tuple):
    """The blend's backward launch (kernels/blend.py) after attention's: (dk, dv, dgate, dgate_v)."""
    batch, seqlen_q, heads_kv, head_dim = dk_new.shape
    device = dk_new.device
    paged = block_table is not None
    kv_shape = tuple(dk_new.shape)
    gates = [gate_args(blend.gate, blend.k, kv_shape), gate_args(blend.gate_v, blend.v, kv_shape)]
    needs = [blend.need_gate and gates[0][0] == GATE_TENSOR, blend.need_gate_v and gates[1][0] == GATE_TENSOR]
    # A gate with one value per (b, i, h) (stride 0 along channels) gets its gradient summed over channels.
    per_row = [g[0] == GATE_TENSOR and g[2][3] == 0 for g in gates]
    dk = torch.empty(kv_shape, dtype=blend.k.dtype, device=device)
    dv = torch.empty(kv_shape, dtype=blend.v.dtype, device=device)
    dgates = [torch.empty(kv_shape[:3] if rows else kv_shape, dtype=torch.float32, device=device) if need else dk_new
              for need, rows in zip(needs, per_row)]
    # Absent tensors point at one that is there (never read or written).
    buf_k = dk_new if dk_cache is None else dk_cache
    buf_v = dv_new if dv_cache is None else dv_cache
    k_old = blend.k if blend.k_old is None else blend.k_old
    v_old = blend.v if blend.v_old is None else blend.v_old
    (gk_kind, gk, s_gk, gk_alpha, gk_beta), (gv_kind, gv, s_gv, gv_alpha, gv_beta) = gates
    with device_guard(device):
        blend_bwd_kernel[grid](
            dk_new, dv_new, buf_k, buf_v, cache_seqlens, block_table if paged else cache_seqlens, blend.k, blend.v,
            k_old, v_old, gk, gv, dk, dv, *dgates, *blend.k.stride()[:3], *blend.v.stride()[:3],
            *buf_k.stride()[:3], *buf_v.stride()[:3], block_table.stride(0) if paged else 0, *s_gk, *s_gv,
            gk_alpha, gk_beta, gv_alpha, gv_beta, seqlen_q, cache_len, heads_kv, triton.cdiv(seqlen_q, BLOCK_SLOTS),
            page_size, num_blocks,
            D=head_dim, GATE_K=gk_kind, GATE_V=gv_kind, GRAD_IN_K=dk_cache is not None,
            GRAD_IN_V=dv_cache is not None, UPDATE_K=blend.update_k, UPDATE_V=blend.update_v, NEED_DGATE_K=needs[0],
            NEED_DGATE_V=needs[1], DGATE_ROWS_K=per_row[0], DGATE_ROWS_V=per_row[1], PAGED=paged, WIDE=wide,
            UPCAST=upcast, BLOCK_N=BLOCK_SLOTS, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=4,
            enable_fp_fusion=True)
    dgate, dgate_v = (_gate_grad(gate, grad, rows) if need else None
                      for gate, grad, rows, need in zip((blend.gate, blend.gate_v), dgates, per_row, needs))
    return dk, dv, dgate, dgate_v


def _gate_grad(gate: torch.Tensor, grad: torch.Tensor, rows: bool) -> torch.Tensor:
    """A gate's gradient in its own shape and dtype, from the kernel's float32 (B, M, Hkv[, D]) one: summed
    over what the gate was broadcast along (as PyTorch's sum_to_size)."""
    if rows:
        grad = grad.unsqueeze(-1)
    return grad.sum_to_size(gate.shape).to(gate.dtype)
