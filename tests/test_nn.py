"""melt_kernels.nn against a hand-written float64 model, and the chunking properties of both caches.

The hand-written model below rotates, projects and gates one token at a time
and attends through tests/loop_model.py (Python loops over tokens and heads);
it shares nothing with melt_kernels but the parameters it reads.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from loop_model import loop_model
from melt_kernels import LoopLMCache, MeltCache, available_backends
from melt_kernels.nn import LoopedLM, LoopedLMConfig, MeltAttention
from utils import active_mask, assert_untouched, reseed

TOL = dict(atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- the hand-written model


def rotate_by_hand(vec, pos, base):
    """RoPE of one token's (H, D) vectors at position ``pos``: pairs (j, j + D/2) turned by pos * base^(-2j/D)."""
    dim = vec.shape[-1]
    half = dim // 2
    low, high = [], []
    for j in range(half):
        theta = pos * base ** (-2 * j / dim)
        c, s = math.cos(theta), math.sin(theta)
        a, b = vec[:, j], vec[:, j + half]
        low.append(a * c - b * s)
        high.append(b * c + a * s)
    return torch.stack(low + high, dim=-1)


def attention_by_hand(attn, x, k_cache, v_cache, lengths, loop, shared, base):
    """One loop of MeltAttention for x (B, M, hidden); returns (out, K_new, V_new), caches out of place."""
    heads, heads_kv, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qs, ks, vs, gates = [], [], [], []
    for b in range(x.shape[0]):
        row = [[], [], [], []]
        for i in range(x.shape[1]):
            token, pos = x[b, i], lengths[b] + i
            row[0].append(rotate_by_hand((attn.q_proj.weight @ token).reshape(heads, dim), pos, base))
            row[1].append(rotate_by_hand((attn.k_proj.weight @ token).reshape(heads_kv, dim), pos, base))
            row[2].append((attn.v_proj.weight @ token).reshape(heads_kv, dim))
            row[3].append(torch.sigmoid(attn.gate_proj.weight @ token + attn.gate_proj.bias).reshape(heads_kv, -1))
        for acc, part in zip((qs, ks, vs, gates), row):
            acc.append(torch.stack(part))
    q, k, v, gate = (torch.stack(t) for t in (qs, ks, vs, gates))
    gate = gate if shared and loop > 0 else None
    out, _, k_new, v_new = loop_model(q, k, v, k_cache, v_cache, torch.tensor(lengths), gate, causal=True)
    return out.flatten(-2) @ attn.o_proj.weight.T, k_new, v_new


def rms_by_hand(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def model_by_hand(model, ids, kind, chunk_size):
    """Logits (B, P, V) of chunk-wise prefill, and the caches {layer or (loop, layer): (K, V)}."""
    c = model.config
    batch, length = ids.shape
    shape = (batch, length, c.num_kv_heads, c.head_dim)
    caches = {}
    logits = []
    for start in range(0, length, chunk_size):
        x = model.embed.weight[ids[:, start:start + chunk_size]]
        for loop in range(model.num_loops):
            for i, block in enumerate(model.layers):
                key = i if kind == "melt" else (loop, i)
                k_cache, v_cache = caches.get(key, (torch.zeros(shape, dtype=x.dtype),) * 2)
                a, k_new, v_new = attention_by_hand(block.attn, rms_by_hand(x, block.attn_norm.weight, c.norm_eps),
                                                    k_cache, v_cache, [start] * batch, loop, kind == "melt",
                                                    c.rope_base)
                caches[key] = (k_new, v_new)
                x = x + a
                h = rms_by_hand(x, block.mlp_norm.weight, c.norm_eps)
                z = h @ block.mlp.gate_proj.weight.T
                x = x + (z * torch.sigmoid(z) * (h @ block.mlp.up_proj.weight.T)) @ block.mlp.down_proj.weight.T
        logits.append(rms_by_hand(x, model.norm.weight, c.norm_eps) @ model.embed.weight.T)
    return torch.cat(logits, dim=1), caches


# ---------------------------------------------------------------- helpers


def tiny_model(seed=0, loops=2, dtype=torch.float64, **sizes):
    config = LoopedLMConfig(**{**dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      head_dim=16, intermediate_size=48, num_loops=loops), **sizes})
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


