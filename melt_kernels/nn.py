"""A MELT attention layer and a small looped decoder-only LM (SPEC §3).

:class:`MeltAttention` is a drop-in attention layer for looped models: q/k/v/o
projections, RoPE applied before the keys reach the cache, and a learned
retention gate ``alpha = sigmoid(W_g x + b_g)`` (one per kv head, or one per
channel) that blends every loop's fresh keys/values into the token's cache
slot through :func:`melt_kernels.gated_kv_attention`.  Loop 0 writes through
(there is nothing to retain yet).

:class:`LoopedLM` runs N such layers T times per token (embedding, pre-norm
blocks with SwiGLU, RMSNorm, tied head) with either cache; the weights are
the same, only the cache differs:

* :class:`~melt_kernels.MeltCache` (MELT): one K/V pair per layer shared by
  every loop, gated from loop 1 on; memory independent of T.
* :class:`~melt_kernels.LoopLMCache` (Ouro-style LoopLM): one pair per
  (loop, layer), written through at every loop; memory grows with T.

One forward call runs one chunk of M tokens through all T loops against the
settled cache of the earlier tokens, then settles the chunk
(``cache.advance(M)``).  What this implies for chunking:

* LoopLM: every (loop, layer) pair is an ordinary causal layer with its own
  cache, so the logits do not depend on how the sequence is cut into chunks;
  chunked prefill equals token-by-token decoding up to rounding.
* MELT: inside a chunk, token i at loop r attends to the earlier tokens of
  the same chunk holding their loop-r (partially looped) values, while a
  token decoded alone sees every earlier token settled after all T loops.  So
  with T > 1 the logits depend on the chunking; what holds is that a chunk
  sees exactly what decoding would see after the earlier chunks (chunk size 1
  is token-by-token decoding), which is how MELT is trained.  With T = 1 both
  caches give the same model.

For MELT's post-training from a LoopLM (:mod:`melt_kernels.train`), a chunk
can also run the *interpolated transition*: with a MELT cache and
``transition=(looplm_cache, lam)`` every attention layer runs both the
teacher-style attention (this loop's own pair of ``looplm_cache``, written
through) and the MELT attention (the shared cache, gated) from the same
q/k/v, and outputs ``(1 - lam) * teacher-style + lam * MELT``; both caches
settle the chunk.  ``lam = 0`` gives the LoopLM's logits, ``lam = 1`` MELT's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from melt_kernels.cache import LoopLMCache, MeltCache
from melt_kernels.gated_kv_attention import gated_kv_attention
from melt_kernels.reference import compute_dtype

Cache = Union[MeltCache, LoopLMCache]
GATE_KINDS = ("head", "element")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention, as Llama/GPT-NeoX).

    The frequencies are recomputed in float64 at every call rather than kept
    as a buffer, which ``module.to(torch.bfloat16)`` would round.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for (B, M) integer positions, each (B, M, 1, D/2) in ``dtype``."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device) / self.head_dim
        angles = positions.to(torch.float64)[..., None] * self.base ** -exponents  # [B, M, D/2]
        return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates channel pairs (j, j + D/2) of x (B, M, H, D) in cos's dtype; returns x's dtype, contiguous."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class MeltAttention(nn.Module):
    """Attention with a shared, gated KV cache (MELT).

    Arguments:
        hidden_size: model width.
        num_heads, num_kv_heads: query and key/value heads (GQA/MQA when
            num_kv_heads < num_heads; it must divide num_heads).
        head_dim: channels per head (16..256, even).
        gate: "head" for one retention per kv head (W_g: hidden -> Hkv), or
            "element" for one per channel (W_g: hidden -> Hkv * D).
        rope_base: RoPE's base.

    The gate is computed in float32 (float64 for float64 models) from the
    layer's input.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, gate: str = "head",
                 rope_base: float = 10000.0, device=None, dtype=None):
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS}, got {gate!r}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.gate = num_heads, num_kv_heads, head_dim, gate
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **factory)
        gate_width = num_kv_heads * (head_dim if gate == "element" else 1)
        self.gate_proj = nn.Linear(hidden_size, gate_width, bias=True, **factory)
        self.rotary = RotaryEmbedding(head_dim, rope_base)

    def retention(self, x: torch.Tensor) -> torch.Tensor:
        """alpha = sigmoid(W_g x + b_g), (B, M, Hkv, 1) or (B, M, Hkv, D)."""
        alpha = torch.sigmoid(self.gate_proj(x).to(compute_dtype(x.dtype)))
        return alpha.unflatten(-1, (self.num_kv_heads, -1))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_seqlens: Union[torch.Tensor, int], loop: int, *, shared: bool = True,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, backend: str = "auto",
                transition: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
                max_seqlen_k: Optional[int] = None) -> torch.Tensor:
        """One loop iteration of the layer for the M active tokens of x (B, M, hidden).

        k_cache, v_cache (B, S, Hkv, D) are updated in place at positions
        L_b .. L_b+M-1 (L_b = cache_seqlens[b]). With ``shared`` (a MELT
        cache) loops >= 1 blend with the learned gate and loop 0 writes
        through; without it (one cache per loop) every loop writes through.
        ``rope`` is (cos, sin) for the active positions, as
        :class:`RotaryEmbedding` returns; computed here when not given.

        ``transition=(k_loop, v_loop, lam)`` (shared only) also writes the
        same k/v through into this loop's own cache pair (B, S, Hkv, D) at
        the same positions, attends there (the LoopLM teacher's attention)
        and returns ``(1 - lam) * that + lam * the MELT attention``.
        ``max_seqlen_k``: max_b(L_b) + M known on the host, passed to
        :func:`gated_kv_attention` to size its kernels' work (a hint).
        """
        if transition is not None and not shared:
            raise ValueError("transition interpolates towards the shared (MELT) cache: it needs shared=True")
        if rope is None:
            lengths = torch.as_tensor(cache_seqlens, device=x.device).long().reshape(-1, 1)
            rope = self.rotary(lengths + torch.arange(x.shape[1], device=x.device), compute_dtype(x.dtype))
        q = apply_rotary(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), *rope)
        k = apply_rotary(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)), *rope)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        gate = self.retention(x) if shared and loop > 0 else None
        out = gated_kv_attention(q, k, v, k_cache, v_cache, cache_seqlens, gate, causal=True, backend=backend,
                                 max_seqlen_k=max_seqlen_k)
        if transition is not None:
            k_loop, v_loop, lam = transition
            looplm = gated_kv_attention(q, k, v, k_loop, v_loop, cache_seqlens, causal=True, backend=backend,
                                        max_seqlen_k=max_seqlen_k)
            # Blending before o_proj is blending the layer's outputs: o_proj is linear without bias.
            out = torch.lerp(looplm, out, lam)
        return self.o_proj(out.flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class LoopedLMConfig:
    """Sizes of :class:`LoopedLM`; ``gate`` is MeltAttention's "head" or "element"."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    num_loops: int = 2
    gate: str = "head"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6


class LoopedBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LoopedLMConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, **factory)
        self.attn = MeltAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                  config.gate, config.rope_base, **factory)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, **factory)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, **factory)

    def forward(self, x, k_cache, v_cache, cache_seqlens, loop, *, shared, rope, backend, transition=None,
                max_seqlen_k=None):
        x = x + self.attn(self.attn_norm(x), k_cache, v_cache, cache_seqlens, loop, shared=shared, rope=rope,
                          backend=backend, transition=transition, max_seqlen_k=max_seqlen_k)
        return x + self.mlp(self.mlp_norm(x))


class LoopedLM(nn.Module):
    """Decoder-only LM whose N blocks run T = ``num_loops`` times per token.

    Runs with a MELT cache or a LoopLM cache (:meth:`new_cache`); the weights
    are the same. ``backend`` is passed to every
    :func:`~melt_kernels.gated_kv_attention` call ("auto" picks the fastest
    available; "reference" is the unfused PyTorch path). ``num_loops`` may be
    changed between runs: T does not change the weights.
    """

    def __init__(self, config: LoopedLMConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config, self.backend, self.num_loops = config, backend, config.num_loops
        factory = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        # Small, as the usual initializer_range: with nn.Embedding's N(0, 1) the tied head mostly echoes the input.
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(LoopedBlock(config, **factory) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, **factory)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base)

    def new_cache(self, kind: str, batch: int, max_seqlen: int) -> Cache:
        """An empty "melt" or "looplm" cache for this model, on its device and in its dtype."""
        c, weight = self.config, self.embed.weight
        sizes = (c.num_layers, batch, max_seqlen, c.num_kv_heads, c.head_dim)
        if kind == "melt":
            return MeltCache(*sizes, dtype=weight.dtype, device=weight.device)
        if kind == "looplm":
            return LoopLMCache(self.num_loops, *sizes, dtype=weight.dtype, device=weight.device)
        raise ValueError(f"kind must be 'melt' or 'looplm', got {kind!r}")

    def _check_cache(self, cache: Cache, batch: int, num_tokens: int) -> None:
        if not isinstance(cache, (MeltCache, LoopLMCache)):
            raise TypeError(f"cache must be a MeltCache or a LoopLMCache, got {type(cache).__name__}")
        if cache.num_layers != self.config.num_layers:
            raise ValueError(f"the cache has {cache.num_layers} layers, the model {self.config.num_layers}")
        if isinstance(cache, LoopLMCache) and cache.num_loops != self.num_loops:
            raise ValueError(f"the LoopLM cache holds {cache.num_loops} loops, the model runs {self.num_loops}")
        if cache.batch != batch:
            raise ValueError(f"input_ids has {batch} rows, the cache {cache.batch}")
        if num_tokens > cache.room():
            raise ValueError(f"{num_tokens} more tokens do not fit: the cache has room for {cache.room()}")

    def _check_transition(self, cache: Cache, transition: tuple[LoopLMCache, float], batch: int,
                          num_tokens: int) -> None:
        looplm_cache, lam = transition
        if not isinstance(cache, MeltCache) or not isinstance(looplm_cache, LoopLMCache):
            raise TypeError(f"the transition runs a MeltCache with transition=(LoopLMCache, lam), got a "
                            f"{type(cache).__name__} with a {type(looplm_cache).__name__}")
        self._check_cache(looplm_cache, batch, num_tokens)
        if not torch.equal(looplm_cache.seqlens_host, cache.seqlens_host):
            raise ValueError(f"the transition's LoopLM cache holds lengths {looplm_cache.seqlens_host.tolist()}, "
                             f"the MELT cache {cache.seqlens_host.tolist()}")
        if not 0 <= lam <= 1:
            raise ValueError(f"the transition's lam must be in [0, 1], got {lam}")

    def forward(self, input_ids: torch.Tensor, cache: Cache, *, last_only: bool = False,
                transition: Optional[tuple[LoopLMCache, float]] = None) -> torch.Tensor:
        """Runs one chunk input_ids (B, M) through all T loops, then settles it in the cache.

        Returns logits (B, M, vocab), or (B, 1, vocab) for the last token with ``last_only``.
        ``transition=(looplm_cache, lam)``, with a MELT ``cache``, runs the interpolated
        transition (module docstring) and settles the chunk in both caches.
        """
        batch, seqlen = input_ids.shape
        self._check_cache(cache, batch, seqlen)
        if transition is not None:
            self._check_transition(cache, transition, batch, seqlen)
        shared = isinstance(cache, MeltCache)
        x = self.embed(input_ids)
        lengths = cache.seqlens
        positions = lengths.long()[:, None] + torch.arange(seqlen, device=x.device)  # [B, M]
        # Every layer and loop of the chunk rotates at the same positions.
        rope = self.rotary(positions, compute_dtype(x.dtype))
        # The lengths live on the caches' device; their host copy bounds them for the kernels' plans.
        bound = cache.max_seqlen_k(seqlen)
        for loop in range(self.num_loops):
            for i, block in enumerate(self.layers):
                k_cache, v_cache = cache.layer(i, loop)
                mix = None if transition is None else (*transition[0].layer(i, loop), transition[1])
                x = block(x, k_cache, v_cache, lengths, loop, shared=shared, rope=rope, backend=self.backend,
                          transition=mix, max_seqlen_k=bound)
        cache.advance(seqlen)
        if transition is not None:
            transition[0].advance(seqlen)
        if last_only:
            x = x[:, -1:]
        return F.linear(self.norm(x), self.embed.weight)

    def prefill(self, input_ids: torch.Tensor, cache: Cache, chunk_size: Optional[int] = None, *,
                last_only: bool = False, transition: Optional[tuple[LoopLMCache, float]] = None) -> torch.Tensor:
        """Chunk-wise prefill: input_ids (B, P) cut into chunks of ``chunk_size`` (default: one chunk).

        Each chunk runs all T loops against the settled cache of the earlier
        chunks. Returns logits (B, P, vocab), or (B, 1, vocab) with ``last_only``.
        ``transition`` is passed to every chunk (see :meth:`forward`).
        """
        batch, length = input_ids.shape
        chunk_size = length if chunk_size is None else chunk_size
        if length < 1 or chunk_size < 1:
            raise ValueError(f"need at least one token and a positive chunk_size, got {length} tokens and "
                             f"chunk_size={chunk_size}")
        self._check_cache(cache, batch, length)
        if transition is not None:
            self._check_transition(cache, transition, batch, length)
        logits = [self(chunk, cache, last_only=last_only, transition=transition)
                  for chunk in input_ids.split(chunk_size, dim=1)]
        return logits[-1] if last_only else torch.cat(logits, dim=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, cache: Cache, max_new_tokens: int, *,
                 chunk_size: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prefills input_ids (B, P) into ``cache``, then decodes token by token.

        Greedy by default; with ``do_sample`` draws from softmax(logits /
        temperature) with ``generator`` (on the model's device). Returns the
        new tokens (B, max_new_tokens); the last one is not fed back, so the
        cache ends up holding P + max_new_tokens - 1 more tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self._check_cache(cache, input_ids.shape[0], input_ids.shape[1] + max_new_tokens - 1)
        logits = self.prefill(input_ids, cache, chunk_size, last_only=True)[:, -1]
        tokens = []
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits.to(compute_dtype(logits.dtype)) / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(dim=-1)
            tokens.append(token)
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], cache, last_only=True)[:, -1]
        return torch.stack(tokens, dim=1)
