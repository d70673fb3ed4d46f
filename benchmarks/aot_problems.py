"""The problems the sm_90 ahead-of-time compile (benchmarks/aot_compile.py) compiles, derived from the planners'
decision space instead of a hand-picked list.

The forward's planner (``plan_forward``) picks a path from the rows of a kv head (M * G <= DECODE_ROWS: one
decode launch, else a blend launch and the chunk attention) and that path's tiles, warps and stages from the
dtype, the padded head_dim, the rows (the decode row tile), the prefix against the batch (split-KV with a
merge, or one direct program per row) and alignment; the backward's (``plan_bwd``) its tiles from the dtype,
the head_dim, the chunk length (query tiles no taller than the chunk), alignment, paging and the mode (dQ
atomically or by its own kernel, deterministic).  :func:`derived_problems` walks those inputs at the values
where an answer can change, read off the planners themselves (the row tiles from 16 up to the largest one the
forward gives the dtype and head_dim, the decode/chunk boundary (per element size), a chunk just past the largest tile; long,
short and empty prefixes at batch 1 and a batch that fills the machine), for GQA group sizes 1 to 32 (G is a
compile-time constant of the forward kernels; :func:`groups_of`), and keeps one problem per distinct plan.
What the planners do not choose (gate kinds, the causal flag, dlse, paging, the cache gradients, inference
or training calls, the decode's folded merge, 64-bit offsets) is compiled at every plan of G = 1
(:data:`VARIANTS`); the alternatives the GPU pass's tune step times (:data:`TOURNAMENT`) at the headline
shapes (:data:`HEADLINE`).  tests/test_aot_problems.py checks that every plan the planners give a wide grid
of calls is among the derived problems'.

No Triton driver or environment change here: the tests import this module under the interpreter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Iterator, Union

import torch

import tournament
from melt_kernels.kernels.bwd import BwdPlan, plan_bwd
from melt_kernels.kernels.decode import decode_rows
from melt_kernels.kernels.fwd import Plan, path_of, plan_forward

H200_SMS = 132
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# One head_dim per padded width the planners tell apart (<= 64, 128, 256), and one padded (80 -> 128).
HEAD_DIMS = (64, 80, 128, 256)
# GQA group sizes 1 to 32, one of each kind the forward kernels (G is a constant of them) compile differently:
# no division of rows (1), a divisor they cannot shift (3), a power of two below every row tile (4), and the
# largest, a whole 32-row tile of one token's heads (32).  With the chunk lengths of each, every row tile
# and path of the planner is reached for each of them (tests/test_aot_problems.py).
GROUPS = (1, 3, 4, 32)
# Prefix lengths behind the chunk: a long one splits, a short one splits little or not, none (the chunk
# alone) gives one program per row block (the direct plan, no merge).
LONG_PREFIX, SHORT_PREFIX = 8192, 128
PREFIXES = (LONG_PREFIX, SHORT_PREFIX, 0)
# A batch whose programs fill an H200 without splitting the keys (direct plans at any prefix).
FULL_BATCH = 256
# Plan fields that are run-time arguments of the kernels, not compiled in.
RUNTIME_FIELDS = ("splits", "split_len", "row_blocks")


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
    # A training call's forward writes the side outputs its backward reads (melt_kernels/autograd.py); an
    # inference call's does not.
    side_outputs: bool = True
    # Whether the forward's launches are compiled (not for a problem kept for its backward plans only) and the
    # backward's (of a training call), in both modes: dQ atomically and deterministic.
    forward: bool = True
    backward: bool = True
    with_dlse: bool = False
    need_cache_grad: bool = True
    # Every tensor one element off 16-byte alignment, heads padded by one element: no divisibility
    # specialization (what a padded or sliced user layout compiles to).
    unaligned: bool = False
    # Paged caches (docs/op.md#paged-caches): pools of pages of this size read through a block table; 0: contiguous.
    page_size: int = 0
    # Planner overrides, (name, value) pairs: the forward's (plan_forward) and the backward's (plan_bwd).
    fwd_overrides: tuple = ()
    bwd_overrides: tuple = ()

    @property
    def codes(self) -> tuple:
        """The choices of the call that select code paths (constexprs) rather than plans."""
        return (self.gate_k, self.gate_v, self.causal, self.side_outputs, self.with_dlse, self.need_cache_grad,
                self.page_size)

    @property
    def groups(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def prefix(self) -> int:
        return self.cache_len - self.seqlen_q

    def fwd_plan(self, dtype: torch.dtype, head_dim: int) -> Plan:
        """The forward's plan for this problem on an H200, as the launcher asks for it."""
        return plan_forward(self.batch, self.seqlen_q, self.heads_q, self.heads_kv, head_dim, self.prefix,
                            H200_SMS, dtype.itemsize, aligned=not self.unaligned, **dict(self.fwd_overrides))

    def bwd_plans(self, dtype: torch.dtype, head_dim: int) -> tuple[BwdPlan, BwdPlan]:
        """The backward's plans on a GPU (atomic dQ, deterministic), as its launcher asks for them."""
        return tuple(plan_bwd(head_dim, self.seqlen_q, dtype, False, not self.unaligned, self.page_size > 0,
                              deterministic, **dict(self.bwd_overrides)) for deterministic in (False, True))


