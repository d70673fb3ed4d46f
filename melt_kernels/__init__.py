"""melt_kernels: a fused gated KV-cache update + attention op for looped language models (MELT)."""
from importlib import metadata as _metadata

from melt_kernels.backends import available_backends
from melt_kernels.cache import LoopLMCache, MeltCache
from melt_kernels.gated_kv_attention import gated_kv_attention
from melt_kernels import model, ouro, train
from melt_kernels.model import LoopedLM, LoopedLMConfig, kv_bytes_per_token
from melt_kernels.ouro import load_ouro, to_melt


def _transformers_major() -> int:
    try:
        return int(_metadata.version("transformers").split(".")[0])
    except (_metadata.PackageNotFoundError, ValueError):
        return 0


# The [hf] extra: with transformers 5.x installed, model_type "melt" is registered with its Auto classes.
if _transformers_major() == 5:
    from melt_kernels import hf  # noqa: F401

__version__ = "0.1.0"
__all__ = ["gated_kv_attention", "available_backends", "MeltCache", "LoopLMCache", "LoopedLM", "LoopedLMConfig",
           "kv_bytes_per_token", "load_ouro", "to_melt", "model", "ouro", "train"]
