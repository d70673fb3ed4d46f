"""The GPU pass's correctness step: each kernel backend against the reference on a fixed set of problems.

Instead of the hypothesis suite (too slow to compile and run inside one lease), a fixed table that covers
what the kernels can get wrong on a real GPU, every check against the reference (float64 where it can):

* forward: decode (M = 1) and chunks (M = 16, 64, 500) x GQA groups 1, 2, 8 x head_dim 64, 128, 256 (the
  CUDA backend: 64, 128), dtypes and gate kinds in turn; three rows per problem whose lengths are 0, 1 and
  63 modulo 64, the longest 32k; every position past a row's range poisoned with NaN
  (docs/op.md#the-attention-read); outputs
  poisoned before the run; the caches bit-identical to the reference's in the same dtype and untouched
  outside the active slots; out and lse within FlashAttention's rule (float32: 1e-5);
* splits: decode at lengths to 32k with every split count the planner chooses, and forced 1, 2, 7, 64;
* stale: old slot values a thousand times the fresh ones (a read of the slot before its update would
  dominate the softmax), write-through and gated;
* determinism: 20 runs from identical inputs give identical bits (a difference is a race);
* backward: T = 2 loops chained on one cache, every gradient (q, k, v, gates, the caches' old values)
  against the float64 reference;
* paged: the forward through a block table (docs/op.md#paged-caches: shuffled pages of one pool, NaN spare pages, -1
  past each row's pages) against the same backend on contiguous caches, bit for bit, pages nobody
  references untouched;
* graph: a decode step of a small looped model on a paged cache captured as a CUDA graph and replayed
  (melt_kernels.graphs.CapturedDecode) against the same step run eagerly, bit for bit, over steps that cross
  page boundaries; the time per token of the replay, the eager capturable step and the model's ordinary eager
  decode step (CUDA events, after warm-up).  Dry run: the eager paths only.

Checks run in parallel worker processes (compiling Triton kernels is the slow part of a fresh machine).
Every finished check is written to ``--out`` at once, so a run cut by its time limit keeps its results.

    python benchmarks/gpu_correctness.py --out correctness.json            # on a GPU
    python benchmarks/gpu_correctness.py --dry-run --out correctness.json  # CPU: interpreter and emulator
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GATES = ("head", "element", "separate", "float", "none", "broadcast")  # tests/utils.py's gate kinds
FP32_TOL = 1e-5


@dataclass(frozen=True)
class Check:
    kind: str  # forward, splits, stale, determinism, backward
    backend: str  # triton or cuda
    dtype: str
    seqlen_q: int
    heads_q: int
    heads_kv: int
    head_dim: int
    lengths: tuple  # L_b of each row
    gate: str = "head"
    causal: bool = True
    splits: Optional[int] = None  # forced split count; None: the planner's
    repeats: int = 20  # determinism
    page_size: int = 0  # paged and graph checks (graph: M is the number of decode steps)

    @property
    def name(self) -> str:
        return (f"{self.kind}/{self.backend}/{self.dtype}/M{self.seqlen_q}/H{self.heads_q}:{self.heads_kv}/"
                f"D{self.head_dim}/L{'-'.join(map(str, self.lengths))}/{self.gate}"
                f"{'' if self.causal else '/noncausal'}{'' if self.splits is None else f'/splits{self.splits}'}"
                f"{f'/page{self.page_size}' if self.page_size else ''}")


# --- the table ----------------------------------------------------------------------------------------------

def _rows(longest: int, seqlen_q: int) -> tuple:
    """Three row lengths: 0, 1 and 63 modulo 64, the first ``longest`` (a multiple of 64)."""
    return (longest, max(64, longest // 8) + 1, 63 + 64 * (seqlen_q % 3))


def gpu_table(backends: list[str], quick: bool) -> list[Check]:
    checks = []
    for backend in backends:
        cuda = backend == "cuda"
        dtypes = ("bf16", "fp16") if cuda else ("bf16", "fp16", "fp32")
        head_dims = (64, 128) if cuda else (64, 128, 256)
        longest = {1: 32768, 16: 8192, 64: 4096, 500: 2048}
        i = 0
        for seqlen_q in (1, 16, 64, 500):
            for groups in (1, 2, 8):
                for head_dim in head_dims:
                    if quick and i % 3:
                        i += 1
                        continue
                    checks.append(Check("forward", backend, dtypes[i % len(dtypes)], seqlen_q, 2 * groups, 2,
                                        head_dim, _rows(longest[seqlen_q], seqlen_q), GATES[i % len(GATES)],
                                        causal=seqlen_q == 1 or i % 2 == 0))
                    i += 1
        forced = (1, 2, 7, 64)
        for splits in forced + tuple(planner_splits(backend)):
            checks.append(Check("splits", backend, "bf16", 1, 16, 2, 128, (32768, 20000, 4095), "element",
                                splits=splits))
        for gate in ("none", "float", "element"):
            for seqlen_q in (1, 64):
                checks.append(Check("stale", backend, "bf16", seqlen_q, 8, 2, 128, (1024, 3000, 63), gate))
        checks.append(Check("determinism", backend, "bf16", 1, 32, 8, 128, (32768, 8191, 100), "element"))
        checks.append(Check("determinism", backend, "bf16", 500, 16, 4, 128, (4096, 1000, 63), "head"))
        # The last of the backend's dtypes: float32 for Triton, float16 for CUDA (16-bit only).
        for dtype, seqlen_q, groups, head_dim, gate in (("bf16", 64, 4, 128, "head"),
                                                         (dtypes[-1], 16, 1, 64, "element"),
                                                         ("fp16", 500, 2, 128, "separate"),
                                                         ("bf16", 1, 8, 64, "float")):
            checks.append(Check("backward", backend, dtype, seqlen_q, 2 * groups, 2, head_dim, (1000, 37, 0), gate))
        for seqlen_q, groups, page_size, gate in ((1, 4, 16, "element"), (1, 8, 256, "head"), (64, 2, 64, "float")):
            checks.append(Check("paged", backend, "bf16", seqlen_q, 2 * groups, 2, 128, (4095, 1000, 63), gate,
                                page_size=page_size))
        checks.append(Check("graph", backend, "bf16", 40, 16, 4, 128, (500,) * 8, "head", page_size=16))
    return checks


def dry_table(backends: list[str]) -> list[Check]:
    """The same kinds of check at interpreter/emulator sizes."""
    checks = []
    for backend in backends:
        cuda = backend == "cuda"
        if cuda:  # the emulator runs one host thread per GPU thread: a few small launches
            checks += [Check("forward", backend, "bf16", 1, 4, 2, 64, (130, 65, 63), "element"),
                       Check("forward", backend, "fp16", 20, 4, 1, 64, (64, 1, 63), "head"),
                       Check("splits", backend, "fp16", 1, 2, 1, 64, (129, 64, 3), "float", splits=2),
                       Check("stale", backend, "bf16", 1, 2, 1, 64, (70, 3, 1), "none"),
                       Check("determinism", backend, "bf16", 1, 2, 1, 64, (129, 70, 3), "head", repeats=2)]
            continue
        i = 0
        for seqlen_q in (1, 5, 20):
            for groups in (1, 2):
                checks.append(Check("forward", backend, ("bf16", "fp16", "fp32")[i % 3], seqlen_q, 2 * groups, 2,
                                    (16, 32)[i % 2], (128, 65, 63), GATES[i % len(GATES)], causal=i % 2 == 0))
                i += 1
        for splits in (1, 2, 7):
            checks.append(Check("splits", backend, "bf16", 1, 4, 2, 16, (192, 100, 63), "element", splits=splits))
        checks += [Check("stale", backend, "bf16", 5, 4, 2, 16, (64, 30, 1), "none"),
                   Check("determinism", backend, "bf16", 5, 4, 2, 16, (129, 64, 3), "head", repeats=3),
                   Check("backward", backend, "bf16", 5, 4, 2, 16, (40, 3, 0), "head"),
                   Check("backward", backend, "fp32", 3, 2, 1, 32, (20, 7, 1), "element"),
                   Check("graph", backend, "fp32", 3, 4, 2, 16, (14, 14), "head", page_size=16)]
    for backend in backends:  # the emulator needs head_dim 64 or 128 and 16-bit dtypes
        checks.append(Check("paged", backend, "bf16", 1, 4, 2, 64, (40, 3, 17), "element", page_size=16))
    return checks


def planner_splits(backend: str) -> list[int]:
    """The split counts the backend's planner picks for decode on an H200 (132 SMs) at lengths up to 32k."""
    chosen = set()
    for batch in (1, 4, 16):
        for length in (256, 1024, 4096, 16384, 32768):
            for groups in (1, 8):
                if backend == "triton":
                    from melt_kernels.kernels.fwd import plan_forward
                    chosen.add(plan_forward(batch, 1, 2 * groups, 2, 128, length, 132).splits)
                else:
                    from melt_kernels.cuda_backend import num_splits
                    chosen.add(num_splits(batch * 2, -(-length // 64) + 1, 132))
    return sorted(chosen - {1, 2, 7, 64})


# --- running one check ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty* inside starts as NaN (floats) or an extreme integer, so an unwritten output shows."""
    saved = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoned(factory):
        def make(*args, **kwargs):
            t = factory(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(math.nan)
            elif t.dtype != torch.bool:
                t.fill_(torch.iinfo(t.dtype).min)
            return t
        return make

    for name, factory in saved.items():
        setattr(torch, name, poisoned(factory))
    try:
        yield
    finally:
        for name, factory in saved.items():
            setattr(torch, name, factory)


def cache_len(c: Check) -> int:
    """The check's cache capacity: its longest row, the chunk and a few spare slots (whole pages when paged)."""
    length = max(c.lengths) + c.seqlen_q + 3
    return -(-length // c.page_size) * c.page_size if c.page_size else length


def why_unsupported(c: Check) -> Optional[str]:
    """Why the op or the check's backend would refuse the check's problem (dtype, head_dim, sizes), or None.

    Asked of uninitialised CPU tensors of the check's shapes, so it runs anywhere: the dry run and a test ask
    it of the GPU's table, and an entry its backend cannot run is found in CI, not on a lease.
    """
    import importlib

    from melt_kernels.checks import check_inputs

    dtype, batch, length = DTYPES[c.dtype], len(c.lengths), cache_len(c)
    q = torch.empty(batch, c.seqlen_q, c.heads_q, c.head_dim, dtype=dtype)
    k, v = (torch.empty(batch, c.seqlen_q, c.heads_kv, c.head_dim, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.empty(batch, length, c.heads_kv, c.head_dim, dtype=dtype) for _ in range(2))
    try:
        problem = check_inputs(q, k, v, k_cache, v_cache, torch.tensor(c.lengths, dtype=torch.int32), 0.5,
                               causal=c.causal)
    except (ValueError, TypeError) as e:  # a shape the op itself refuses
        return str(e)
    return importlib.import_module(f"melt_kernels.{c.backend}_backend").unsupported(problem)


def unrunnable(checks: list[Check]) -> list[str]:
    """"name: reason" for each check that its backend would refuse."""
    return [f"{c.name}: {why}" for c in checks if (why := why_unsupported(c)) is not None]


def make_inputs(c: Check, device: str, seed: int):
    """A problem with the check's row lengths; cache positions past each row's range hold NaN."""
    from utils import make_case

    seqlen_q, lengths = c.seqlen_q, c.lengths
    capacity = cache_len(c)
    case = make_case(seed, batch=len(lengths), seqlen_q=seqlen_q, heads_q=c.heads_q, heads_kv=c.heads_kv,
                     head_dim=c.head_dim, cache_len=capacity, dtype=DTYPES[c.dtype], device=device,
                     gate_kind=c.gate)
    case.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    beyond = torch.arange(capacity, device=device)[None, :] >= (case.cache_seqlens[:, None] + seqlen_q)
    for cache in (case.k_cache, case.v_cache):
        cache[beyond] = math.nan
    if c.kind == "stale":  # old slot values that would dominate the softmax if read instead of the new ones
        active = ~beyond & (torch.arange(capacity, device=device)[None, :] >= case.cache_seqlens[:, None])
        for cache in (case.k_cache, case.v_cache):
            cache[active] = cache[active] * 1000
        if c.gate == "float":
            case.gate = 1e-3
        elif c.gate == "element":
            case.gate = case.gate * 1e-3
    return case


def launcher(c: Check, dry_run: bool):
    """fwd(p) -> (out, lse) for a validated Problem p, through the check's backend (and forced splits)."""
    if c.backend == "triton":
        from melt_kernels.kernels.fwd import gated_kv_attention_fwd as fwd
        extra = {}
        if c.splits is not None:
            extra["split_len"] = max(1, -(-max(c.lengths) // c.splits))
    else:
        from melt_kernels import cuda_backend
        fwd = cuda_backend.gated_kv_attention_fwd_emulated if dry_run else cuda_backend.gated_kv_attention_fwd
        extra = {} if c.splits is None else {"splits": c.splits}
    return lambda p, **paged: fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                                  p.softmax_scale, p.causal, p.max_seqlen_k, **extra, **paged)


def error_bound(kernel: torch.Tensor, exact: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(kernel error, allowed): float32 1e-5 relative to the result's scale; 16-bit FlashAttention's rule,
    2x the error of the reference run in the same dtype plus one ulp at the result's largest magnitude."""
    finite = torch.isfinite(exact)
    diff = (kernel.double() - exact).abs()
    err = math.inf if not torch.isfinite(kernel[finite]).all() else diff[finite].max().item() if finite.any() else 0.
    scale = exact[finite].abs().max().item() if finite.any() else 1.
    if dtype == torch.float32:
        return err, FP32_TOL * max(1., scale)
    low_err = (low.double() - exact).abs()[finite].max().item() if finite.any() else 0.
    return err, 2 * low_err + torch.finfo(dtype).eps * scale + 1e-5


def run_forward(c: Check, device: str, dry_run: bool) -> dict:
    from melt_kernels.checks import check_inputs
    from melt_kernels.reference import attention, gated_kv_attention_ref_fwd
    from utils import active_mask, bits

    case = make_inputs(c, device, zlib.crc32(c.name.encode()))
    same = case.clone()
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()
    p = check_inputs(*case.args(), causal=c.causal)
    with poisoned_allocations():
        out, lse = launcher(c, dry_run)(p)
    r = check_inputs(*same.args(), causal=c.causal)
    out_low, lse_low = gated_kv_attention_ref_fwd(r.q, r.k, r.v, r.k_cache, r.v_cache, r.cache_seqlens, r.gate,
                                                  r.gate_v, r.softmax_scale, r.causal, r.max_seqlen_k)
    problems = []
    if not torch.equal(bits(case.k_cache), bits(same.k_cache)):
        problems.append("k_cache differs from the reference's")
    if not torch.equal(bits(case.v_cache), bits(same.v_cache)):
        problems.append("v_cache differs from the reference's")
    mask = active_mask(p.cache_seqlens.cpu(), len(c.lengths), c.seqlen_q, case.k_cache.shape[1])
    for name, before, after in (("k_cache", before_k, case.k_cache), ("v_cache", before_v, case.v_cache)):
        if not torch.equal(bits(before)[~mask], bits(after)[~mask]):
            problems.append(f"{name} written outside the active slots")
    # Exact attention over the caches as the kernel left them (they equal the reference's, checked above).
    out_exact, lse_exact = attention(p.q.double(), case.k_cache.double(), case.v_cache.double(), p.cache_seqlens,
                                     p.softmax_scale, c.causal)
    record = {}
    for name, got, exact, low in (("out", out, out_exact, out_low), ("lse", lse, lse_exact, lse_low)):
        err, allowed = error_bound(got, exact, low, DTYPES[c.dtype])
        record[f"{name}_err"], record[f"{name}_allowed"] = err, allowed
        if not err <= allowed:
            problems.append(f"{name} error {err:.3g} > allowed {allowed:.3g}")
    return dict(record, problems=problems)


def run_determinism(c: Check, device: str, dry_run: bool) -> dict:
    from melt_kernels.checks import check_inputs
    from utils import bits

    case = make_inputs(c, device, zlib.crc32(c.name.encode()))
    fwd = launcher(c, dry_run)
    first, problems = None, []
    for run in range(c.repeats):
        copy = case.clone()
        out, lse = fwd(check_inputs(*copy.args(), causal=c.causal))
        result = [bits(t) for t in (out, lse, copy.k_cache, copy.v_cache)]
        if first is None:
            first = result
        elif not all(torch.equal(a, b) for a, b in zip(first, result)):
            problems.append(f"run {run} differs from run 0: a race between the programs of a launch")
            break
    return dict(problems=problems, repeats=c.repeats)


def run_backward(c: Check, device: str, dry_run: bool) -> dict:
    """T = 2 loops on one cache through the public op; every gradient against float64 (reference backend)."""
    import melt_kernels

    seed = zlib.crc32(c.name.encode())
    case = make_inputs(c, device, seed)
    weights = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(seed + 1),
                          dtype=torch.float64).to(device)

    def leaves(dtype):
        """The case's tensors as leaves in ``dtype`` (gates keep float32 unless ``dtype`` is float64)."""
        made = {}
        for name in ("q", "k", "v", "k_cache", "v_cache", "gate", "gate_v"):
            t = getattr(case, name)
            if isinstance(t, torch.Tensor):
                keep = name.startswith("gate") and dtype != torch.float64
                t = t.detach().to(t.dtype if keep else dtype).requires_grad_()
            made[name] = t
        return made

    def grads(dtype, backend):
        t = leaves(dtype)
        k_cache, v_cache = t["k_cache"].clone(), t["v_cache"].clone()  # non-leaf: their old values get gradients
        loss = 0
        for loop in range(2):
            out = melt_kernels.gated_kv_attention(t["q"], t["k"] * (1 + loop), t["v"], k_cache, v_cache,
                                                  case.cache_seqlens, t["gate"], t["gate_v"], causal=c.causal,
                                                  backend=backend)
            loss = loss + (out.double() * weights).sum()
        names = [n for n, x in t.items() if isinstance(x, torch.Tensor)]
        return dict(zip(names, torch.autograd.grad(loss, [t[n] for n in names])))

    got = grads(DTYPES[c.dtype], c.backend)
    exact = grads(torch.float64, "reference")
    low = grads(DTYPES[c.dtype], "reference")
    # Positions past a row's range hold NaN: their gradient must be exactly zero (finite) in the kernel's
    # result; the comparison covers the positions a row reads.
    cache_len = case.k_cache.shape[1]
    valid = torch.arange(cache_len, device=device)[None, :] < case.cache_seqlens[:, None] + c.seqlen_q
    problems, record = [], {}
    for name, g in got.items():
        e, lo = exact[name], low[name]
        if name.endswith("_cache"):
            if not torch.equal(g[~valid], torch.zeros_like(g[~valid])):
                problems.append(f"d{name} is not zero past the rows' ranges")
            g, e, lo = g[valid], e[valid], lo[valid]
        err, allowed = error_bound(g, e, lo, DTYPES[c.dtype])
        record[f"d{name}_err"], record[f"d{name}_allowed"] = err, 4 * allowed
        # Gradients sum over more terms than one output: 4x the forward's allowance.
        if not err <= 4 * allowed:
            problems.append(f"d{name} error {err:.3g} > allowed {4 * allowed:.3g}")
    return dict(record, problems=problems)


def run_paged(c: Check, device: str, dry_run: bool) -> dict:
    """The forward through a block table against the same backend on the contiguous caches, bit for bit."""
    from melt_kernels.checks import check_inputs
    from utils import bits, page_case

    seed = zlib.crc32(c.name.encode())
    case = make_inputs(c, device, seed)
    paged = page_case(case, c.page_size, seed)
    before = [bits(t) for t in (paged.k_pool, paged.v_pool)]
    fwd = launcher(c, dry_run)
    p = check_inputs(*case.args(), causal=c.causal)
    out_c, lse_c = fwd(p)
    pools = check_inputs(case.q, case.k, case.v, paged.k_pool, paged.v_pool, case.cache_seqlens, case.gate,
                         case.gate_v, causal=c.causal, block_table=paged.block_table)
    with poisoned_allocations():
        out_p, lse_p = fwd(pools, block_table=paged.block_table)
    problems = []
    if not (torch.equal(bits(out_p), bits(out_c)) and torch.equal(bits(lse_p), bits(lse_c))):
        problems.append("out/lse through the table differ from the contiguous call's")
    batch = len(c.lengths)
    reach = torch.arange(case.k_cache.shape[1], device=device)[None, :] < (case.cache_seqlens[:, None] + c.seqlen_q)
    for name, pool, cache, old in (("k", paged.k_pool, case.k_cache, before[0]),
                                   ("v", paged.v_pool, case.v_cache, before[1])):
        if not torch.equal(bits(paged.logical(pool, batch))[reach.cpu()], bits(cache)[reach.cpu()]):
            problems.append(f"{name} pool differs from the contiguous cache in the rows' pages")
        if not torch.equal(bits(pool)[~paged.used], old[~paged.used]):
            problems.append(f"{name} pool changed in pages no row references")
    return dict(problems=problems)


def run_graph(c: Check, device: str, dry_run: bool) -> dict:
    """A decode step captured and replayed against the same step run eagerly; time per token of each."""
    from melt_kernels import LoopedLM, LoopedLMConfig, PagedCache
    from melt_kernels.graphs import CapturedDecode
    from utils import reseed

    config = LoopedLMConfig(vocab_size=256, hidden_size=c.heads_q * c.head_dim // 2, num_hidden_layers=2,
                            num_attention_heads=c.heads_q, num_key_value_heads=c.heads_kv, head_dim=c.head_dim,
                            intermediate_size=256, total_ut_steps=2, gate="kv-head")
    model = reseed(LoopedLM(config, backend=c.backend, dtype=DTYPES[c.dtype]), zlib.crc32(c.name.encode()))
    model = model.to(device)
    batch, prompt_len, steps = len(c.lengths), c.lengths[0], c.seqlen_q
    max_seqlen = prompt_len + 2 * steps + 2 * c.page_size
    prompt = torch.randint(0, 256, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    caches = [PagedCache(model.new_page_pool("melt", batch * -(-max_seqlen // c.page_size), c.page_size), batch,
                         max_seqlen) for _ in range(3)]
    with torch.no_grad():
        firsts = [model.prefill(prompt, cache, last_only=True)[:, -1] for cache in caches]
    replayed = CapturedDecode(model, caches[0])
    eager = CapturedDecode(model, caches[1], capture=False)
    problems = []
    tokens = firsts[0].argmax(-1)
    for _ in range(steps):
        a, b = replayed.step(tokens), eager.step(tokens)
        if not torch.equal(a, b):
            problems.append("the replayed step differs from the eager capturable step")
            break
        tokens = a.argmax(-1)
    record = dict(captured=replayed.captured)
    if device == "cuda":
        def per_token(step, tokens):
            for _ in range(3):
                step(tokens)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step(tokens)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / steps

        with torch.no_grad():
            record["graph_ms_per_token"] = per_token(replayed.step, tokens)
            record["eager_capturable_ms_per_token"] = per_token(eager.step, tokens)
            record["eager_ms_per_token"] = per_token(lambda t: model(t[:, None], caches[2], last_only=True), tokens)
    return dict(record, problems=problems)


RUNNERS = {"forward": run_forward, "splits": run_forward, "stale": run_forward, "determinism": run_determinism,
           "backward": run_backward, "paged": run_paged, "graph": run_graph}


def run_check(c: Check, dry_run: bool) -> dict:
    device = "cpu" if dry_run else "cuda"
    start = time.perf_counter()
    row = dict(asdict(c), name=c.name)
    try:
        result = RUNNERS[c.kind](c, device, dry_run)
        row.update(result, status="passed" if not result["problems"] else "failed")
    except Exception as e:  # a crash is a failed check with its traceback, not the end of the step
        row.update(status="error", problems=[f"{type(e).__name__}: {e}"], traceback=traceback.format_exc()[-3000:])
    if device == "cuda":
        torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - start
    return row


# --- driver --------------------------------------------------------------------------------------------------

def kernel_backends(dry_run: bool) -> list[str]:
    import melt_kernels

    if dry_run:
        try:
            from melt_kernels import cuda_backend  # noqa: F401  (built: the emulator runs its kernels)
            return ["triton", "cuda"]
        except ImportError:
            return ["triton"]
    return [b for b in melt_kernels.available_backends() if b != "reference"]


def interleaved(checks: list[Check]) -> list[Check]:
    """Round robin over (kind, backend), so that a run cut by its time limit has covered every kind."""
    groups: dict = {}
    for c in checks:
        groups.setdefault((c.kind, c.backend), []).append(c)
    queues = list(groups.values())
    ordered = []
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered


def write(path: str, meta: dict, rows: list[dict], pending: list[str]) -> None:
    summary = {status: sum(r["status"] == status for r in rows) for status in ("passed", "failed", "error")}
    summary["not_run"] = len(pending)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta=meta, summary=summary, checks=rows, not_run=pending), f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON of every check (rewritten as checks finish)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter and CUDA emulator")
    parser.add_argument("--quick", action="store_true", help="a third of the forward table (a rerun)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 8 on a GPU, 1 dry)")
    parser.add_argument("--only", default=None, help="run the checks whose name contains this")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    backends = kernel_backends(args.dry_run)
    if args.dry_run:  # the GPU's table cannot run here: its entries are held against their backends' limits
        refused = unrunnable(gpu_table(backends, quick=False))
        if refused:
            print("the GPU table has checks that their backend refuses:", *refused, sep="\n  ")
            return 1
    checks = dry_table(backends) if args.dry_run else gpu_table(backends, args.quick)
    if args.only:
        checks = [c for c in checks if args.only in c.name]
    checks = interleaved(checks)
    workers = args.workers or (1 if args.dry_run else min(8, os.cpu_count() or 1))
    meta = dict(dry_run=args.dry_run, backends=backends, workers=workers, torch=torch.__version__,
                device="cpu" if args.dry_run else torch.cuda.get_device_name())
    print(f"{len(checks)} checks on {backends} with {workers} worker(s)", flush=True)
    rows, pending = [], [c.name for c in checks]
    write(args.out, meta, rows, pending)
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        running = {pool.submit(run_check, c, args.dry_run): c for c in checks}
        for done in futures.as_completed(running):
            row = done.result()
            rows.append(row)
            pending.remove(row["name"])
            write(args.out, meta, rows, pending)
            print(f"{row['status']:7s} {row['seconds']:6.1f} s  {row['name']}  {'; '.join(row['problems'])}",
                  flush=True)
    failed = [r for r in rows if r["status"] != "passed"]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
