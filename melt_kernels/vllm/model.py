"""The looped LM in vLLM, from vLLM's layers: MELT (:class:`MeltForCausalLM`) and Ouro (:class:`OuroForCausalLM`).

One module tree serves both checkpoints; they differ in how many KV caches
a layer has.  MELT has one, written and read by all T loops of a step, so
the engine sizes its pool for N layers whatever T is and holds T times
Ouro's tokens at one budget (docs/serving.md#vllm); Ouro has one per loop
(N x T), every loop written through.  The math is
:mod:`melt_kernels.model`'s (the forward in its docstring, the gates as its
modules and :func:`~melt_kernels.model.gate_at_loop`), on vLLM's parallel
linears, RMSNorm, rotary embedding and vocab-parallel embedding, so that
tensor parallelism splits the heads as in vLLM's own models.  The gates'
weights are replicated (hidden x hidden, or hidden x kv-heads x width); a
K/V gate's rank takes its own kv heads' retentions.

A step's tokens (prefill chunks and decode tokens of several requests, in
one flat batch) run all T loops in one forward.  At every loop each layer
writes its active slots through the engine's ``Attention`` (the write is an
overwrite) and reads them; what the gates need of the previous loop lives in
the forward's locals, per layer, for this step's tokens only
(:class:`~melt_kernels.model.LoopCarry`):

* latent (the paper's gate): h_prev, the gated latent; k, v are computed
  from ``h = z h_prev + (1 - z) x`` and overwrite the slots (q from x).
* kv-head / kv-element (this package's): the slots' values after the
  previous loop, which are this step's own (the cache's earlier tokens are
  settled and never rewritten), so the blend ``alpha K_old + (1 - alpha) k``
  needs no cache read; it is computed in float32 and rounded to the model's
  dtype, which is the cache's (the plugin refuses a quantised cache with
  these gates), as the fused op rounds it.  Loop 1 writes through.

The plugin serves MELT's prompts whole and leaves Ouro every engine feature
(:mod:`melt_kernels.vllm.config`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors

from melt_kernels.model import KVGate, LoopCarry, LoopedLMConfig, LoopOutput, blend, gate_at_loop, make_gate

# The checkpoint's separate projections load into vLLM's fused ones.
CHECKPOINT_TO_FUSED = WeightsMapper(orig_to_new_stacked={
    ".q_proj": (".qkv_proj", "q"),
    ".k_proj": (".qkv_proj", "k"),
    ".v_proj": (".qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
})


class LoopedMLP(nn.Module):
    def __init__(self, config: LoopedLMConfig, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class LoopedAttention(nn.Module):
    """Ouro's attention with the config's MELT gate, on ``num_caches`` engine ``Attention`` layers: 1 (MELT's
    shared cache) or T (Ouro's, loop r on cache r)."""

    def __init__(
        self,
        config: LoopedLMConfig,
        layer_index: int,
        num_caches: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = max(1, config.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # The kv heads of this rank, as QKVParallelLinear assigns them (replicated when fewer than the ranks).
        replicas = max(1, tp_size // config.num_key_value_heads)
        first = get_tensor_model_parallel_rank() // replicas * self.num_kv_heads
        self.kv_heads = slice(first, first + self.num_kv_heads)

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        )
        self.melt_gate = make_gate(config)
        # The engine orders the KV caches by the one integer in each Attention's name: cache r of layer i is
        # named as layer r * N + i.
        layer_prefix = f"layers.{layer_index}."
        self.attn = nn.ModuleList(
            Attention(
                self.num_heads,
                self.head_dim,
                self.head_dim**-0.5,
                num_kv_heads=self.num_kv_heads,
                cache_config=cache_config,
                quant_config=quant_config,
                prefix=prefix.replace(layer_prefix, f"layers.{r * config.num_hidden_layers + layer_index}.")
                + ".attn",
            )
            for r in range(num_caches)
        )

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, loop: int, carry: LoopCarry
    ) -> tuple[torch.Tensor, LoopCarry]:
        """Loop ``loop`` of the layer for the step's tokens x (N, hidden), after input_layernorm; returns the
        o_proj output and what the next loop of this layer needs (module docstring)."""
        latent, alpha = gate_at_loop(self.melt_gate, x, loop, carry)
        if latent is not None and latent is not x:
            # q from x, k and v from the gated latent: one GEMM over both.
            qkv, _ = self.qkv_proj(torch.cat((x, latent)))
            q = qkv[: x.shape[0], : self.q_size]
            k, v = qkv[x.shape[0] :, self.q_size :].split([self.kv_size, self.kv_size], dim=-1)
        else:
            qkv, _ = self.qkv_proj(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if isinstance(self.melt_gate, KVGate):
            k = k.reshape(-1, self.num_kv_heads, self.head_dim)
            v = v.reshape(-1, self.num_kv_heads, self.head_dim)
            if alpha is not None:
                alpha = alpha[:, self.kv_heads]
                k, v = blend(carry.k, k, alpha), blend(carry.v, v, alpha)
            carry = LoopCarry(k=k, v=v)
        else:
            carry = LoopCarry(latent)
        out = self.attn[loop if len(self.attn) > 1 else 0](q, k, v)
        out, _ = self.o_proj(out)
        return out, carry


class LoopedDecoderLayer(nn.Module):
    """Ouro's sandwich block: ``h + norm2(attn(norm1(h)))``, then ``h + norm4(mlp(norm3(h)))``."""

    def __init__(
        self,
        config: LoopedLMConfig,
        layer_index: int,
        num_caches: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.self_attn = LoopedAttention(
            config, layer_index, num_caches, cache_config, quant_config, prefix=f"{prefix}.self_attn"
        )
        self.input_layernorm_2 = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.mlp = LoopedMLP(config, quant_config, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm_2 = RMSNorm(hidden, eps=eps)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, loop: int, carry: LoopCarry
    ) -> tuple[torch.Tensor, LoopCarry]:
        attn, carry = self.self_attn(positions, self.input_layernorm(h), loop, carry)
        h = h + self.input_layernorm_2(attn)
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h))), carry


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class LoopedModel(nn.Module):
    """The decoder (checkpoint prefix ``model.``): embeddings, the layers run T times, ``norm`` after every
    loop, the early-exit gate (used when ``exit_threshold`` is set)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", per_loop_caches: bool = False):
        super().__init__()
        config = vllm_config.model_config.hf_config  # a LoopedLMConfig (melt_kernels.hf.MeltConfig)
        self.config = config
        num_caches = config.total_ut_steps if per_loop_caches else 1
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.layers = nn.ModuleList(
            LoopedDecoderLayer(
                config,
                i,
                num_caches,
                vllm_config.cache_config,
                vllm_config.quant_config,
                prefix=f"{prefix}.layers.{i}",
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.early_exit_gate = ReplicatedLinear(
            config.hidden_size, 1, bias=True, prefix=f"{prefix}.early_exit_gate"
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        carries = [LoopCarry()] * len(self.layers)
        hidden, exit_logits = [], []
        for loop in range(self.config.total_ut_steps):
            for i, layer in enumerate(self.layers):
                h, carries[i] = layer(positions, h, loop, carries[i])
            h = self.norm(h)
            if self.config.exit_threshold is not None:
                hidden.append(h)
                exit_logits.append(self.early_exit_gate(h)[0][..., 0])
        if self.config.exit_threshold is None:
            return h
        return LoopOutput(torch.stack(hidden), torch.stack(exit_logits)).chosen(self.config.exit_threshold)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=CHECKPOINT_TO_FUSED)


class LoopedForCausalLM(nn.Module):
    """The looped LM with its head; subclasses say whether each loop has its own KV caches."""

    per_loop_caches: bool
    hf_to_vllm_mapper = CHECKPOINT_TO_FUSED
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config  # a LoopedLMConfig (melt_kernels.hf.MeltConfig)
        self.config = config
        self.model = LoopedModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), per_loop_caches=self.per_loop_caches
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


class MeltForCausalLM(LoopedForCausalLM):
    """A model_type "melt" checkpoint (:func:`melt_kernels.ouro.to_melt`, then ``save_pretrained``): one KV cache
    per layer, shared by the loops."""

    per_loop_caches = False


class OuroForCausalLM(LoopedForCausalLM):
    """A model_type "ouro" checkpoint (ByteDance's Ouro-1.4B / 2.6B layout, docs/models.md#ouro-checkpoints): one KV
    cache per (loop, layer)."""

    per_loop_caches = True
