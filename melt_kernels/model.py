"""The looped LM: Ouro's architecture, run with one KV cache per loop (LoopLM) or one gated cache (MELT).

This is the package's one looped-model implementation (docs/models.md#the-looped-model;
Ouro's facts: docs/models.md#ouro-checkpoints).  Parameter names are an Ouro checkpoint's
(``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``, ...,
``model.norm``, ``model.early_exit_gate``, ``lm_head``), so
:func:`melt_kernels.ouro.load_ouro` loads a checkpoint into it as it is.

Forward of one chunk of M tokens (all T = ``config.total_ut_steps`` loops
always run)::

    h = embed_tokens[ids]; cos, sin = RoPE(positions)                  # theta = config.rope_theta
    for loop in range(T):
        for each layer:
            x = input_layernorm(h)
            h = h + input_layernorm_2(o_proj(attention(x)))             # sandwich norms
            h = h + post_attention_layernorm_2(mlp(post_attention_layernorm(h)))
        h = norm(h)                                                      # at the end of EVERY loop
        exit_logit[loop] = early_exit_gate(h)
    logits = lm_head(h of the chosen loop)            # the last loop unless config.exit_threshold is set

Numerics are Ouro's: RMSNorm computes in float32, casts back, then
multiplies by its weight; RoPE tables in float32 cast to the model dtype,
rotation in the model dtype; attention softmax in float32 (the op).  A
float64 model computes everything in float64 instead.

The cache decides the model:

* :class:`~melt_kernels.LoopLMCache` (one K/V pair per (loop, layer), every
  loop written through): Ouro exactly.  The gates, if any, are not used.
  Logits do not depend on how the sequence is cut into chunks.
* :class:`~melt_kernels.MeltCache` (one pair per layer shared by the loops):
  MELT.  Each loop overwrites or blends the active tokens' slots, so a chunk
  sees the earlier chunks settled after all T loops, and (with T > 1) the
  logits depend on the chunking; chunk size 1 is token-by-token decoding.
* A LoopLMCache with ``transition=(teacher_cache, lam)``: the interpolated
  transition of MELT's post-training (docs/training.md#the-recipe, phase 1), attention reading
  ``lam * KV_MELT + (1 - lam) * KV_LoopLM(loop r)`` from pairs of its own,
  one per loop (:meth:`LoopedModel.forward`).

``config.gate`` picks how a MELT cache slot is updated across the loops of
its token (all kinds start as "keep nothing", :data:`KEEP_NOTHING_LOGIT`, so a
fresh or converted model is its LoopLM with *last-step reuse*: each slot
holds its token's latest loop's K/V):

* None: every loop writes through (last-step reuse, no parameters).
* ``"latent"``: **the MELT paper's gate** (docs/models.md#the-gates), per layer
  ``z = sigmoid(x W_z + h_prev U_z + b_z)``, ``h = z * h_prev + (1 - z) * x``
  on the attention input x (after input_layernorm), then the slot is written
  through with ``k, v = RoPE(h W_K), h W_V``.  Loop 1 has no h_prev: h = x.
  The query is always computed from x.  h_prev lives in the forward call's
  locals, one (B, M, hidden) tensor per layer for the active tokens of the
  chunk, carried from loop to loop and dropped when the chunk settles: the
  cache stays one pass's K/V, and a decode step (M = 1) runs its T loops in
  one call, so nothing else needs to persist.
* ``"kv-head"`` / ``"kv-element"``: **this package's K/V-space variant**,
  ``alpha = sigmoid(W_g x + b_g)`` per kv head or per K/V channel, and
  ``K_slot = alpha * K_old + (1 - alpha) * k`` fused in the kernel
  (:func:`~melt_kernels.gated_kv_attention`'s ``gate``); loop 1 writes
  through.

The early-exit gate and the MELT cache: all T loops always run (as in Ouro's
reference code), so each slot holds what the LAST loop wrote whichever loop
the exit rule picks for the logits; the exit only chooses which loop's h
feeds ``lm_head``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from melt_kernels import remote_code
from melt_kernels.backends import which_backend
from melt_kernels.cache import LoopLMCache, MeltCache
from melt_kernels.gated_kv_attention import gated_kv_attention
from melt_kernels.paged_cache import PagedCache, PagePool
from melt_kernels.reference import compute_dtype

Cache = Union[MeltCache, LoopLMCache, PagedCache]
GATES = ("latent", "kv-head", "kv-element")
# sigmoid(-10) = 4.54e-5: a gate "keeps nothing" of the old slot (or of h_prev) to within 1e-4.
KEEP_NOTHING_LOGIT = -10.0
CHECKPOINT_MODEL_TYPE = "melt"  # config.json's model_type of a model saved by LoopedLM.save_pretrained


@dataclass
class LoopedLMConfig:
    """Sizes and options of :class:`LoopedLM`; field names and defaults are Ouro-1.4B's ``config.json``.

    ``num_key_value_heads`` and ``head_dim`` default (None) to
    ``num_attention_heads`` and ``hidden_size // num_attention_heads``.
    ``total_ut_steps`` is the loop count T.  ``gate`` is None (no MELT gate),
    "latent" (the paper's), "kv-head" or "kv-element" (this package's).
    ``exit_threshold`` picks the loop whose h feeds the head: None for the
    last loop, or a threshold for Ouro's exit rule (:func:`exit_loop`);
    ``early_exit_threshold`` is the checkpoint's own value, kept for
    reference (``config.exit_threshold = config.early_exit_threshold`` asks
    for Ouro's rule as the checkpoint states it).
    """

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 65536
    total_ut_steps: int = 4
    early_exit_threshold: float = 1.0
    exit_threshold: Optional[float] = None
    tie_word_embeddings: bool = False
    gate: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "total_ut_steps"):
            _check_positive(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                                 f"({self.num_attention_heads}): give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive("num_key_value_heads", self.num_key_value_heads)
        _check_positive("head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps}, "
                             f"{self.rope_theta}")
        if self.gate is not None and self.gate not in GATES:
            raise ValueError(f"gate must be None or one of {GATES}, got {self.gate!r}")
        if self.exit_threshold is not None and not 0 < self.exit_threshold <= 1:
            raise ValueError(f"exit_threshold must be None or in (0, 1], got {self.exit_threshold}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def kv_bytes_per_token(config: LoopedLMConfig, kind: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV-cache bytes one token takes: keys and values of every layer, times T for a "looplm" cache.

    Ouro-1.4B in bfloat16: 786,432 ("looplm", 24 layers x 4 loops x 2 x
    2048 x 2 bytes) against 196,608 ("melt").
    """
    if kind not in ("melt", "looplm"):
        raise ValueError(f"kind must be 'melt' or 'looplm', got {kind!r}")
    pairs = config.num_hidden_layers * (config.total_ut_steps if kind == "looplm" else 1)
    return pairs * 2 * config.num_key_value_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Ouro's RMSNorm: normalised in float32 (float64 for float64), cast back, then times the weight."""

    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = x.to(compute_dtype(x.dtype))
        work = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * work.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B, M, 1, head_dim) in ``dtype``, for integer positions (B, M).

    Ouro's tables: ``inv_freq = 1 / theta^(arange(0, D, 2) / D)`` and the
    angles in float32 (float64 for float64), ``cat(freqs, freqs)``, then cast.
    """
    work = compute_dtype(dtype)
    exponents = torch.arange(0, head_dim, 2, device=positions.device).to(work) / head_dim
    angles = positions.to(work)[..., None] * (1.0 / theta ** exponents)  # [B, M, D/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (B, M, H, D) in x's dtype: ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LatentGate(nn.Module):
    """The MELT paper's gate (docs/models.md#the-gates): ``z = sigmoid(x W_z + h_prev U_z + b_z)``,
    ``h = z h_prev + (1 - z) x``.

    ``w_z`` holds W_z and b_z, ``u_z`` holds U_z (both hidden x hidden).  z
    and the blend are computed in float32 (float64 for float64).
    """

    def __init__(self, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.w_z = nn.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)
        self.u_z = nn.Linear(hidden_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        work = compute_dtype(x.dtype)
        z = torch.sigmoid((self.w_z(x) + self.u_z(h_prev)).to(work))
        return torch.lerp(x.to(work), h_prev.to(work), z).to(x.dtype)

    def keep_nothing_(self) -> None:
        nn.init.zeros_(self.w_z.weight)
        nn.init.zeros_(self.u_z.weight)
        nn.init.constant_(self.w_z.bias, KEEP_NOTHING_LOGIT)


class KVGate(nn.Module):
    """This package's K/V-space gate: retention ``alpha = sigmoid(W_g x + b_g)``, (B, M, Hkv, 1 or D).

    Computed in float32 (float64 for float64) and blended into the cache by
    the op: ``K_slot = alpha * K_old + (1 - alpha) * k``, likewise V.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, width: int, device=None, dtype=None):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.proj = nn.Linear(hidden_size, num_kv_heads * width, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x).to(compute_dtype(x.dtype))).unflatten(-1, (self.num_kv_heads, -1))

    def keep_nothing_(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, KEEP_NOTHING_LOGIT)


