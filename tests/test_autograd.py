"""Autograd of the fused op (melt_kernels/autograd.py), on the reference backend in float64.

* gradcheck of one call, of the T loops of a chunk, and of several chunks, for every input: q, k, v,
  the gates of each kind and the caches' values before the first call;
* the in-place chain gives the gradients of the out-of-place functional definition (docs/op.md#gradients), with
  the caches given in every layout, as views of a bigger buffer, and as halves of one packed tensor;
* a write into a cache by anything but the op, between a call and its backward, makes that backward
  raise; the op's own later calls (loops, chunks, inference calls) do not;
* what backward keeps alive, and what it allocates, does not grow with the cache length;
* the version counter moves with every call and the caches' history is rebased onto the op.
"""
import pytest
import torch
from hypothesis import given, strategies as st
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import melt_kernels
from grad_utils import chain_grads, grad_names, loss_weights, make_chain, run_functional, run_in_place
from melt_kernels import MeltCache
from melt_kernels.autograd import GatedKVAttentionFunction, _CommitFunction
from melt_kernels.backends import triton_interpreted
from utils import GATE_KINDS, LAYOUTS, make_case

TOL = dict(atol=1e-10, rtol=1e-10)


def _op(*args, **kwargs):
    return melt_kernels.gated_kv_attention(*args, return_lse=True, backend="reference", **kwargs)


def _flat_chain(chain, causal):
    """gradcheck's view of a chain: a function of its leaves returning every out, lse and the final caches."""
    def fn(*values):
        results, k_cache, v_cache = run_in_place(chain.with_leaves(values), causal, "reference")
        return tuple(t for pair in results for t in pair) + (k_cache, v_cache)
    return fn, chain.leaves()


@pytest.mark.parametrize("gate_kind", GATE_KINDS)
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_single_call(gate_kind, causal):
    """Every gate kind, both masks: the full Jacobian for two combinations, random projections of it
    (gradcheck's fast mode) for the others, to keep the suite quick."""
    chain = make_chain(11, loops=1, chunks=1, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, extra=2,
                       gate_kind=gate_kind).clone()
    fn, leaves = _flat_chain(chain, causal)
    full = (gate_kind, causal) in (("separate", True), ("broadcast", False))
    assert gradcheck(fn, leaves, atol=1e-8, rtol=1e-6, fast_mode=not full)


@pytest.mark.parametrize("gate_kind", ["separate", "broadcast", "none"])
@pytest.mark.parametrize("loops,chunks", [(3, 1), (2, 2)])
def test_gradcheck_chained(gate_kind, loops, chunks):
    """The T loops of a chunk, and chunks after it, all on one cache; every leaf checked (fast mode:
    random projections of the full Jacobian)."""
    chain = make_chain(5, loops=loops, chunks=chunks, batch=2, seqlen_q=2, heads_q=4, heads_kv=2, head_dim=16,
                       extra=3, gate_kind=gate_kind, layout="padded").clone()
    fn, leaves = _flat_chain(chain, causal=True)
    assert gradcheck(fn, leaves, atol=1e-8, rtol=1e-6, fast_mode=True)


@given(params=st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**31 - 1), loops=st.integers(1, 3), chunks=st.integers(1, 3), batch=st.integers(1, 3),
    seqlen_q=st.integers(1, 4), heads_kv=st.integers(1, 2), groups=st.integers(1, 3),
    head_dim=st.sampled_from([16, 24]), extra=st.integers(0, 8), gate_kind=st.sampled_from(GATE_KINDS),
    layout=st.sampled_from(LAYOUTS), int_seqlens=st.booleans())),
    causal=st.booleans(), cache_requires_grad=st.booleans(),
    use=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
def test_chained_matches_functional(params, causal, cache_requires_grad, use):
    """T loops x C chunks in place == the out-of-place composition, for every gradient, whichever of out,
    lse and the final caches the loss uses."""
    params = dict(params)
    params["heads_q"] = params["heads_kv"] * params.pop("groups")
    chain = make_chain(**params)
    weights = loss_weights(chain, params["seed"], use)
    in_place = chain.clone(cache_requires_grad=cache_requires_grad)
    functional = chain.clone(cache_requires_grad=cache_requires_grad)
    got = chain_grads(in_place, weights, lambda c: run_in_place(c, causal, "reference"))
    want = chain_grads(functional, weights, lambda c: run_functional(c, causal))
    for name, g, w in zip(grad_names(in_place), got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name}: {m}")


