"""The reference backend against the separate loop-by-loop model of docs/op.md#the-op (tests/loop_model.py)."""
import pytest
import torch
from hypothesis import given, strategies as st

import melt_kernels
from loop_model import loop_model
from utils import active_mask, assert_untouched, bits, case_params, make_case

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-6, rtol=2e-6)}


def _split(params):
    params = dict(params)
    return params.pop("causal"), params


def _run_reference(case, causal, **kw):
    return melt_kernels.gated_kv_attention(*case.args(), causal=causal, return_lse=True, backend="reference", **kw)


@given(case_params(dtypes=(torch.float64, torch.float32)), st.sampled_from([None, 0.3]))
def test_reference_matches_loop_model(params, softmax_scale):
    causal, params = _split(params)
    case = make_case(**params)
    expected = loop_model(*case.args(), softmax_scale=softmax_scale, causal=causal)
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()

    out, lse = _run_reference(case, causal, softmax_scale=softmax_scale)

    tol = TOL[params["dtype"]]
    mask = active_mask(case.cache_seqlens, params["batch"], params["seqlen_q"], params["cache_len"])
    for got, want in ((out, expected[0]), (lse, expected[1]), (case.k_cache, expected[2]),
                      (case.v_cache, expected[3])):
        torch.testing.assert_close(got, want.to(got.dtype), **tol)
    assert out.dtype == case.q.dtype and lse.dtype == (torch.float64 if params["dtype"] == torch.float64
                                                       else torch.float32)
    assert_untouched(before_k, case.k_cache, mask)
    assert_untouched(before_v, case.v_cache, mask)


@given(case_params(dtypes=(torch.float16, torch.bfloat16), gate_kinds=("none", "head", "element")))
def test_reference_half_precision(params):
    """Half caches: the blend is done in float32 and rounded once, so every stored value is the float32
    result rounded to the cache dtype; outputs within the half precision's own rounding of the float64 math."""
    causal, params = _split(params)
    case = make_case(**params)
    exact = loop_model(*case.clone(dtype=torch.float64).args(), causal=causal)
    blended = loop_model(*case.args(), causal=causal, dtype=torch.float32)
    _run_reference(case, causal)
    assert torch.equal(bits(case.k_cache), bits(blended[2])) and torch.equal(bits(case.v_cache), bits(blended[3]))
    eps = torch.finfo(params["dtype"]).eps
    out = melt_kernels.gated_kv_attention(*make_case(**params).args(), causal=causal, backend="reference")
    torch.testing.assert_close(out.double(), exact[0], atol=4 * eps, rtol=4 * eps)


