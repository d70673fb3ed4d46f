"""docs/op.md#the-attention-read: a row's result depends on keys [0, L_b + M - 1] of that row only, in every backend.

Whatever a cache holds where row b never reads it (garbage, NaN, +inf, -inf) must reach neither row b's out
and lse nor any gradient.  Each test poisons, in both caches:

* every position p >= L_b + M of row b (rows have different lengths, so one row's unread positions are
  another's keys: the batch-padding case that a zero probability times NaN used to leak through);
* with ``gate=None`` also the active slots L_b .. L_b+M-1 themselves: a write-through never reads the old slot;
* every element of the caches' storage outside the (B, S, Hkv, D) view (the padded layout's extra rows and
  channels), which no kernel may touch.

and compares with the same call on the clean caches: out, lse, every gradient (q, k, v, gates, and the caches'
values before the call) must be equal (and finite), the caches equal where they were not poisoned and still
the poison where they were (never written).

Not poisoned: the active slots a causal token i does not see (L_b+i+1 .. L_b+M-1).  They are not garbage but
this call's own updated slots, written from k/v (blended with the old slot when gated) before anyone reads
them, and a later token reads them; a non-finite value there comes from the inputs (or from a gated slot's
old value, which docs/op.md#the-cache-update reads) and is already in that later token's result.  Every backend
gives them a zero probability, like FlashAttention and SDPA, and so does not promise more than finite values
there.

Backends: the reference (float64/float32), the Triton kernels (under TRITON_INTERPRET=1 on the CPU, or on a
GPU) forward and backward through the op, and the CUDA kernels' forward run by the host emulator when the
extension is built (the CUDA backend's backward is the Triton one, fed only out, lse and the active slots).
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import melt_kernels
from melt_kernels.backends import triton_interpreted
from melt_kernels.checks import check_inputs
from utils import Case, case_params, make_case

try:
    from melt_kernels import cuda_backend
except ImportError:
    cuda_backend = None

TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda" if torch.cuda.is_available() else None
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None,
                                  reason="the Triton kernels need a CUDA device, or TRITON_INTERPRET=1")
needs_emulator = pytest.mark.skipif(cuda_backend is None, reason="melt_kernels._cuda is not built (MELT_BUILD_CUDA=1)")
POISONS = (math.nan, math.inf, -math.inf)


def _lengths(case: Case) -> torch.Tensor:
    batch = case.q.shape[0]
    return torch.as_tensor(case.cache_seqlens).reshape(-1).expand(batch).long().cpu()


def unread_mask(case: Case) -> torch.Tensor:
    """(B, S) bool: the positions of each row that no token of the row reads in this call."""
    batch, seqlen_q = case.q.shape[:2]
    pos = torch.arange(case.k_cache.shape[1])[None, :]
    lengths = _lengths(case)[:, None]
    unread = pos >= lengths + seqlen_q
    if case.gate is None:  # write-through: the old active slots are overwritten unread
        unread |= pos >= lengths
    return unread


def _poison_outside_view(cache: torch.Tensor, value: float) -> None:
    """Sets every element of ``cache``'s storage that the view does not cover to ``value``."""
    storage = torch.tensor([], dtype=cache.dtype, device=cache.device).set_(cache.untyped_storage())
    index = torch.arange(storage.numel(), device=cache.device)
    inside = torch.zeros(storage.numel(), dtype=torch.bool, device=cache.device)
    inside[index.as_strided(cache.shape, cache.stride(), cache.storage_offset()).reshape(-1)] = True
    storage[~inside] = value


def poisoned(case: Case, value: float) -> Case:
    """A copy of ``case`` whose caches hold ``value`` wherever no token of the call may read them."""
    copy = case.clone()
    mask = unread_mask(case).to(copy.k_cache.device)
    with torch.no_grad():
        for cache in (copy.k_cache, copy.v_cache):
            _poison_outside_view(cache, value)
            cache[mask] = value
    return copy


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.isfinite(want).all(), f"{what}: the clean run is not finite"
    assert torch.equal(got, want), \
        f"{what}: differs from the clean run (max |diff| {(got.double() - want.double()).abs().max().item():.3g})"


def check_forward(run, case: Case, value: float) -> None:
    """``run(case) -> (out, lse)`` updates ``case``'s caches in place."""
    dirty = poisoned(case, value)
    mask = unread_mask(case).to(case.k_cache.device)
    clean = case.clone()
    out_clean, lse_clean = run(clean)
    out, lse = run(dirty)
    assert_same(out, out_clean, "out")
    assert_same(lse, lse_clean, "lse")
    for name, got, want in (("k_cache", dirty.k_cache, clean.k_cache), ("v_cache", dirty.v_cache, clean.v_cache)):
        assert torch.equal(got[~mask], want[~mask]), f"{name} differs from the clean run where it was read"
        kept = got[mask & ~unread_written(case).to(mask.device)]
        assert (kept.isnan() if math.isnan(value) else kept == value).all(), f"{name}: a poisoned position changed"