def make_gate(config: LoopedLMConfig, device=None, dtype=None) -> Optional[nn.Module]:
    if config.gate is None:
        return None
    if config.gate == "latent":
        return LatentGate(config.hidden_size, device=device, dtype=dtype)
    width = config.head_dim if config.gate == "kv-element" else 1
    return KVGate(config.hidden_size, config.num_key_value_heads, width, device=device, dtype=dtype)


class LoopCarry(NamedTuple):
    """What a layer carries from one loop of the active tokens to the next (nothing at loop 0).

    ``latent``: the latent gate's h (None with another gate).  ``k``, ``v``
    (B, M, Hkv, D): in the interpolated transition only, MELT's slot values
    after the loop, which a MELT cache would hold.
    """

    latent: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None


def gate_at_loop(gate: Optional[nn.Module], x: torch.Tensor, loop: int, carry: LoopCarry) \
        -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The per-loop rule of a layer's MELT gate (docs/models.md#the-gates), shared by every runtime: for the active
    tokens' attention input x at 0-based ``loop``, returns ``(latent, alpha)``.

    ``latent`` (latent gate only): the h that k and v are projected from and the next loop blends with; at the
    first loop there is no previous h, so it is x itself, and from the second on ``gate(x, carry.latent)``.
    ``alpha`` (K/V gates only): the retention of the slots' previous values, from the second loop on; the
    first loop writes through.  None where the gate does not apply (no gate: every loop writes through).
    """
    if isinstance(gate, LatentGate):
        return (x if loop == 0 else gate(x, carry.latent)), None
    if isinstance(gate, KVGate) and loop > 0:
        return None, gate(x)
    return None, None


class Attention(nn.Module):
    """Ouro's attention (GQA, RoPE before caching) on a cache pair through :func:`gated_kv_attention`.

    ``melt_gate`` (config.gate) only acts on a shared (MELT) cache.
    """

    def __init__(self, config: LoopedLMConfig, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        factory = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, **factory)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, **factory)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, **factory)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, **factory)
        self.melt_gate = make_gate(config, device=device, dtype=dtype)

    def _kv(self, source: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        k = apply_rotary(self.k_proj(source).unflatten(-1, (self.num_kv_heads, self.head_dim)), *rope)
        return k, self.v_proj(source).unflatten(-1, (self.num_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_seqlens: torch.Tensor, loop: int, rope: tuple[torch.Tensor, torch.Tensor], *, shared: bool,
                carry: LoopCarry = LoopCarry(), backend: str = "auto",
                transition: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
                max_seqlen_k: Optional[int] = None,
                block_table: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, LoopCarry]:
        """One loop of the layer for the active tokens x (B, M, hidden), after input_layernorm.

        Updates k_cache, v_cache (B, S, Hkv, D) in place at positions L_b ..
        L_b+M-1: with ``shared`` (a MELT pair) through the gate, otherwise
        written through (a LoopLM pair).  ``carry`` is what the previous loop
        of this layer left (:class:`LoopCarry`; empty at loop 0).

        ``transition=(k_teacher, v_teacher, lam)`` runs the interpolated
        transition (docs/training.md#the-recipe, phase 1) on this loop's own pair (``shared``
        False): MELT's new slot values k_m, v_m (what the gate would store in
        a MELT cache: computed here, rounded to the cache dtype, carried to
        the next loop) are mixed with the teacher's k/v of this loop for the
        same tokens (B, M, Hkv, D), and ``lam * k_m + (1 - lam) * k_teacher``
        (likewise v) is written through and read, in float32 (float64 for
        float64) rounded once.  ``max_seqlen_k``: max_b(L_b) + M from the
        cache's host lengths, the op's hint that sizes its kernels' work by the
        lengths, not the capacity.  ``block_table``: the caches are pools of
        pages read through it (a PagedCache, docs/op.md#paged-caches).  Returns (o_proj
        output, the carry for the next loop).
        """
        if transition is not None and shared:
            raise ValueError("the transition writes into this loop's own (interpolated) pair: it needs shared=False")
        q = apply_rotary(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), *rope)
        latent, alpha = gate_at_loop(self.melt_gate if shared or transition is not None else None, x, loop, carry)
        k, v = self._kv(x if latent is None else latent, rope)
        if transition is None:
            out = gated_kv_attention(q, k, v, k_cache, v_cache, cache_seqlens, alpha, causal=True, backend=backend,
                                     max_seqlen_k=max_seqlen_k, block_table=block_table)
            return self.o_proj(out.flatten(-2)), LoopCarry(latent)
        k_teacher, v_teacher, lam = transition
        if alpha is not None:
            k, v = blend(carry.k, k, alpha), blend(carry.v, v, alpha)
        out = gated_kv_attention(q, blend(k, k_teacher, lam), blend(v, v_teacher, lam), k_cache, v_cache,
                                 cache_seqlens, causal=True, backend=backend, max_seqlen_k=max_seqlen_k)
        return self.o_proj(out.flatten(-2)), LoopCarry(latent, k, v)


def blend(old: torch.Tensor, fresh: torch.Tensor, retention: Union[torch.Tensor, float]) -> torch.Tensor:
    """``retention * old + (1 - retention) * fresh`` in float32 (float64 for float64), rounded once to fresh's
    dtype: the op's gated slot update (docs/op.md#the-cache-update), outside the kernel.  Exact at retention 0 and 1."""
    work = compute_dtype(fresh.dtype)
    return torch.lerp(fresh.to(work), old.to(work), retention).to(fresh.dtype)


