"""The problems the sm_90 ahead-of-time compile (benchmarks/aot_compile.py) compiles, derived from the planners'
decision space instead of a hand-picked list.

The planners (``plan_forward`` of the forward, ``plan_bwd`` of the backward) choose tiles, warps and stages from
the dtype, the padded head_dim, the rows of a kv head (M * G: the decode or the chunk path, the row tile), the
prefix length against the batch (split-KV or one direct program per row), the chunk length (the backward's
query tiles), alignment and paging.  :func:`derived_problems` walks those inputs
at the values where a planner's answer can change, read off the planners themselves (the row tiles from 16 up
to the largest one the forward gives the dtype and head_dim, a chunk just past it, prefixes that do and do not
split), for GQA group sizes 1 to 32 (G is a compile-time constant of the forward kernels), and keeps one
problem per distinct plan; the compile then keeps one launch per distinct specialization.  What the planners do
not choose (gate kinds, the causal flag, paging, the backward's optional gradients, 64-bit offsets) is compiled
at every plan of G = 1 and at MQA decode.  tests/test_aot_problems.py checks that every plan the planners give
a wide grid of calls is among the derived problems'.

No Triton driver or environment change here: the tests import this module under the interpreter.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch

import dataclasses

from melt_kernels.kernels.bwd import plan_bwd
from melt_kernels.kernels.decode import DECODE_ROWS
from melt_kernels.kernels.fwd import Plan, plan_forward

H200_SMS = 132
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# One head_dim per padded width the planners tell apart (<= 64, 128, 256), and one padded (80 -> 128).
HEAD_DIMS = (64, 80, 128, 256)
# GQA group sizes 1 to 32, one of each kind the forward kernel (G is a constant of it) compiles differently:
# no division of rows (1), a divisor it cannot shift (3), a power of two below every row tile (4), and the
# largest, a whole 16- or 32-row tile of one token's heads (32).  With the chunk lengths of each, every row
# tile and owner choice of the planner is reached for each of them (tests/test_aot_problems.py).
GROUPS = (1, 3, 4, 32)
# Prefix lengths behind the chunk: a short one gives one split (the direct plan, no merge), a long one splits.
SHORT_PREFIX, LONG_PREFIX = 128, 8192


@dataclass(frozen=True)
class Problem:
    """One call of the op: its shape and what varies the compiled code."""

    name: str
    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    cache_len: int  # S; every row's L_b = S - M (host lengths: max_seqlen_k = S)
    # Gate of the keys and of the values: "none", "scalar" (a float), "head" (a tensor per (b, token, kv head):
    # stride 0 along head_dim) or "channel" (per channel: stride 1, a different specialization of the same
    # loads).  Keys per channel and values per head: both tensor kinds in one compile where gates are not
    # the point.
    gate_k: str = "channel"
    gate_v: str = "head"
    causal: bool = True
    backward: bool = True
    with_dlse: bool = False
    need_cache_grad: bool = True
    # Every tensor one element off 16-byte alignment, heads padded by one element: no divisibility
    # specialization (what a padded or sliced user layout compiles to).
    unaligned: bool = False
    # Paged caches (docs/op.md#paged-caches): pools of pages of this size read through a block table; 0: contiguous.
    page_size: int = 0

    @property
    def groups(self) -> int:
        return self.heads_q // self.heads_kv

    def fwd_plan(self, dtype: torch.dtype, head_dim: int) -> Plan:
        """The forward's plan for this problem on an H200, as the launcher asks for it."""
        prefix = self.cache_len - self.seqlen_q
        return plan_forward(self.batch, self.seqlen_q, self.heads_q, self.heads_kv, head_dim, prefix, H200_SMS,
                            dtype.itemsize, aligned=not self.unaligned)

    def bwd_tiles(self, dtype: torch.dtype, head_dim: int) -> dict:
        """The backward's tiles for this problem on a GPU, as its launcher asks for them."""
        return dataclasses.asdict(plan_bwd(head_dim, self.seqlen_q, dtype, False, not self.unaligned,
                                           self.page_size > 0))


