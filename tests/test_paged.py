"""Paged caches (docs/op.md#paged-caches): every backend through a block table against the same backend on
contiguous caches.

A case's caches are moved into shuffled pages of one shared pool per tensor (tests/utils.page_case): rows of
different lengths, table entries a row does not need set to -1, spare pages nobody references filled with
NaN.  The paged call must give the contiguous call's out/lse bit for bit (the same arithmetic on the same
values), write the same bits into the active slots, and leave every other slot of the pools, the
unreferenced pages included, bit-identical.  Bad tables raise before anything is written.
"""
import pytest
import torch
from hypothesis import given, strategies as st

import melt_kernels
from melt_kernels.backends import triton_interpreted
from utils import GATE_KINDS, active_mask, bits, make_case, page_case

BACKENDS = ["reference"] + (["triton"] if triton_interpreted() or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu"


@st.composite
def paged_params(draw, page_sizes=(16, 32, 48, 64, 256)):
    """(make_case keywords, page_size, causal) of a small paged problem."""
    page_size = draw(st.sampled_from(page_sizes))
    seqlen_q = draw(st.integers(1, 4))
    heads_kv = draw(st.integers(1, 2))
    max_blocks = draw(st.integers(1, 3 if page_size <= 64 else 1))
    params = dict(seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(1, 3)), seqlen_q=seqlen_q,
                  heads_kv=heads_kv, heads_q=heads_kv * draw(st.integers(1, 2)),
                  head_dim=draw(st.sampled_from((16, 32))), cache_len=page_size * max_blocks,
                  gate_kind=draw(st.sampled_from(GATE_KINDS)),
                  dtype=draw(st.sampled_from((torch.float32, torch.bfloat16))))
    return params, page_size, draw(st.booleans())


def paged_call(case, paged, backend, causal, **kwargs):
    return melt_kernels.gated_kv_attention(case.q, case.k, case.v, paged.k_pool, paged.v_pool, case.cache_seqlens,
                                           case.gate, case.gate_v, causal=causal, return_lse=True,
                                           backend=backend, block_table=paged.block_table, **kwargs)