def _run_on_views(chain, kind, causal=True):
    """Runs ``chain`` with its caches copied into views: MeltCache's layer tensors sliced to a shorter
    window, or k and v as the two halves of one packed (B, S, 2, Hkv, D) tensor.  Returns (results, K, V)."""
    batch, cache_len, heads_kv, head_dim = chain.k_cache.shape
    if kind == "melt_cache":
        cache = MeltCache(2, batch, cache_len + 5, heads_kv, head_dim, dtype=torch.float64)
        for t, leaf in zip(cache.layer(1), (chain.k_cache, chain.v_cache)):
            t[:, :cache_len].copy_(leaf)  # the leaf caches' values flow in through copy_
        k_cache, v_cache = (t[:, :cache_len] for t in cache.layer(1))
    else:
        base = torch.stack([chain.k_cache, chain.v_cache], dim=2)
        k_cache, v_cache = base[:, :, 0], base[:, :, 1]
    results = []
    for i, s in enumerate(chain.steps):
        results.append(_op(s.q, s.k, s.v, k_cache, v_cache, chain.step_lengths(i // chain.loops), s.gate,
                           s.gate_v, causal=causal))
    return results, k_cache, v_cache


@pytest.mark.parametrize("kind", ["melt_cache", "packed"])
def test_views_of_caches(kind):
    chain = make_chain(3, loops=2, chunks=2, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=16, extra=4,
                       gate_kind="separate")
    weights = loss_weights(chain, 0, (True, True, True))
    views = chain.clone()
    got = chain_grads(views, weights, lambda c: _run_on_views(c, kind))
    want = chain_grads(chain.clone(), weights, lambda c: run_functional(c, True))
    for name, g, w in zip(grad_names(views), got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name}: {m}")


def _small_problem(seed=0, gate_kind="head", layout="contiguous"):
    case = make_case(seed, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=8,
                     dtype=torch.float64, gate_kind=gate_kind, layout=layout)
    for t in (case.q, case.k, case.v, case.gate, case.gate_v):
        if isinstance(t, torch.Tensor):
            t.requires_grad_()
    return case


def _outside_writes():
    """Ways to modify a cache in place that are not the op: on the tensor, through a view, on the base."""
    return {
        "k_cache": lambda k, v, base: k.mul_(1.0),
        "v_cache": lambda k, v, base: v[:, :1].zero_(),
        "base": lambda k, v, base: base.add_(0.0),
        "detached": lambda k, v, base: k.detach()[0, 0].fill_(1.0),
    }


@pytest.mark.parametrize("write", list(_outside_writes()))
@pytest.mark.parametrize("when", ["after_last_call", "between_calls"])
def test_outside_write_makes_backward_raise(write, when):
    """The prefix is read from the live cache at backward time; any other in-place write is caught."""
    case = _small_problem()
    base = torch.zeros(2, 8, 2, 1, 16, dtype=torch.float64)
    k_cache, v_cache = base[:, :, 0], base[:, :, 1]
    k_cache.copy_(case.k_cache)
    v_cache.copy_(case.v_cache)
    outside = _outside_writes()[write]
    out1, _ = _op(case.q, case.k, case.v, k_cache, v_cache, 2, case.gate)
    if when == "between_calls":
        outside(k_cache, v_cache, base)
    out2, _ = _op(case.q, case.k, case.v, k_cache, v_cache, 2, case.gate)
    if when == "after_last_call":
        outside(k_cache, v_cache, base)
    with pytest.raises(RuntimeError, match="modified in place by something other than gated_kv_attention"):
        (out1.sum() + out2.sum()).backward()


def test_own_writes_do_not_raise():
    """Loops, later chunks and inference calls of the op between a call and its backward are its own
    writes; writes into other tensors (a clone of the cache) are nobody's business."""
    case = _small_problem()
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    out1, _ = _op(case.q, case.k, case.v, k_cache, v_cache, 1, case.gate)
    out2, _ = _op(case.q, case.k, case.v, k_cache, v_cache, 1, case.gate)
    with torch.no_grad():
        _op(case.q, case.k, case.v, k_cache, v_cache, 3, None)
    k_cache.clone().zero_()
    out3, _ = _op(case.q, case.k, case.v, k_cache, v_cache, 5, case.gate)
    (out1.sum() + out2.sum() + out3.sum()).backward()
    assert case.q.grad is not None and torch.isfinite(case.q.grad).all()


def _saved_bytes(cache_len: int, gate_kind: str) -> int:
    """Bytes of the tensors saved for backward by one call that are neither inputs nor views of them."""
    case = make_case(1, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=16, cache_len=cache_len,
                     dtype=torch.float64, gate_kind=gate_kind)
    leaves = [case.q, case.k, case.v, case.gate, case.gate_v]
    for t in leaves:
        if isinstance(t, torch.Tensor):
            t.requires_grad_()
    k_cache = case.k_cache.clone().requires_grad_()
    v_cache = case.v_cache.clone().requires_grad_()
    k_work, v_work = k_cache * 1, v_cache * 1
    given = [t for t in leaves + [k_work, v_work] if isinstance(t, torch.Tensor)]
    given_storages = {t.untyped_storage().data_ptr() for t in given}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = melt_kernels.gated_kv_attention(case.q, case.k, case.v, k_work, v_work, case.cache_seqlens,
                                              case.gate, case.gate_v, backend="reference")
    assert saved, "the hook saw nothing: the test would pass vacuously"
    del out
    return sum(t.numel() * t.element_size() for t in saved
               if t.untyped_storage().data_ptr() not in given_storages)


@pytest.mark.parametrize("gate_kind", ["none", "element", "separate"])
def test_saved_memory_does_not_grow_with_the_cache(gate_kind):
    short, long = _saved_bytes(8, gate_kind), _saved_bytes(200, gate_kind)
    assert short == long > 0
    # (B, M, Hkv, D) active slots before/after and (B, M, Hq, D) out, in float64, plus lse and lengths.
    assert long <= 8 * (4 * 2 * 3 * 2 * 16 + 2 * 3 * 4 * 16 + 2 * 4 * 3) + 64


def test_version_counter_and_history():
    case = _small_problem()
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    versions = k_cache._version, v_cache._version
    out, _ = _op(case.q, case.k, case.v, k_cache, v_cache, case.cache_seqlens, case.gate)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    # The caches' values now depend on k/v/gate: their history is this op.
    assert k_cache.requires_grad and k_cache.grad_fn is not None
    assert v_cache.requires_grad and v_cache.grad_fn is not None


def test_no_graph_without_grad():
    case = make_case(2, batch=1, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=6, dtype=torch.float64)
    version = case.k_cache._version
    out, lse = _op(case.q, case.k, case.v, case.k_cache, case.v_cache, case.cache_seqlens, case.gate)
    assert out.grad_fn is None and lse.grad_fn is None and not case.k_cache.requires_grad
    assert case.k_cache._version > version


def test_inference_mode():
    with torch.inference_mode():
        case = make_case(2, batch=1, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=6,
                         dtype=torch.float64)
        before = case.k_cache.clone()
        out, _ = _op(case.q, case.k, case.v, case.k_cache, case.v_cache, 3, 0.25)
    assert torch.isfinite(out).all()
    expected = 0.25 * before[:, 3:5] + 0.75 * case.k
    torch.testing.assert_close(case.k_cache[:, 3:5], expected, **TOL)


def test_gate_gradient_keeps_the_gates_shape_and_dtype():
    """A float32 gate (Hkv, 1) broadcast over float64 tensors gets a float32 (Hkv, 1) gradient, the sum of
    the broadcast element-wise gradient."""
    case = make_case(4, batch=2, seqlen_q=3, heads_q=2, heads_kv=2, head_dim=16, cache_len=9, dtype=torch.float64)
    gate64 = torch.rand(2, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    gate32 = gate64.detach().float().requires_grad_()
    full = gate32.detach().double().expand(2, 3, 2, 16).clone().requires_grad_()
    grads = []
    for gate in (gate32, full):
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        out, lse = _op(case.q, case.k, case.v, k_cache, v_cache, case.cache_seqlens, gate)
        (out.sum() + lse.sum() + k_cache.sum()).backward()
        grads.append(gate.grad)
    assert grads[0].shape == (2, 1) and grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0].double(), grads[1].sum((0, 1, 3)).reshape(2, 1), atol=1e-5, rtol=1e-5)


