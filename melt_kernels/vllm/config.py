"""How vLLM reads and checks the looped models' configs, and the serving policy each architecture gets.

* :class:`OuroConfig`: transformers' config class for model_type "ouro" (no
  release of transformers has one), registered with ``AutoConfig`` so that
  the engine reads an Ouro checkpoint without ``trust_remote_code``.
  model_type "melt" is :class:`melt_kernels.hf.MeltConfig`, registered when
  :mod:`melt_kernels` is imported.  Both read config.json through
  :func:`melt_kernels.ouro.config_fields`, as ``load_ouro`` does, so the
  engine refuses what the package does not implement as it reads the config.
* :class:`MeltServing` and :class:`OuroServing`: vLLM's per-architecture
  config hooks (``MODELS_CONFIG_MAP``), run when the engine's config is
  built, in the process that builds it, so that bad input is refused there
  with its own message (:func:`check_checkpoint`), before any worker starts.

The prefill policy (docs/serving.md#prefill-policy).  MELT's output depends on where a prompt is
cut into chunks (a chunk sees the earlier chunks settled after all T loops),
and vLLM's scheduler cuts prompts by its token budget, which depends on the
other requests; a cached prefix is a chunk boundary the prompt alone would
not have.  So MELT serves whole prompts: chunked prefill and prefix caching
are turned off, and the token budget is raised to ``max_model_len`` if it is
smaller (a prompt must fit one step).  A request's tokens then depend on its
own prompt only, as :meth:`melt_kernels.model.LoopedLM.generate` with one
prefill chunk.  Ouro does not depend on the chunking and keeps both.
"""
from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from melt_kernels.hf import MeltConfig
from melt_kernels.model import LoopedLMConfig
from melt_kernels.ouro import OURO_MODEL_TYPE, check_tensors, read_headers

logger = init_logger(__name__)


class OuroConfig(MeltConfig):
    """transformers' config of an Ouro checkpoint: MeltConfig under model_type "ouro" (an Ouro config.json never
    sets the gate, which :func:`melt_kernels.ouro.config_fields` checks)."""

    model_type = OURO_MODEL_TYPE


def checkpoint_folder(model_config) -> str:
    """The folder holding the checkpoint's config.json: the model path, or the Hugging Face cache's snapshot."""
    if os.path.isdir(model_config.model):
        return model_config.model
    from huggingface_hub import hf_hub_download

    return os.path.dirname(hf_hub_download(model_config.model, "config.json", revision=model_config.revision))


def check_checkpoint(vllm_config) -> LoopedLMConfig:
    """Refuses, naming the cause, what this plugin cannot serve as it would compute it: a missing, extra or
    mis-shaped tensor when the weights are already on disk (:func:`melt_kernels.ouro.check_tensors`; otherwise
    vLLM's loader names what it did not load) and a head_dim the engine's attention backend refuses.  A
    config.json field the package does not implement was refused before, when the engine read the config
    (:meth:`melt_kernels.hf.MeltConfig.from_dict`, the reader of every runtime)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
    folder = checkpoint_folder(model_config)
    config = model_config.hf_config  # a LoopedLMConfig, hf_overrides applied
    if any(name.endswith(".safetensors") for name in os.listdir(folder)):
        check_tensors(config, {name: shape for name, (_, shape, _) in read_headers(folder).items()})
    with set_current_vllm_config(vllm_config):
        backend = get_attn_backend(config.head_dim, model_config.dtype, cache_config.cache_dtype)
    if not backend.supports_head_size(config.head_dim):
        raise ValueError(f"head_dim {config.head_dim} is refused by the engine's attention backend "
                         f"{backend.get_name()} (it takes {backend.get_supported_head_sizes()})")
    return config


class MeltServing(VerifyAndUpdateConfig):
    """MeltForCausalLM: the checks, a gate required, and whole-prompt prefill (module docstring)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        config = check_checkpoint(vllm_config)
        if config.gate is None:
            raise ValueError("this model_type 'melt' checkpoint has no gate (gate: null): it is Ouro saved by "
                             "save_pretrained; serve it as Ouro with --hf-overrides "
                             "'{\"architectures\": [\"OuroForCausalLM\"]}'")
        cache_dtype = vllm_config.cache_config.cache_dtype
        if config.gate != "latent" and cache_dtype != "auto":
            # The blend keeps the previous loop's slot values in the step's locals, in the model's dtype; a
            # quantised cache would hold other values than those the blend reads.
            raise ValueError(f"kv_cache_dtype={cache_dtype!r} is not supported with the {config.gate!r} gate "
                             f"(its blend reads the slots' previous values in the model's dtype): use 'auto'")
        scheduler, model_config = vllm_config.scheduler_config, vllm_config.model_config
        scheduler.enable_chunked_prefill = False
        scheduler.long_prefill_token_threshold = 0
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, model_config.max_model_len)
        vllm_config.cache_config.enable_prefix_caching = False
        logger.warning("MELT (gate %r, T=%d): chunked prefill and prefix caching are off, each prompt is "
                       "prefilled whole (max_num_batched_tokens=%d), so a request's tokens depend on its own "
                       "prompt only", config.gate, config.total_ut_steps, scheduler.max_num_batched_tokens)


class OuroServing(VerifyAndUpdateConfig):
    """OuroForCausalLM: the checks; every engine feature stays on (Ouro does not depend on the chunking)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        config = check_checkpoint(vllm_config)
        if config.gate is not None:
            raise ValueError(f"OuroForCausalLM serves a checkpoint without a gate, this one has {config.gate!r}: "
                             f"serve it as MeltForCausalLM")
