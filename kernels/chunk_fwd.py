"""The chunk path's attention launch (docs/op.md#the-attention-read), FlashAttention-2's forward over the cache.

It runs after the blend launch (kernels/blend.py) has written the chunk's M active slots, so it only reads:
keys [0, L_b + M) of row b are all in the cache.  Rows are the M * G pairs (active token i, query head
h * G + g) of a kv head h, flattened as r = i * G + g, so one program serves every query head of its kv head
and each K/V tile it loads feeds all of them (GQA read once).

Grid (1-D, decomposed in the kernel): row block x split x (b, kv head), the last row block first (under the
causal mask it sees the most keys, so the longest programs start first).  A row block's keys are cut into
``splits`` ranges of ``split_len`` (flash-decoding for a short chunk over a long cache); with one split the
program writes the final output and lse directly, otherwise a merge launch (kernels/merge.py) combines the
splits by their log-sum-exp.  The planner sizes the splits by waves of multiprocessors.

Inside a program one key loop runs in two parts: tiles every row of the block sees (below the causal band,
and in range) without a mask, then the tiles of the band with the causal and range masks.  Scores are in the
log2 domain: softmax_scale * log2(e) is folded into the exponent (exp2), and FMA contraction is on.

Every access stays in bounds: head_dim is padded to a power of two (masked unless it is one), rows past
M * G are never stored, keys past the range are masked, and the row lengths are clamped to [0, S - M] as in
the blend launch, so even a CUDA ``cache_seqlens`` with bad values (not checked on the host, since that would
sync) never reads outside [0, S).  Offsets along batch and head are 64-bit; inside a (b, h) slice 32-bit
unless WIDE.  Paged caches: every key address goes through the block table (kernels/tile_ops.cache_offsets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl

from melt_kernels.kernels.tile_ops import LN2, attend, round_to

# A split shorter than this many key tiles costs more in partial results and merging than it gains.
MIN_TILES_PER_SPLIT = 4


@triton.jit
def chunk_attention_kernel(
    Q, KC, VC, SEQLENS, BT, O, LSE, O_PART, LSE_PART,
    s_qb, s_qm, s_qh, s_kcb, s_kcn, s_kch, s_vcb, s_vcn, s_vch, s_btb, s_ob, s_om, s_oh, s_lb, s_lh,
    qk_scale, M, S, HKV, BH, NR, P, SPLIT_LEN, PAGE, NB,
    G: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, DIRECT: tl.constexpr, PAGED: tl.constexpr,
    WIDE: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (row block, split, (b, kv head)): grid (NR * P * BH,), the last row block first."""
    i_rs, i_bh = tl.program_id(0) // BH, tl.program_id(0) % BH
    i_r, i_s = NR - 1 - i_rs // P, i_rs % P
    i_b, i_h = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    R = M * G
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), tl.maximum(S - M, 0))

    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    o_i, o_g = o_r // G, o_r % G
    o_d = tl.arange(0, BLOCK_D)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    # Rows of this block see keys [0, hi); those below band_lo every row sees.
    i_first = (i_r * BLOCK_R) // G
    i_last = (tl.minimum((i_r + 1) * BLOCK_R, R) - 1) // G
    if CAUSAL:
        hi = L + i_last + 1
        band_lo = L + i_first + 1
    else:
        hi = L + M
        band_lo = hi
    # The last split reaches hi whatever bound sized the splits (a max_seqlen_k hint too small costs time).
    lo = i_s * SPLIT_LEN
    s_hi = tl.where(i_s == P - 1, hi, tl.minimum(lo + SPLIT_LEN, hi))
    n_full = tl.maximum(tl.minimum(s_hi, band_lo) - lo, 0) // BLOCK_N * BLOCK_N

    o_q = (i_h * G + o_g)[:, None] * s_qh + o_i[:, None] * s_qm + o_d[None, :]
    if WIDE:
        o_q = (i_h * G + o_g).to(tl.int64)[:, None] * s_qh + o_i.to(tl.int64)[:, None] * s_qm + o_d[None, :]
    # [BR, BD]
    b_q = tl.load(Q + i_b * s_qb + o_q, mask=m_rd, other=0.)
    b_last = L + o_i
    BT = BT + i_b * s_btb
    KC = KC + i_h * s_kch
    VC = VC + i_h * s_vch
    if not PAGED:
        KC = KC + i_b * s_kcb
        VC = VC + i_b * s_vcb
    b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc, b_m, b_l = attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, lo, lo + n_full, b_last,
                           qk_scale, PAGE, NB, False, CAUSAL, PAGED, WIDE, D, BLOCK_N, BLOCK_D, PRECISION,
                            FIX_BF16)
    acc, b_m, b_l = attend(acc, b_m, b_l, b_q, KC, VC, BT, s_kcb, s_kcn, s_vcb, s_vcn, lo + n_full, s_hi, b_last,
                            qk_scale, PAGE, NB, True, CAUSAL, PAGED, WIDE, D, BLOCK_N, BLOCK_D, PRECISION,
                            FIX_BF16)
    # A split whose range a row does not reach (l = 0) leaves out = 0 and lse = -inf, which the merge weighs 0.
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    b_out = acc / b_l_safe[:, None]
    b_lse = tl.where(b_l > 0, (b_m + tl.log2(b_l_safe)) * LN2, float("-inf"))
    if DIRECT:
        o_o = o_i.to(tl.int64)[:, None] * s_om + (i_h * G + o_g)[:, None] * s_oh + o_d[None, :]
        tl.store(O + i_b * s_ob + o_o, round_to(b_out, O.dtype.element_ty, FIX_BF16), mask=m_rd)
        tl.store(LSE + i_b * s_lb + (i_h * G + o_g) * s_lh + o_i, b_lse, mask=m_r)
    else:
        p_part = (i_bh.to(tl.int64) * P + i_s) * R + o_r
        tl.store(O_PART + p_part[:, None] * D + o_d[None, :], b_out, mask=m_rd)
        tl.store(LSE_PART + p_part, b_lse, mask=m_r)


