"""The decode path (docs/op.md#the-attention-read): one launch that blends and attends, for calls whose rows fit
one tile (M * G <= DECODE_ROWS: decoding one token, speculative steps, MQA/GQA groups).

Rows are the M * G pairs (active token i, query head h * G + g) of a kv head h, r = i * G + g: one program
holds them all, so each K/V tile it loads feeds every query head of the group.  The settled prefix [0, L_b)
is cut into P splits of SPLIT_LEN keys (flash-decoding), one program each, sized so that B * Hkv * P fills
the multiprocessors about twice; the split that finishes last can merge the splits itself (FOLD_MERGE) instead
of a merge launch (kernels/merge.py).

Ownership rule (what makes the in-place update race-free inside one launch).  The program of split 0 is the
*owner* of row b's active slots [L_b, L_b + M): it reads their old values (only when a gate needs them),
blends, stores the rounded result (and the side outputs the backward reads), waits at a CTA barrier, and is
then the only program that reads those slots back, after its prefix split.  Every other program reads
positions < L_b only, which nothing in the launch writes.  So each active slot has one writer, no program
reads a slot another may be writing, and the old value is read by the very program that overwrites it,
before it does.  The kernel is compiled without FMA contraction (the blend must round alpha*old and
(1-alpha)*fresh separately, docs/op.md#the-cache-update); decode is memory-bound, so that costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl

from melt_kernels.kernels.blend import BLOCK_SLOTS
from melt_kernels.kernels.merge import merge_rows
from melt_kernels.kernels.tile_ops import LN2, attend, blend_tile, round_to

# Rows (M * G) one decode program holds; larger calls take the chunk path (a blend launch, then attention).
DECODE_ROWS = 64
# float32 multiplies on the FMA units, whose tiles live in registers: 64 rows spilled 0.8-2.7 KB per thread
# at head_dim 80-256 (sm_90, Triton 3.9; benchmarks/aot_compile.py), 32 rows none.
DECODE_ROWS_FP32 = 32


def decode_rows(elem_size: int) -> int:
    """The most rows (M * G) one decode program holds for elements of ``elem_size`` bytes."""
    return DECODE_ROWS if elem_size <= 2 else DECODE_ROWS_FP32


# Active slots per step of the owner's blend: the blend launch's tile.
SLOT_TILE = tl.constexpr(BLOCK_SLOTS)
# Programs per multiprocessor the split count aims at: two keep a load stream in flight while one computes.
PROGRAMS_PER_SM = 2
# The shortest split, in key tiles: shorter ones cost more in partial results and merging than they gain.
MIN_SPLIT_TILES = 2


@triton.jit
def decode_kernel(
    Q, K, V, KC, VC, SEQLENS, BT, GK, GV, KN, VN, KO, VO, O, LSE, O_PART, LSE_PART, COUNTERS,
    s_qb, s_qm, s_qh, s_kb, s_km, s_kh, s_vb, s_vm, s_vh,
    s_kcb, s_kcn, s_kch, s_vcb, s_vcn, s_vch, s_btb,
    s_gkb, s_gkm, s_gkh, s_gkd, s_gvb, s_gvm, s_gvh, s_gvd, s_nb, s_nm, s_nh,
    gk_alpha, gk_beta, gv_alpha, gv_beta,
    s_ob, s_om, s_oh, s_lb, s_lh,
    qk_scale, M, S, HKV, P, SPLIT_LEN, PAGE, NB,
    G: tl.constexpr, D: tl.constexpr, GATE_K: tl.constexpr, GATE_V: tl.constexpr, SAVE_NEW_K: tl.constexpr,
    SAVE_NEW_V: tl.constexpr, SAVE_OLD_K: tl.constexpr, SAVE_OLD_V: tl.constexpr, CAUSAL: tl.constexpr,
    DIRECT: tl.constexpr, FOLD_MERGE: tl.constexpr, PAGED: tl.constexpr, WIDE: tl.constexpr,
    PRECISION: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (b, kv head, split): grid (B * Hkv * P,); split 0 owns the active slots."""
    i_bh, i_s = tl.program_id(0) // P, tl.program_id(0) % P
    i_b, i_h = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    R = M * G
    # Clamped so that a bad CUDA length cannot move any access outside [0, S).
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), tl.maximum(S - M, 0))
    is_owner = i_s == 0

    BT = BT + i_b * s_btb
    KC = KC + i_h * s_kch
    VC = VC + i_h * s_vch
    if not PAGED:
        KC = KC + i_b * s_kcb
        VC = VC + i_b * s_vcb
    if is_owner:
        p_n = i_b * s_nb + i_h * s_nh
        # Slot tiles of the blend launch's height, not BLOCK_N: [64, D] old, fresh and gate tiles beside the
        # attention's registers spilled 72-296 bytes at M = 16 (sm_90), and a 1-token decode loads 16 rows.
        for i_0 in range(0, M, SLOT_TILE):
            o_a = i_0 + tl.arange(0, SLOT_TILE)
            blend_tile(KC, K + i_b * s_kb + i_h * s_kh, GK + i_b * s_gkb + i_h * s_gkh, KN + p_n, KO + p_n, BT,
                       gk_alpha, gk_beta, o_a, o_a < M, L, S, s_kcb, s_kcn, s_km, s_gkm, s_gkd, s_nm, PAGE, NB,
                       GATE_K, SAVE_NEW_K, SAVE_OLD_K, PAGED, WIDE, D, BLOCK_D, FIX_BF16)
            blend_tile(VC, V + i_b * s_vb + i_h * s_vh, GV + i_b * s_gvb + i_h * s_gvh, VN + p_n, VO + p_n, BT,
                       gv_alpha, gv_beta, o_a, o_a < M, L, S, s_vcb, s_vcn, s_vm, s_gvm, s_gvd, s_nm, PAGE, NB,
                       GATE_V, SAVE_NEW_V, SAVE_OLD_V, PAGED, WIDE, D, BLOCK_D, FIX_BF16)
    # The owner's stores must be visible to all its threads before it reads the slots back.
    tl.debug_barrier()

    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    o_i, o_g = o_r // G, o_r % G
    o_d = tl.arange(0, BLOCK_D)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    # [BR, BD]
    b_q = tl.load(Q + i_b * s_qb + (i_h * G + o_g)[:, None] * s_qh + o_i.to(tl.int64)[:, None] * s_qm
                  + o_d[None, :], mask=m_rd, other=0.)
    b_last = L + o_i
    # The last split reaches the row's true L_b, however short the bound the plan was sized by (a
    # max_seqlen_k hint that was too small costs time, never keys).
    p_lo = i_s * SPLIT_LEN
    p_hi = tl.where(i_s == P - 1, L, tl.minimum(p_lo + SPLIT_LEN, L))
    n_full = tl.maximum(p_hi - p_lo, 0) // BLOCK_N * BLOCK_N
    b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # Prefix keys: every row sees them all.
    acc, b_m, b_l = attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, p_lo, p_lo + n_full, b_last,
                           qk_scale, PAGE, NB, False, False, PAGED, WIDE, D, BLOCK_N, BLOCK_D, PRECISION, FIX_BF16)
    acc, b_m, b_l = attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, p_lo + n_full, p_hi, b_last,
                           qk_scale, PAGE, NB, True, False, PAGED, WIDE, D, BLOCK_N, BLOCK_D, PRECISION, FIX_BF16)
    # The active slots, for the owner only (an empty range for the others).
    a_lo = tl.where(is_owner, L, 0)
    a_hi = tl.where(is_owner, tl.minimum(L + M, S), 0)
    acc, b_m, b_l = attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, a_lo, a_hi, b_last,
                           qk_scale, PAGE, NB, True, CAUSAL, PAGED, WIDE, D, BLOCK_N, BLOCK_D, PRECISION, FIX_BF16)
    # An empty prefix split (l = 0) leaves out = 0 and lse = -inf, which the merge weighs by 0.
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    b_out = acc / b_l_safe[:, None]
    b_lse = tl.where(b_l > 0, (b_m + tl.log2(b_l_safe)) * LN2, float("-inf"))
    if DIRECT:
        p_o = O + i_b * s_ob + o_i.to(tl.int64)[:, None] * s_om + (i_h * G + o_g)[:, None] * s_oh
        tl.store(p_o + o_d[None, :], round_to(b_out, O.dtype.element_ty, FIX_BF16), mask=m_rd)
        tl.store(LSE + i_b * s_lb + (i_h * G + o_g) * s_lh + o_i, b_lse, mask=m_r)
    else:
        p_part = (i_bh.to(tl.int64) * P + i_s) * R + o_r
        tl.store(O_PART + p_part[:, None] * D + o_d[None, :], b_out, mask=m_rd)
        tl.store(LSE_PART + p_part, b_lse, mask=m_r)
        if FOLD_MERGE:
            # Every thread's partial stores precede the arrival (acq_rel: the last to arrive sees them all).
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNTERS + i_bh, 1, sem="acq_rel")
            if arrived == P - 1:
                merge_rows(O_PART, LSE_PART, O, LSE, i_bh, o_r, s_ob, s_om, s_oh, s_lb, s_lh, M, HKV, P, G, D,
                           BLOCK_R, BLOCK_D, FIX_BF16, True)
                # Back to zero for the next call on this stream (the counters are never cleared otherwise).
                tl.atomic_xchg(COUNTERS + i_bh, 0, sem="relaxed")


