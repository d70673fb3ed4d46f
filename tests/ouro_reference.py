"""Tiny Ouro checkpoints and an independent float64 forward of Ouro and MELT, written from docs/models.md's
Ouro checkpoints and gates (docs/models.md#ouro-checkpoints, docs/models.md#the-gates).

Nothing here imports melt_kernels: the checkpoint is laid out from Ouro's
tensor names (plus the MELT gate names of the converted format), and the
forward reads the weights by name from a plain dict, one loop and layer at a
time, attention by an explicit causal mask over a growing cache.

* :func:`forward` with ``cache="looplm"`` is Ouro: one cache per (loop,
  layer), every loop written through, all T loops run.
* With ``cache="melt"`` it is MELT: one cache per layer, each chunk's tokens
  overwriting (no gate, or a gate that keeps nothing: last-step reuse) or
  blending their slots loop after loop, the earlier chunks settled.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

F64 = torch.float64


def tiny_config(**overrides) -> dict:
    """A config.json of a tiny Ouro (GQA, 3 loops), in Ouro's own fields."""
    config = dict(architectures=["OuroForCausalLM"], model_type="ouro", vocab_size=40, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                  max_position_embeddings=128, total_ut_steps=3, early_exit_threshold=1.0,
                  tie_word_embeddings=False, use_sliding_window=False, sliding_window=None, max_window_layers=2,
                  attention_dropout=0.0, initializer_range=0.02, use_cache=True, bos_token_id=0, eos_token_id=0,
                  pad_token_id=None, torch_dtype="float32", transformers_version="4.54.0")
    config.update(overrides)
    return config


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Ouro's tensor names and shapes (docs/models.md#ouro-checkpoints) (nn.Linear weights are (out, in))."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "model.early_exit_gate.weight": (1, hidden), "model.early_exit_gate.bias": (1,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (q_out, hidden),
                       p + "self_attn.k_proj.weight": (kv_out, hidden), p + "self_attn.v_proj.weight": (kv_out, hidden),
                       p + "self_attn.o_proj.weight": (hidden, q_out), p + "input_layernorm_2.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,), p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                       p + "post_attention_layernorm_2.weight": (hidden,)})
    return shapes


