"""The Hub's convention for architectures transformers does not ship: ``auto_map`` and the code it names.

A checkpoint saved by this package (:meth:`melt_kernels.model.LoopedLM.save_pretrained`, or
:class:`melt_kernels.hf.MeltForCausalLM`'s) carries, as Ouro's own checkpoints do, an ``auto_map`` in its
``config.json`` and the module it names, so that
``transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it wherever
melt_kernels is installed, without importing melt_kernels first.  That module holds no model code: it imports
the installed package's classes, so a checkpoint never forks the implementation it was saved with.
"""
from __future__ import annotations

import os
from typing import Union

MODULE = "modeling_melt"
AUTO_MAP = {"AutoConfig": f"{MODULE}.MeltConfig", "AutoModelForCausalLM": f"{MODULE}.MeltForCausalLM"}
SOURCE = '''"""MELT / looped-LM checkpoint code for transformers' trust_remote_code: the installed melt_kernels' classes.

pip install "melt_kernels[hf]"  (needs transformers 5.x)
"""
from melt_kernels.hf import MeltConfig, MeltForCausalLM

__all__ = ["MeltConfig", "MeltForCausalLM"]
'''


def write(path: Union[str, os.PathLike]) -> dict:
    """Writes the module ``auto_map`` names into checkpoint folder ``path``; returns the ``auto_map``."""
    with open(os.path.join(path, MODULE + ".py"), "w") as f:
        f.write(SOURCE)
    return dict(AUTO_MAP)
