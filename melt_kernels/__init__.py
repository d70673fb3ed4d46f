"""melt_kernels: a fused gated KV-cache update + attention op for looped language models (MELT)."""
import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys
from importlib import metadata as _metadata

from melt_kernels.backends import available_backends
from melt_kernels.cache import LoopLMCache, MeltCache
from melt_kernels.gated_kv_attention import gated_kv_attention
from melt_kernels.paged_cache import PagedCache, PagePool
from melt_kernels import model, ouro, train
from melt_kernels.model import LoopedLM, LoopedLMConfig, kv_bytes_per_token
from melt_kernels.ouro import load_ouro, to_melt


def _transformers_major() -> int:
    try:
        return int(_metadata.version("transformers").split(".")[0])
    except (_metadata.PackageNotFoundError, ValueError):
        return 0


class _ThenRegister(_importlib_abc.Loader):
    """transformers' own loader, then melt_kernels.hf's registration of model_type "melt"."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _importlib.import_module("melt_kernels.hf")

    def __getattr__(self, name):  # resource readers, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _RegisterWhenTransformersLoads(_importlib_abc.MetaPathFinder):
    """Registers the Auto classes the moment transformers is imported, so that ``import melt_kernels`` does
    not pay for importing transformers (about 2 s) in programs that never use it."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        _sys.meta_path.remove(self)
        spec = _importlib_util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


# The [hf] extra: with transformers 5.x installed, model_type "melt" is registered with its Auto classes,
# now if transformers is already imported, else as soon as it is.
if _transformers_major() == 5:
    if "transformers" in _sys.modules:
        from melt_kernels import hf  # noqa: F401
    else:
        _sys.meta_path.insert(0, _RegisterWhenTransformersLoads())

__version__ = "0.1.0"
__all__ = ["gated_kv_attention", "available_backends", "MeltCache", "LoopLMCache", "LoopedLM", "LoopedLMConfig",
           "kv_bytes_per_token", "load_ouro", "to_melt", "model", "ouro", "train"]