def row_tiles(dtype: torch.dtype, head_dim: int, aligned: bool = True) -> list[int]:
    """The forward's row tiles for ``dtype`` and ``head_dim``: 16 up to the one it gives the most rows."""
    largest = plan_forward(1, 2**20, 1, 1, head_dim, 0, H200_SMS, dtype.itemsize, aligned=aligned).block_r
    return [16 << i for i in range(largest.bit_length() - 4)]


def chunk_lengths(groups: int, tiles: list[int]) -> list[int]:
    """M for G query heads per kv head: decode, the longest chunk each row tile holds, the longest the decode
    path takes and the shortest past it, and one just past the largest tile (two row blocks, the second
    partial)."""
    edges = {max(1, DECODE_ROWS // groups), DECODE_ROWS // groups + 1}
    return sorted({1, tiles[-1] // groups + 1}.union(max(1, tile // groups) for tile in tiles).union(edges))


def _problem(name: str, seqlen_q: int, groups: int, prefix: int, **variant) -> Problem:
    return Problem(name, 1, seqlen_q, 2 * groups, 2, prefix + seqlen_q, **variant)


# Variants of the code that no planner picks, each compiled at every plan of G = 1 and at MQA decode.
VARIANTS = (
    dict(gate_k="none", gate_v="none"),
    dict(gate_k="scalar", gate_v="scalar"),
    dict(causal=False, with_dlse=True, need_cache_grad=False),
    dict(page_size=16),
)


def plan_choices(plan: Plan) -> tuple:
    """What of a forward plan the kernels compile in (the split count and length are run-time values)."""
    return (type(plan).__name__, plan.block_r, plan.block_n, plan.block_d, plan.num_warps, plan.num_stages,
            plan.direct)


def _candidates(dtype: torch.dtype, head_dim: int) -> Iterator[Problem]:
    """Every chunk length of every G, with a long prefix (splits and a merge) and a short one (where one row
    block holds the chunk, one split: the direct plan); alignment, which the planners also choose from, at the
    smallest and largest G; the variants at every chunk length of G = 1 and at MQA decode."""
    for unaligned, groups_all in ((False, GROUPS), (True, (1, GROUPS[-1]))):
        tiles = row_tiles(dtype, head_dim, aligned=not unaligned)
        for groups in groups_all:
            for m in chunk_lengths(groups, tiles):
                for prefix in (LONG_PREFIX, SHORT_PREFIX):
                    yield _problem(f"G={groups} M={m} L={prefix}" + " unaligned" * unaligned, m, groups, prefix,
                                   unaligned=unaligned)
    tiles = row_tiles(dtype, head_dim)
    for variant in VARIANTS:
        name = " ".join(f"{k}={v}" for k, v in variant.items())
        for m in chunk_lengths(1, tiles):
            yield _problem(f"{name} G=1 M={m}", m, 1, LONG_PREFIX, **variant)
        yield _problem(f"{name} G={GROUPS[-1]} M=1", 1, GROUPS[-1], LONG_PREFIX, **variant)


def derived_problems(dtype: torch.dtype, head_dim: int) -> Iterator[Problem]:
    """The problems that reach every choice of the planners for ``dtype`` and ``head_dim`` (module docstring):
    of the candidates, those that bring a forward plan not yet seen for their variant and G, or a backward
    tiling not yet seen for their variant and prefix (the backward takes G at run time); the backward only for
    those."""
    seen = set()
    for p in _candidates(dtype, head_dim):
        variant = (p.gate_k, p.gate_v, p.causal, p.with_dlse, p.need_cache_grad, p.unaligned, p.page_size)
        fwd_key = (variant, p.groups, plan_choices(p.fwd_plan(dtype, head_dim)))
        # The prefix also decides whether the backward splits dQ (float32 partial sums) or writes it directly.
        bwd_key = (variant, p.cache_len - p.seqlen_q, tuple(sorted(p.bwd_tiles(dtype, head_dim).items())))
        if fwd_key in seen and bwd_key in seen:
            continue
        yield replace(p, backward=bwd_key not in seen)
        seen.update((fwd_key, bwd_key))
    # Caches whose offsets need 64 bits (the backward's WIDE) and a large batch (one split, direct).
    yield Problem("decode-wide", 2, 1, 16, 8, 2**23, backward=False)
    yield Problem("chunk-wide", 1, 128, 16, 8, 2**22)
    yield Problem("decode-batch256", 256, 1, 16, 16, 4096 + 1, backward=False)
