"""melt_kernels.model: the looped model's mechanics (caches, chunking, decoding, sampling, checks, numerics).

Its math against an independent float64 forward is in tests/test_ouro.py; here the model is built directly from
a LoopedLMConfig with every parameter drawn by tests/utils.reseed (so the MELT gates are far from "keep nothing").
"""
import pytest
import torch

from melt_kernels import LoopLMCache, MeltCache, available_backends
from melt_kernels.model import GATES, LoopedLM, LoopedLMConfig, RMSNorm, apply_rotary, rope_tables
from utils import reseed

TOL = dict(atol=1e-10, rtol=1e-10)


def tiny_model(seed=0, loops=2, dtype=torch.float64, **sizes):
    config = LoopedLMConfig(**{**dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=48, total_ut_steps=loops,
                                      gate="kv-head"), **sizes})
    return reseed(LoopedLM(config, backend="reference", dtype=dtype), seed)


def token_ids(seed, batch, length, vocab=40):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill(model, kind, ids, chunk_size):
    cache = model.new_cache(kind, ids.shape[0], ids.shape[1])
    return model.prefill(ids, cache, chunk_size), cache


def cache_pairs(cache):
    if isinstance(cache, MeltCache):
        return {i: cache.layer(i) for i in range(cache.num_layers)}
    return {(r, i): cache.layer(i, r) for r in range(cache.num_loops) for i in range(cache.num_layers)}


@pytest.mark.parametrize("gate", GATES)
def test_melt_logits_depend_on_chunking_only_when_looped(gate):
    """Inside a chunk, MELT's tokens attend to each other's partially looped slots: with T > 1 a chunk of
    several tokens is not token-by-token decoding (that is why the model is trained chunk-wise); with T = 1
    loop 1 writes through (kv gates) or h = x (latent gate), and the chunking does not matter."""
    ids = token_ids(6, 2, 6)
    looped = tiny_model(6, loops=3, gate=gate)
    assert (prefill(looped, "melt", ids, 3)[0] - prefill(looped, "melt", ids, 1)[0]).abs().max() > 1e-6
    single = tiny_model(6, loops=1, gate=gate)
    torch.testing.assert_close(prefill(single, "melt", ids, 3)[0], prefill(single, "melt", ids, 1)[0], **TOL)


@pytest.mark.parametrize("gate", GATES)
def test_one_loop_melt_is_looplm(gate):
    model = tiny_model(8, loops=1, gate=gate)
    ids = token_ids(8, 2, 6)
    melt_logits, melt_cache = prefill(model, "melt", ids, 4)
    loop_logits, loop_cache = prefill(model, "looplm", ids, 4)
    assert torch.equal(melt_logits, loop_logits)
    assert melt_cache.nbytes == loop_cache.nbytes
    for (k_melt, v_melt), (k_loop, v_loop) in zip(cache_pairs(melt_cache).values(), cache_pairs(loop_cache).values()):
        assert torch.equal(k_melt, k_loop) and torch.equal(v_melt, v_loop)


@pytest.mark.parametrize("kind", ["melt", "looplm"])
def test_generate_is_prefill_then_chunks_of_one(kind):
    """Decoding is chunk size 1: generate()'s tokens are the argmax of a prefill of the prompt (same chunks)
    followed by one-token chunks of the generated tokens, and both leave bit-identical caches."""
    model = tiny_model(7, loops=2, gate="latent")
    prompt, new = token_ids(7, 2, 5), 4
    cache = model.new_cache(kind, 2, 5 + new - 1)
    tokens = model.generate(prompt, cache, new, chunk_size=2)

    check = model.new_cache(kind, 2, 5 + new - 1)
    with torch.no_grad():
        logits = torch.cat([model.prefill(prompt, check, 2)[:, -1:], model.prefill(tokens[:, :-1], check, 1)], 1)
    assert torch.equal(logits.argmax(-1), tokens)
    for (k_got, v_got), (k_want, v_want) in zip(cache_pairs(cache).values(), cache_pairs(check).values()):
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
    assert cache.seqlens_host.tolist() == [5 + new - 1] * 2