def plan_choices(plan: Union[Plan, BwdPlan]) -> tuple:
    """What of a plan the kernels compile in (the split count and length, the row blocks are run-time values;
    whether one split covers the row is not)."""
    fields = tuple((k, v) for k, v in dataclasses.asdict(plan).items() if k not in RUNTIME_FIELDS)
    return (type(plan).__name__, fields + ((("direct", plan.direct),) if hasattr(plan, "direct") else ()))


def row_tiles(dtype: torch.dtype, head_dim: int, aligned: bool = True) -> list[int]:
    """The forward's row tiles for ``dtype`` and ``head_dim``: 16 up to the one it gives the most rows."""
    largest = plan_forward(1, 2**20, 1, 1, head_dim, 0, H200_SMS, dtype.itemsize, aligned=aligned).block_r
    return [16 << i for i in range(max(largest, decode_rows(dtype.itemsize)).bit_length() - 4)]


def chunk_lengths(groups: int, tiles: list[int], most_decode_rows: int) -> list[int]:
    """M for G query heads per kv head: decode, the longest chunk each row tile holds, the longest the decode
    path takes (``most_decode_rows`` rows) and the shortest past it, and one just past the largest tile (two
    row blocks, the second partial)."""
    edges = {max(1, most_decode_rows // groups), most_decode_rows // groups + 1}
    return sorted({1, tiles[-1] // groups + 1}.union(max(1, tile // groups) for tile in tiles).union(edges))


def _problem(name: str, seqlen_q: int, groups: int, prefix: int, batch: int = 1, **variant) -> Problem:
    return Problem(name, batch, seqlen_q, 2 * groups, 2, prefix + seqlen_q, **variant)


# The decode path's folded merge (the split that finishes last merges): never picked by default, timed by the
# GPU pass's tune step.
FOLD_MERGE = (("fold_merge", True),)
# Variants of the code that no planner picks, each compiled at every plan of G = 1, three calls that between
# them take every other value of each choice: attention without a gate, a causal mask, dlse or a cache
# gradient; scalar gates on paged caches; an inference call (no side outputs, no backward), on the decode
# path with the folded merge.
VARIANTS = (
    dict(gate_k="none", gate_v="none", causal=False, with_dlse=True, need_cache_grad=False),
    dict(gate_k="scalar", gate_v="scalar", page_size=16),
    dict(side_outputs=False, backward=False, fwd_overrides=FOLD_MERGE),
)

# The GPU pass's headline shapes (docs/gpu.md#the-gpu-pass; benchmarks/attention.py, attention_bwd.py):
# bfloat16, Ouro-1.4B's 16 heads x 128, one gate per head for keys and values; decode at 8k and 32k keys,
# batch 1 and 64; 500-token chunks at the start, middle and end of a 10k-token sequence, with their backward.
HEADLINE_DTYPE, HEADLINE_HEAD_DIM = "bf16", 128
# Decode as inference calls; chunks as inference calls and as training calls (forward and backward).
HEADLINE = tuple(
    [Problem(f"headline decode B={b} {n // 1024}k", b, 1, 16, 16, n, gate_k="head", gate_v="head",
             side_outputs=False, backward=False) for n in (8192, 32768) for b in (1, 64)]
    + [Problem(f"headline chunk B={b} M=500 L={prefix}" + " training" * training, b, 500, 16, 16, prefix + 500,
               gate_k="head", gate_v="head", side_outputs=training, backward=training)
       for training in (False, True) for b, prefix in ((4, 0), (4, 4500), (1, 9500))])
# The alternatives the tune step times at those shapes (benchmarks/tournament.py, whose lists these are; split
# lengths are run-time values, and the backward's deterministic mode is compiled at every backward plan anyway):
# every one must compile within the spill limit.
TOURNAMENT = {
    "decode": tuple(tuple(o.items()) for o in tournament.DECODE),
    "chunk": tuple(tuple(o.items()) for o in tournament.CHUNK),
    "backward": tuple(tuple(o.items()) for o in tournament.BACKWARD if "deterministic" not in o),
}


def tournament_problems() -> Iterator[Problem]:
    """The headline problems with each alternative of the tune step (:data:`TOURNAMENT`): the forward's of the
    inference calls, the backward's of the training calls."""
    for p in HEADLINE:
        if not p.side_outputs:
            for overrides in TOURNAMENT[path_of(p.seqlen_q, p.heads_q, p.heads_kv)]:
                yield replace(p, name=f"{p.name} {dict(overrides)}", fwd_overrides=overrides)
        if p.backward:
            for overrides in TOURNAMENT["backward"]:
                yield replace(p, name=f"{p.name} bwd {dict(overrides)}", bwd_overrides=overrides)


def groups_of(dtype: torch.dtype) -> tuple:
    """The GQA group sizes compiled for ``dtype``.  G enters the kernels' index math only, the same for every
    dtype, and the dtype their element types and (through the rows) tiles only: every G at bfloat16; float32
    at G = 1, which reaches every row count and so every tile, and at MQA decode (its float32 tiles spilled
    there, benchmarks/NOTES.md, issue 20); float16, whose plans are bfloat16's, at G = 1."""
    return {torch.bfloat16: GROUPS, torch.float32: (1, GROUPS[-1])}.get(dtype, (1,))


def _candidates(dtype: torch.dtype, head_dim: int) -> Iterator[Problem]:
    """Training calls at every chunk length of every G (:func:`groups_of`) at every prefix, at batch 1 and at
    a full batch; alignment, which the planners also choose from, at G = 1; the variants at every chunk
    length of G = 1 (the folded merge of the decode path only): at bfloat16 all, at the other dtypes those that
    change a plan (paging, the backward's tiles; the folded merge), gates and masks selecting the same code
    whatever the element type."""
    for unaligned in (False, True):
        tiles = row_tiles(dtype, head_dim, aligned=not unaligned)
        for groups in (groups_of(dtype) if not unaligned else (1,)):
            for m in chunk_lengths(groups, tiles, decode_rows(dtype.itemsize)):
                for prefix in PREFIXES:
                    for batch in (1, FULL_BATCH):
                        yield _problem(f"G={groups} M={m} L={prefix} B={batch}" + " unaligned" * unaligned, m,
                                       groups, prefix, batch, unaligned=unaligned)
    tiles = row_tiles(dtype, head_dim)
    for variant in (VARIANTS if dtype == torch.bfloat16 else VARIANTS[1:]):
        name = " ".join(f"{k}={v}" for k, v in variant.items() if k != "fwd_overrides")
        name += " fold_merge" * ("fwd_overrides" in variant)
        for m in chunk_lengths(1, tiles, decode_rows(dtype.itemsize)):
            # fold_merge is the decode path's
            chunk = {"fwd_overrides": ()} if m > decode_rows(dtype.itemsize) else {}
            yield _problem(f"{name} G=1 M={m}", m, 1, LONG_PREFIX, **dict(variant, **chunk))


def derived_problems(dtype: torch.dtype, head_dim: int) -> Iterator[Problem]:
    """The problems that reach every choice of the planners for ``dtype`` and ``head_dim`` (module docstring):
    of the candidates, those that bring a forward plan not yet seen for their variant and G, or backward plans
    not yet seen for their variant, prefix and batch (the backward takes G at run time); the forward only for
    the former, the backward only for the latter.  Then, for the headline dtype and head_dim, the headline
    problems and the tune step's alternatives; and in any case caches whose offsets need 64 bits."""
    seen = set()
    default = Problem("", 1, 1, 1, 1, 1).codes
    for p in _candidates(dtype, head_dim):
        variant = (p.codes, p.unaligned)
        # One token (M = 1, which Triton specializes) and longer chunks at every plan of the default code at
        # G = 1; other G and the variants at one chunk length per plan.
        fwd_key = (variant, p.groups, plan_choices(p.fwd_plan(dtype, head_dim)),
                   p.seqlen_q == 1 if p.codes == default and p.groups == 1 else None)
        # The prefix and the batch also decide whether the deterministic dQ splits (float32 partial sums) or
        # writes directly.
        bwd_key = (variant, p.prefix, p.batch, tuple(plan_choices(plan) for plan in p.bwd_plans(dtype, head_dim)))
        if fwd_key in seen and bwd_key in seen:
            continue
        yield replace(p, forward=fwd_key not in seen, backward=p.backward and bwd_key not in seen)
        seen.update((fwd_key, bwd_key))
    if (dtype, head_dim) == (DTYPES[HEADLINE_DTYPE], HEADLINE_HEAD_DIM):
        yield from HEADLINE
        yield from tournament_problems()
    # Caches whose offsets need 64 bits (WIDE) and a large batch (one split, direct).
    yield Problem("decode-wide", 2, 1, 16, 8, 2**23, backward=False)
    yield Problem("chunk-wide", 1, 128, 16, 8, 2**22)