def unread_written(case: Case) -> torch.Tensor:
    """(B, S) bool: the poisoned positions the call overwrites (the active slots of a write-through)."""
    pos = torch.arange(case.k_cache.shape[1])[None, :]
    lengths = _lengths(case)[:, None]
    active = (pos >= lengths) & (pos < lengths + case.q.shape[1])
    return active if case.gate is None else torch.zeros_like(active)


def op(backend: str, causal: bool):
    def run(case):
        return melt_kernels.gated_kv_attention(*case.args(), causal=causal, return_lse=True, backend=backend)
    return run


def emulator(causal: bool, splits):
    def run(case):
        p = check_inputs(*case.args(), causal=causal)
        return cuda_backend.gated_kv_attention_fwd_emulated(
            p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, p.causal,
            p.max_seqlen_k, splits=splits)
    return run


def gradients(case: Case, backend: str, causal: bool, seed: int) -> list:
    """Gradients of random cotangents of (out, lse, caches after the call) for q, k, v, the tensor gates and
    the caches' values before the call."""
    case = case.clone()
    leaves = [case.q, case.k, case.v] + [g for g in (case.gate, case.gate_v) if isinstance(g, torch.Tensor)]
    leaves += [case.k_cache, case.v_cache]
    for t in leaves:
        t.requires_grad_(True)
    # The op writes into non-leaf copies (same strides, so the padding stays as it was: never read).
    k_cache, v_cache = (torch.empty_strided(c.shape, c.stride(), dtype=c.dtype, device=c.device).copy_(c)
                        for c in (case.k_cache, case.v_cache))
    out, lse = melt_kernels.gated_kv_attention(case.q, case.k, case.v, k_cache, v_cache, case.cache_seqlens,
                                               case.gate, case.gate_v, causal=causal, return_lse=True,
                                               backend=backend)
    gen = torch.Generator().manual_seed(seed)
    outputs = (out, lse, k_cache, v_cache)
    cotangents = [torch.randn(t.shape, generator=gen).to(t) for t in outputs]
    return torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True, materialize_grads=True)


def check_backward(case: Case, backend: str, causal: bool, value: float, seed: int) -> None:
    names = ["dq", "dk", "dv"] + [n for n, g in (("dgate", case.gate), ("dgate_v", case.gate_v))
                                  if isinstance(g, torch.Tensor)] + ["dk_cache", "dv_cache"]
    want = gradients(case, backend, causal, seed)
    got = gradients(poisoned(case, value), backend, causal, seed)
    for name, g, w in zip(names, got, want):
        assert_same(g, w, name)


def _split(params):
    params = dict(params)
    return params.pop("causal"), params


# --- the reproducer of issue 13 --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_issue_repro_nan_past_shorter_row(backend):
    """B=2, lengths [5, 1], M=1: row 1 reads positions 0..1 only; NaN at its positions 2.. must not show."""
    device = "cpu" if backend == "reference" else TRITON_DEVICE
    case = make_case(0, batch=2, seqlen_q=1, heads_q=1, heads_kv=1, head_dim=16, cache_len=8, device=device,
                     gate_kind="none")
    case.cache_seqlens = torch.tensor([5, 1], dtype=torch.int32, device=device)
    clean = case.clone()
    with torch.no_grad():
        case.v_cache[1, 2:] = math.nan
    out = melt_kernels.gated_kv_attention(*case.args(), backend=backend)
    assert torch.equal(out, melt_kernels.gated_kv_attention(*clean.args(), backend=backend))


# --- every backend, hypothesis shapes --------------------------------------------------------------------------

@given(case_params(dtypes=(torch.float64, torch.float32), max_extra=8), st.sampled_from(POISONS),
       st.integers(0, 2**31 - 1))
def test_reference_ignores_unread_positions(params, value, seed):
    causal, params = _split(params)
    case = make_case(**params)
    check_forward(op("reference", causal), case, value)
    check_backward(case, "reference", causal, value, seed)


@needs_triton
@given(case_params(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=(16, 24), max_seqlen_q=5,
                   max_extra=8), st.sampled_from(POISONS))
def test_triton_forward_ignores_unread_positions(params, value):
    causal, params = _split(params)
    check_forward(op("triton", causal), make_case(device=TRITON_DEVICE, **params), value)


@needs_triton
@given(case_params(dtypes=(torch.float32, torch.bfloat16), head_dims=(16, 24), max_seqlen_q=5, max_extra=8),
       st.sampled_from(POISONS), st.integers(0, 2**31 - 1))
def test_triton_backward_ignores_unread_positions(params, value, seed):
    causal, params = _split(params)
    check_backward(make_case(device=TRITON_DEVICE, **params), "triton", causal, value, seed)


@needs_emulator
@given(case_params(dtypes=(torch.float16, torch.bfloat16), head_dims=(64,), max_batch=2, max_seqlen_q=20,
                   max_extra=40, max_groups=4), st.sampled_from(POISONS), st.sampled_from([None, 1, 2, 3]))
def test_cuda_emulated_ignores_unread_positions(params, value, splits):
    """Decode (M*G <= 64, the split holding the active tile blends) and chunk (blend launch) paths, with key
    splits; the emulator runs the kernels' own source over host memory."""
    causal, params = _split(params)
    check_forward(emulator(causal, splits), make_case(**params), value)
