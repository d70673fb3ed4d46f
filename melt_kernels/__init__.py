"""melt_kernels: a fused gated KV-cache update + attention op for looped language models (MELT)."""
from melt_kernels.backends import available_backends
from melt_kernels.cache import LoopLMCache, MeltCache
from melt_kernels.gated_kv_attention import gated_kv_attention
from melt_kernels import nn, train

__version__ = "0.1.0"
__all__ = ["gated_kv_attention", "available_backends", "MeltCache", "LoopLMCache", "nn", "train"]