def rewrite_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor,
                  backend: str) -> None:
    """Writes k, v (B, M, Hkv, D) through into positions start .. start+M-1 of every row of the caches.

    The write goes through :func:`gated_kv_attention` on the M slots (a view,
    from an empty prefix; the output, of throw-away queries, is dropped), so
    that autograd sees it as one of the op's own in-place writes, like the
    loops' (docs/op.md#gradients): the gradient reaching those slots from later chunks
    flows into k and v.  Costs one M x M attention.
    """
    m = k.shape[1]
    gated_kv_attention(torch.zeros_like(k), k, v, k_cache[:, start:start + m], v_cache[:, start:start + m], 0,
                       causal=True, backend=backend)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LoopedLMConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **factory)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **factory)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Ouro's sandwich block: ``h + norm2(attn(norm1(h)))``, then ``h + norm4(mlp(norm3(h)))``."""

    def __init__(self, config: LoopedLMConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, **factory)
        self.self_attn = Attention(config, **factory)
        self.input_layernorm_2 = RMSNorm(config.hidden_size, eps, **factory)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, **factory)
        self.mlp = MLP(config, **factory)
        self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps, **factory)

    def forward(self, h, k_cache, v_cache, cache_seqlens, loop, rope, *, shared, carry=LoopCarry(), backend="auto",
                transition=None, max_seqlen_k=None, block_table=None):
        attn, carry = self.self_attn(self.input_layernorm(h), k_cache, v_cache, cache_seqlens, loop, rope,
                                     shared=shared, carry=carry, backend=backend, transition=transition,
                                     max_seqlen_k=max_seqlen_k, block_table=block_table)
        h = h + self.input_layernorm_2(attn)
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h))), carry


