"""Training checkpoints: the weights as safetensors, the rest of the run's state beside them.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNN``:

* ``config.json`` + ``model.safetensors``: :meth:`LoopedLM.save_pretrained`,
  so the folder also loads as a model (``load_ouro``, transformers);
* ``trainer_state.pt``: the step, the optimiser's and the scheduler's state,
  the data generator's and torch's RNG states and the recipe, loadable with
  ``torch.load(weights_only=True)``.

It is written to a temporary folder and renamed into place, so a folder with
``trainer_state.pt`` is complete; the newest ``keep`` are kept.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch
from safetensors.torch import load_file

from melt_kernels.model import LoopedLM

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"step-(\d{6,})$")


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step-{step:06d}")


def save(path: str, model: LoopedLM, state: dict, keep: Optional[int] = None) -> None:
    """Writes the checkpoint folder ``path`` (atomically), then deletes all but the newest ``keep`` beside it."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    if keep:
        for old in list_checkpoints(os.path.dirname(path))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: str) -> list[str]:
    """The complete checkpoint folders under ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := _STEP_DIR.match(name)) and os.path.isfile(os.path.join(folder, name, STATE_FILE))]
    return [path for _, path in sorted(found)]


def latest(out_dir: str) -> Optional[str]:
    """The newest complete checkpoint of run folder ``out_dir``, or None."""
    found = list_checkpoints(os.path.join(out_dir, "checkpoints"))
    return found[-1] if found else None


def load(path: str, model: LoopedLM, map_location=None) -> dict:
    """Loads the weights of checkpoint ``path`` into ``model`` (every tensor must match) and returns its state."""
    weights = load_file(os.path.join(path, "model.safetensors"), device="cpu")
    tied = model.config.tie_word_embeddings
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return torch.load(os.path.join(path, STATE_FILE), map_location=map_location or "cpu", weights_only=True)