def gate_shapes(config: dict, gate: str) -> dict[str, tuple[int, ...]]:
    """The MELT gate tensors of a converted checkpoint: latent W_z (+ b_z), U_z; or the K/V gate's projection."""
    hidden, shapes = config["hidden_size"], {}
    width = config["num_key_value_heads"] * (config["head_dim"] if gate == "kv-element" else 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn.melt_gate."
        if gate == "latent":
            shapes.update({p + "w_z.weight": (hidden, hidden), p + "w_z.bias": (hidden,),
                           p + "u_z.weight": (hidden, hidden)})
        else:
            shapes.update({p + "proj.weight": (width, hidden), p + "proj.bias": (width,)})
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """float64 weights: matrices ~ N(0, 1/fan_in), the embedding ~ N(0, 1), every vector (norm weights
    included, so that a swapped norm shows) ~ 1 + N(0, 0.3^2), the exit gate scaled so that its
    probabilities spread over the loops."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=gen, dtype=F64)
        if name == "model.embed_tokens.weight":
            weights[name] = noise
        elif name.startswith("model.early_exit_gate"):
            weights[name] = 3 * noise / math.sqrt(shape[-1]) if len(shape) == 2 else 0.5 * noise
        else:
            weights[name] = noise / math.sqrt(shape[-1]) if len(shape) == 2 else 1 + 0.3 * noise
    return weights


def write_checkpoint(path, config: dict, weights: dict[str, torch.Tensor], shards: int = 1,
                     dtype: torch.dtype = F64) -> None:
    """config.json and the weights in ``dtype``: one model.safetensors, or ``shards`` files listed in
    model.safetensors.index.json.  A stale ``rotary_emb.inv_freq`` buffer rides along, as in old checkpoints."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tensors = {name: t.to(dtype).contiguous() for name, t in weights.items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4, dtype=dtype)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=1)


def write_tokenizer(path, lines: list[str]):
    """A word-level tokenizer of ``lines`` as a checkpoint ships one: tokenizer.json (the tokenizers package) and a
    tokenizer_config.json naming its class and its end-of-sequence token "</s>"; returns the tokenizer."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "[UNK]"}, f)
    return tok


# ---------------------------------------------------------------- the forward


def rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    """x (B, M, H, D) rotated at integer positions (B, M): pairs (j, j + D/2) by pos * theta^(-2j/D)."""
    dim = x.shape[-1]
    angles = positions[..., None].to(F64) * theta ** (-torch.arange(0, dim, 2, dtype=F64) / dim)  # [B, M, D/2]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    a, b = x[..., :dim // 2], x[..., dim // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def causal_attention(q, keys, values, positions):
    """q (B, M, Hq, D) at positions (B, M) over keys/values (B, S, Hkv, D): position p sees keys 0..p."""
    group = q.shape[2] // keys.shape[2]
    keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bmhd,bshd->bhms", q, keys) / math.sqrt(q.shape[-1])
    visible = torch.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]  # [B, M, S]
    scores = scores.masked_fill(~visible[:, None], -math.inf)
    return torch.einsum("bhms,bshd->bmhd", scores.softmax(-1), values)


def forward(w: dict, config: dict, ids: torch.Tensor, chunk_size: int, cache: str, gate=None, teacher=None,
            truncate=False) -> dict:
    """Chunk-wise float64 run of ids (B, P): {"logits" (last loop), "hidden" (T, B, P, hidden) after each loop's
    norm, "exit_logits" (T, B, P), "kv" (the caches at the end, by (loop, layer) or layer)}.  ``gate`` (MELT
    cache only): None (write-through), "latent", "kv-head" or "kv-element", its weights read from ``w`` under the
    converted checkpoint's names.

    ``teacher=(teacher_weights, lam)`` (MELT cache only) is the interpolated transition
    (docs/training.md#the-recipe): attention at loop r reads lam * (the MELT cache as it stands) + (1 - lam) *
    (the teacher's loop-r cache after a LoopLM run of the whole sequence), position by position.  ``truncate``
    cuts the caches' gradient at every chunk boundary (truncated backpropagation: later chunks read the settled
    values as constants)."""
    c = config
    loops, layers, eps, theta = c["total_ut_steps"], c["num_hidden_layers"], c["rms_norm_eps"], c["rope_theta"]
    heads, heads_kv, dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    batch, length = ids.shape
    store = {}
    hidden_parts, exit_parts = [], []
    if teacher is not None:
        teacher_kv, lam = forward(teacher[0], config, ids, length, "looplm")["kv"], teacher[1]

    def lin(x, name):
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    for start in range(0, length, chunk_size):
        chunk = ids[:, start:start + chunk_size]
        m = chunk.shape[1]
        if truncate:
            store = {key: (K.detach(), V.detach()) for key, (K, V) in store.items()}
        positions = torch.arange(start, start + m).expand(batch, m)
        h = w["model.embed_tokens.weight"][chunk]
        latent = {}
        hidden, exits = [], []
        for r in range(loops):
            for i in range(layers):
                p = f"model.layers.{i}."
                key = (r, i) if cache == "looplm" else i
                K, V = store.setdefault(key, (torch.zeros(batch, length, heads_kv, dim, dtype=F64),) * 2)
                K, V = K.clone(), V.clone()
                x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
                q = rope(lin(x, p + "self_attn.q_proj").unflatten(-1, (heads, dim)), positions, theta)
                source = x
                if cache == "melt" and gate == "latent":
                    if r > 0:
                        gate_in = lin(x, p + "self_attn.melt_gate.w_z") + lin(latent[i], p + "self_attn.melt_gate.u_z")
                        z = torch.sigmoid(gate_in)
                        source = z * latent[i] + (1 - z) * x
                    latent[i] = source
                k = rope(lin(source, p + "self_attn.k_proj").unflatten(-1, (heads_kv, dim)), positions, theta)
                v = lin(source, p + "self_attn.v_proj").unflatten(-1, (heads_kv, dim))
                if cache == "melt" and gate in ("kv-head", "kv-element") and r > 0:
                    alpha = torch.sigmoid(lin(x, p + "self_attn.melt_gate.proj")).unflatten(-1, (heads_kv, -1))
                    k = alpha * K[:, start:start + m].clone() + (1 - alpha) * k
                    v = alpha * V[:, start:start + m].clone() + (1 - alpha) * v
                K[:, start:start + m], V[:, start:start + m] = k, v
                store[key] = (K, V)
                if teacher is not None:
                    K = lam * K + (1 - lam) * teacher_kv[(r, i)][0]
                    V = lam * V + (1 - lam) * teacher_kv[(r, i)][1]
                attn = causal_attention(q, K, V, positions).flatten(-2)
                h = h + rms_norm(lin(attn, p + "self_attn.o_proj"), w[p + "input_layernorm_2.weight"], eps)
                y = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
                swiglu = torch.nn.functional.silu(lin(y, p + "mlp.gate_proj")) * lin(y, p + "mlp.up_proj")
                mlp = lin(swiglu, p + "mlp.down_proj")
                h = h + rms_norm(mlp, w[p + "post_attention_layernorm_2.weight"], eps)
            h = rms_norm(h, w["model.norm.weight"], eps)
            hidden.append(h)
            exits.append(lin(h, "model.early_exit_gate")[..., 0])
        hidden_parts.append(torch.stack(hidden))
        exit_parts.append(torch.stack(exits))
    hidden = torch.cat(hidden_parts, dim=2)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return {"logits": hidden[-1] @ head.T, "hidden": hidden, "exit_logits": torch.cat(exit_parts, dim=2), "head": head,
            "kv": store}


def exit_probabilities(exit_logits: torch.Tensor) -> torch.Tensor:
    """Ouro's exit distribution p(t) (docs/models.md#ouro-checkpoints) over the loops (first dimension), loop by
    loop."""
    lam = torch.sigmoid(exit_logits)
    probs, survival = [], torch.ones_like(lam[0])
    for t in range(lam.shape[0]):
        probs.append(survival if t == lam.shape[0] - 1 else lam[t] * survival)
        survival = survival * (1 - lam[t])
    return torch.stack(probs)


def exit_choice(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The first loop (0-based) whose cumulative probability reaches ``threshold``, else the last; per token."""
    flat = probs.reshape(probs.shape[0], -1)
    choice = []
    for j in range(flat.shape[1]):
        total, pick = 0.0, flat.shape[0] - 1
        for t in range(flat.shape[0]):
            total += float(flat[t, j])
            if total >= threshold:
                pick = t
                break
        choice.append(pick)
    return torch.tensor(choice).reshape(probs.shape[1:])