@dataclass(frozen=True)
class DecodePlan:
    """How a decode call is cut into programs (module docstring)."""

    block_r: int  # the rows (token, query head) of a kv head, padded to a power of two >= 16
    block_n: int  # keys per tile
    block_d: int  # head_dim padded to a power of two
    splits: int  # P
    split_len: int  # keys per prefix split (a multiple of block_n); the last split reaches L_b
    num_warps: int
    num_stages: int
    fold_merge: bool  # the split that finishes last merges (no merge launch)

    @property
    def direct(self) -> bool:
        return self.splits == 1


def plan_decode(batch: int, seqlen_q: int, heads_q: int, heads_kv: int, head_dim: int, max_prefix: int, sms: int,
                elem_size: int = 2, *, aligned: bool = True, block_r: Optional[int] = None,
                block_n: Optional[int] = None, split_len: Optional[int] = None, num_warps: Optional[int] = None,
                num_stages: Optional[int] = None, fold_merge: bool = False) -> DecodePlan:
    """Tiles, warps, stages and splits; ``max_prefix`` bounds every row's L_b.

    Decode reads the whole prefix once: memory-bound.  One warpgroup with its warps along the (padded) rows,
    64-key tiles three stages deep (cp.async), and enough
    splits for PROGRAMS_PER_SM programs per multiprocessor but none shorter than MIN_SPLIT_TILES tiles: at
    batch 1 with 16 kv heads and 1k keys that is 8 splits of 128 keys (128 programs), at 8k 16 splits of
    512.  float32 multiplies in IEEE float32 on the FMA units, which needs small tiles to stay in registers;
    so do 16-bit head_dims above 128 on tensors that are not ``aligned`` (kernels/launch.py).  Each choice
    stays within 64 bytes of register spills for sm_90 (benchmarks/aot_compile.py checks it in CI).
    """
    rows = seqlen_q * (heads_q // heads_kv)
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = elem_size > 2
    narrow = not aligned and not wide and block_d >= 128
    least = max(16, triton.next_power_of_2(rows))
    # 16-bit head_dim 256 on unaligned tensors: a [64, 256] accumulator on one warpgroup beside the narrow loads
    # spilled 84-124 bytes for 1-16 rows (Triton 3.6), so up to 32 rows the warps go along the keys of an
    # unpadded row tile (mma v2; 64 rows would take a replicated wgmma).
    along_keys = narrow and block_d > 128 and least <= 32
    if num_warps is None:
        num_warps = 8 if wide or along_keys else 4
    if block_r is None:
        # Warps along rows: 16 rows per warp, padding included, so that each warp holds whole rows of the
        # scores (its own max and sum, and P stays in its registers for the next dot) and a 16-bit tile is one
        # warpgroup's wgmma.  With 16 rows and warps along keys (what one 16-row tile gives), every key tile
        # sends each row's max and sum through shared memory.  The padding's extra tensor work is free here.
        # float32 tiles and those with warps along the keys are not padded.
        block_r = least if wide or along_keys else max(least, 16 * num_warps)
    elif block_r < least:
        raise ValueError(f"block_r must hold the {rows} rows (M * Hq / Hkv) of the decode path: at least {least}, "
                         f"got {block_r}")
    if block_n is None:
        if wide:
            # 32-row float32 tiles at head_dim 80-128 spill 470-720 bytes (sm_90, Triton 3.6 and 3.9) with 32
            # keys (MQA decode at G = 32, M = 8 at G = 4): 16 keys, none.
            block_n = 16 if block_d > 128 or (block_d > 64 and block_r > 16) else 32
        elif along_keys:
            block_n = 8 * num_warps  # 8 keys per warp: mma v2's narrowest
        elif narrow and block_d > 128:
            block_n = 16
        elif narrow:
            block_n = 32 if block_r > 32 else 64
        else:
            # head_dim 256 with 64-key tiles spills 76 bytes on Triton 3.6 for an element gate (three
            # [64, 256] tiles live in the slot update), even when the row tile is 16 rows.
            block_n = 32 if block_d > 128 else 64
    if num_stages is None:
        num_stages = 3 if block_d <= 128 and not wide else 2
    if split_len is None:
        wanted = PROGRAMS_PER_SM * sms
        most = triton.cdiv(max_prefix, MIN_SPLIT_TILES * block_n)
        splits = max(1, min(triton.cdiv(wanted, batch * heads_kv), most))
        split_len = triton.cdiv(max(max_prefix, 1), splits)
    split_len = block_n * triton.cdiv(max(split_len, 1), block_n)
    splits = max(1, triton.cdiv(max_prefix, split_len))
    return DecodePlan(block_r=block_r, block_n=block_n, block_d=block_d, splits=splits, split_len=split_len,
                      num_warps=num_warps, num_stages=num_stages, fold_merge=fold_merge and splits > 1)


def decode_grid(batch: int, heads_kv: int, plan: DecodePlan) -> tuple:
    return (batch * heads_kv * plan.splits,)