class _Allocations(TorchDispatchMode):
    """The bytes of every tensor storage an op creates inside the block (outputs that share no storage
    with the op's inputs: not views, not in-place results): all of them, and those made while the op's own
    backward nodes run (``ours``, switched on and off by :meth:`watch`)."""

    def __init__(self):
        super().__init__()
        self.sizes, self.ours, self.inside = [], [], 0

    def watch(self, monkeypatch, function):
        backward = function.backward

        def counted(ctx, *grads):
            self.inside += 1
            try:
                return backward(ctx, *grads)
            finally:
                self.inside -= 1
        monkeypatch.setattr(function, "backward", staticmethod(counted))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.sizes.append(t.untyped_storage().nbytes())
                if self.inside:
                    self.ours.append(t.untyped_storage().nbytes())
        return out


def _backward_allocations(monkeypatch, cache_len: int, backend: str, loss_reads_caches: bool,
                          cache_requires_grad: bool):
    """(all sizes, the op's sizes) allocated by the backward of 3 loops x 2 chunks on one cache of
    ``cache_len`` positions (row lengths 4 and 2 before the first chunk, host lengths), and one cache's bytes."""
    gen = torch.Generator().manual_seed(0)
    batch, seqlen_q, heads_kv, head_dim = 2, 3, 2, 16
    dtype = torch.float64 if backend == "reference" else torch.float32
    leaf = torch.randn(2, batch, cache_len, heads_kv, head_dim, generator=gen, dtype=dtype)
    leaf.requires_grad_(cache_requires_grad)
    k_cache, v_cache = leaf[0] * 1, leaf[1] * 1
    weight = torch.randn(k_cache.shape, generator=gen, dtype=dtype)
    lengths = torch.tensor([4, 2], dtype=torch.int32)
    total = 0
    for chunk in range(2):
        for loop in range(3):
            q = torch.randn(batch, seqlen_q, 4, head_dim, generator=gen, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(batch, seqlen_q, heads_kv, head_dim, generator=gen, dtype=dtype, requires_grad=True)
                    for _ in range(2))
            gate = torch.rand(batch, seqlen_q, heads_kv, 1, generator=gen, dtype=dtype, requires_grad=True)
            out = melt_kernels.gated_kv_attention(q, k, v, k_cache, v_cache, lengths + chunk * seqlen_q,
                                                  gate if loop else None, backend=backend)
            total = total + out.square().sum()
    if loss_reads_caches:
        # A gradient made by the user's graph (k_cache) and an expanded one (v_cache) reach the last call.
        total = total + (k_cache * weight).sum() + v_cache.sum()
    allocations = _Allocations()
    with monkeypatch.context() as patch:
        allocations.watch(patch, GatedKVAttentionFunction)
        allocations.watch(patch, _CommitFunction)
        with allocations:
            total.backward()
    return allocations, batch * cache_len * heads_kv * head_dim * leaf.element_size()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("loss_reads_caches,cache_requires_grad", [(False, False), (True, False), (False, True)])
