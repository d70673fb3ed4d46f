"""melt_kernels: a fused gated KV-cache update + attention op for looped language models (MELT)."""
import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.machinery as _machinery
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _map_kernels_folder() -> None:
    """Makes the checkout's top-level ``kernels/`` folder ``melt_kernels.kernels`` where nothing else does.

    That folder has no ``__init__.py`` on purpose: a namespace folder never wins over a regular package of the
    same name, so Hugging Face's ``kernels`` (which transformers imports) stays itself when the checkout's root is
    on ``sys.path`` (``python -m`` from the checkout).  A wheel installs the folder as ``melt_kernels/kernels``,
    found as usual; setuptools' editable finder, and a checkout used without installing, do not resolve a
    namespace subpackage that lives outside its parent, so it is mapped here.
    """
    name = __name__ + ".kernels"
    if _importlib_util.find_spec(name) is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if not _os.path.isdir(folder):
        return
    spec = _machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    _sys.modules[name] = _importlib_util.module_from_spec(spec)


_map_kernels_folder()

from melt_kernels.backends import available_backends, which_backend  # noqa: E402
from melt_kernels.cache import LoopLMCache, MeltCache  # noqa: E402
from melt_kernels.gated_kv_attention import gated_kv_attention  # noqa: E402
from melt_kernels.paged_cache import PagedCache, PagePool  # noqa: E402
from melt_kernels import model  # noqa: E402
from melt_kernels.model import LoopedLM, LoopedLMConfig, kv_bytes_per_token  # noqa: E402

# Imported on first use: `python -m melt_kernels.ouro` / `-m melt_kernels.train` run modules that `import
# melt_kernels` must not have imported already (runpy warns that they are in sys.modules), and neither is needed
# to run the op.
_LAZY = {"ouro": ("melt_kernels.ouro", None), "train": ("melt_kernels.train", None),
         "load_ouro": ("melt_kernels.ouro", "load_ouro"), "to_melt": ("melt_kernels.ouro", "to_melt")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = _importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def _register_with_transformers() -> None:
    """Registers model_type "melt" with transformers' Auto classes: :mod:`melt_kernels.hf`'s classes (registered
    when it is imported) on the transformers it supports, a config that says what to install on the others."""
    from melt_kernels import hf_support

    if hf_support.is_supported(hf_support.transformers_version()):
        _importlib.import_module("melt_kernels.hf")
    else:
        hf_support.register_refusal()


class _ThenRegister(_importlib_abc.Loader):
    """transformers' own loader, then :func:`_register_with_transformers` (model_type "melt")."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_with_transformers()

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


# The [hf] extra: model_type "melt" is registered with transformers' Auto classes, now if transformers is already
# imported, else as soon as it is (with transformers 4.x, as a config that says what to install instead).
if "transformers" in _sys.modules:
    _register_with_transformers()
elif _importlib_util.find_spec("transformers") is not None:
    _sys.meta_path.insert(0, _RegisterWhenTransformersLoads())

__version__ = "0.1.0"
__all__ = ["gated_kv_attention", "available_backends", "which_backend", "MeltCache", "LoopLMCache", "PagedCache",
           "PagePool", "LoopedLM", "LoopedLMConfig", "kv_bytes_per_token", "load_ouro", "to_melt", "model", "ouro",
           "train"]
