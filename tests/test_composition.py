"""The composition backend (melt_kernels/composition_backend.py: the blend, then PyTorch's attention) against the
reference on the CPU: outputs and log-sum-exp within float64/float32 rounding, caches bit-identical, every
output written (torch.empty is NaN-poisoned by conftest), positions past a row's keys never read, gradients of
chained calls equal to the reference's, and a clear refusal of what it does not handle."""
import dataclasses

import pytest
import torch
from hypothesis import given, strategies as st

import melt_kernels
from grad_utils import chain_grads, loss_weights, make_chain, run_in_place
from melt_kernels.autograd import run
from melt_kernels.backends import explain_backend, planned
from melt_kernels.checks import check_inputs
from melt_kernels.composition_backend import (gated_kv_attention_composition_bwd, gated_kv_attention_composition_fwd,
                                              unsupported)
from melt_kernels.reference import gated_kv_attention_ref_bwd, gated_kv_attention_ref_fwd
from utils import bits, case_params, make_case

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-6, rtol=2e-6)}


def _uniform(case, params):
    """The case with one length for every row (what the composition handles), as an int or a host tensor."""
    length = int(torch.as_tensor(case.cache_seqlens).reshape(-1)[0])
    lengths = length if params["int_seqlens"] else torch.full((params["batch"],), length, dtype=torch.int32)
    return dataclasses.replace(case, cache_seqlens=lengths)


def _run(case, causal, backend, **kw):
    return melt_kernels.gated_kv_attention(*case.args(), causal=causal, return_lse=True, backend=backend, **kw)


@given(case_params(dtypes=(torch.float64, torch.float32)), st.sampled_from([None, 0.3]))
def test_forward_matches_the_reference(params, softmax_scale):
    causal = params.pop("causal")
    case = _uniform(make_case(**params), params)
    want = case.clone()
    out, lse = _run(case, causal, "composition", softmax_scale=softmax_scale)
    ref_out, ref_lse = _run(want, causal, "reference", softmax_scale=softmax_scale)
    torch.testing.assert_close(out, ref_out, **TOL[params["dtype"]])
    torch.testing.assert_close(lse, ref_lse, **TOL[params["dtype"]])
    assert lse.dtype == ref_lse.dtype and out.dtype == case.q.dtype
    for name in ("k_cache", "v_cache"):
        assert torch.equal(bits(getattr(case, name)), bits(getattr(want, name))), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_kind", ["float", "head", "element", "separate"])
def test_half_caches_are_bit_identical(dtype, gate_kind):
    """16-bit caches: the blend's float32 products rounded once, as the reference, whether the gate is a float,
    a float32 tensor (the four-launch path) or a 16-bit one."""
    case = make_case(3, batch=2, seqlen_q=5, heads_q=4, heads_kv=2, head_dim=16, cache_len=12, dtype=dtype,
                     gate_kind=gate_kind, int_seqlens=True)
    if gate_kind == "element":
        case = dataclasses.replace(case, gate=case.gate.to(dtype))
    want = case.clone()
    out, _ = _run(case, True, "composition")
    ref_out, _ = _run(want, True, "reference")
    assert torch.equal(bits(case.k_cache), bits(want.k_cache)) and torch.equal(bits(case.v_cache), bits(want.v_cache))
    torch.testing.assert_close(out, ref_out, atol=4 * torch.finfo(dtype).eps, rtol=4 * torch.finfo(dtype).eps)


def test_positions_past_the_keys_are_never_read():
    """NaN and inf past L + M (the rest of the capacity) reach no output, as in every backend."""
    case = make_case(5, batch=2, seqlen_q=3, heads_q=2, heads_kv=2, head_dim=16, cache_len=14, dtype=torch.float64,
                     int_seqlens=True)
    end = case.cache_seqlens + 3
    for cache, poison in ((case.k_cache, float("nan")), (case.v_cache, float("inf"))):
        cache[:, end:] = poison
    want = case.clone()
    out, lse = _run(case, True, "composition")
    ref_out, ref_lse = _run(want, True, "reference")
    assert out.isfinite().all() and lse.isfinite().all()
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float64])


@pytest.mark.parametrize("gate_kind", ["none", "float", "head", "broadcast", "separate"])
@pytest.mark.parametrize("use", [(True, False, False), (True, False, True), (True, True, True)],
                         ids=["out", "out+caches", "out+lse+caches"])
