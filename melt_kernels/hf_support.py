"""Which transformers :mod:`melt_kernels.hf` works with, and registering model_type "melt" with it.

:mod:`melt_kernels.hf` is written for transformers 5 (its config, cache and
generation APIs).  Ouro's model cards pin transformers 4.54, so many people
who have Ouro have a 4.x.  There, instead of registering nothing (and
transformers then saying only that it does not know model_type "melt"),
"melt" is registered as a config that refuses to load with what to do: the
version needed, and the transformers-free path.  Importing
:mod:`melt_kernels.hf` itself (as a checkpoint's ``auto_map`` code does)
raises the same message.  :mod:`melt_kernels` calls :func:`register` when
transformers is imported, of whatever version.
"""
from __future__ import annotations

import importlib

SUPPORTED = ">=5,<6"
SUPPORTED_MAJOR = 5


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def unsupported_message(version: str) -> str:
    return (f"melt_kernels' transformers integration (model_type 'melt') needs transformers{SUPPORTED}; "
            f"transformers {version} is installed. Either `pip install \"transformers{SUPPORTED}\"` (the [hf] "
            f"extra), or run the checkpoint without transformers: `model = melt_kernels.load_ouro(path)`, then "
            f"`model.generate(prompt_ids, model.new_cache('melt', batch, max_seqlen), max_new_tokens)`.")


def is_supported(version: str) -> bool:
    major = version.split(".")[0]
    return major.isdigit() and int(major) == SUPPORTED_MAJOR


def require_supported() -> None:
    """Raises ImportError with :func:`unsupported_message` unless the installed transformers is supported."""
    version = transformers_version()
    if not is_supported(version):
        raise ImportError(unsupported_message(version))


def register() -> None:
    """Registers model_type "melt": :mod:`melt_kernels.hf`'s classes, or a refusing config on other versions."""
    version = transformers_version()
    if is_supported(version):
        importlib.import_module("melt_kernels.hf")  # registers on import
        return
    from transformers import AutoConfig, PretrainedConfig

    from melt_kernels.model import CHECKPOINT_MODEL_TYPE

    class UnsupportedMeltConfig(PretrainedConfig):
        model_type = CHECKPOINT_MODEL_TYPE

        def __init__(self, **kwargs):
            raise ImportError(unsupported_message(version))

    AutoConfig.register(CHECKPOINT_MODEL_TYPE, UnsupportedMeltConfig, exist_ok=True)
