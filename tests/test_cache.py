"""MELT and LoopLM caches: exact sizes, explicit advance, used by the op."""
import pytest
import torch

import melt_kernels
from melt_kernels import LoopLMCache, MeltCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_are_exact_and_constant_in_loop_depth(dtype):
    layers, batch, length, heads, dim = 3, 2, 10, 2, 16
    melt = MeltCache(layers, batch, length, heads, dim, dtype=dtype)
    per_pair = 2 * batch * length * heads * dim * torch.finfo(dtype).bits // 8
    lengths_bytes = batch * 4
    assert melt.nbytes == layers * per_pair + lengths_bytes
    for loops in (1, 2, 4):
        loop = LoopLMCache(loops, layers, batch, length, heads, dim, dtype=dtype)
        assert loop.nbytes == loops * layers * per_pair + lengths_bytes
        assert len({t.data_ptr() for t in loop.keys + loop.values}) == 2 * loops * layers


def test_layer_views_share_or_separate_by_loop():
    melt = MeltCache(2, 1, 4, 1, 16)
    assert melt.layer(1, loop=0)[0] is melt.layer(1, loop=3)[0]
    loop = LoopLMCache(3, 2, 1, 4, 1, 16)
    assert loop.layer(1, loop=0)[0] is not loop.layer(1, loop=2)[0]
    with pytest.raises(ValueError, match="loop must be in"):
        loop.layer(0, loop=3)


def test_advance_is_explicit_and_bounded():
    cache = MeltCache(1, 2, 5, 1, 16)
    cache.advance(2)
    cache.advance(torch.tensor([3, 1]))
    assert cache.seqlens.tolist() == [5, 3] and cache.seqlens_host.tolist() == [5, 3]
    assert cache.room() == 0
    with pytest.raises(ValueError, match="outside"):
        cache.advance(1)
    with pytest.raises(ValueError, match="outside"):
        cache.advance(torch.tensor([0, -4]))
    with pytest.raises(ValueError, match="shape"):
        cache.advance(torch.tensor([1, 1, 1]))
    assert cache.seqlens.tolist() == [5, 3]
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="must be a positive int"):
        MeltCache(bad, 1, 4, 1, 16)


def test_loops_of_a_step_stay_in_the_active_slots_until_advance():
    """T loops on a MELT cache write only slots L_b..L_b+M-1; advance settles them."""
    torch.manual_seed(0)
    cache = MeltCache(1, 2, 8, 2, 16, dtype=torch.float64)
    cache.advance(torch.tensor([2, 4]))
    k_cache, v_cache = cache.layer(0)
    before = k_cache.clone()
    q = torch.randn(2, 3, 2, 16, dtype=torch.float64)
    for loop in range(3):
        k, v = torch.randn(2, 3, 2, 16, dtype=torch.float64), torch.randn(2, 3, 2, 16, dtype=torch.float64)
        gate = None if loop == 0 else torch.rand(2, 3, 2, 1, dtype=torch.float64)
        melt_kernels.gated_kv_attention(q, k, v, k_cache, v_cache, cache.seqlens_host, gate, backend="reference")
    changed = (k_cache != before).any(-1).any(-1)
    assert changed.tolist() == [[p in range(2, 5) for p in range(8)], [p in range(4, 7) for p in range(8)]]
    cache.advance(3)
    assert cache.seqlens_host.tolist() == [5, 7]


def test_advance_before_backward_keeps_gradients():
    """The op keeps its own copy of the lengths: advancing the cache (in place) before backward is fine."""
    torch.manual_seed(1)
    cache = MeltCache(1, 2, 8, 1, 16, dtype=torch.float64)
    k_cache, v_cache = (t.clone() for t in cache.layer(0))
    q = torch.randn(2, 2, 1, 16, dtype=torch.float64, requires_grad=True)
    kv = [torch.randn(2, 2, 1, 16, dtype=torch.float64) for _ in range(2)]
    grads = []
    for advance_first in (False, True):
        out = melt_kernels.gated_kv_attention(q, *kv, k_cache.clone(), v_cache.clone(), cache.seqlens,
                                              backend="reference")
        if advance_first:
            cache.advance(2)
        grads.append(torch.autograd.grad(out.square().sum(), q)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_model_passes_the_host_length_bound(monkeypatch):
    """Every op call of a model step gets max_seqlen_k = max_b(L_b) + M from the cache's host lengths (the
    kernels' plans follow the lengths even when the lengths tensor lives on the GPU)."""
    from melt_kernels import model as model_module

    config = model_module.LoopedLMConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, intermediate_size=32, total_ut_steps=2,
                                         gate="kv-head")
    model = model_module.LoopedLM(config, backend="reference")
    cache = model.new_cache("melt", batch=2, max_seqlen=40)
    cache.advance(torch.tensor([3, 9]))
    seen = []
    real = model_module.gated_kv_attention

    def record(*args, max_seqlen_k=None, **kwargs):
        seen.append(max_seqlen_k)
        return real(*args, max_seqlen_k=max_seqlen_k, **kwargs)

    monkeypatch.setattr(model_module, "gated_kv_attention", record)
    with torch.no_grad():
        model(torch.zeros(2, 4, dtype=torch.long), cache)
    assert seen == [9 + 4] * 4 and cache.max_seqlen_k(1) == 9 + 4 + 1