@pytest.mark.parametrize("causal", [True, False])
def test_chained_gradients_match_the_reference(gate_kind, use, causal):
    """Two chunks of three loops on one cache, every leaf's gradient (q, k, v, gates, the caches before the
    first call) through the composition against the reference, in float64.  A loss on lse sends the backward
    to the reference's math (SDPA takes no lse gradient)."""
    chain = make_chain(7, loops=3, chunks=2, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=16, extra=4,
                       gate_kind=gate_kind, layout="padded", int_seqlens=True)
    weights = loss_weights(chain, 11, use)
    got = chain_grads(chain.clone(), weights, lambda c: run_in_place(c, causal, "composition"))
    want = chain_grads(chain.clone(), weights, lambda c: run_in_place(c, causal, "reference"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("with_buffers", [False, True])
def test_attention_backward_launcher_without_blend(with_buffers):
    """The launcher contract without ``blend``: (dq, dk_new, dv_new) and the prefix gradient added into the
    buffers, nothing else of them touched, as the reference's."""
    case = make_case(9, batch=2, seqlen_q=4, heads_q=6, heads_kv=2, head_dim=16, cache_len=11, dtype=torch.float64,
                     int_seqlens=True)
    lengths = torch.full((2,), case.cache_seqlens, dtype=torch.int32)
    bound = case.cache_seqlens + 4
    k_new, v_new = (torch.empty_like(case.k) for _ in range(2))
    out, lse = gated_kv_attention_composition_fwd(case.q, case.k, case.v, case.k_cache, case.v_cache, lengths,
                                                  case.gate, case.gate, 0.25, True, bound, k_new=k_new, v_new=v_new)
    dout = torch.randn_like(out)
    results = []
    for bwd in (gated_kv_attention_composition_bwd, gated_kv_attention_ref_bwd):
        buffers = [torch.randn(c.shape, generator=torch.Generator().manual_seed(1), dtype=c.dtype)
                   if with_buffers else None for c in (case.k_cache, case.v_cache)]
        grads = bwd(case.q, case.k_cache, case.v_cache, k_new, v_new, lengths, out, lse, dout, None, 0.25, True,
                    *buffers, bound)
        results.append(list(grads) + [b for b in buffers if b is not None])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_forward_launcher_fills_the_side_outputs():
    case = make_case(4, batch=2, seqlen_q=3, heads_q=2, heads_kv=1, head_dim=16, cache_len=8, dtype=torch.float32,
                     gate_kind="separate", int_seqlens=True)
    want = case.clone()
    lengths = torch.full((2,), case.cache_seqlens, dtype=torch.int32)
    bound = case.cache_seqlens + 3
    sides = [[torch.empty_like(case.k) for _ in range(4)] for _ in range(2)]
    for fwd, c, side in ((gated_kv_attention_composition_fwd, case, sides[0]),
                         (gated_kv_attention_ref_fwd, want, sides[1])):
        fwd(c.q, c.k, c.v, c.k_cache, c.v_cache, lengths, c.gate, c.gate_v, 0.5, True, bound,
            **dict(zip(("k_new", "v_new", "k_old", "v_old"), side)))
    for got, expected in zip(*sides):
        assert torch.equal(bits(got), bits(expected))


def _problem(**changes):
    case = make_case(2, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=8, int_seqlens=True)
    args = dict(zip(("q", "k", "v", "k_cache", "v_cache", "cache_seqlens", "gate", "gate_v"), case.args()))
    return check_inputs(**{**args, **changes})


def test_what_it_does_not_handle_is_named():
    assert unsupported(_problem()) is None
    assert "same length" in unsupported(_problem(cache_seqlens=torch.tensor([1, 4])))
    assert "on the host" in unsupported(dataclasses.replace(_problem(), max_seqlen_k=None, min_seqlen_k=None))
    pool = torch.randn(3, 16, 1, 16)
    paged = _problem(k_cache=pool, v_cache=pool.clone(), block_table=torch.tensor([[0], [1]], dtype=torch.int32))
    assert "paged" in unsupported(paged)
    assert "does not run cpu" in unsupported(_problem(), kernel="flash")
    assert "kernels" in unsupported(_problem(), kernel="math")
    assert "same length" in explain_backend(_problem(cache_seqlens=torch.tensor([1, 4])))["composition"]


def test_a_refused_call_writes_nothing():
    case = make_case(8, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=8)
    case = dataclasses.replace(case, cache_seqlens=torch.tensor([1, 4], dtype=torch.int32))
    before = [bits(case.k_cache), bits(case.v_cache)]
    with pytest.raises(RuntimeError, match="same length"):
        _run(case, True, "composition")
    assert torch.equal(before[0], bits(case.k_cache)) and torch.equal(before[1], bits(case.v_cache))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("seqlen_q, cache_len", [(1, 300), (64, 64), (64, 300)])
def test_cuda_kernels_match_the_reference(kernel, seqlen_q, cache_len):
    """PyTorch's CUDA attention kernels behind the composition (GQA included): caches bit-identical to the
    reference's, out and lse within bfloat16's rounding; cuDNN refused where its top-left mask is not the op's;
    and the gradients of one training call as the reference's."""
    case = make_case(6, batch=2, seqlen_q=seqlen_q, heads_q=4, heads_kv=2, head_dim=64, cache_len=cache_len,
                     dtype=torch.bfloat16, device="cuda", full_rows=True)
    impl = planned("composition", (("kernel", kernel),))
    reason = impl.unsupported(check_inputs(*case.args()))
    if kernel == "cudnn" and seqlen_q < cache_len and seqlen_q > 1:
        assert "top-left" in reason
        return
    assert reason is None
    want = case.clone()
    out, lse = run(check_inputs(*case.args()), impl)
    ref_out, ref_lse = _run(want, True, "reference")
    assert torch.equal(bits(case.k_cache), bits(want.k_cache)) and torch.equal(bits(case.v_cache), bits(want.v_cache))
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=0)
    grads = []
    for backend in (impl, "reference"):
        fresh = make_case(6, batch=2, seqlen_q=seqlen_q, heads_q=4, heads_kv=2, head_dim=64, cache_len=cache_len,
                          dtype=torch.bfloat16, device="cuda", full_rows=True)
        leaves = [t.requires_grad_() for t in (fresh.q, fresh.k, fresh.v, fresh.gate)]
        result = run(check_inputs(*fresh.args()), backend) if backend is impl else _run(fresh, True, "reference")
        result[0].float().square().sum().backward()
        grads.append([t.grad.float() for t in leaves])
    for got, expected in zip(*grads):
        assert ((got - expected).norm() / expected.norm()).item() < 2e-2
