"""Hugging Face transformers (5.x) integration: the looped model as a ``PreTrainedModel`` that generates.

Importing :mod:`melt_kernels` imports this module when transformers 5.x is
imported (the ``[hf]`` extra) and registers, in-process, ``model_type="melt"``
with ``AutoConfig`` and ``AutoModelForCausalLM``.  So a checkpoint written by
:meth:`melt_kernels.model.LoopedLM.save_pretrained` (or by
:class:`MeltForCausalLM`'s own ``save_pretrained``) loads with::

    import melt_kernels, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

Such a checkpoint also follows the Hub's convention for architectures
transformers does not ship: its config has an ``auto_map`` naming a
``modeling_melt.py`` beside it that imports this module
(:mod:`melt_kernels.remote_code`), so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads
it wherever melt_kernels is installed, without importing it first.  Other
transformers versions: :mod:`melt_kernels.hf_support`.

:class:`MeltForCausalLM` has the checkpoint's module tree
(:class:`~melt_kernels.model.LoopedModel` under ``model.``, ``lm_head``) and
runs it on the package's own caches, wrapped in :class:`LoopCache`: a
:class:`~melt_kernels.MeltCache` when the config has a gate (one K/V pair per
layer, the same size whatever T is), a :class:`~melt_kernels.LoopLMCache`
(Ouro's, one pair per loop and layer) when it has none.  ``generate`` sizes
the cache once for prompt + new tokens.  Every attention call is
:func:`~melt_kernels.gated_kv_attention` (fused cache update and read):
transformers' ``Cache.update`` is never called.

Padded batches: rows may be padded anywhere (``attention_mask`` 0), left
padding being what ``generate`` expects.  Each forward moves each row's real
tokens to the front of the chunk, so they occupy consecutive cache slots from
the row's own length on and get the positions they would have alone; the
padding runs behind them, is never attended to by a real token (causal), and
its slots are overwritten by the row's next tokens.  A padded row therefore
generates what it generates alone.  The outputs are put back in the input's
columns (zero logits at padding).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

from melt_kernels.hf_support import require_supported

require_supported()  # before transformers' 5.x names are imported: on 4.x, the message says what to do
# ruff: noqa: E402
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from melt_kernels import remote_code
from melt_kernels.cache import LoopLMCache, MeltCache
from melt_kernels.model import CHECKPOINT_MODEL_TYPE, DecoderLayer, LoopedLMConfig, LoopedModel, init_weights
from melt_kernels.ouro import config_fields

# transformers renamed the cache argument and output field from past_key_values to cache (5.2x).
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MeltConfig(PreTrainedConfig, LoopedLMConfig):
    """transformers' face of :class:`~melt_kernels.model.LoopedLMConfig`: the same fields (inherited, not restated)
    and checks.  Read from a ``config.json``, it refuses what the package does not implement through the reader
    of every runtime, :func:`melt_kernels.ouro.config_fields`."""

    model_type = CHECKPOINT_MODEL_TYPE

    def __post_init__(self, **kwargs):
        LoopedLMConfig.__post_init__(self)  # checks the values and fills the defaults derived from others
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' reader of a config.json's dict (``from_pretrained``, ``AutoConfig``), after the package's
        checks: a field it does not implement is a ValueError naming it, as in ``load_ouro`` and vLLM."""
        config_fields(config_dict)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Nothing, as :meth:`MeltForCausalLM.register_for_auto_class`."""


class LoopCache(Cache):
    """A :class:`~melt_kernels.MeltCache` or :class:`~melt_kernels.LoopLMCache` as a transformers ``Cache``.

    The model updates it in place through ``gated_kv_attention``; ``update``
    is not used.  ``get_seq_length()`` counts the input columns consumed
    (padding included), as ``generate`` expects; the per-row lengths are in
    ``cache.seqlens``.
    """

    def __init__(self, cache: Union[MeltCache, LoopLMCache]):
        super().__init__(layers=[])
        self.cache, self.columns = cache, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.cache.max_seqlen

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.cache.num_layers

    @property
    def batch_size(self) -> int:
        return self.cache.batch

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __len__(self) -> int:
        return self.cache.num_layers

    def update(self, *args, **kwargs):
        raise NotImplementedError("a LoopCache is updated in place by melt_kernels.gated_kv_attention inside the "
                                  "model, not through Cache.update")

    def reset(self) -> None:
        self.cache.reset()
        self.columns = 0

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("LoopCache supports greedy search and sampling; beam search, cropping and "
                                  "reordering rows are not implemented")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class MeltForCausalLM(PreTrainedModel, GenerationMixin):
    """The looped LM (Ouro's architecture, with or without a MELT gate) for transformers.

    ``backend`` (an attribute, default "auto") is passed to every
    :func:`~melt_kernels.gated_kv_attention` call.  Greedy search and
    sampling are supported, with any padding (module docstring); beam search
    is not.
    """

    config_class = MeltConfig
    base_model_prefix = "model"
    _no_split_modules = [DecoderLayer.__name__]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MeltConfig):
        super().__init__(config)
        self.model = LoopedModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.backend = "auto"
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save_pretrained, with the ``auto_map`` and ``modeling_melt.py`` of
        :mod:`melt_kernels.remote_code` (loadable with ``trust_remote_code=True`` without importing
        melt_kernels)."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.auto_map = remote_code.write(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Nothing: transformers calls it on classes loaded through ``auto_map`` so that saving copies their
        module (this one) into the checkpoint; the checkpoint's ``modeling_melt.py`` imports it instead."""

    def new_cache(self, batch: int, max_seqlen: int) -> LoopCache:
        """An empty cache for ``batch`` rows of up to ``max_seqlen`` positions: MELT's with a gate, else Ouro's."""
        c, weight = self.config, self.model.embed_tokens.weight
        sizes = (c.num_hidden_layers, batch, max_seqlen, c.num_key_value_heads, c.head_dim)
        cache = MeltCache(*sizes, dtype=weight.dtype, device=weight.device) if c.gate is not None else \
            LoopLMCache(c.total_ut_steps, *sizes, dtype=weight.dtype, device=weight.device)
        return LoopCache(cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode,
                                      batch_size: int, max_cache_length: int) -> None:
        """generate()'s hook: one cache for the whole generation, sized for prompt + new tokens."""
        if model_kwargs.get(CACHE_NAME) is not None or generation_config.use_cache is False:
            return  # the user's cache, or none: each forward then runs its whole input on a fresh cache
        if generation_config.num_beams > 1:
            raise NotImplementedError("MeltForCausalLM does not implement beam search")
        rows = generation_config.num_return_sequences * batch_size
        model_kwargs[CACHE_NAME] = self.new_cache(rows, max_cache_length)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[LoopCache] = None, cache: Optional[LoopCache] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Runs the new tokens input_ids (B, M) through all T loops on the cache, which settles them.

        ``attention_mask`` (B, columns so far + M), 0 at padding.  Without a
        cache a fresh one serves this call alone.  Returns logits (B, M or
        ``logits_to_keep``, vocab) of the chosen loop (config.exit_threshold)
        and the cache (under transformers' name for it; None with
        ``use_cache=False``).
        """
        for name in ("inputs_embeds", "position_ids", "labels"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"MeltForCausalLM.forward does not take {name}")
        state = cache if cache is not None else past_key_values
        batch, seqlen = input_ids.shape
        if state is None:
            state = self.new_cache(batch, seqlen)
        elif not isinstance(state, LoopCache):
            raise TypeError(f"the cache must be a melt_kernels.hf.LoopCache, got {type(state).__name__}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, state.columns + seqlen):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(batch, state.columns + seqlen)} (the columns so far and the new ones)")
            mask = attention_mask[:, -seqlen:].bool()
        if mask is None or bool(mask.all()):
            loops = self.model(input_ids, state.cache, backend=self.backend)
            hidden = loops.chosen(self.config.exit_threshold)
        else:
            # Real tokens first, in order, padding behind them (module docstring).
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
            loops = self.model(input_ids.gather(1, order), state.cache, backend=self.backend,
                               num_tokens=mask.sum(dim=1))
            packed = loops.chosen(self.config.exit_threshold)
            hidden = torch.zeros_like(packed).scatter(1, order[..., None].expand_as(packed), packed)
            hidden = hidden.masked_fill(~mask[..., None], 0)
        state.columns += seqlen
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        returned = None if use_cache is False else state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), **{CACHE_NAME: returned})


def register() -> None:
    """Registers model_type "melt" with transformers' Auto classes (idempotent)."""
    AutoConfig.register(CHECKPOINT_MODEL_TYPE, MeltConfig, exist_ok=True)
    AutoModelForCausalLM.register(MeltConfig, MeltForCausalLM, exist_ok=True)


register()