def check_paged(backend, params, page_size, causal, pad_unused=True):
    case = make_case(device=DEVICE, **params)
    paged = page_case(case, page_size, params["seed"], pad_unused=pad_unused)
    before = paged.k_pool.clone(), paged.v_pool.clone()
    out_c, lse_c = melt_kernels.gated_kv_attention(*case.args(), causal=causal, return_lse=True, backend=backend)
    out_p, lse_p = paged_call(case, paged, backend, causal)
    assert torch.equal(bits(out_p), bits(out_c)) and torch.equal(bits(lse_p), bits(lse_c))
    batch, seqlen_q = case.q.shape[:2]
    active = active_mask(case.cache_seqlens, batch, seqlen_q, params["cache_len"])
    for pool, old, cache in zip((paged.k_pool, paged.v_pool), before, (case.k_cache, case.v_cache)):
        # The active slots hold the contiguous call's bits ...
        assert torch.equal(bits(paged.logical(pool, batch))[active], bits(cache)[active])
        # ... and nothing else of the pools changed: written slots are put back, then everything compared.
        restored = pool.clone()
        table = paged.block_table.long().cpu()
        pos = torch.arange(params["cache_len"])
        for b, p in active.nonzero().tolist():
            restored[table[b, p // page_size], p % page_size] = old[table[b, p // page_size], p % page_size]
        assert torch.equal(bits(restored), bits(old)), "a paged call wrote outside the active slots"
        del pos
    return case, paged


@pytest.mark.parametrize("backend", BACKENDS)
@given(drawn=paged_params())
def test_paged_matches_contiguous(backend, drawn):
    check_paged(backend, *drawn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_full_table_and_shared_pool(backend):
    """Every table entry valid (no -1 padding), several rows sharing one pool, chunk path and split-KV sizes."""
    params = dict(seed=7, batch=3, seqlen_q=5, heads_kv=2, heads_q=4, head_dim=32, cache_len=96,
                  gate_kind="element", dtype=torch.float32)
    check_paged(backend, params, 32, True, pad_unused=False)


def _bad_table_cases(case, paged):
    """(description, keyword overrides of the paged call) that must raise."""
    table, k_pool = paged.block_table, paged.k_pool
    out_of_range = table.clone()
    out_of_range[0, 0] = k_pool.shape[0]
    negative = table.clone()
    negative[-1, 0] = -1
    aliased = table.clone()
    aliased[1] = aliased[0]
    return [
        ("int64 table", dict(block_table=table.long()), TypeError),
        ("1-D table", dict(block_table=table[0]), ValueError),
        ("wrong batch", dict(block_table=table[:1]), ValueError),
        ("too few blocks", dict(block_table=table[:, :1]), ValueError),
        ("index past the pool", dict(block_table=out_of_range), ValueError),
        ("negative index", dict(block_table=negative), ValueError),
        ("aliased active slots", dict(block_table=aliased), ValueError),
    ]


def test_bad_tables_raise_before_writing():
    params = dict(seed=3, batch=2, seqlen_q=2, heads_kv=1, heads_q=2, head_dim=16, cache_len=64,
                  gate_kind="head", dtype=torch.float32)
    case = make_case(**params)
    case.cache_seqlens = torch.tensor([30, 30], dtype=torch.int32)  # both rows write slots 14, 15 of their 2nd block
    paged = page_case(case, 16, 3, pad_unused=False)
    before = [bits(t) for t in (paged.k_pool, paged.v_pool)]
    for what, overrides, error in _bad_table_cases(case, paged):
        call = dict(block_table=paged.block_table) | overrides
        with pytest.raises(error, match="block_table"):
            melt_kernels.gated_kv_attention(case.q, case.k, case.v, paged.k_pool, paged.v_pool,
                                            case.cache_seqlens, case.gate, backend="reference", **call)
        assert all(torch.equal(b, bits(t)) for b, t in zip(before, (paged.k_pool, paged.v_pool))), what
    for page_size in (8, 24, 272):
        pools = [torch.zeros(4, page_size, 1, 16) for _ in range(2)]
        with pytest.raises(ValueError, match="page_size"):
            melt_kernels.gated_kv_attention(case.q, case.k, case.v, *pools, case.cache_seqlens,
                                            block_table=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="pool"):
        melt_kernels.gated_kv_attention(case.q, case.k, case.v, paged.k_pool, paged.v_pool[:, :, :, :8],
                                        case.cache_seqlens, block_table=paged.block_table)



@pytest.mark.parametrize("backend", BACKENDS)
@given(drawn=paged_params(page_sizes=(16, 32)), loops=st.integers(1, 2))
def test_paged_gradients_match_contiguous(backend, drawn, loops):
    """Two loops of in-place calls on one cache, then a loss reading the cache too: the gradients of q, k, v,
    the gates and the cache values before the calls agree with the contiguous run (the pools' gradients
    through the table; pages no row references get zero)."""
    params, page_size, causal = drawn
    params = dict(params, dtype=torch.float64 if backend == "reference" else torch.float32)
    case = make_case(device=DEVICE, **params)
    paged = page_case(case, page_size, params["seed"], pad_unused=False)
    batch = case.q.shape[0]
    weights = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1), dtype=case.q.dtype)
    cache_weights = torch.randn(case.k_cache.shape, generator=torch.Generator().manual_seed(2), dtype=case.q.dtype)

    def run(k_cache, v_cache, to_logical, **table):
        inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v, k_cache, v_cache)]
        gates = [g.detach().requires_grad_() if isinstance(g, torch.Tensor) else g for g in (case.gate, case.gate_v)]
        q, k, v, kc0, vc0 = inputs
        kc, vc = kc0.clone(), vc0.clone()
        loss = 0
        for r in range(loops):
            out = melt_kernels.gated_kv_attention(q, k * (r + 1), v, kc, vc, case.cache_seqlens, *gates,
                                                  causal=causal, backend=backend, **table)
            loss = loss + (out * weights).sum()
        loss = loss + (to_logical(kc) * cache_weights).sum()
        loss.backward()
        grads = [t.grad for t in inputs[:3]] + [g.grad for g in gates if isinstance(g, torch.Tensor)]
        return grads, (kc0.grad, vc0.grad)

    grads_c, cache_grads_c = run(case.k_cache, case.v_cache, lambda c: c)
    grads_p, cache_grads_p = run(paged.k_pool, paged.v_pool, lambda c: paged.logical(c, batch),
                                 block_table=paged.block_table)
    tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-5, atol=1e-6)
    for g_c, g_p in zip(grads_c, grads_p):
        torch.testing.assert_close(g_p, g_c, **tol)
    for g_c, g_p in zip(cache_grads_c, cache_grads_p):
        torch.testing.assert_close(paged.logical(g_p, batch), g_c, **tol)
        assert not g_p[~paged.used].any(), "an unreferenced page got a gradient"