def test_write_through_never_reads_old_slot():
    case = make_case(0, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=16, cache_len=9, gate_kind="none",
                     dtype=torch.float64)
    mask = active_mask(case.cache_seqlens, 2, 3, 9)
    case.k_cache[mask] = float("nan")
    case.v_cache[mask] = float("inf")
    out = melt_kernels.gated_kv_attention(*case.args(), backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(case.k_cache[mask], case.k.reshape(-1, 2, 16))


def test_gate_one_keeps_cache_and_gate_zero_writes_through():
    case = make_case(1, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=6, gate_kind="none",
                     dtype=torch.float64)
    keep, through = case.clone(), case.clone()
    melt_kernels.gated_kv_attention(*keep.args()[:6], 1.0, backend="reference")
    melt_kernels.gated_kv_attention(*through.args()[:6], 0.0, backend="reference")
    torch.testing.assert_close(keep.k_cache, case.k_cache, rtol=0, atol=0)
    mask = active_mask(case.cache_seqlens, 2, 2, 6)
    torch.testing.assert_close(through.v_cache[mask], case.v.reshape(-1, 1, 16), rtol=0, atol=0)


def _functional_loops(inputs, chunks, loops, lengths0, causal):
    """T loops over each chunk, out of place (loop_model): the definition the in-place calls must reproduce."""
    q, k, v, k_cache, v_cache, gate, gate_v = inputs
    outs = []
    for c, (lo, hi) in enumerate(chunks):
        for t in range(loops):
            qs = q[:, lo:hi] * (1 + t)
            g = None if t == 0 else gate[:, lo:hi]
            gv = None if t == 0 else gate_v[:, lo:hi]
            out, lse, k_cache, v_cache = loop_model(qs, k[:, lo:hi] + t, v[:, lo:hi] - t, k_cache, v_cache,
                                                    lengths0 + lo, g, gv, causal=causal)
            outs += [out, lse]
    return outs + [k_cache, v_cache]


def _inplace_loops(inputs, chunks, loops, lengths0, causal):
    q, k, v, k_cache, v_cache, gate, gate_v = inputs
    k_cache, v_cache = k_cache.clone(), v_cache.clone()  # non-leaf, so it can be updated in place
    outs = []
    for lo, hi in chunks:
        for t in range(loops):
            g = None if t == 0 else gate[:, lo:hi]
            gv = None if t == 0 else gate_v[:, lo:hi]
            out, lse = melt_kernels.gated_kv_attention(
                q[:, lo:hi] * (1 + t), k[:, lo:hi] + t, v[:, lo:hi] - t, k_cache, v_cache, lengths0 + lo, g, gv,
                causal=causal, return_lse=True, backend="reference")
            outs += [out, lse]
    return outs + [k_cache, v_cache]


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([(0, 2), (0, 1, 3)]), st.booleans())
def test_chained_loops_and_chunks_match_out_of_place_gradients(seed, loops, cuts, causal):
    """T in-place calls per chunk over several chunks, one backward: every gradient as the functional model."""
    batch, heads_q, heads_kv, head_dim, extra = 2, 4, 2, 16, 3
    seqlen = cuts[-1]
    chunks = list(zip(cuts[:-1], cuts[1:]))
    gen = torch.Generator().manual_seed(seed)
    lengths0 = torch.randint(0, extra + 1, (batch,), generator=gen, dtype=torch.int32)
    cache_len = extra + seqlen

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    inputs = (leaf(batch, seqlen, heads_q, head_dim), leaf(batch, seqlen, heads_kv, head_dim),
              leaf(batch, seqlen, heads_kv, head_dim), leaf(batch, cache_len, heads_kv, head_dim),
              leaf(batch, cache_len, heads_kv, head_dim),
              torch.rand(batch, seqlen, heads_kv, 1, generator=gen, dtype=torch.float64).requires_grad_(),
              torch.rand(batch, seqlen, heads_kv, head_dim, generator=gen, dtype=torch.float64).requires_grad_())
    got = _inplace_loops(inputs, chunks, loops, lengths0, causal)
    want = _functional_loops(inputs, chunks, loops, lengths0, causal)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    # With one loop the gates are never used: their gradients are zero.
    grads_got = torch.autograd.grad(got, inputs, cotangents, allow_unused=True, materialize_grads=True)
    grads_want = torch.autograd.grad(want, inputs, cotangents, allow_unused=True, materialize_grads=True)
    for name, g, w in zip(("q", "k", "v", "k_cache", "v_cache", "gate", "gate_v"), grads_got, grads_want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("gate_kind", ["none", "float", "head", "broadcast", "separate"])
def test_gradcheck_single_call(gate_kind):
    case = make_case(3, batch=2, seqlen_q=2, heads_q=4, heads_kv=2, head_dim=16, cache_len=5,
                     dtype=torch.float64, gate_kind=gate_kind, layout="padded")
    gates = [g for g in (case.gate, case.gate_v) if isinstance(g, torch.Tensor)]
    tensors = [case.q, case.k, case.v, case.k_cache, case.v_cache, *gates]
    for t in tensors:
        t.requires_grad_()

    def f(q, k, v, k_cache, v_cache, *gs):
        gate, gate_v = case.gate, case.gate_v
        if gates:
            gate = gs[0]
            gate_v = gs[1] if len(gs) > 1 else None
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
        out, lse = melt_kernels.gated_kv_attention(q, k, v, k_cache, v_cache, case.cache_seqlens, gate, gate_v,
                                                   return_lse=True, backend="reference")
        return out, lse, k_cache, v_cache

    assert torch.autograd.gradcheck(f, tensors)


def test_version_counter_moves_and_history_is_rebased():
    case = make_case(4, batch=1, seqlen_q=1, heads_q=2, heads_kv=1, head_dim=16, cache_len=4, dtype=torch.float64)
    q = case.q.requires_grad_()
    versions = case.k_cache._version, case.v_cache._version
    melt_kernels.gated_kv_attention(q, *case.args()[1:], backend="reference")
    assert case.k_cache._version > versions[0] and case.v_cache._version > versions[1]
    assert case.k_cache.grad_fn is not None and case.k_cache.requires_grad
    with torch.no_grad():
        versions = case.k_cache._version, case.v_cache._version
        melt_kernels.gated_kv_attention(*case.args(), backend="reference")
    assert case.k_cache._version > versions[0] and case.v_cache._version > versions[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_untouched_nan_keeps_its_bits(dtype):
    """Positions outside the active slots keep their exact bits, NaN payloads included: PyTorch's CPU
    ``scatter_`` rewrites untouched bfloat16 NaNs (0x7FC0 -> 0xFFFF), so the reference must not use it."""
    case = make_case(5, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=9, dtype=dtype)
    case.cache_seqlens = torch.tensor([3, 6], dtype=torch.int32)
    mask = active_mask(case.cache_seqlens, 2, 2, 9)
    for cache in (case.k_cache, case.v_cache):
        cache[~mask] = float("nan")
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()
    with torch.no_grad():
        melt_kernels.gated_kv_attention(*case.args(), backend="reference")
    assert_untouched(before_k, case.k_cache, mask)
    assert_untouched(before_v, case.v_cache, mask)
