"""The jitted pieces every kernel of this package shares: dot products and roundings that the Triton
interpreter gets right, cache addresses through a block table, and the blend of one tile of slots.

The Triton interpreter (3.9) mishandles bfloat16: ``tl.dot`` multiplies the raw 16-bit patterns as integers,
and float32 -> bfloat16 truncates instead of rounding to nearest even.  With FIX_BF16 (set by the launchers
for bfloat16 under the interpreter only) :func:`dot` and :func:`round_to` do what the GPU does, by other means.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)

# Gate kinds (constexpr): none (write-through), a Python float, a tensor seen through stride-0 broadcasting.
GATE_NONE, GATE_SCALAR, GATE_TENSOR = 0, 1, 2


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    """a @ b accumulated in float32 (FIX_BF16: on float32 copies; exact products and float32 sums, as the
    tensor cores)."""
    if FIX_BF16:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def round_to(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (FIX_BF16: to nearest even on the bits; x is finite)."""
    if FIX_BF16 and dtype == tl.bfloat16:
        b_bits = x.to(tl.uint32, bitcast=True)
        b_bits = b_bits + 0x7FFF + ((b_bits >> 16) & 1)
        y = (b_bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def cache_offsets(BT, o_p, m_p, s_page, s_pos, PAGE, NB, PAGED: tl.constexpr, WIDE: tl.constexpr):
    """Offsets of logical positions ``o_p`` of one row inside its cache (``m_p``: the positions used).

    Contiguous caches: position times the sequence stride (the row is in the base pointer).  Paged caches
    (docs/op.md#paged-caches): slot o_p % PAGE of page BT[o_p // PAGE] (BT: the row of the block table), the
    entry clamped to [0, NB) so that whatever the table holds no access leaves the pool.  32-bit unless WIDE
    (a cache or pool spanning 2**31 elements): 64-bit offsets per element cost registers enough to spill.
    """
    if PAGED:
        i_pg = tl.load(BT + o_p // PAGE, mask=m_p, other=0)
        i_pg = tl.minimum(tl.maximum(i_pg, 0), NB - 1)
        o_in = o_p % PAGE
        if WIDE:
            i_pg, o_in = i_pg.to(tl.int64), o_in.to(tl.int64)
        offsets = i_pg * s_page + o_in * s_pos
    else:
        if WIDE:
            o_p = o_p.to(tl.int64)
        offsets = o_p * s_pos
    return offsets


@triton.jit
def blend_tile(C, X, GATE, NEW, OLD, BT, g_alpha, g_beta, o_i, m_i, L, S, s_cb, s_cn, s_xm, s_gm, s_gd, s_nm,
               PAGE, NB, GATE_KIND: tl.constexpr, SAVE_NEW: tl.constexpr, SAVE_OLD: tl.constexpr,
               PAGED: tl.constexpr, WIDE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               FIX_BF16: tl.constexpr):
    """Active slots ``o_i`` (``m_i``: those that exist) of one (b, kv head): C[L + i] = alpha * C_old[L + i] +
    (1 - alpha) * X[i], in float32, rounded once (docs/op.md#the-cache-update).

    C, X, GATE, NEW and OLD point at the (b, h) slice of the cache (of the pool: head only, when PAGED), of the
    fresh values, of the gate and of the (B, M, Hkv, D) side outputs: the slots' values after (SAVE_NEW) and
    before (SAVE_OLD) the update, which the backward reads (row stride ``s_nm``).  The caller compiles this
    without FMA contraction: alpha*old and (1-alpha)*fresh are rounded separately, as PyTorch does.
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_p = L + o_i
    m_p = m_i & (o_p < S)
    m_x = m_p[:, None] & m_d[None, :]
    p_c = C + cache_offsets(BT, o_p, m_p, s_cb, s_cn, PAGE, NB, PAGED, WIDE)[:, None] + o_d[None, :]
    o_i64 = o_i.to(tl.int64)
    # [BN, BD]
    b_x = tl.load(X + o_i64[:, None] * s_xm + o_d[None, :], mask=m_x, other=0.)
    if GATE_KIND == 0:
        b_new = b_x
    else:
        b_old = tl.load(p_c, mask=m_x, other=0.)
        if SAVE_OLD:
            tl.store(OLD + o_i64[:, None] * s_nm + o_d[None, :], b_old, mask=m_x)
        if GATE_KIND == 1:
            b_mix = g_alpha * b_old.to(tl.float32) + g_beta * b_x.to(tl.float32)
        else:
            b_a = tl.load(GATE + o_i64[:, None] * s_gm + o_d[None, :] * s_gd, mask=m_x, other=0.).to(tl.float32)
            b_mix = b_a * b_old.to(tl.float32) + (1. - b_a) * b_x.to(tl.float32)
        b_new = round_to(b_mix, C.dtype.element_ty, FIX_BF16)
    tl.store(p_c, b_new, mask=m_x)
    if SAVE_NEW:
        tl.store(NEW + o_i64[:, None] * s_nm + o_d[None, :], b_new, mask=m_x)


@triton.jit
def attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kb, s_kn, s_vb, s_vn, lo, hi, b_last, qk_scale, PAGE, NB,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr, WIDE: tl.constexpr,
            D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
            FIX_BF16: tl.constexpr):
    """Online softmax of the rows of ``b_q`` over keys [lo, hi).

    MASKED: keys past ``hi`` are masked, and with CAUSAL row r sees keys <= b_last[r]; a row may then see no
    key of the range (it keeps l = 0).  Unmasked: every row sees every key of [lo, hi), a whole number of
    tiles.  ``b_m`` is the running max of the scaled scores in the log2 domain.
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    EVEN_D: tl.constexpr = BLOCK_D == D
    for i_n in range(lo, hi, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        p_k = KC + cache_offsets(BT, o_n, m_n, s_kb, s_kn, PAGE, NB, PAGED, WIDE)[:, None] + o_d[None, :]
        p_v = VC + cache_offsets(BT, o_n, m_n, s_vb, s_vn, PAGE, NB, PAGED, WIDE)[:, None] + o_d[None, :]
        # [BN, BD]
        if MASKED:
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.)
            b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.)
        elif EVEN_D:
            b_k = tl.load(p_k)
            b_v = tl.load(p_v)
        else:
            b_k = tl.load(p_k, mask=m_d[None, :], other=0.)
            b_v = tl.load(p_v, mask=m_d[None, :], other=0.)
        # [BR, BN]
        b_s = dot(b_q, tl.trans(b_k), PRECISION, FIX_BF16) * qk_scale
        if MASKED:
            m_s = m_n[None, :]
            if CAUSAL:
                m_s = m_s & (o_n[None, :] <= b_last[:, None])
            b_s = tl.where(m_s, b_s, float("-inf"))
        # [BR]
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_use = b_m_new
        if MASKED:
            # A row with no visible key yet: exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
            b_m_use = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_r = tl.exp2(b_m - b_m_use)
        b_p = tl.exp2(b_s - b_m_use[:, None])
        b_l = b_l * b_r + tl.sum(b_p, 1)
        acc = acc * b_r[:, None] + dot(round_to(b_p, b_v.dtype, FIX_BF16), b_v, PRECISION, FIX_BF16)
        b_m = b_m_new
    return acc, b_m, b_l