# ---------------------------------------------------------------- the early exit


def exit_probabilities(exit_logits: torch.Tensor) -> torch.Tensor:
    """Ouro's exit distribution over loops, (T, ...) from the gate's logits (T, ...).

    ``lambda_t = sigmoid(logit_t)``, survival ``S_t = prod_{j<=t} (1 -
    lambda_j)``; ``p(t) = lambda_t S_{t-1}`` for t < T and ``p(T) =
    S_{T-1}`` (1-based), computed in float32 (float64 for float64).
    """
    lam = torch.sigmoid(exit_logits.to(compute_dtype(exit_logits.dtype)))
    survival = torch.cumprod(1 - lam, dim=0)
    before = torch.cat((torch.ones_like(survival[:1]), survival[:-1]))  # S_{t-1}
    return torch.cat(((lam * before)[:-1], before[-1:]))


def exit_loop(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """0-based loop index (...) each token exits at: the first whose cumulative probability reaches
    ``threshold``, the last loop when none does (float rounding can keep the sum just below 1)."""
    reached = probabilities.cumsum(dim=0) >= threshold
    last = torch.full_like(reached[0], probabilities.shape[0] - 1, dtype=torch.long)
    return torch.where(reached.any(dim=0), reached.long().argmax(dim=0), last)


@dataclass
class LoopOutput:
    """What the loops of a run produced: ``hidden_states`` (T, B, M, hidden), each loop's h after ``model.norm``,
    and ``exit_logits`` (T, B, M), the early-exit gate's logits."""

    hidden_states: torch.Tensor
    exit_logits: torch.Tensor

    def exit_probabilities(self) -> torch.Tensor:
        return exit_probabilities(self.exit_logits)

    def exit_loop(self, threshold: float) -> torch.Tensor:
        return exit_loop(self.exit_probabilities(), threshold)

    def chosen(self, threshold: Optional[float]) -> torch.Tensor:
        """The h (B, M, hidden) that feeds the head: the last loop's, or the exit rule's with a threshold."""
        if threshold is None:
            return self.hidden_states[-1]
        index = self.exit_loop(threshold)[None, ..., None].expand(1, *self.hidden_states.shape[1:])
        return self.hidden_states.gather(0, index)[0]

    @staticmethod
    def cat(parts: list["LoopOutput"]) -> "LoopOutput":
        """The outputs of consecutive chunks joined along the token dimension."""
        return LoopOutput(torch.cat([p.hidden_states for p in parts], dim=2),
                          torch.cat([p.exit_logits for p in parts], dim=2))


# ---------------------------------------------------------------- the model


class LoopedModel(nn.Module):
    """The decoder (checkpoint prefix ``model.``): embeddings, the layers run T times, ``norm``, the exit gate.

    ``config`` is a :class:`LoopedLMConfig` (transformers' :class:`melt_kernels.hf.MeltConfig` is one); T is
    read from ``config.total_ut_steps`` at every call.
    """

    def __init__(self, config: LoopedLMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, **factory) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True, **factory)

    def check_cache(self, cache: Cache, batch: int, num_tokens: int) -> None:
        """Raises unless ``cache`` fits this model and ``num_tokens`` more tokens of ``batch`` rows."""
        c = self.config
        if not isinstance(cache, (MeltCache, LoopLMCache, PagedCache)):
            raise TypeError(f"cache must be a MeltCache, a LoopLMCache or a PagedCache, got {type(cache).__name__}")
        if cache.num_layers != c.num_hidden_layers:
            raise ValueError(f"the cache has {cache.num_layers} layers, the model {c.num_hidden_layers}")
        if not is_shared(cache) and cache.num_loops != c.total_ut_steps:
            raise ValueError(f"the LoopLM cache holds {cache.num_loops} loops, the model runs {c.total_ut_steps}")
        if cache.batch != batch:
            raise ValueError(f"input_ids has {batch} rows, the cache {cache.batch}")
        if num_tokens > cache.room():
            raise ValueError(f"{num_tokens} more tokens do not fit: the cache has room for {cache.room()}")

    def check_transition(self, cache: Cache, transition: tuple[LoopLMCache, float], batch: int,
                         num_tokens: int) -> None:
        """Raises unless ``transition=(teacher_cache, lam)`` can run the chunk of ``num_tokens`` on ``cache``."""
        teacher_cache, lam = transition
        if not isinstance(cache, LoopLMCache) or not isinstance(teacher_cache, LoopLMCache):
            raise TypeError(f"the transition runs on a LoopLMCache (the interpolated pairs, one per loop) with "
                            f"transition=(the teacher's LoopLMCache, lam), got a {type(cache).__name__} with a "
                            f"{type(teacher_cache).__name__}")
        if (teacher_cache.num_loops, teacher_cache.num_layers, teacher_cache.batch) != \
                (cache.num_loops, cache.num_layers, cache.batch):
            raise ValueError(f"the teacher's cache holds {teacher_cache.num_loops} loops x "
                             f"{teacher_cache.num_layers} layers x {teacher_cache.batch} rows, the model's "
                             f"{cache.num_loops} x {cache.num_layers} x {cache.batch}")
        if teacher_cache.keys[0].shape[2:] != cache.keys[0].shape[2:] or \
                teacher_cache.keys[0].dtype != cache.keys[0].dtype:
            raise ValueError(f"the teacher's cache holds {tuple(teacher_cache.keys[0].shape[2:])} "
                             f"{teacher_cache.keys[0].dtype} heads, the model's {tuple(cache.keys[0].shape[2:])} "
                             f"{cache.keys[0].dtype}")
        lengths = cache.seqlens_host
        if not bool((lengths == lengths[0]).all()):
            raise ValueError(f"the transition runs rows of one length, got lengths {lengths.tolist()}")
        if not torch.equal(teacher_cache.seqlens_host, lengths + num_tokens):
            raise ValueError(f"the teacher's cache must hold this chunk (run the teacher on it first): it holds "
                             f"lengths {teacher_cache.seqlens_host.tolist()}, expected "
                             f"{(lengths + num_tokens).tolist()}")
        if not 0 <= lam <= 1:
            raise ValueError(f"the transition's lam must be in [0, 1], got {lam}")

    def forward(self, input_ids: torch.Tensor, cache: Cache, *, backend: str = "auto",
                transition: Optional[tuple[LoopLMCache, float]] = None,
                num_tokens: Optional[torch.Tensor] = None, capturable: bool = False) -> LoopOutput:
        """Runs one chunk input_ids (B, M) through all T loops, then settles it in the cache.

        The chunk occupies positions L_b .. L_b+M-1 of row b (its RoPE
        positions too).  ``num_tokens`` (B,) settles only the first
        num_tokens[b] of row b (the rest are padding whose slots later tokens
        overwrite; causal attention keeps them out of the real tokens' view).

        ``transition=(teacher_cache, lam)`` runs the interpolated transition
        (docs/training.md#the-recipe, phase 1): attention at loop r reads ``lam * KV_MELT + (1 -
        lam) * KV_LoopLM(r)``, where KV_LoopLM(r) is the teacher's loop-r
        cache, a LoopLMCache that already holds this chunk (the frozen
        teacher ran it first), and KV_MELT what this model's MELT cache would
        hold: the earlier chunks settled after all T loops, the active
        tokens after the gate's update of loop r.  ``cache`` is then a
        LoopLMCache of the model's own holding those mixtures, one pair per
        loop (the settled prefix of the teacher differs per loop, so one
        shared pair cannot hold them); every row must have the same length.
        Once the T loops have run, the chunk's slots of the pairs of loops
        0 .. T-2 are rewritten with MELT's settled values (the last loop's)
        mixed with that loop's teacher values (:func:`rewrite_slots`).
        lam = 0 is the teacher (given its weights), lam = 1 is MELT on a
        MELT cache.

        ``capturable``: the chunk reads and writes device state only, so that
        it can be captured in a CUDA graph and replayed (docs/op.md#cuda-graphs-and-host-cost): no host
        checks, no host-derived ``max_seqlen_k`` hint (the kernels plan by
        the capacity), no page reservation (the caller reserves first), and
        the device lengths advance in place (``cache.seqlens += M``); the
        host lengths are the caller's to advance
        (:class:`melt_kernels.graphs.CapturedDecode`).
        """
        batch, seqlen = input_ids.shape
        if capturable and (transition is not None or num_tokens is not None):
            raise ValueError("capturable runs plain chunks: no transition, no num_tokens")
        if not capturable:
            self.check_cache(cache, batch, seqlen)
            if transition is not None:
                self.check_transition(cache, transition, batch, seqlen)
            # A paged cache takes the pages this chunk's positions need now (a contiguous one checks room).
            cache.reserve(seqlen)
        shared = is_shared(cache)
        h = self.embed_tokens(input_ids)
        lengths = cache.seqlens
        positions = lengths.long()[:, None] + torch.arange(seqlen, device=h.device)  # [B, M]
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        start = None if transition is None else int(cache.seqlens_host[0])
        carries = [LoopCarry()] * len(self.layers)
        # The lengths live on the caches' device; their host copy bounds them for the kernels' plans (not when
        # capturable: a graph replayed at growing lengths keeps the capacity's plan).
        bound = None if capturable else cache.max_seqlen_k(seqlen)
        hidden, exit_logits = [], []
        for loop in range(self.config.total_ut_steps):
            for i, layer in enumerate(self.layers):
                k_cache, v_cache = cache.layer(i, loop)
                mix = None
                if transition is not None:
                    mix = (*(t[:, start:start + seqlen] for t in transition[0].layer(i, loop)), transition[1])
                h, carries[i] = layer(h, k_cache, v_cache, lengths, loop, rope, shared=shared, carry=carries[i],
                                      backend=backend, transition=mix, max_seqlen_k=bound,
                                      block_table=cache.block_table)
            h = self.norm(h)
            hidden.append(h)
            exit_logits.append(self.early_exit_gate(h)[..., 0])
        if transition is not None:
            teacher_cache, lam = transition
            for loop in range(self.config.total_ut_steps - 1):
                for i, carry in enumerate(carries):
                    k_teacher, v_teacher = (t[:, start:start + seqlen] for t in teacher_cache.layer(i, loop))
                    rewrite_slots(*cache.layer(i, loop), start, blend(carry.k, k_teacher, lam),
                                  blend(carry.v, v_teacher, lam), backend)
        if capturable:
            cache.seqlens.add_(seqlen)
        else:
            cache.advance(seqlen if num_tokens is None else num_tokens)
        return LoopOutput(torch.stack(hidden), torch.stack(exit_logits))


