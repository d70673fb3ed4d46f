"""Forward of the fused gated KV-cache update + attention (SPEC §2.1-2.2) in Triton.

One launch blends the active tokens' fresh keys/values into the caches in
place and attends over the updated caches; when the keys are cut into
several splits (flash-decoding) or the active tokens' rows into several row
blocks, a second small launch merges the partial results by their
log-sum-exp.

Work decomposition.  The rows of a kv head h of row b are the M * G pairs
(active token i, query head h*G + g), G = Hq // Hkv, flattened as
r = i * G + g, so one program serves every query head of its kv head and
each K/V tile it loads feeds all of them.  Rows are cut into NR row blocks
of BLOCK_R; the settled prefix [0, L_b) into P splits of SPLIT_LEN keys.
The active slots [L_b, L_b + M) are not part of any split.

Ownership rule (what makes the update race-free by construction).  For
every (b, h) exactly one program, the *owner*, touches the active slots
[L_b, L_b + M): it reads their old values (only when a gate needs them),
blends, stores the rounded result, waits at a CTA barrier, and is then the
only program that reads those slots back for attention.  Every other
program of the launch reads positions < L_b only, which nothing in the
launch writes.  So each active slot has one writer, no program reads a slot
another program may have overwritten, and the old value is read by the very
program that overwrites it, before it does.  The owner is:

* NR == 1 (decode, small M * G): the program of split 0; it serves all rows,
  so it attends over its prefix split and then over the active slots.
* NR > 1 (chunk): one extra program per (b, h), item 0 of the (b, h) group
  (launched first, as it does the longest single task), that serves the
  active part of all NR row blocks in turn; the prefix programs of each row
  block leave the active keys to it and the merge adds the two.

Every access is masked: head_dim is padded to a power of two, rows past
M * G, keys past the range, and the row lengths are clamped to [0, S - M] in
the kernel, so even a CUDA ``cache_seqlens`` with bad values (not checked on
the host, since that would sync) never makes the kernels read or write
outside [0, S).  Offsets along the batch, sequence and head dimensions are
int64.

Paged caches (PAGED, SPEC 2.6): the caches are pools (num_blocks, page_size,
Hkv, D) and every cache address goes through :func:`_cache_offsets`, which
maps logical position p of row b to slot p % page_size of page
block_table[b, p // page_size], the entry clamped into [0, num_blocks); S is
then max_blocks * page_size.  The contiguous cache is the same code with the
identity mapping (the row in the base pointer, p times the sequence stride):
one kernel, and the ownership rule above holds unchanged as long as no two
rows' active slots share a physical slot (checked on the host when the table
is there).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from melt_kernels.kernels.launch import aligned, check_grids, device_guard, num_sms

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)

# Gate kinds (constexpr): none (write-through), a Python float, a tensor seen through stride-0 broadcasting.
GATE_NONE, GATE_SCALAR, GATE_TENSOR = 0, 1, 2


# The Triton interpreter (3.9) mishandles bfloat16: tl.dot multiplies the raw 16-bit patterns as integers,
# and float32 -> bfloat16 truncates instead of rounding to nearest even.  With FIX_BF16 (set for bfloat16
# under the interpreter only) the two helpers below do what the GPU does, by other means.


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    """a @ b accumulated in float32 (FIX_BF16: on float32 copies; exact products and float32 sums, as the
    tensor cores)."""
    if FIX_BF16:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _round(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (FIX_BF16: to nearest even on the bits; x is finite)."""
    if FIX_BF16 and dtype == tl.bfloat16:
        b_bits = x.to(tl.uint32, bitcast=True)
        b_bits = b_bits + 0x7FFF + ((b_bits >> 16) & 1)
        y = (b_bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _cache_offsets(BT, o_p, m_p, s_page, s_pos, PAGE, NB, PAGED: tl.constexpr):
    """int64 offsets of logical positions ``o_p`` of one row inside its cache (``m_p``: the positions used).

    Contiguous caches: position times the sequence stride (the row is in the base pointer).  Paged caches
    (SPEC 2.6): slot o_p % PAGE of page BT[o_p // PAGE] (BT: the row of the block table), the entry clamped to
    [0, NB) so that whatever the table holds no access leaves the pool.
    """
    if PAGED:
        i_pg = tl.load(BT + o_p // PAGE, mask=m_p, other=0)
        i_pg = tl.minimum(tl.maximum(i_pg, 0), NB - 1)
        offsets = i_pg.to(tl.int64) * s_page + (o_p % PAGE).to(tl.int64) * s_pos
    else:
        offsets = o_p.to(tl.int64) * s_pos
    return offsets


@triton.jit
def _blend_active(C, X, GATE, BT, g_alpha, g_beta, s_cb, s_cn, s_xm, s_gm, s_gd, L, M, S, PAGE, NB,
                  GATE_KIND: tl.constexpr, PAGED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr):
    """C[L + i] = alpha * C_old[L + i] + (1 - alpha) * X[i] for i < M (L + i < S), in float32, rounded once.

    C, X and GATE point at the (b, h) slice of the cache (of the pool: head only, when PAGED), the fresh
    values and the gate; BT at the row of the block table.
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    for i_0 in range(0, M, BLOCK_N):
        o_i = i_0 + tl.arange(0, BLOCK_N)
        o_p = L + o_i
        m_p = (o_i < M) & (o_p < S)
        m_x = m_p[:, None] & m_d[None, :]
        p_c = C + _cache_offsets(BT, o_p, m_p, s_cb, s_cn, PAGE, NB, PAGED)[:, None] + o_d[None, :]
        # [BN, BD]
        b_x = tl.load(X + o_i.to(tl.int64)[:, None] * s_xm + o_d[None, :], mask=m_x, other=0.)
        if GATE_KIND == 0:
            tl.store(p_c, b_x, mask=m_x)
        else:
            b_old = tl.load(p_c, mask=m_x, other=0.).to(tl.float32)
            if GATE_KIND == 1:
                b_new = g_alpha * b_old + g_beta * b_x.to(tl.float32)
            else:
                b_a = tl.load(GATE + o_i.to(tl.int64)[:, None] * s_gm + o_d[None, :] * s_gd, mask=m_x,
                              other=0.).to(tl.float32)
                b_new = b_a * b_old + (1. - b_a) * b_x.to(tl.float32)
            tl.store(p_c, _round(b_new, C.dtype.element_ty, FIX_BF16), mask=m_x)


@triton.jit
def _attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kb, s_kn, s_vb, s_vn, lo, hi, b_last, qk_scale, PAGE, NB,
            MASK_CAUSAL: tl.constexpr, PAGED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    """Online softmax of the rows of ``b_q`` over keys [lo, hi); with MASK_CAUSAL row r sees keys <= b_last[r].

    Scores are in the log2 domain (``qk_scale`` includes log2(e)).  The first
    block always holds a visible key for every row (prefix keys are seen by
    all rows, and every row sees the first active slot), so ``b_m`` is
    finite after it and exp2 never meets inf - inf.
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    for i_n in range(lo, hi, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        m_kv = m_n[:, None] & m_d[None, :]
        # [BN, BD]
        b_k = tl.load(KC + _cache_offsets(BT, o_n, m_n, s_kb, s_kn, PAGE, NB, PAGED)[:, None] + o_d[None, :],
                      mask=m_kv, other=0.)
        b_v = tl.load(VC + _cache_offsets(BT, o_n, m_n, s_vb, s_vn, PAGE, NB, PAGED)[:, None] + o_d[None, :],
                      mask=m_kv, other=0.)
        # [BR, BN]
        b_s = _dot(b_q, tl.trans(b_k), PRECISION, FIX_BF16) * qk_scale
        m_s = m_n[None, :]
        if MASK_CAUSAL:
            m_s = m_s & (o_n[None, :] <= b_last[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        # [BR]
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_r = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_r + tl.sum(b_p, 1)
        acc = acc * b_r[:, None] + _dot(_round(b_p, b_v.dtype, FIX_BF16), b_v, PRECISION, FIX_BF16)
        b_m = b_m_new
    return acc, b_m, b_l


@triton.jit
def gated_kv_attention_fwd_kernel(
    Q, K, V, KC, VC, SEQLENS, BT, GK, GV, O, LSE, O_PART, LSE_PART,
    s_qb, s_qm, s_qh, s_kb, s_km, s_kh, s_vb, s_vm, s_vh,
    s_kcb, s_kcn, s_kch, s_vcb, s_vcn, s_vch, s_btb,
    s_gkb, s_gkm, s_gkh, s_gkd, s_gvb, s_gvm, s_gvh, s_gvd,
    gk_alpha, gk_beta, gv_alpha, gv_beta,
    s_ob, s_om, s_oh, s_lb, s_lh,
    qk_scale, M, S, HKV, NR, NT, NS, SPLIT_LEN, PAGE, NB,
    G: tl.constexpr, D: tl.constexpr, GATE_K: tl.constexpr, GATE_V: tl.constexpr, CAUSAL: tl.constexpr,
    SEPARATE_OWNER: tl.constexpr, DIRECT: tl.constexpr, PAGED: tl.constexpr, PRECISION: tl.constexpr,
    FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per work item t of a (b, h): grid (B * Hkv * NT,), NT = SEPARATE_OWNER + NR * P.

    Item t >= SEPARATE_OWNER is prefix split s = w // NR of row block w % NR (w = t - SEPARATE_OWNER);
    item 0 with SEPARATE_OWNER is the owner of the active slots (module docstring).  Each row has
    NS = P + SEPARATE_OWNER partial slots (normalised output and lse): slot 0 holds the active keys
    (and, with NR == 1, split 0), slot SEPARATE_OWNER + s split s.  DIRECT (NS == 1): the final out/lse.
    """
    i_bh, i_t = tl.program_id(0) // NT, tl.program_id(0) % NT
    i_b, i_h = i_bh // HKV, i_bh % HKV
    i_b64, i_h64 = i_b.to(tl.int64), i_h.to(tl.int64)
    R = M * G

    # Clamped so that a bad CUDA length cannot move any access outside [0, S).
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), tl.maximum(S - M, 0))
    a_hi = tl.minimum(L + M, S)

    # The last prefix split reaches the row's true L_b, however short the bound the plan was sized by (a
    # max_seqlen_k hint that was too small costs time, never keys).
    if SEPARATE_OWNER:
        is_owner = i_t == 0
        i_w = tl.maximum(i_t - 1, 0)
        i_s = i_w // NR
        i_slot = tl.where(is_owner, 0, 1 + i_s)
        # The owner serves every row block over the active keys only: its prefix range is empty.
        r_lo = tl.where(is_owner, 0, i_w % NR)
        r_hi = tl.where(is_owner, NR, r_lo + 1)
        p_lo = tl.where(is_owner, 0, i_s * SPLIT_LEN)
        p_hi = tl.where(is_owner, 0, tl.where(i_s == NS - 2, L, tl.minimum(p_lo + SPLIT_LEN, L)))
    else:
        # NR == 1: item t is prefix split t, and split 0 owns the active slots.
        is_owner = i_t == 0
        i_slot = i_t
        r_lo = 0
        r_hi = 1
        p_lo = i_t * SPLIT_LEN
        p_hi = tl.where(i_t == NT - 1, L, tl.minimum(p_lo + SPLIT_LEN, L))

    # Paged: S is the row's logical capacity (max_blocks * PAGE) and the row lives in the table, not the base.
    KC = KC + i_h64 * s_kch
    VC = VC + i_h64 * s_vch
    BT = BT + i_b64 * s_btb
    if not PAGED:
        KC = KC + i_b64 * s_kcb
        VC = VC + i_b64 * s_vcb
    if is_owner:
        _blend_active(KC, K + i_b64 * s_kb + i_h64 * s_kh, GK + i_b64 * s_gkb + i_h64 * s_gkh, BT, gk_alpha,
                      gk_beta, s_kcb, s_kcn, s_km, s_gkm, s_gkd, L, M, S, PAGE, NB, GATE_K, PAGED, D, BLOCK_N,
                      BLOCK_D, FIX_BF16)
        _blend_active(VC, V + i_b64 * s_vb + i_h64 * s_vh, GV + i_b64 * s_gvb + i_h64 * s_gvh, BT, gv_alpha,
                      gv_beta, s_vcb, s_vcn, s_vm, s_gvm, s_gvd, L, M, S, PAGE, NB, GATE_V, PAGED, D, BLOCK_N,
                      BLOCK_D, FIX_BF16)
    # The owner's stores must be visible to all its threads before it reads the slots back.
    tl.debug_barrier()

    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    for i_r in range(r_lo, r_hi):
        o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        o_i, o_g = o_r // G, o_r % G
        m_rd = m_r[:, None] & m_d[None, :]
        # [BR, BD]
        b_q = tl.load(Q + i_b64 * s_qb + (i_h64 * G + o_g)[:, None] * s_qh + o_i.to(tl.int64)[:, None] * s_qm
                      + o_d[None, :], mask=m_rd, other=0.)
        # Causal: the last key each row sees (rows past R see every key and are never stored).
        b_last = L + o_i
        b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        b_l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        acc, b_m, b_l = _attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, p_lo, p_hi, b_last,
                                qk_scale, PAGE, NB, False, PAGED, D, BLOCK_N, BLOCK_D, PRECISION, FIX_BF16)
        if is_owner:
            # Causal rows of this block see no active key past their last token.
            t_hi = a_hi
            if CAUSAL:
                t_hi = tl.minimum(a_hi, L + (tl.minimum((i_r + 1) * BLOCK_R, R) - 1) // G + 1)
            acc, b_m, b_l = _attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, L, t_hi, b_last,
                                    qk_scale, PAGE, NB, CAUSAL, PAGED, D, BLOCK_N, BLOCK_D, PRECISION, FIX_BF16)
        # An empty prefix split (l = 0) leaves out = 0 and lse = -inf, which the merge weighs by 0.
        b_l_safe = tl.where(b_l > 0, b_l, 1.)
        b_out = acc / b_l_safe[:, None]
        b_lse = tl.where(b_l > 0, (b_m + tl.log2(b_l_safe)) * LN2, float("-inf"))
        if DIRECT:
            p_o = O + i_b64 * s_ob + o_i.to(tl.int64)[:, None] * s_om + (i_h64 * G + o_g)[:, None] * s_oh
            tl.store(p_o + o_d[None, :], _round(b_out, O.dtype.element_ty, FIX_BF16), mask=m_rd)
            tl.store(LSE + i_b64 * s_lb + (i_h64 * G + o_g) * s_lh + o_i, b_lse, mask=m_r)
        else:
            p_part = (i_bh.to(tl.int64) * NS + i_slot) * R + o_r
            tl.store(O_PART + p_part[:, None] * D + o_d[None, :], b_out, mask=m_rd)
            tl.store(LSE_PART + p_part, b_lse, mask=m_r)


@triton.jit
def gated_kv_attention_merge_kernel(
    O_PART, LSE_PART, O, LSE, s_ob, s_om, s_oh, s_lb, s_lh, M, HKV, NS,
    G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """One program per row (b, h, r): out = sum_t exp(lse_t - lse) * out_t over its NS partial slots."""
    R = M * G
    i_bh, i_r = tl.program_id(0) // R, tl.program_id(0) % R
    i_b, i_h = i_bh // HKV, i_bh % HKV
    i_i, i_g = i_r // G, i_r % G
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    base = i_bh.to(tl.int64) * NS * R + i_r
    # Slot 0 is never empty (it holds the active keys), so the running max is finite after the first block.
    b_m = tl.full([], float("-inf"), tl.float32)
    b_l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i_0 in range(0, NS, BLOCK_T):
        o_t = i_0 + tl.arange(0, BLOCK_T)
        m_t = o_t < NS
        p_part = base + o_t.to(tl.int64) * R
        # [BT]
        b_lse = tl.load(LSE_PART + p_part, mask=m_t, other=float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_lse, 0))
        b_w = tl.exp(b_lse - b_m_new)
        b_r = tl.exp(b_m - b_m_new)
        # [BT, BD]
        b_o = tl.load(O_PART + p_part[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.)
        acc = acc * b_r + tl.sum(b_w[:, None] * b_o, 0)
        b_l = b_l * b_r + tl.sum(b_w, 0)
        b_m = b_m_new
    i_q = i_h.to(tl.int64) * G + i_g
    p_o = O + i_b.to(tl.int64) * s_ob + i_i.to(tl.int64) * s_om + i_q * s_oh
    tl.store(p_o + o_d, _round(acc / b_l, O.dtype.element_ty, FIX_BF16), mask=m_d)
    tl.store(LSE + i_b.to(tl.int64) * s_lb + i_q * s_lh + i_i, b_m + tl.log(b_l))


@dataclass(frozen=True)
class LaunchPlan:
    """How a call is cut into programs (see the module docstring)."""

    block_r: int  # rows (token, query head) per tile
    block_n: int  # keys per tile
    block_d: int  # head_dim padded to a power of two
    row_blocks: int  # NR
    splits: int  # P, prefix splits per row block
    split_len: int  # keys per prefix split (a multiple of block_n)
    num_warps: int
    num_stages: int

    @property
    def separate_owner(self) -> bool:
        return self.row_blocks > 1

    @property
    def items(self) -> int:
        """NT: programs per (b, kv head)."""
        return int(self.separate_owner) + self.row_blocks * self.splits

    @property
    def slots(self) -> int:
        """NS: partial results per row, merged by their log-sum-exp."""
        return int(self.separate_owner) + self.splits

    @property
    def direct(self) -> bool:
        """One program per row writes the final result: no merge launch."""
        return self.slots == 1


# Prefix splits shorter than this cost more in partial results and merging than they gain in parallelism.
MIN_SPLIT_LEN = 256


def plan_launch(batch: int, seqlen_q: int, heads_q: int, heads_kv: int, head_dim: int, max_prefix: int,
                sms: int, elem_size: int = 2, *, block_r: Optional[int] = None, block_n: Optional[int] = None,
                split_len: Optional[int] = None, num_warps: Optional[int] = None,
                num_stages: Optional[int] = None, aligned: bool = True) -> LaunchPlan:
    """Tile sizes, warps, pipeline depth and split count; ``max_prefix`` bounds every row's L_b.

    Decode (M * G rows fit one small tile) reads the whole cache once: it is
    memory-bound, so a 16-row tile, 64-key tiles three stages deep, and
    enough splits to give every SM a few programs.  Chunk (128-row tiles,
    several row blocks) is matmul-bound: FlashAttention-like tiles, and
    splits only when the row blocks alone do not fill one wave.  float32
    (``elem_size`` 4) multiplies in IEEE float32 on the FMA units, which
    needs small tiles to stay in registers; so do 16-bit head_dims above 128
    on tensors that are not ``aligned`` (kernels/launch.py).  The choices keep
    every configuration within 64 bytes of register spills for sm_90 with
    Triton 3.6 and 3.9 (``benchmarks/aot_compile.py`` checks it in CI).
    """
    rows = seqlen_q * (heads_q // heads_kv)
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = elem_size > 2
    narrow = not aligned and not wide and block_d >= 128
    if block_r is None:
        # float32 at head_dim 256 on unaligned tensors spills 120-144 bytes with 32-row tiles (Triton 3.9).
        cap = 16 if wide and not aligned and block_d > 128 else \
            32 if wide or (narrow and block_d > 128) else 64 if block_d > 128 else 128
        block_r = min(max(16, triton.next_power_of_2(rows)), cap)
    if block_n is None:
        if wide:
            # 32-row float32 tiles at head_dim 80-128 spill 470-720 bytes (sm_90, Triton 3.6 and 3.9) with 32
            # keys where one row block serves the chunk (MQA decode at G = 32, M = 8 at G = 4): 16 keys, none.
            block_n = 16 if block_d > 128 or (block_d > 64 and block_r > 16) else 32
        elif narrow and block_d > 128:
            block_n = 16 if block_r > 16 else 32
        elif narrow:
            block_n = 32 if block_r > 64 else 64
        else:
            # head_dim 256 with 64-key tiles spills 76 bytes on Triton 3.6 for an element gate (three
            # [64, 256] tiles live in the slot update), even when the row tile is 16 rows.
            block_n = 32 if block_d > 128 else 64
    row_blocks = triton.cdiv(rows, block_r)
    if split_len is None:
        # Memory-bound tiles want a few programs per SM in flight; matmul-bound ones one wave.  A split
        # of at least 16 * block_r keys keeps its partial results under 1/8 of the K/V bytes it reads.
        wanted = (4 if block_r <= 64 else 1) * sms
        programs = batch * heads_kv * row_blocks
        most = triton.cdiv(max_prefix, max(MIN_SPLIT_LEN, 16 * block_r))
        splits = max(1, min(triton.cdiv(wanted, programs), most))
        split_len = triton.cdiv(max(max_prefix, 1), splits)
    split_len = block_n * triton.cdiv(max(split_len, 1), block_n)
    splits = max(1, triton.cdiv(max_prefix, split_len))
    if num_warps is None:
        num_warps = 4 if block_d <= 64 and block_r <= 64 and not wide else 8
    if num_stages is None:
        num_stages = 3 if block_r <= 64 and block_d <= 128 and not wide else 2
    return LaunchPlan(block_r=block_r, block_n=block_n, block_d=block_d, row_blocks=row_blocks, splits=splits,
                      split_len=split_len, num_warps=num_warps, num_stages=num_stages)


def _gate_args(gate, like: torch.Tensor, kv_shape: tuple):
    """(kind, pointer, strides (b, m, h, d), alpha, 1 - alpha) for a gate given as None, float or tensor."""
    if gate is None:
        return GATE_NONE, like, (0, 0, 0, 0), 0., 0.
    if isinstance(gate, float):
        # 1 - alpha in double, then rounded, as PyTorch does for a Python scalar.
        return GATE_SCALAR, like, (0, 0, 0, 0), gate, 1. - gate
    # The strides of gate.expand(kv_shape), without building the view: 0 on broadcast dimensions.
    pad = (0,) * (4 - gate.dim())
    strides = pad + tuple(st if sz > 1 else 0 for st, sz in zip(gate.stride(), gate.shape))
    return GATE_TENSOR, gate, strides, 0., 0.


def fwd_grids(batch: int, heads_kv: int, rows: int, plan: LaunchPlan) -> dict:
    """The grid of each launch of a call: the main kernel, and the merge unless the plan is direct."""
    grids = {"gated_kv_attention_fwd_kernel": (batch * heads_kv * plan.items,)}
    if not plan.direct:
        grids["gated_kv_attention_merge_kernel"] = (batch * heads_kv * rows,)
    return grids


# The plan is a pure function of a few ints, asked for at every call with the same few shapes.
_plan = functools.lru_cache(maxsize=4096)(plan_launch)


def gated_kv_attention_fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                           max_seqlen_k=None, *, block_table=None, block_r=None, block_n=None, split_len=None,
                           num_warps=None, num_stages=None, input_precision=None):
    """In-place gated update of the active slots and attention over the updated caches (SPEC §2.1-2.2).

    Same signature and result as ``melt_kernels.reference.gated_kv_attention_ref_fwd``: returns
    (out (B, M, Hq, D) in q.dtype, lse (B, Hq, M) float32), launched on q's device and its current stream.
    ``max_seqlen_k`` sizes the split-KV plan (the cache capacity when None); it need not bound the lengths:
    the last split of each row reaches its true length.  Keyword overrides (for tests and tuning):
    ``block_r``/``block_n`` tile sizes (powers of two >= 16), ``split_len`` keys per prefix split,
    ``num_warps``/``num_stages``, ``input_precision`` of float32 dot products ("ieee" by default; "tf32"
    opts into TF32).  ``block_table``: paged caches (SPEC 2.6), the caches then being pools.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    cache_len = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    groups = heads_q // heads_kv
    max_prefix = max(0, min(cache_len if max_seqlen_k is None else max_seqlen_k, cache_len) - seqlen_q)
    device = q.device
    plan = _plan(batch, seqlen_q, heads_q, heads_kv, head_dim, max_prefix, num_sms(device), q.element_size(),
                 block_r=block_r, block_n=block_n, split_len=split_len, num_warps=num_warps, num_stages=num_stages,
                 aligned=aligned(q, k, v, k_cache, v_cache))
    rows = seqlen_q * groups
    direct, slots = plan.direct, plan.slots
    grids = fwd_grids(batch, heads_kv, rows, plan)
    check_grids(grids)
    if q.dtype == torch.float32:
        precision = input_precision or "ieee"
    else:
        precision = None  # ignored for 16-bit operands

    fix_bf16 = q.dtype == torch.bfloat16 and device.type == "cpu"  # the interpreter
    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=device)
    if direct:
        o_part = lse_part = lse  # unused
    else:
        # One allocation for both: the partial outputs (parts, D), then their lse (parts,).
        parts = batch * heads_kv * slots * rows
        workspace = torch.empty(parts * (head_dim + 1), dtype=torch.float32, device=device)
        o_part, lse_part = workspace[:parts * head_dim], workspace[parts * head_dim:]
    kv_shape = (batch, seqlen_q, heads_kv, head_dim)
    gk_kind, gk, s_gk, gk_alpha, gk_beta = _gate_args(gate, k, kv_shape)
    gv_kind, gv, s_gv, gv_alpha, gv_beta = (gk_kind, gk, s_gk, gk_alpha, gk_beta) if gate_v is gate else \
        _gate_args(gate_v, v, kv_shape)

    with device_guard(device):
        gated_kv_attention_fwd_kernel[grids["gated_kv_attention_fwd_kernel"]](
            q, k, v, k_cache, v_cache, cache_seqlens, block_table if paged else cache_seqlens, gk, gv, out, lse,
            o_part, lse_part,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_table.stride(0) if paged else 0,
            *s_gk, *s_gv, gk_alpha, gk_beta, gv_alpha, gv_beta,
            *out.stride()[:3], lse.stride(0), lse.stride(1),
            softmax_scale * LOG2E, seqlen_q, cache_len, heads_kv, plan.row_blocks, plan.items, slots,
            plan.split_len, page_size, k_cache.shape[0],
            G=groups, D=head_dim, GATE_K=gk_kind, GATE_V=gv_kind, CAUSAL=causal,
            SEPARATE_OWNER=plan.separate_owner, DIRECT=direct, PAGED=paged, PRECISION=precision,
            FIX_BF16=fix_bf16,
            BLOCK_R=plan.block_r, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d,
            num_warps=plan.num_warps, num_stages=plan.num_stages,
            # The blend must round alpha*old and (1-alpha)*fresh separately, as PyTorch does: no FMA contraction.
            enable_fp_fusion=False,
        )
        if not direct:
            gated_kv_attention_merge_kernel[grids["gated_kv_attention_merge_kernel"]](
                o_part, lse_part, out, lse, *out.stride()[:3], lse.stride(0), lse.stride(1),
                seqlen_q, heads_kv, slots, G=groups, D=head_dim,
                BLOCK_T=min(16, triton.next_power_of_2(slots)), BLOCK_D=plan.block_d,
                FIX_BF16=fix_bf16, num_warps=4 if plan.block_d >= 128 else 2, enable_fp_fusion=True,
            )
    return out, lse
