"""Ouro checkpoints: load them exactly, convert them to MELT, and the command that does both.

* :func:`load_ouro` reads an Ouro checkpoint (``config.json`` plus
  ``model.safetensors`` or the shards of ``model.safetensors.index.json``)
  into a :class:`~melt_kernels.model.LoopedLM` that computes Ouro, with
  safetensors only (no transformers).  The config and the tensors are
  checked strictly before any weight is read: a field it does not implement,
  a missing, extra or mis-shaped tensor is an error naming it.  It also reads
  back what :meth:`LoopedLM.save_pretrained` (or transformers'
  ``save_pretrained`` of :mod:`melt_kernels.hf`) wrote (model_type "melt").
* :func:`to_melt` adds a MELT gate to an Ouro model: "latent" is the MELT
  paper's gate, "kv-head" and "kv-element" this package's K/V-space gates
  (:mod:`melt_kernels.model`).  Every kind starts as "keep nothing", so the
  converted model is Ouro with last-step reuse.

The whole path on a real checkpoint::

    melt convert OURO_DIR OUT_DIR --gate latent     # or: python -m melt_kernels.ouro convert ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from typing import Optional, Union

import torch

from melt_kernels.cli import ArgumentProblem, reading, reporting
from melt_kernels.model import CHECKPOINT_MODEL_TYPE, GATES, KVGate, LatentGate, LoopedLM, LoopedLMConfig, \
    kv_bytes_per_token

PathLike = Union[str, os.PathLike]
OURO_MODEL_TYPE = "ouro"
ARCHITECTURES = {OURO_MODEL_TYPE: ["OuroForCausalLM"], CHECKPOINT_MODEL_TYPE: ["MeltForCausalLM"]}
# config.json fields that hold no computation: bookkeeping, initialisation, a cache switch; Qwen2's
# max_window_layers only matters with a sliding window, which is refused below.  So do transformers' private
# fields (a leading underscore: _name_or_path, and _commit_hash, which transformers 5.17 hands a config it loads).
IGNORED_FIELDS = frozenset({"architectures", "auto_map", "model_type", "dtype", "torch_dtype", "transformers_version",
                            "use_cache", "initializer_range", "max_window_layers"})
# Fields accepted only with the value Ouro uses (None: the field may also be absent); anything else is
# a feature this package does not implement.
FIXED_FIELDS = {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None, "rope_scaling": None,
                "attention_dropout": 0.0, "attention_bias": False, "mlp_bias": False}
# Fields only a converted (model_type "melt") checkpoint may set.
MELT_ONLY_FIELDS = frozenset({"gate", "exit_threshold"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- the config


def read_config(path: PathLike) -> LoopedLMConfig:
    """The :class:`LoopedLMConfig` of checkpoint folder ``path``'s ``config.json``, checked by :func:`config_fields`."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint folder")
    with open(file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not JSON ({e})") from e
    return LoopedLMConfig(**config_fields(raw))


def config_fields(raw: dict) -> dict:
    """The :class:`LoopedLMConfig` fields of a checkpoint's ``config.json`` (``raw``), checked strictly: the one
    reader of every runtime (:func:`load_ouro`, transformers' :class:`melt_kernels.hf.MeltConfig`, vLLM).

    Raises ValueError naming any field it does not implement (a sliding
    window, RoPE scaling, another activation, dropout, biases, a layer type
    other than full attention, an unknown field).
    """
    if not isinstance(raw, dict):
        raise ValueError(f"config.json must hold an object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type must be one of {sorted(ARCHITECTURES)}, got {model_type!r}")
    if raw.get("architectures", ARCHITECTURES[model_type]) != ARCHITECTURES[model_type]:
        raise ValueError(f"config.json: architectures must be {ARCHITECTURES[model_type]} for model_type "
                         f"{model_type!r}, got {raw['architectures']!r}")
    implemented = set(LoopedLMConfig.__dataclass_fields__) - (MELT_ONLY_FIELDS if model_type == OURO_MODEL_TYPE
                                                              else set())
    values = {}
    for name, value in raw.items():
        if name in implemented:
            values[name] = value
        elif name in FIXED_FIELDS:
            if value != FIXED_FIELDS[name]:
                raise ValueError(f"config.json: {name}={value!r} is not implemented (only {FIXED_FIELDS[name]!r})")
        elif name == "layer_types":
            if any(kind != "full_attention" for kind in value):
                raise ValueError(f"config.json: layer_types={value!r} is not implemented (only full_attention)")
        elif name == "rope_parameters":  # transformers 5's spelling of rope_theta and rope_scaling
            values.update(_rope_parameters(value, raw))
        elif name not in IGNORED_FIELDS and not name.startswith("_"):
            raise ValueError(f"config.json: field {name!r} is not implemented")
    return values


def _rope_parameters(value, raw: dict) -> dict:
    if value is None:
        return {}
    kind = value.get("rope_type", "default")
    extra = set(value) - {"rope_type", "rope_theta"}
    if kind != "default" or extra:
        raise ValueError(f"config.json: rope_parameters={value!r} is not implemented (plain RoPE only)")
    if "rope_theta" in value and "rope_theta" in raw and value["rope_theta"] != raw["rope_theta"]:
        raise ValueError(f"config.json: rope_parameters' rope_theta {value['rope_theta']} disagrees with "
                         f"rope_theta {raw['rope_theta']}")
    return {"rope_theta": value["rope_theta"]} if "rope_theta" in value else {}


# ---------------------------------------------------------------- the tensors


def read_headers(path: PathLike) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor name: (file, shape, safetensors dtype)} of the checkpoint, single-file or sharded, read from
    the safetensors headers only; a file that is not safetensors (truncated, say) is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    headers = {}
    for file in files:
        try:
            opened = safe_open(os.path.join(path, file), framework="pt")
        except SafetensorError as e:  # a truncated or corrupt file
            raise ValueError(f"{file} cannot be read as safetensors ({e})") from e
        with opened as f:
            for name in f.keys():
                if name in headers:
                    raise ValueError(f"tensor {name!r} is in both {headers[name][0]} and {file}")
                piece = f.get_slice(name)
                headers[name] = (file, tuple(piece.get_shape()), piece.get_dtype())
    if weight_map is not None:
        wrong = sorted(n for n in set(weight_map) | set(headers) if weight_map.get(n) != headers.get(n, (None,))[0])
        if wrong:
            raise ValueError(f"model.safetensors.index.json does not match its shards for tensor(s) {wrong[:5]}")
    return headers