try:
    from melt_kernels import cuda_backend
except ImportError:
    cuda_backend = None
needs_extension = pytest.mark.skipif(cuda_backend is None, reason="melt_kernels._cuda is not built (MELT_BUILD_CUDA=1)")


def _launcher(backend):
    """The backend's forward launcher on CPU tensors (the CUDA kernels through the host emulator)."""
    if backend == "cuda":
        return lambda *args, **kw: cuda_backend.gated_kv_attention_fwd_emulated(*args, splits=2, **kw)
    from melt_kernels.kernels.fwd import gated_kv_attention_fwd
    return lambda *args, **kw: gated_kv_attention_fwd(*args, block_n=16, block_r=16, split_len=16, **kw)


KERNELS = [pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreted(), reason="TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=needs_extension)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("seqlen_q,heads_q,page_size", [(1, 4, 16), (3, 2, 48), (40, 4, 32)])
def test_kernel_paged_matches_contiguous_and_clamps_entries(backend, seqlen_q, heads_q, page_size):
    """Each kernel backend (decode path; the CUDA chunk path with its blend launch at M = 40) through a table
    against itself on contiguous caches, bit for bit; a table whose unneeded entries hold garbage (10**6:
    possible in a device table, never checked on the host) gives the same bits (only the needed entries are
    read); and needed entries out of range (10**6, -3) act as the table clamped into [0, num_blocks)."""
    case = make_case(5, batch=2, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=2, head_dim=64,
                     cache_len=3 * page_size if seqlen_q < 40 else 4 * page_size, dtype=torch.float16,
                     gate_kind="element")
    case.cache_seqlens = torch.tensor([page_size + 5, case.k_cache.shape[1] - seqlen_q], dtype=torch.int32)
    paged = page_case(case, page_size, 5)
    launch = _launcher(backend)
    p = melt_kernels.checks.check_inputs(*case.args())
    out_c, lse_c = launch(p.q, p.k, p.v, case.k_cache, case.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                          p.softmax_scale, True)
    garbage = torch.where(paged.block_table < 0, 10**6, paged.block_table)
    # Needed entries out of range too, and the table they clamp to: the same accesses, the same bits.
    wild, clamped = garbage.clone(), garbage.clone()
    wild[0, 0], clamped[0, 0] = 10**6, paged.k_pool.shape[0] - 1
    wild[1, 0], clamped[1, 0] = -3, 0
    results = []
    for table in (paged.block_table, garbage, wild, clamped):
        pools = paged.k_pool.clone(), paged.v_pool.clone()
        out, lse = launch(p.q, p.k, p.v, *pools, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, True,
                          block_table=table.contiguous())
        results.append([bits(t) for t in (out, lse, *pools)])
    assert all(torch.equal(a, b) for a, b in zip(*results[:2])), "garbage in unneeded table entries changed the result"
    assert all(torch.equal(a, b) for a, b in zip(*results[2:])), "out-of-range entries are not clamped into the pool"
    assert torch.equal(results[0][0], bits(out_c)) and torch.equal(results[0][1], bits(lse_c))
    for pool_bits, cache in zip(results[0][2:], (case.k_cache, case.v_cache)):
        pool = pool_bits.view(paged.k_pool.dtype)
        mask = torch.arange(case.k_cache.shape[1])[None, :] < (p.cache_seqlens.long() + seqlen_q)[:, None]
        assert torch.equal(bits(paged.logical(pool, 2))[mask], bits(cache)[mask])
        assert torch.equal(pool_bits[~paged.used], bits(paged.k_pool if cache is case.k_cache
                                                        else paged.v_pool)[~paged.used])
