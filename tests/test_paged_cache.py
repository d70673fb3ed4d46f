"""melt_kernels.paged_cache: the looped model on paged caches (PagePool + PagedCache), continuous batching.

The model on a PagedCache must give the logits it gives on the contiguous caches (MELT and LoopLM, chunked
prefill and decoding), with the pages a row holds exactly those its tokens need, and a batch that takes and drops
sequences between decode steps must give every sequence the logits it gets alone.
"""
import pytest
import torch

from melt_kernels import PagedCache, PagePool
from melt_kernels.backends import triton_interpreted
from test_model import tiny_model, token_ids

TOL = dict(atol=1e-12, rtol=1e-12)


def decode(model, ids, cache, steps, chunk_size):
    """Chunked prefill of ids, then ``steps`` greedy decode steps: the logits of every step, (B, steps+1, V)."""
    logits = [model.prefill(ids, cache, chunk_size, last_only=True)[:, -1]]
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1)[:, None], cache, last_only=True)[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("kind", ["melt", "looplm"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_model_matches_contiguous(kind, page_size):
    model = tiny_model(3, loops=3, gate="kv-element")
    ids = token_ids(3, 2, 21)
    steps = 14  # 21 + 14 = 35 tokens: three pages of 16, and a page boundary crossed while decoding
    expected = decode(model, ids, model.new_cache(kind, 2, 40), steps, chunk_size=8)
    pool = model.new_page_pool(kind, num_blocks=9, page_size=page_size)
    cache = PagedCache(pool, batch=2, max_seqlen=64)
    got = decode(model, ids, cache, steps, chunk_size=8)
    torch.testing.assert_close(got, expected, **TOL)
    # The last token is not fed back: 21 + 14 - 1 settled, 21 + 14 positions reserved at most.
    settled = 21 + steps
    assert cache.seqlens_host.tolist() == [settled, settled]
    per_row = -(-settled // page_size)
    assert cache.pages == pool.pages_in_use == 2 * per_row
    pairs = model.config.num_hidden_layers * (1 if kind == "melt" else model.config.total_ut_steps)
    page_bytes = 2 * pairs * page_size * model.config.num_key_value_heads * model.config.head_dim * 8
    assert pool.page_nbytes == page_bytes and pool.nbytes == 9 * page_bytes
    assert cache.nbytes_in_use == pool.nbytes_in_use == 2 * per_row * page_bytes


def test_continuous_batching_matches_each_sequence_alone():
    """Sequence A decodes alone, B joins (prefilled on its own rows of the same pool, then moved into the
    batch without a copy), C joins, A finishes and leaves (its pages go back to the pool and C reuses them):
    each sequence gets, step by step, the logits it gets alone on a contiguous cache."""
    model = tiny_model(4, loops=2, gate="latent")
    prompts = {"A": token_ids(10, 1, 5), "B": token_ids(11, 1, 18), "C": token_ids(12, 1, 3)}
    pool = model.new_page_pool("melt", num_blocks=6, page_size=16)
    batch = PagedCache(pool, batch=0, max_seqlen=48)
    rows, last, seen = [], {}, {name: [] for name in prompts}

    def join(name):
        alone = PagedCache(pool, batch=1, max_seqlen=48)
        logits = model.prefill(prompts[name], alone, chunk_size=4, last_only=True)[:, -1]
        batch.extend(alone)
        assert alone.batch == 0
        rows.append(name)
        last[name] = logits[0]
        seen[name].append(logits[0])

    def step():
        tokens = torch.stack([last[name].argmax() for name in rows])[:, None]
        logits = model(tokens, batch, last_only=True)[:, -1]
        for name, row in zip(rows, logits):
            last[name] = row
            seen[name].append(row)

    join("A")
    step()
    join("B")
    step()
    step()
    join("C")
    step()
    in_use = pool.pages_in_use
    a_pages = int((batch.table_host[rows.index("A")] >= 0).sum())
    batch.drop([rows.index("A")])
    rows.remove("A")
    assert pool.pages_in_use == in_use - a_pages
    for _ in range(3):
        step()
    assert pool.pages_in_use == batch.pages == sum(-(-int(n) // 16) for n in batch.seqlens_host)

    for name, logits in seen.items():
        cache = model.new_cache("melt", 1, 48)
        expected = decode(model, prompts[name], cache, len(logits) - 1, chunk_size=4)[0]
        torch.testing.assert_close(torch.stack(logits), expected, **TOL)


def test_pool_exhaustion_takes_nothing():
    model = tiny_model(5, loops=2)
    pool = model.new_page_pool("melt", num_blocks=3, page_size=16)
    cache = PagedCache(pool, batch=2, max_seqlen=64)
    model(token_ids(5, 2, 16), cache)  # one page per row
    assert pool.free_pages == 1
    with pytest.raises(RuntimeError, match="page pool is full"):
        model(token_ids(6, 2, 4), cache)  # both rows need a second page
    assert pool.free_pages == 1 and cache.seqlens_host.tolist() == [16, 16]
    with pytest.raises(ValueError, match="page_size"):
        PagePool.melt(2, 4, 24, 2, 16)


@pytest.mark.skipif(not triton_interpreted(), reason="the Triton kernels under TRITON_INTERPRET=1")
def test_paged_model_on_triton_matches_contiguous():
    model = tiny_model(7, loops=2, dtype=torch.float32, gate="kv-head")
    model.backend = "triton"
    ids = token_ids(7, 2, 6)
    expected = decode(model, ids, model.new_cache("melt", 2, 32), 3, chunk_size=6)
    cache = PagedCache(model.new_page_pool("melt", num_blocks=4, page_size=16), batch=2, max_seqlen=32)
    torch.testing.assert_close(decode(model, ids, cache, 3, chunk_size=6), expected, rtol=0, atol=0)