@dataclass(frozen=True)
class ChunkPlan:
    """How a chunk's attention launch is cut into programs (module docstring)."""

    block_r: int  # rows (token, query head) per tile
    block_n: int  # keys per tile
    block_d: int  # head_dim padded to a power of two
    row_blocks: int
    splits: int  # key ranges per row block
    split_len: int  # keys per range (a multiple of block_n); the last range reaches the row's end
    num_warps: int
    num_stages: int

    @property
    def direct(self) -> bool:
        """One program per row writes the final result: no merge launch."""
        return self.splits == 1


def wave_splits(programs: int, most: int, slots: int) -> int:
    """How many key ranges to cut each of ``programs`` equal programs into, at most ``most``, when ``slots``
    programs run at once: none while the programs fill a wave (splitting then only adds partial results and a
    merge, 8 bytes per row and channel and split), else as many as keep them within one wave."""
    if programs >= slots:
        return 1
    return max(1, min(most, slots // programs))


def plan_chunk(batch: int, seqlen_q: int, heads_q: int, heads_kv: int, head_dim: int, max_prefix: int, sms: int,
               elem_size: int = 2, *, aligned: bool = True, block_r: Optional[int] = None,
               block_n: Optional[int] = None, split_len: Optional[int] = None, num_warps: Optional[int] = None,
               num_stages: Optional[int] = None) -> ChunkPlan:
    """Tiles, warps, stages and splits of the attention launch; ``max_prefix`` bounds every row's L_b.

    16-bit inputs: FlashAttention-2's Hopper tiles, 128 rows x 64 keys with 8 warps (two warpgroups of 64
    rows: no replicated MMA) up to head_dim 128, 128 x 32 at 256 (64 rows on 4 warps held 255 registers and
    spilled up to 100 bytes; on 8 warps they replicated), 64 x 16 on 4 warps for unaligned tensors at 256
    (128 x 16 spilled 92 bytes under Triton 3.6).  float32 multiplies in IEEE float32 on the
    FMA units: small tiles.  Tensors that are not ``aligned`` (kernels/launch.py) load narrower and hold more
    registers: smaller key tiles.  Each choice stays within 64 bytes of register spills for sm_90 with
    Triton 3.6 and the newest (benchmarks/aot_compile.py checks it in CI; registers in benchmarks/NOTES.md).
    """
    rows = seqlen_q * (heads_q // heads_kv)
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = elem_size > 2
    if block_r is None:
        if wide:
            cap = 16 if block_d > 128 and not aligned else 32
        else:
            cap = 64 if block_d > 128 and not aligned else 128
        block_r = min(max(16, triton.next_power_of_2(rows)), cap)
    if block_n is None:
        if wide:
            block_n = 16 if block_d > 64 and block_r > 16 else 32
        elif block_d > 128:
            block_n = 32 if aligned else 16
        else:
            block_n = 64 if aligned else 32
    if num_warps is None:
        # Two warpgroups only on 128 rows: on a 64-row tile the second would issue the first's wgmma
        # (head_dim 256's 64 x 32 tiles did, benchmarks/ttgir_check.py).
        num_warps = 8 if (block_r >= 128 and block_d >= 128) or wide else 4
    if num_stages is None:
        num_stages = 2 if block_d > 128 or wide else 3
    row_blocks = triton.cdiv(rows, block_r)
    keys = max_prefix + seqlen_q
    if split_len is None:
        # One program per multiprocessor with 128-row tiles (their registers), two with smaller ones.
        slots = sms * (1 if block_r * block_d >= 128 * 128 else 2)
        most = triton.cdiv(keys, MIN_TILES_PER_SPLIT * block_n)
        splits = wave_splits(batch * heads_kv * row_blocks, most, slots)
        split_len = triton.cdiv(keys, splits)
    split_len = block_n * triton.cdiv(max(split_len, 1), block_n)
    splits = max(1, triton.cdiv(keys, split_len))
    return ChunkPlan(block_r=block_r, block_n=block_n, block_d=block_d, row_blocks=row_blocks, splits=splits,
                     split_len=split_len, num_warps=num_warps, num_stages=num_stages)


def chunk_grid(batch: int, heads_kv: int, plan: ChunkPlan) -> tuple:
    return (plan.row_blocks * plan.splits * batch * heads_kv,)
