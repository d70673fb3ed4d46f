"""MELT in vLLM: one KV cache per layer, written by all T loops of a step (SPEC 3.4).

The engine allocates N layers' worth of pages whatever T is, so at one KV
budget it holds T times Ouro's tokens.  The gates act as
:mod:`melt_kernels.vllm.layers` describes; the plugin serves whole prompts
(:mod:`melt_kernels.vllm.config`).
"""
from melt_kernels.vllm.layers import LoopedForCausalLM


class MeltForCausalLM(LoopedForCausalLM):
    """A model_type "melt" checkpoint (:func:`melt_kernels.ouro.to_melt`, then ``save_pretrained``)."""

    per_loop_caches = False
