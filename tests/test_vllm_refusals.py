"""The vLLM plugin refuses, when the engine's config is built and before any worker starts, what it cannot
serve as the package computes it, naming the cause.  Skipped without vLLM (its own venv: .ci/vllm.sh)."""
import os

import pytest

vllm = pytest.importorskip("vllm")

from safetensors.torch import load_file, save_file  # noqa: E402

from melt_kernels.ouro import load_ouro  # noqa: E402
from vllm_checkpoints import write_folder, write_ouro  # noqa: E402


def start(path, **engine_args):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return vllm.LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=64,
                    **engine_args)


def test_melt_checkpoint_missing_a_gate_tensor(tmp_path):
    path = write_folder(tmp_path, "kv-head")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.melt_gate.proj.bias"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"lacks tensor.*model\.layers\.1\.self_attn\.melt_gate\.proj\.bias"):
        start(path)


def test_quantised_kv_cache_with_a_kv_gate(tmp_path):
    """The K/V gates blend the slots' previous values as the model computed them: a quantised cache would hold
    others."""
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported with the 'kv-element' gate"):
        start(write_folder(tmp_path, "kv-element"), kv_cache_dtype="fp8")


def test_ouro_config_field_the_package_does_not_implement(tmp_path):
    with pytest.raises(ValueError, match="hidden_act='gelu' is not implemented"):
        start(write_ouro(tmp_path, hidden_act="gelu"))


def test_head_dim_the_engines_attention_refuses(tmp_path):
    with pytest.raises(ValueError, match="head_dim 16 is refused by the engine's attention backend"):
        start(write_ouro(tmp_path, hidden_size=32, head_dim=16))


def test_melt_checkpoint_without_a_gate(tmp_path):
    """A LoopedLM without a gate saves model_type "melt": it is Ouro, and the message says how to serve it."""
    load_ouro(write_ouro(tmp_path / "ouro"), backend="reference").save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="has no gate.*OuroForCausalLM"):
        start(tmp_path / "saved")