def test_sampling_follows_the_generator():
    model = tiny_model(9, loops=2, dtype=torch.float32)
    prompt = token_ids(9, 3, 4)

    def sample(seed, temperature=1.0):
        cache = model.new_cache("melt", 3, 4 + 5)
        return model.generate(prompt, cache, 6, do_sample=True, temperature=temperature,
                              generator=torch.Generator().manual_seed(seed))

    first = sample(1)
    assert torch.equal(first, sample(1))
    assert 0 <= int(first.min()) and int(first.max()) < 40
    assert not all(torch.equal(first, sample(seed)) for seed in range(2, 6))
    greedy = model.generate(prompt, model.new_cache("melt", 3, 9), 6)
    assert torch.equal(sample(1, temperature=1e-6), greedy)


def test_caches_config_and_backend_are_checked():
    model = tiny_model(10, loops=2)
    ids = token_ids(10, 1, 3)
    with pytest.raises(ValueError, match="holds 3 loops"):
        model(ids, LoopLMCache(3, 2, 1, 8, 2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not fit"):
        model.prefill(ids, model.new_cache("melt", 1, 2))
    with pytest.raises(ValueError, match="rows"):
        model(ids, model.new_cache("melt", 2, 8))
    with pytest.raises(ValueError, match="kind"):
        model.new_cache("ouro", 1, 8)
    for bad, match in ((dict(gate="head"), "gate"), (dict(num_key_value_heads=3), "num_key_value_heads"),
                       (dict(head_dim=15), "head_dim"), (dict(total_ut_steps=0), "total_ut_steps"),
                       (dict(exit_threshold=1.5), "exit_threshold"), (dict(hidden_size=30, head_dim=None), "head_dim")):
        with pytest.raises(ValueError, match=match):
            LoopedLMConfig(**bad)
    model.backend = "cuda"
    with pytest.raises(RuntimeError, match="cuda"):
        model(ids, model.new_cache("melt", 1, 8))


def test_model_changes_loop_depth_without_new_weights():
    """num_loops is config.total_ut_steps: T = 4 on T = 2's weights is the same model run longer."""
    model = tiny_model(11, loops=2)
    ids = token_ids(11, 1, 3)
    two = prefill(model, "looplm", ids, 1)[0]
    model.num_loops = 4
    cache = model.new_cache("looplm", 1, 3)

    def kv_bytes(c):
        return c.nbytes - c.seqlens.numel() * c.seqlens.element_size()

    assert model.config.total_ut_steps == 4 and cache.num_loops == 4
    assert kv_bytes(cache) == 4 * kv_bytes(model.new_cache("melt", 1, 3))
    four, loops = model.prefill(ids, cache, 1, return_loops=True)
    assert loops.hidden_states.shape[0] == 4 and (four - two).abs().max() > 1e-6


def test_ouro_numerics_in_bfloat16():
    """RMSNorm normalises in float32, casts to bf16, THEN multiplies by the weight; RoPE's tables are computed in
    float32 and cast, the rotation done in bf16 (Ouro's reference code).  Bit for bit, and distinguishable from
    the other order on these inputs."""
    gen = torch.Generator().manual_seed(12)
    x = (3 * torch.randn(4, 5, 64, generator=gen)).to(torch.bfloat16)
    norm = RMSNorm(64, 1e-6, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen))
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * normed.to(torch.bfloat16))
    assert not torch.equal(norm(x), (norm.weight.float() * normed).to(torch.bfloat16))

    positions = torch.tensor([[0, 7, 1000, 65000]])
    cos, sin = rope_tables(positions, 128, 1e6, torch.bfloat16)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    assert torch.equal(cos[:, :, 0], emb.cos().to(torch.bfloat16))
    assert torch.equal(sin[:, :, 0], emb.sin().to(torch.bfloat16))
    q = torch.randn(1, 4, 2, 128, generator=gen).to(torch.bfloat16)
    rotated = q * cos + torch.cat((-q[..., 64:], q[..., :64]), dim=-1) * sin
    assert torch.equal(apply_rotary(q, cos, sin), rotated)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
@pytest.mark.parametrize("kind,gate", [("looplm", None), ("melt", "latent"), ("melt", "kv-element")])
def test_kernel_backends_run_the_model_like_the_reference(backend, kind, gate):
    """Whatever kernel backend runs here (the Triton interpreter under TRITON_INTERPRET=1, Triton/CUDA on a
    GPU) gives the reference backend's logits, float32 through 2 loops x 2 layers, chunks of 3."""
    model = tiny_model(12, loops=2, dtype=torch.float32, gate=gate).to(DEVICE)
    ids = token_ids(12, 2, 5).to(DEVICE)
    want = prefill(model, kind, ids, 3)[0]
    model.backend = backend
    got, cache = prefill(model, kind, ids, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cache.seqlens_host.tolist() == [5, 5]
