"""Ouro in vLLM: one KV cache per (loop, layer), N x T in all, every loop written through.

Ouro's output does not depend on how a prompt is cut into chunks, so it
keeps chunked prefill and prefix caching.
"""
from melt_kernels.vllm.layers import LoopedForCausalLM


class OuroForCausalLM(LoopedForCausalLM):
    """A model_type "ouro" checkpoint (ByteDance's Ouro-1.4B / 2.6B layout, OURO.md)."""

    per_loop_caches = True