def expected_tensors(config: LoopedLMConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor a checkpoint of ``config`` holds (a tied lm_head is not stored)."""
    with torch.device("meta"):
        model = LoopedLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")}


def check_tensors(config: LoopedLMConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raises KeyError for a missing tensor, ValueError for an extra or mis-shaped one, naming it.
    ``*.rotary_emb.inv_freq`` entries (recomputed, never read) are ignored."""
    expected = expected_tensors(config)
    present = {n: s for n, s in shapes.items() if not n.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(present))
    if missing:
        raise KeyError(f"the checkpoint lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise ValueError(f"the checkpoint has unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if present[name] != shape:
            raise ValueError(f"tensor {name!r} has shape {present[name]}, the config implies {shape}")


def _as_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_ouro(path: PathLike, dtype: Union[torch.dtype, str, None] = None,
              device: Union[torch.device, str, None] = None, backend: str = "auto") -> LoopedLM:
    """Loads an Ouro (or converted MELT) checkpoint folder into a :class:`LoopedLM`.

    ``dtype`` defaults to the checkpoint's (that of ``model.embed_tokens``),
    ``device`` to the CPU.  The config and every tensor's name and shape are
    checked (:func:`read_config`, :func:`check_tensors`) before any weight is
    read; the weights are then read once, straight into the model.  With a
    LoopLM cache the model computes Ouro (the last loop feeds the head;
    ``model.config.exit_threshold = model.config.early_exit_threshold``
    applies Ouro's exit rule).
    """
    from safetensors import safe_open

    config = read_config(path)
    headers = read_headers(path)
    check_tensors(config, {name: shape for name, (_, shape, _) in headers.items()})
    stored = headers["model.embed_tokens.weight"][2]
    if dtype is None and stored not in SAFETENSORS_DTYPES:
        raise ValueError(f"model.embed_tokens.weight is stored as {stored}: pass a floating dtype")
    dtype = _as_dtype(dtype) or SAFETENSORS_DTYPES[stored]
    device = torch.device(device or "cpu")
    expected = expected_tensors(config)
    state = {}
    for file in sorted({file for file, _, _ in headers.values()}):
        with safe_open(os.path.join(path, file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name).to(dtype)
    return _materialise(config, state, backend)


def _materialise(config: LoopedLMConfig, state: dict[str, torch.Tensor], backend: str) -> LoopedLM:
    """A LoopedLM of ``config`` whose parameters ARE the tensors of ``state`` (no copy, no initialisation);
    gates absent from ``state`` are created "keep nothing" beside them."""
    with torch.device("meta"):
        model = LoopedLM(config, backend=backend)
    if config.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    gates = {name: module for name, module in model.named_modules() if isinstance(module, (LatentGate, KVGate))}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or any(not key.startswith(tuple(gates)) for key in result.missing_keys):
        raise ValueError(f"state does not fit the model: unexpected {result.unexpected_keys}, missing "
                         f"{result.missing_keys}")
    reference = state["model.embed_tokens.weight"]
    for name, gate in gates.items():
        if any(key.startswith(name + ".") for key in result.missing_keys):
            gate.to_empty(device=reference.device).to(reference.dtype)
            gate.keep_nothing_()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# ---------------------------------------------------------------- conversion


def to_melt(model: LoopedLM, gate: str = "latent") -> LoopedLM:
    """A MELT model made from Ouro model ``model``: a copy of every weight plus a ``gate`` per layer.

    ``gate="latent"`` is the MELT paper's gate (W_z, U_z of hidden x hidden
    and b_z per layer, on the latent before the K/V projections);
    ``"kv-head"`` and ``"kv-element"`` are this package's K/V-space gates,
    fused in the kernel.  Every kind starts within 1e-4 of "keep nothing"
    (weights 0, bias -10: z, alpha = sigmoid(-10) = 4.5e-5), still trainable,
    so the converted model with a MELT cache is Ouro with last-step reuse:
    one chunk from an empty cache gives Ouro's logits, and decoding token by
    token keeps each token's last loop's K/V.  ``model`` is left as it is
    (it can serve as the teacher); ``del`` it to free its memory.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if model.config.gate is not None:
        raise ValueError(f"the model already has a {model.config.gate!r} gate")
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    melt = _materialise(replace(model.config, gate=gate), state, model.backend)
    return melt.train(model.training)


# ---------------------------------------------------------------- the command


def copy_tokenizer(source: PathLike, destination: PathLike) -> list[str]:
    """Copies the tokenizer files of checkpoint folder ``source`` (those it has of :data:`TOKENIZER_FILES`) into
    ``destination``, so that a model saved there loads and serves with its tokenizer; returns their names."""
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
    for name in copied:
        shutil.copy(os.path.join(source, name), os.path.join(destination, name))
    return copied


def token_ids(text: str) -> list[int]:
    """``--prompt-ids``' type: space-separated non-negative token ids."""
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected space-separated token ids, got {text!r}")
    return ids


def positive_int(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parser(prog="python -m melt_kernels.ouro") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Convert an Ouro checkpoint to MELT, save it, reload it and generate.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="OURO_DIR -> OUT_DIR (config.json + model.safetensors), then generate")
    c.add_argument("ouro_dir")
    c.add_argument("out_dir")
    c.add_argument("--gate", choices=GATES, default="latent",
                   help="latent: the MELT paper's gate; kv-head / kv-element: this package's (default latent)")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    c.add_argument("--device", help="default: cuda when available, else cpu")
    c.add_argument("--prompt", default="The capital of France is",
                   help="text prompt (needs transformers and the checkpoint's tokenizer files)")
    c.add_argument("--prompt-ids", type=token_ids, help="prompt as space-separated token ids (instead of --prompt)")
    c.add_argument("--new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    c.add_argument("--chunk", type=positive_int, help="prefill chunk size (default: the whole prompt)")
    c.add_argument("--no-generate", action="store_true", help="convert and save only")
    return p


def _tokenizer(path: PathLike):
    """The checkpoint's tokenizer through transformers, or None when either is missing."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(path)


def convert(args) -> dict:
    """Runs ``convert``; returns what it printed, as numbers.  A problem with an argument's file or folder is an
    :class:`~melt_kernels.cli.ArgumentProblem` naming the argument."""
    with reading("ouro_dir"):
        start = time.perf_counter()
        ouro = load_ouro(args.ouro_dir, args.dtype, args.device)
        tokenizer = None if args.no_generate or args.prompt_ids else _tokenizer(args.ouro_dir)
    if tokenizer is None and not (args.no_generate or args.prompt_ids):
        raise ArgumentProblem("argument --prompt: no tokenizer to encode it (needs transformers and the "
                              "checkpoint's tokenizer files): give --prompt-ids, or --no-generate")
    c = ouro.config
    ids = None if args.no_generate else args.prompt_ids or tokenizer(args.prompt)["input_ids"]
    if ids is not None and not (ids and max(ids) < c.vocab_size):
        raise ArgumentProblem(f"argument {'--prompt-ids' if args.prompt_ids else '--prompt'}: needs at least one "
                              f"token, each below the vocabulary size {c.vocab_size}, got {ids}")
    dtype = ouro.model.embed_tokens.weight.dtype
    params = sum(p.numel() for p in ouro.parameters())
    print(f"loaded {args.ouro_dir}: {c.num_hidden_layers} layers x T={c.total_ut_steps} loops, hidden "
          f"{c.hidden_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} kv) x {c.head_dim}, "
          f"{params:,} parameters, {str(dtype).removeprefix('torch.')} on {args.device} "
          f"({time.perf_counter() - start:.1f} s)")
    with reading("ouro_dir"):
        melt = to_melt(ouro, args.gate)
    del ouro
    gate_params = sum(p.numel() for n, p in melt.named_parameters() if ".melt_gate." in n)
    with reading("out_dir"):
        melt.save_pretrained(args.out_dir)
        copy_tokenizer(args.ouro_dir, args.out_dir)
    looplm, shared = (kv_bytes_per_token(c, kind, dtype) for kind in ("looplm", "melt"))
    print(f"converted with gate {args.gate!r} ({'the MELT paper' if args.gate == 'latent' else 'this package'}'s, "
          f"+{gate_params:,} parameters) and saved to {args.out_dir}")
    print(f"KV cache per token: Ouro {looplm:,} bytes (one cache per loop and layer), MELT {shared:,} bytes "
          f"(one per layer): {looplm / shared:.2f}x less")
    result = dict(gate=args.gate, params=params, gate_params=gate_params, kv_bytes_per_token_ouro=looplm,
                  kv_bytes_per_token_melt=shared)
    if args.no_generate:
        return result
    del melt
    model = load_ouro(args.out_dir, dtype, args.device)  # what a user of OUT_DIR gets
    prompt = torch.tensor([ids], device=args.device)
    cache = model.new_cache("melt", 1, prompt.shape[1] + args.new_tokens)
    start = time.perf_counter()
    tokens = model.generate(prompt, cache, args.new_tokens, chunk_size=args.chunk, progress=True)[0].tolist()
    seconds = time.perf_counter() - start
    text = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens))
    print(f"prompt ({len(ids)} tokens): {args.prompt if tokenizer is not None else ids}")
    print(f"generated ({args.new_tokens} tokens, {seconds:.1f} s): {text}")
    print(f"MELT cache for these {prompt.shape[1] + args.new_tokens} positions: {cache.nbytes:,} bytes; Ouro's "
          f"would hold {c.total_ut_steps}x its keys and values")
    return {**result, "prompt_ids": ids, "tokens": tokens, "cache_bytes": cache.nbytes}


def main(argv=None, prog="python -m melt_kernels.ouro") -> dict:
    """``convert``'s command line; returns what it printed, as numbers (the ``melt`` script drops it)."""
    p = parser(prog)
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with reporting(f"{p.prog} convert"):
        return convert(args)


if __name__ == "__main__":
    main(sys.argv[1:])