# ---------------------------------------------------------------- MeltAttention


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), seqlen=st.integers(1, 3), extra=st.integers(0, 4),
       heads_kv=st.integers(1, 2), groups=st.integers(1, 2), head_dim=st.sampled_from([16, 32]),
       gate=st.sampled_from(["head", "element"]), loops=st.integers(1, 3), shared=st.booleans())
def test_attention_matches_hand_written_loops(seed, batch, seqlen, extra, heads_kv, groups, head_dim, gate, loops,
                                              shared):
    """T loops of the layer on one cache: the gate blends loop r >= 1 into the slot loop r-1 left (shared) or
    every loop writes through (not shared); loop 0 never reads the old slot, which holds random values here."""
    hidden, length = 24, seqlen + extra
    gen = torch.Generator().manual_seed(seed)
    attn = reseed(MeltAttention(hidden, heads_kv * groups, heads_kv, head_dim, gate=gate, dtype=torch.float64),
                  seed)
    lengths = torch.randint(0, extra + 1, (batch,), generator=gen, dtype=torch.int32)
    k_cache, v_cache = (torch.randn(batch, length, heads_kv, head_dim, generator=gen, dtype=torch.float64)
                        for _ in range(2))
    before = (k_cache.clone(), v_cache.clone())
    k_hand, v_hand = before
    for loop in range(loops):
        x = torch.randn(batch, seqlen, hidden, generator=gen, dtype=torch.float64)
        out = attn(x, k_cache, v_cache, lengths, loop, shared=shared, backend="reference")
        want, k_hand, v_hand = attention_by_hand(attn, x, k_hand, v_hand, lengths.tolist(), loop, shared, 10000.0)
        torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(k_cache, k_hand, **TOL)
    torch.testing.assert_close(v_cache, v_hand, **TOL)
    mask = active_mask(lengths, batch, seqlen, length)
    assert_untouched(before[0], k_cache, mask)
    assert_untouched(before[1], v_cache, mask)


# ---------------------------------------------------------------- the looped LM


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["melt", "looplm"]), loops=st.integers(1, 3),
       batch=st.integers(1, 2), length=st.integers(1, 5), chunk_size=st.integers(1, 5),
       gate=st.sampled_from(["head", "element"]), heads_kv=st.sampled_from([1, 2, 4]))
def test_model_matches_hand_written_model(seed, kind, loops, batch, length, chunk_size, gate, heads_kv):
    model = tiny_model(seed, loops, num_layers=2, gate=gate, num_kv_heads=heads_kv)
    ids = token_ids(seed, batch, length)
    logits, cache = prefill(model, kind, ids, chunk_size)
    want, hand_caches = model_by_hand(model, ids, kind, chunk_size)
    torch.testing.assert_close(logits, want, **TOL)
    pairs = cache_pairs(cache)
    assert pairs.keys() == hand_caches.keys()
    for key, (k_cache, v_cache) in pairs.items():
        torch.testing.assert_close(k_cache, hand_caches[key][0], **TOL)
        torch.testing.assert_close(v_cache, hand_caches[key][1], **TOL)
    assert cache.seqlens_host.tolist() == [length] * batch


def test_gradients_match_hand_written_model():
    """Chunk-wise training: two chunks of two tokens, three loops on one MELT cache, per-channel gates."""
    model = tiny_model(3, loops=3, gate="element", num_layers=2)
    ids = token_ids(3, 2, 4)
    weights = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = list(model.parameters())
    loss = (prefill(model, "melt", ids, 2)[0] * weights).sum()
    hand_loss = (model_by_hand(model, ids, "melt", 2)[0] * weights).sum()
    grads = torch.autograd.grad(loss, params)
    hand_grads = torch.autograd.grad(hand_loss, params)
    for (name, _), got, want in zip(model.named_parameters(), grads, hand_grads):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().max() > 0 for n, g in zip(dict(model.named_parameters()), grads) if "attn.gate_proj" in n)


