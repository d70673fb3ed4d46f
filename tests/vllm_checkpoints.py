"""Tiny checkpoint folders that vLLM serves, and the package's own greedy tokens for them (the vLLM tests).

head_dim is 64: vLLM's CPU attention refuses 16 (tests/ouro_reference.py's default).  Weights are random
(ouro_reference.random_weights), gates randomised so that they do something (utils.randomise_gates), float32.
"""
import torch

from melt_kernels.ouro import load_ouro, to_melt
from ouro_reference import random_weights, tensor_shapes, tiny_config, write_checkpoint
from utils import randomise_gates

# The MELT gates, the latent one with Ouro's exit rule (each token's loop feeds the head), and Ouro itself.
KINDS = ("latent", "kv-head", "kv-element", "latent-exit", "ouro")
EXIT_THRESHOLD = 0.5


def served_config(**overrides) -> dict:
    # eos None: both sides generate their full length.
    return tiny_config(**{"hidden_size": 64, "head_dim": 64, "eos_token_id": None, **overrides})


def write_ouro(path, **overrides):
    config = served_config(**overrides)
    write_checkpoint(path, config, random_weights(tensor_shapes(config), seed=21), dtype=torch.float32)
    return path


def write_folder(path, kind: str):
    """An Ouro checkpoint (kind "ouro") or, for a gate kind, its conversion saved by save_pretrained."""
    if kind == "ouro":
        return write_ouro(path)
    ouro = load_ouro(write_ouro(path / "ouro"), backend="reference")
    melt = randomise_gates(to_melt(ouro, kind.removesuffix("-exit")), seed=22)
    if kind.endswith("-exit"):
        melt.config.exit_threshold = EXIT_THRESHOLD
    melt.save_pretrained(path / kind)
    return path / kind


def package_tokens(path, prompt: list[int], new: int) -> list[int]:
    """LoopedLM.generate of ``prompt`` alone, prefilled whole: Ouro on its LoopLM cache, MELT on its own."""
    model = load_ouro(path, backend="reference")
    kind = "looplm" if model.config.gate is None else "melt"
    ids = torch.tensor([prompt])
    return model.generate(ids, model.new_cache(kind, 1, len(prompt) + new), new)[0].tolist()
