"""Which transformers :mod:`melt_kernels.hf` works with, and what model_type "melt" says on the others.

:mod:`melt_kernels.hf` is written for transformers 5 (its config, cache and
generation APIs).  Ouro's model cards pin transformers 4.54, so many people
who have Ouro have a 4.x.  There, instead of registering nothing (and
transformers then saying only that it does not know model_type "melt"),
"melt" is registered as a config that refuses to load with what to do: the
version needed, and the transformers-free path (:func:`register_refusal`).
Importing :mod:`melt_kernels.hf` itself (as a checkpoint's ``auto_map`` code
does) raises the same message.  :mod:`melt_kernels` registers one or the other
when transformers is imported, of whatever version.
"""
from __future__ import annotations

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


def register_refusal() -> None:
    """Registers model_type "melt" as a config that refuses to load, naming the installed and the needed version
    (for a transformers :mod:`melt_kernels.hf` does not support)."""
    version = transformers_version()
    from transformers import AutoConfig, PretrainedConfig

    from melt_kernels.model import CHECKPOINT_MODEL_TYPE

    class UnsupportedMeltConfig(PretrainedConfig):
        model_type = CHECKPOINT_MODEL_TYPE

        def __init__(self, **kwargs):
            raise ImportError(unsupported_message(version))

    AutoConfig.register(CHECKPOINT_MODEL_TYPE, UnsupportedMeltConfig, exist_ok=True)