def is_shared(cache: Cache) -> bool:
    """Whether the loops share one K/V pair per layer (MELT), contiguous or paged."""
    return isinstance(cache, MeltCache) or (isinstance(cache, PagedCache) and cache.shared)


def init_weights(module: nn.Module) -> None:
    """A fresh model's initialisation of ``module`` alone (apply it to every module, children first).

    Linear layers keep PyTorch's default, embeddings N(0, 0.02^2), norms 1,
    and MELT gates "keep nothing" (weights 0, bias
    :data:`KEEP_NOTHING_LOGIT`): a fresh MELT model is its LoopLM with
    last-step reuse.
    """
    if isinstance(module, (LatentGate, KVGate)):
        module.keep_nothing_()
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Linear):
        module.reset_parameters()
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


class LoopedLM(nn.Module):
    """A looped LM with Ouro's architecture (module docstring), run chunk-wise on a LoopLM or MELT cache.

    ``backend`` is passed to every :func:`~melt_kernels.gated_kv_attention`
    call ("auto": the fastest available; "reference": unfused PyTorch).
    ``num_loops`` (config.total_ut_steps) may be changed between runs: T does
    not change the weights.
    """

    def __init__(self, config: LoopedLMConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config, self.backend = config, backend
        self.model = LoopedModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.apply(init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_loops(self) -> int:
        return self.config.total_ut_steps

    @num_loops.setter
    def num_loops(self, value: int) -> None:
        _check_positive("num_loops", value)
        self.config.total_ut_steps = value

    def attention_backend(self, backend: Optional[str] = None) -> str:
        """The backend that runs this model's attention calls: ``backend`` (default ``self.backend``) as the op
        resolves it ("auto" per device, dtype and shape) for a decode step of this model on its device."""
        # One token against one settled position: the shapes, dtype and device every call of the model shares.
        c, weight, backend = self.config, self.model.embed_tokens.weight, backend or self.backend
        q = weight.new_zeros(1, 1, c.num_attention_heads, c.head_dim)
        k = weight.new_zeros(1, 1, c.num_key_value_heads, c.head_dim)
        caches = [weight.new_zeros(1, 2, c.num_key_value_heads, c.head_dim) for _ in range(2)]
        return which_backend(q, k, k, *caches, 0, backend=backend).backend

    def new_cache(self, kind: str, batch: int, max_seqlen: int) -> Cache:
        """An empty "melt" or "looplm" cache for this model, on its device and in its dtype."""
        c, weight = self.config, self.model.embed_tokens.weight
        sizes = (c.num_hidden_layers, batch, max_seqlen, c.num_key_value_heads, c.head_dim)
        if kind == "melt":
            return MeltCache(*sizes, dtype=weight.dtype, device=weight.device)
        if kind == "looplm":
            return LoopLMCache(c.total_ut_steps, *sizes, dtype=weight.dtype, device=weight.device)
        raise ValueError(f"kind must be 'melt' or 'looplm', got {kind!r}")

    def new_page_pool(self, kind: str, num_blocks: int, page_size: int) -> PagePool:
        """An empty pool of ``num_blocks`` pages for this model: one pool pair per layer ("melt") or per (loop,
        layer) ("looplm"), on its device and in its dtype.  Batches of rows on it: ``PagedCache(pool, batch,
        max_seqlen)``."""
        c, weight = self.config, self.model.embed_tokens.weight
        sizes = (c.num_hidden_layers, num_blocks, page_size, c.num_key_value_heads, c.head_dim)
        factory = dict(dtype=weight.dtype, device=weight.device)
        if kind == "melt":
            return PagePool.melt(*sizes, **factory)
        if kind == "looplm":
            return PagePool.looplm(c.total_ut_steps, *sizes, **factory)
        raise ValueError(f"kind must be 'melt' or 'looplm', got {kind!r}")

    def forward(self, input_ids: torch.Tensor, cache: Cache, *, last_only: bool = False,
                transition: Optional[tuple[LoopLMCache, float]] = None, return_loops: bool = False,
                capturable: bool = False):
        """Runs one chunk input_ids (B, M) through all T loops, then settles it in the cache.

        Returns logits (B, M, vocab), or (B, 1, vocab) for the last token with
        ``last_only``; with ``return_loops`` a pair (logits, :class:`LoopOutput`).
        ``transition=(teacher_cache, lam)``, with a LoopLM ``cache`` of the
        model's own, runs the interpolated transition (:meth:`LoopedModel.forward`).  ``capturable``: device
        state only, for CUDA graphs (:meth:`LoopedModel.forward`, :class:`melt_kernels.graphs.CapturedDecode`).
        """
        loops = self.model(input_ids, cache, backend=self.backend, transition=transition, capturable=capturable)
        h = loops.chosen(self.config.exit_threshold)
        logits = self.lm_head(h[:, -1:] if last_only else h)
        return (logits, loops) if return_loops else logits

    def prefill(self, input_ids: torch.Tensor, cache: Cache, chunk_size: Optional[int] = None, *,
                last_only: bool = False, return_loops: bool = False):
        """Chunk-wise prefill: input_ids (B, P) cut into chunks of ``chunk_size`` (default: one chunk).

        Each chunk runs all T loops against the settled cache of the earlier
        chunks.  Returns logits (B, P, vocab), or (B, 1, vocab) with
        ``last_only``; with ``return_loops`` also the chunks' :class:`LoopOutput` joined.
        """
        batch, length = input_ids.shape
        chunk_size = length if chunk_size is None else chunk_size
        if length < 1 or chunk_size < 1:
            raise ValueError(f"need at least one token and a positive chunk_size, got {length} tokens and "
                             f"chunk_size={chunk_size}")
        self.model.check_cache(cache, batch, length)
        runs = [self(chunk, cache, last_only=last_only, return_loops=True)
                for chunk in input_ids.split(chunk_size, dim=1)]
        logits = runs[-1][0] if last_only else torch.cat([r[0] for r in runs], dim=1)
        return (logits, LoopOutput.cat([r[1] for r in runs])) if return_loops else logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, cache: Cache, max_new_tokens: int, *,
                 chunk_size: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
        """Prefills input_ids (B, P) into ``cache``, then decodes token by token.

        Greedy by default; with ``do_sample`` draws from softmax(logits /
        temperature) with ``generator`` (on the model's device).  Returns the
        new tokens (B, max_new_tokens); the last one is not fed back, so the
        cache ends up holding P + max_new_tokens - 1 more tokens.  ``progress``
        shows a tqdm bar over the new tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model.check_cache(cache, input_ids.shape[0], input_ids.shape[1] + max_new_tokens - 1)
        logits = self.prefill(input_ids, cache, chunk_size, last_only=True)[:, -1]
        tokens = []
        steps = range(max_new_tokens)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="generating", unit="token")
        for step in steps:
            if do_sample:
                probs = torch.softmax(logits.to(compute_dtype(logits.dtype)) / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(dim=-1)
            tokens.append(token)
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], cache, last_only=True)[:, -1]
        return torch.stack(tokens, dim=1)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Writes ``config.json`` (model_type "melt") and ``model.safetensors`` under the checkpoint's names.

        :func:`melt_kernels.ouro.load_ouro` reads it back, and so does
        ``transformers.AutoModelForCausalLM.from_pretrained`` once
        :mod:`melt_kernels` is imported (:mod:`melt_kernels.hf`), or with
        ``trust_remote_code=True`` without importing it (the ``auto_map`` and
        ``modeling_melt.py`` of :mod:`melt_kernels.remote_code`).  A tied
        ``lm_head.weight`` is not written (transformers' convention).
        """
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()
                 if not (self.config.tie_word_embeddings and name == "lm_head.weight")}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        config = {"model_type": CHECKPOINT_MODEL_TYPE, "architectures": ["MeltForCausalLM"], "dtype": dtype,
                  "auto_map": remote_code.write(path), **asdict(self.config)}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)

