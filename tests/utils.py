"""Random problems for the tests, drawn from a seeded torch.Generator.

Hypothesis draws the sizes and flags (:func:`case_params`); :func:`make_case`
turns them into tensors, so a failing example replays exactly.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from hypothesis import strategies as st

GATE_KINDS = ("none", "float", "head", "element", "broadcast", "separate")
LAYOUTS = ("contiguous", "padded", "heads_first")


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: object  # (B,) tensor or int
    gate: object = None
    gate_v: object = None

    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.cache_seqlens, self.gate, self.gate_v)

    def clone(self, dtype: Optional[torch.dtype] = None, device=None) -> "Case":
        """A deep copy (layouts kept), optionally cast; floats and ints are kept as they are."""
        def copy(x):
            if not isinstance(x, torch.Tensor):
                return x
            y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype if (dtype is None or not x.is_floating_point())
                                    else dtype, device=device or x.device)
            # Write the whole underlying span so strided copies hold the same padding bits.
            y.copy_(x)
            return y.requires_grad_(x.requires_grad) if y.is_floating_point() else y
        return replace(self, **{f.name: copy(getattr(self, f.name)) for f in fields(self)})


def _layout(shape: tuple, layout: str, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """A random (B, S, H, D) tensor in the given memory layout (last dimension always contiguous)."""
    b, s, h, d = shape
    if layout == "contiguous":
        base = torch.randn(shape, generator=gen)
        return base.to(dtype=dtype, device=device)
    if layout == "padded":  # a slice of a wider buffer: row/head strides larger than D
        base = torch.randn((b, s + 3, h, d + 8), generator=gen).to(dtype=dtype, device=device)
        return base[:, 1:s + 1, :, :d]
    if layout == "heads_first":  # (B, H, S, D) storage seen as (B, S, H, D)
        base = torch.randn((b, h, s, d), generator=gen).to(dtype=dtype, device=device)
        return base.transpose(1, 2)
    raise ValueError(layout)


def make_case(seed: int, *, batch: int, seqlen_q: int, heads_q: int, heads_kv: int, head_dim: int, cache_len: int,
              dtype=torch.float32, device="cpu", gate_kind: str = "head", layout: str = "contiguous",
              int_seqlens: bool = False, full_rows: bool = False) -> Case:
    """A random problem; row lengths L_b are drawn in [0, cache_len - seqlen_q] (all max with full_rows)."""
    gen = torch.Generator().manual_seed(seed)
    limit = cache_len - seqlen_q
    assert limit >= 0
    kv = (batch, seqlen_q, heads_kv, head_dim)
    q = _layout((batch, seqlen_q, heads_q, head_dim), layout, dtype, device, gen)
    k = _layout(kv, layout, dtype, device, gen)
    v = _layout(kv, layout, dtype, device, gen)
    k_cache = _layout((batch, cache_len, heads_kv, head_dim), layout, dtype, device, gen)
    v_cache = _layout((batch, cache_len, heads_kv, head_dim), layout, dtype, device, gen)
    if int_seqlens or full_rows:
        lengths = limit if full_rows else int(torch.randint(0, limit + 1, (1,), generator=gen))
        cache_seqlens = lengths
    else:
        cache_seqlens = torch.randint(0, limit + 1, (batch,), generator=gen, dtype=torch.int32).to(device)

    def rand_gate(shape):
        return torch.rand(shape, generator=gen).to(dtype=dtype if dtype == torch.float64 else torch.float32,
                                                   device=device)

    gate = gate_v = None
    if gate_kind == "float":
        gate = float(torch.rand((), generator=gen))
    elif gate_kind == "head":
        gate = rand_gate((batch, seqlen_q, heads_kv, 1))
    elif gate_kind == "element":
        gate = rand_gate(kv)
    elif gate_kind == "broadcast":  # fewer dims than (B, M, Hkv, D): one gate per kv head for every token
        gate = rand_gate((heads_kv, 1))
    elif gate_kind == "separate":
        gate, gate_v = rand_gate((batch, seqlen_q, heads_kv, 1)), rand_gate(kv)
    elif gate_kind != "none":
        raise ValueError(gate_kind)
    return Case(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v)


@st.composite
def case_params(draw, max_batch=3, max_seqlen_q=5, max_extra=12, head_dims=(16, 32), max_groups=3,
                max_heads_kv=2, dtypes=(torch.float64,), layouts=LAYOUTS, gate_kinds=GATE_KINDS):
    """Hypothesis strategy for the keyword arguments of :func:`make_case` (plus ``seed`` and ``causal``)."""
    seqlen_q = draw(st.integers(1, max_seqlen_q))
    heads_kv = draw(st.integers(1, max_heads_kv))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, max_batch)),
        seqlen_q=seqlen_q,
        heads_kv=heads_kv,
        heads_q=heads_kv * draw(st.integers(1, max_groups)),
        head_dim=draw(st.sampled_from(head_dims)),
        cache_len=seqlen_q + draw(st.integers(0, max_extra)),
        dtype=draw(st.sampled_from(dtypes)),
        gate_kind=draw(st.sampled_from(gate_kinds)),
        layout=draw(st.sampled_from(layouts)),
        int_seqlens=draw(st.booleans()),
        causal=draw(st.booleans()),
    )


def active_mask(cache_seqlens, batch: int, seqlen_q: int, cache_len: int) -> torch.Tensor:
    """(B, S) bool: True at the active positions L_b .. L_b+M-1 of each row."""
    lengths = torch.as_tensor(cache_seqlens).reshape(-1).expand(batch).long().cpu()
    pos = torch.arange(cache_len)[None, :]
    return (pos >= lengths[:, None]) & (pos < lengths[:, None] + seqlen_q)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as an integer tensor (on the CPU), so NaN payloads and -0.0 compare exactly."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().cpu().contiguous().view(ints[t.element_size()])


def assert_untouched(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> None:
    """Positions where ``mask`` (B, S) is False are bit-identical in ``before`` and ``after``."""
    keep = ~mask
    assert torch.equal(bits(before)[keep], bits(after)[keep]), "the cache changed outside the active slots"


def assert_deterministic(run, case: Case, repeats: int = 20) -> None:
    """``run(case) -> (out, lse)`` on fresh copies of ``case`` gives identical bits, caches included, every time:
    a difference between identical runs is a race between the programs of a launch."""
    first = None
    for _ in range(repeats):
        copy = case.clone()
        out, lse = run(copy)
        result = [bits(t) for t in (out, lse, copy.k_cache, copy.v_cache)]
        first = first or result
        assert all(torch.equal(a, b) for a, b in zip(first, result)), "identical runs gave different bits"


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_within_rule(kernel: torch.Tensor, exact: torch.Tensor, low_precision: torch.Tensor,
                       factor: float = 2.0, dtype: Optional[torch.dtype] = None,
                       magnitude: Optional[float] = None, allowance: float = 0.0) -> None:
    """FlashAttention's rule: the kernel's error against a float64 result is at most ``factor`` times the
    error of the same math done by PyTorch in the low precision, plus one unit in the last place of
    ``dtype`` (the problem's precision; default the kernel result's) at ``magnitude`` (default the largest
    magnitude of the result: one rounding in that precision, which on the few dozen elements of a test
    shape can alone exceed 2x PyTorch's error) and 1e-5 for exactly-zero results.  A result that sums many
    terms (a broadcast gate's gradient) passes the L2 norm of its terms as ``magnitude``
    (tests/grad_utils.term_norms).  ``allowance``: an error the kernel's algorithm makes by design, computed
    exactly by the caller (a backward that takes the stored, rounded output: grad_utils.stored_output_effect)."""
    kernel_err, torch_err = max_err(kernel, exact), max_err(low_precision, exact)
    if magnitude is None:
        magnitude = exact.detach().abs().max().item()
    floor = torch.finfo(dtype or kernel.dtype).eps * magnitude + 1e-5 + allowance
    assert kernel_err <= factor * torch_err + floor, \
        f"kernel error {kernel_err:.3g} > {factor} x PyTorch low-precision error {torch_err:.3g} + {floor:.3g}"


def reseed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draws every parameter from a seeded generator: matrices ~ N(0, 1/fan_in), vectors ~ 1 + N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.copy_(noise / math.sqrt(p.shape[-1]) if p.dim() == 2 else 1 + 0.2 * noise)
    return module


def randomise_gates(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draws the MELT gates' parameters (names containing ".melt_gate.") ~ N(0, 1/fan_in), so that a converted
    model's gates, which start as "keep nothing", look trained and do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".melt_gate." in name:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
                param.copy_(noise / math.sqrt(param.shape[-1]))
    return model


@dataclass
class Paged:
    """A case's caches moved into shuffled pages of shared pools (docs/op.md#paged-caches), with NaN-filled spare
    pages."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    block_table: torch.Tensor  # (B, max_blocks) int32; entries a row does not need hold -1
    used: torch.Tensor  # (num_blocks,) bool: pages some row's table references

    def logical(self, pool: torch.Tensor, batch: int) -> torch.Tensor:
        """The (B, S, Hkv, D) view of a pool through the table (unneeded blocks as page 0)."""
        table = self.block_table.long().clamp(min=0)
        return pool[table].reshape(batch, -1, *pool.shape[2:])


def page_case(case: Case, page_size: int, seed: int, spare: int = 3, pad_unused: bool = True) -> Paged:
    """Pools holding ``case``'s caches (whose length must be a multiple of ``page_size``): each row's blocks
    in random pages of one pool, ``spare`` pages nobody references; with ``pad_unused``, the table entries
    a row does not need (past its L_b + M) are -1 and those blocks' pages are not referenced either."""
    gen = torch.Generator().manual_seed(seed)
    batch, cache_len = case.k_cache.shape[:2]
    assert cache_len % page_size == 0
    max_blocks = cache_len // page_size
    lengths = torch.as_tensor(case.cache_seqlens).reshape(-1).expand(batch).long().cpu()
    needed = (lengths + case.q.shape[1] + page_size - 1) // page_size
    if not pad_unused:
        needed = torch.full_like(needed, max_blocks)
    total = int(needed.sum()) + spare
    perm = torch.randperm(total, generator=gen)
    table = torch.full((batch, max_blocks), -1, dtype=torch.int32)
    pools = []
    for cache in (case.k_cache, case.v_cache):
        pool = torch.full((total, page_size, *cache.shape[2:]), float("nan"), dtype=cache.dtype,
                          device=cache.device)
        pools.append(pool)
    n = 0
    for b in range(batch):
        for j in range(int(needed[b])):
            page = int(perm[n])
            n += 1
            table[b, j] = page
            for pool, cache in zip(pools, (case.k_cache, case.v_cache)):
                pool[page] = cache[b, j * page_size:(j + 1) * page_size].detach()
    used = torch.zeros(total, dtype=torch.bool)
    used[table[table >= 0].long()] = True
    return Paged(pools[0], pools[1], table.to(case.q.device), used)


def train_in_one_and_two_processes(args: list, tmp_path) -> tuple[dict, dict, list, list]:
    """Runs `python -m melt_kernels.train ARGS --dtype float64` here (into tmp_path/one) and under torchrun with 2
    gloo processes (tmp_path/two); returns both results and both runs' metrics.jsonl records.

    In float64 the runs differ only by the order of the sums (a batch split over two processes), far below the
    callers' tolerance; in float32 Adam amplified that to 2e-5 relative in four steps for some weights."""
    from melt_kernels.train.__main__ import main

    args = args + ["--dtype", "float64"]
    one = main(args + ["--out", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "melt_kernels.train", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    runs = [[json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    return one, two, runs[0], runs[1]