def test_backward_allocations_do_not_grow_with_capacity(monkeypatch, backend, loss_reads_caches,
                                                        cache_requires_grad):
    """6 calls on one cache, 5 of which need the cache's gradient: the op's backward nodes allocate one
    cache-sized buffer per cache for the whole chain (zeros, or a copy of a gradient from the user's
    graph), and with a 5x larger capacity they allocate only those buffers' growth more.  When nothing but
    the op touches the caches, that holds for everything the backward allocates."""
    if backend == "triton" and not triton_interpreted():
        pytest.skip("the Triton kernels on the CPU need the interpreter")
    small, small_cache = _backward_allocations(monkeypatch, 24, backend, loss_reads_caches, cache_requires_grad)
    large, large_cache = _backward_allocations(monkeypatch, 120, backend, loss_reads_caches, cache_requires_grad)
    for allocations, cache_bytes in ((small, small_cache), (large, large_cache)):
        assert allocations.ours, "nothing recorded: the test would pass vacuously"
        big = [n for n in allocations.ours if n >= cache_bytes]
        assert len(big) == 2, f"{len(big)} cache-sized allocations by the op's backward: {big}"
    grown = sum(large.ours) - sum(small.ours)
    assert grown == 2 * (large_cache - small_cache), \
        f"the op's backward allocates {grown} more bytes for a 5x capacity ({large_cache - small_cache} per cache)"
    if not loss_reads_caches and not cache_requires_grad:
        assert sum(large.sizes) - sum(small.sizes) == grown