@pytest.mark.parametrize("chunk_size", [2, 3, 7])
def test_looplm_logits_do_not_depend_on_chunking(chunk_size):
    """One cache per (loop, layer), written through: each is an ordinary causal layer, so any chunking gives
    token-by-token decoding's logits, up to rounding."""
    model = tiny_model(5, loops=3)
    ids = token_ids(5, 2, 7)
    torch.testing.assert_close(prefill(model, "looplm", ids, chunk_size)[0], prefill(model, "looplm", ids, 1)[0],
                               **TOL)


def test_melt_logits_depend_on_chunking_only_when_looped():
    """Inside a chunk, MELT's tokens attend to each other's partially looped slots: with T > 1 a chunk of
    several tokens is not token-by-token decoding (that is why the model is trained chunk-wise); with T = 1
    loop 0 writes through and chunking does not matter."""
    ids = token_ids(6, 2, 6)
    looped = tiny_model(6, loops=3)
    assert (prefill(looped, "melt", ids, 3)[0] - prefill(looped, "melt", ids, 1)[0]).abs().max() > 1e-6
    single = tiny_model(6, loops=1)
    torch.testing.assert_close(prefill(single, "melt", ids, 3)[0], prefill(single, "melt", ids, 1)[0], **TOL)


@pytest.mark.parametrize("kind", ["melt", "looplm"])
def test_generate_is_prefill_then_chunks_of_one(kind):
    """Decoding is chunk size 1: generate()'s tokens are the argmax of a prefill of the prompt (same chunks)
    followed by one-token chunks of the generated tokens, and both leave bit-identical caches."""
    model = tiny_model(7, loops=2)
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


def test_one_loop_melt_is_looplm():
    model = tiny_model(8, loops=1)
    ids = token_ids(8, 2, 6)
    melt_logits, melt_cache = prefill(model, "melt", ids, 4)
    loop_logits, loop_cache = prefill(model, "looplm", ids, 4)
    assert torch.equal(melt_logits, loop_logits)
    assert melt_cache.nbytes == loop_cache.nbytes
    for (k_melt, v_melt), (k_loop, v_loop) in zip(cache_pairs(melt_cache).values(), cache_pairs(loop_cache).values()):
        assert torch.equal(k_melt, k_loop) and torch.equal(v_melt, v_loop)


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


def test_caches_and_backend_are_checked():
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
    model.backend = "cuda"
    with pytest.raises(RuntimeError, match="cuda"):
        model(ids, model.new_cache("melt", 1, 8))


def test_model_changes_loop_depth_without_new_weights():
    model = tiny_model(11, loops=2)
    model.num_loops = 4
    ids = token_ids(11, 1, 3)
    cache = model.new_cache("looplm", 1, 3)

    def kv_bytes(c):
        return c.nbytes - c.seqlens.numel() * c.seqlens.element_size()

    assert cache.num_loops == 4 and kv_bytes(cache) == 4 * kv_bytes(model.new_cache("melt", 1, 3))
    torch.testing.assert_close(model.prefill(ids, cache, 1), model_by_hand(model, ids, "looplm", 1)[0], **TOL)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
@pytest.mark.parametrize("kind", ["melt", "looplm"])
def test_kernel_backends_run_the_model_like_the_reference(backend, kind):
    """Whatever kernel backend runs here (the Triton interpreter under TRITON_INTERPRET=1, Triton/CUDA on a
    GPU) gives the reference backend's logits, float32 through 2 loops x 2 layers, chunks of 3."""
    model = tiny_model(12, loops=2, dtype=torch.float32).to(DEVICE)
    ids = token_ids(12, 2, 5).to(DEVICE)
    want = prefill(model, kind, ids, 3)[0]
    model.backend = backend
    got, cache = prefill(model, kind, ids, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cache.seqlens_host.tolist() == [5, 5]
