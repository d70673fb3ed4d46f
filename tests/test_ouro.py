"""Ouro checkpoints through melt_kernels.ouro against the independent float64 forward of tests/ouro_reference.py.

Tiny random checkpoints with Ouro's real tensor names (norm weights randomised, so a swapped norm shows),
single-file and sharded, are loaded with load_ouro and must give Ouro's logits, per-loop hidden states and exit
distribution at any chunking; converted to MELT they must give last-step reuse, and with trained (random) gates
the gate equations of docs/models.md#the-gates.  Everything runs on backend="reference" in float64 unless said
otherwise.
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from melt_kernels import LoopedLMConfig, available_backends, kv_bytes_per_token
from melt_kernels.model import GATES, KEEP_NOTHING_LOGIT
from melt_kernels.ouro import load_ouro, main as ouro_main, to_melt
from ouro_reference import (exit_choice, exit_probabilities, forward, gate_shapes, random_weights, tensor_shapes,
                            tiny_config, write_checkpoint)
from utils import randomise_gates

TOL = dict(atol=1e-10, rtol=1e-10)
BATCH, LENGTH = 2, 7
CHUNKINGS = [1, 3, LENGTH]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ouro(tmp_path_factory):
    """(config, weights, {"single": dir, "sharded": dir}) of one tiny random Ouro checkpoint, written twice."""
    config = tiny_config()
    weights = random_weights(tensor_shapes(config), seed=1)
    root = tmp_path_factory.mktemp("ouro")
    dirs = {"single": root / "single", "sharded": root / "sharded"}
    write_checkpoint(dirs["single"], config, weights)
    write_checkpoint(dirs["sharded"], config, weights, shards=3)
    return config, weights, dirs


def token_ids(seed, batch=BATCH, length=LENGTH, vocab=40):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, kind, ids, chunk_size):
    cache = model.new_cache(kind, ids.shape[0], ids.shape[1])
    return model.prefill(ids, cache, chunk_size, return_loops=True)


# ---------------------------------------------------------------- Ouro, loaded


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("chunk_size", CHUNKINGS)
def test_loaded_checkpoint_computes_ouro_at_any_chunking(ouro, layout, chunk_size):
    """The LoopLM cache: logits of the last loop, every loop's hidden state after model.norm and the exit gate's
    logits equal Ouro's full-sequence forward, whatever the chunking (Ouro does not depend on it)."""
    config, weights, dirs = ouro
    model = load_ouro(dirs[layout], backend="reference")
    assert model.model.embed_tokens.weight.dtype == torch.float64 and model.num_loops == 3
    ids = token_ids(0)
    want = forward(weights, config, ids, LENGTH, "looplm")
    logits, loops = run(model, "looplm", ids, chunk_size)
    torch.testing.assert_close(logits, want["logits"], **TOL)
    torch.testing.assert_close(loops.hidden_states, want["hidden"], **TOL)
    torch.testing.assert_close(loops.exit_logits, want["exit_logits"], **TOL)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
def test_exit_gate_probabilities_and_choice_are_ouros(ouro, threshold):
    """p(t) = lambda_t S_{t-1}, p(T) = S_{T-1}; the exit is the first loop whose cumulative p reaches the
    threshold, and with config.exit_threshold set, that loop's h feeds lm_head, token by token."""
    config, weights, dirs = ouro
    model = load_ouro(dirs["single"], backend="reference")
    ids = token_ids(1)
    want = forward(weights, config, ids, LENGTH, "looplm")
    want_probs = exit_probabilities(want["exit_logits"])
    choice = exit_choice(want_probs, threshold)
    _, loops = run(model, "looplm", ids, 3)
    torch.testing.assert_close(loops.exit_probabilities(), want_probs, **TOL)
    assert torch.equal(loops.exit_loop(threshold), choice)
    model.config.exit_threshold = threshold
    picked = want["hidden"].gather(0, choice[None, ..., None].expand(1, *want["hidden"].shape[1:]))[0]
    torch.testing.assert_close(run(model, "looplm", ids, 3)[0], picked @ want["head"].T, **TOL)
    # The tokens do not all exit at the same loop, so the choice is exercised.
    assert len(set(choice.flatten().tolist())) > 1, choice


# ---------------------------------------------------------------- conversion to MELT


def set_gate_logit(model, logit):
    """Every gate's bias (b_z, b_g) to ``logit``; the gates' weights are 0 after conversion."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("melt_gate.w_z.bias", "melt_gate.proj.bias")):
                param.fill_(logit)


@pytest.mark.parametrize("gate", GATES)
def test_converted_model_starts_as_ouro_with_last_step_reuse(ouro, gate):
    """Conversion keeps every Ouro weight and adds gates that keep nothing (weights 0, z = alpha = sigmoid(-10)
    = 4.5e-5), trainable.  With a MELT cache, one chunk from an empty cache is Ouro, and any chunking (chunk 1 is
    token-by-token decoding) is last-step reuse, to within what a 4.5e-5 blend of O(1) slot values makes of these
    random weights (< 5e-3 on logits of size ~5); the deviation is the gate's alone: linear in z, and nil at
    z = 0."""
    config, weights, dirs = ouro
    ouro_model = load_ouro(dirs["single"], backend="reference")
    melt = to_melt(ouro_model, gate)
    assert melt.config.gate == gate and ouro_model.config.gate is None
    state, ouro_state = melt.state_dict(), ouro_model.state_dict()
    for name, tensor in ouro_state.items():
        assert torch.equal(state[name], tensor) and state[name].data_ptr() != tensor.data_ptr(), name
    gates = {n: p for n, p in melt.named_parameters() if ".melt_gate." in n}
    assert set(gates) == set(gate_shapes(config, gate))
    for name, param in gates.items():
        assert param.requires_grad and param.dtype == torch.float64
        assert torch.all(param == (KEEP_NOTHING_LOGIT if name.endswith("bias") else 0)), name
    assert torch.sigmoid(torch.tensor(KEEP_NOTHING_LOGIT)) < 1e-4

    ids = token_ids(2)
    want_ouro = forward(weights, config, ids, LENGTH, "looplm")["logits"]
    for chunk_size in CHUNKINGS:
        want = forward(weights, config, ids, chunk_size, "melt")["logits"]
        if chunk_size == LENGTH:
            torch.testing.assert_close(want, want_ouro, **TOL)  # one chunk from an empty cache: the same model
        deviation = (run(melt, "melt", ids, chunk_size)[0] - want).abs().max().item()
        assert deviation < 5e-3, (chunk_size, deviation)
        set_gate_logit(melt, KEEP_NOTHING_LOGIT - 2)
        smaller = (run(melt, "melt", ids, chunk_size)[0] - want).abs().max().item()
        assert smaller * math.exp(2) == pytest.approx(deviation, rel=0.02)
        set_gate_logit(melt, -math.inf)
        torch.testing.assert_close(run(melt, "melt", ids, chunk_size)[0], want, **TOL)
        set_gate_logit(melt, KEEP_NOTHING_LOGIT)
    # The teacher is untouched and still Ouro.
    torch.testing.assert_close(run(ouro_model, "looplm", ids, 2)[0], want_ouro, **TOL)


@pytest.mark.parametrize("gate", GATES)
def test_trained_gates_follow_spec_and_round_trip(ouro, gate, tmp_path):
    """With random (trained-looking) gate weights, the converted model saved by save_pretrained and loaded back by
    load_ouro computes the gates of docs/models.md#the-gates: latent z = sigmoid(x W_z + h_prev U_z + b_z),
    h = z h_prev + (1 - z) x, k, v from h; kv-head / kv-element K_slot = alpha K_old + (1 - alpha) k with
    alpha = sigmoid(W_g x + b_g); loop 1 writes through.  The independent forward reads the saved file's tensors
    by name."""
    config, weights, dirs = ouro
    melt = randomise_gates(to_melt(load_ouro(dirs["sharded"], backend="reference"), gate), seed=3)
    melt.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(tensor_shapes(config)) | set(gate_shapes(config, gate))
    back = load_ouro(tmp_path, backend="reference")
    assert back.config.gate == gate
    ids = token_ids(4)
    for chunk_size in (1, 3):
        want = forward(saved, config, ids, chunk_size, "melt", gate=gate)["logits"]
        torch.testing.assert_close(run(back, "melt", ids, chunk_size)[0], want, **TOL)
    # Not last-step reuse any more: the gates do something.
    assert (forward(saved, config, ids, 3, "melt")["logits"] - want).abs().max() > 1e-3


@pytest.mark.parametrize("gate", ["latent", "kv-element"])
def test_chunkwise_gradients_match_the_reference(ouro, gate):
    """Training: two chunks of 3 + 1 tokens on one MELT cache, 3 loops; gradients of every parameter, gates
    included (random, so that they pass gradient), against autograd through the independent forward."""
    config, _, dirs = ouro
    melt = randomise_gates(to_melt(load_ouro(dirs["single"], backend="reference"), gate), seed=5)
    gen = torch.Generator().manual_seed(5)
    ids = token_ids(5, length=4)
    probe = torch.randn(BATCH, 4, config["vocab_size"], generator=gen, dtype=torch.float64)
    params = dict(melt.named_parameters())
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    grads = torch.autograd.grad((run(melt, "melt", ids, 3)[0] * probe).sum(), list(params.values()),
                                allow_unused=True)
    want = torch.autograd.grad((forward(leaves, config, ids, 3, "melt", gate=gate)["logits"] * probe).sum(),
                               list(leaves.values()), allow_unused=True)
    for name, got, expected in zip(params, grads, want):
        if name.startswith("model.early_exit_gate"):  # the last loop feeds the head: the exit gate is not used
            assert got is None and expected is None
            continue
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{name}: {m}")
    assert all(g.abs().max() > 0 for n, g in zip(params, grads) if ".melt_gate." in n)


def test_to_melt_refuses_what_it_cannot_do(ouro):
    model = load_ouro(ouro[2]["single"], backend="reference")
    with pytest.raises(ValueError, match="gate must be one of"):
        to_melt(model, "head")
    with pytest.raises(ValueError, match="already has a 'latent' gate"):
        to_melt(to_melt(model, "latent"), "kv-head")


@pytest.mark.skipif("triton" not in available_backends(), reason="needs the Triton interpreter or a GPU")
def test_triton_backend_runs_ouro_and_melt_like_the_reference(ouro):
    """The loaded model in float32 on backend="triton" (the interpreter on a CPU) gives the reference backend's
    logits, LoopLM and converted MELT (latent gate), chunks of 3."""
    model = load_ouro(ouro[2]["single"], dtype="float32", backend="reference")
    melt = to_melt(model, "latent")
    ids = token_ids(6)
    for m, kind in ((model, "looplm"), (melt, "melt")):
        want = run(m, kind, ids, 3)[0]
        m.backend = "triton"
        torch.testing.assert_close(run(m, kind, ids, 3)[0], want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad checkpoints


def _drop(name):
    def edit(config, tensors):
        del tensors[name]
    return edit


def _add(name, shape):
    def edit(config, tensors):
        tensors[name] = torch.zeros(shape, dtype=torch.float64)
    return edit


def _reshape(name, shape):
    def edit(config, tensors):
        tensors[name] = torch.zeros(shape, dtype=torch.float64)
    return edit


def _set(**fields):
    def edit(config, tensors):
        config.update(fields)
    return edit


BAD = [
    ("missing tensor", _drop("model.layers.1.post_attention_layernorm_2.weight"), KeyError,
     "model.layers.1.post_attention_layernorm_2.weight"),
    ("missing head", _drop("lm_head.weight"), KeyError, "lm_head.weight"),
    ("extra tensor", _add("model.layers.0.self_attn.q_norm.weight", (16,)), ValueError, "q_norm"),
    ("extra layer", _add("model.layers.2.input_layernorm.weight", (32,)), ValueError, "model.layers.2"),
    ("mis-shaped tensor", _reshape("model.layers.0.self_attn.k_proj.weight", (64, 32)), ValueError, "k_proj"),
    ("mis-shaped norm", _reshape("model.norm.weight", (33,)), ValueError, "model.norm.weight"),
    ("sliding window on", _set(use_sliding_window=True), ValueError, "use_sliding_window"),
    ("sliding window size", _set(sliding_window=4096), ValueError, "sliding_window"),
    ("rope scaling", _set(rope_scaling={"rope_type": "linear", "factor": 2.0}), ValueError, "rope_scaling"),
    ("rope parameters", _set(rope_parameters={"rope_type": "yarn", "factor": 4.0}), ValueError, "rope_parameters"),
    ("activation", _set(hidden_act="gelu"), ValueError, "hidden_act"),
    ("dropout", _set(attention_dropout=0.1), ValueError, "attention_dropout"),
    ("attention bias", _set(attention_bias=True), ValueError, "attention_bias"),
    ("layer types", _set(layer_types=["full_attention", "sliding_attention"]), ValueError, "layer_types"),
    ("unknown field", _set(moe_num_experts=8), ValueError, "moe_num_experts"),
    ("melt field in ouro", _set(gate="latent"), ValueError, "gate"),
    ("model type", _set(model_type="llama"), ValueError, "model_type"),
    ("architecture", _set(architectures=["LlamaForCausalLM"]), ValueError, "architectures"),
    ("heads", _set(num_key_value_heads=3), ValueError, "num_key_value_heads"),
    ("shape from config", _set(intermediate_size=64), ValueError, "mlp"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_checkpoints_are_refused_naming_the_problem(ouro, tmp_path, case):
    _, edit, error, name = case
    config, weights, _ = ouro
    config, tensors = dict(config), dict(weights)
    edit(config, tensors)
    write_checkpoint(tmp_path, config, tensors)
    with pytest.raises(error, match=name.replace(".", r"\.")):
        load_ouro(tmp_path)


def test_bad_shard_index_is_refused(ouro, tmp_path):
    config, weights, dirs = ouro
    shutil.copytree(dirs["sharded"], tmp_path, dirs_exist_ok=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_ouro(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_ouro(tmp_path)


def test_checkpoint_variants_that_are_accepted(ouro, tmp_path):
    """A missing head_dim and num_key_value_heads are derived (hidden / heads, MHA), rope_parameters with a plain
    theta and transformers-5 metadata are accepted, a tied head is read from the embedding, dtype converts."""
    config, _, _ = ouro
    derived = dict(config, hidden_size=64, head_dim=16, num_key_value_heads=4, tie_word_embeddings=True,
                   rope_theta=500.0)
    weights = random_weights(tensor_shapes(derived), seed=7)
    config = {k: v for k, v in derived.items() if k not in ("head_dim", "num_key_value_heads")}
    config.update(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, dtype="float32")
    write_checkpoint(tmp_path, config, weights)
    model = load_ouro(tmp_path, dtype=torch.float32, backend="reference")
    assert (model.config.head_dim, model.config.num_key_value_heads, model.config.rope_theta) == (16, 4, 500.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = token_ids(7)
    want = forward(weights, derived, ids, LENGTH, "looplm")["logits"]
    torch.testing.assert_close(run(model, "looplm", ids, 2)[0].double(), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- memory and the command


def test_kv_bytes_per_token_of_ouro_1_4b():
    """docs/models.md#ouro-checkpoints: 24 layers x 4 loops x 2 x 2048 x 2 bytes = 786,432 per token for Ouro-1.4B
    in bf16, one pass 196,608; LoopedLMConfig's defaults are Ouro-1.4B's shape."""
    config = LoopedLMConfig()
    assert kv_bytes_per_token(config, "looplm", torch.bfloat16) == 24 * 4 * 2 * 2048 * 2 == 786_432
    assert kv_bytes_per_token(config, "melt", torch.bfloat16) == 196_608
    assert kv_bytes_per_token(config, "melt", torch.float32) == 2 * 196_608


def test_kv_bytes_per_token_is_what_the_caches_hold(ouro):
    model = load_ouro(ouro[2]["single"], backend="reference")
    for kind in ("melt", "looplm"):
        cache = model.new_cache(kind, 3, 10)
        kv = cache.nbytes - cache.seqlens.numel() * cache.seqlens.element_size()
        assert kv == 30 * kv_bytes_per_token(model.config, kind, torch.float64)


def test_convert_command(ouro, tmp_path, capsys):
    """python -m melt_kernels.ouro convert OURO_DIR OUT_DIR --gate latent: saves a MELT checkpoint that loads back
    (also through the package), reports the KV bytes per token, and generates with a progress bar what the
    converted model generates."""
    _, _, dirs = ouro
    out = tmp_path / "melt"
    result = ouro_main(["convert", str(dirs["sharded"]), str(out), "--gate", "latent", "--device", "cpu",
                        "--prompt-ids", "3 1 4 1 5", "--new-tokens", "4", "--chunk", "2"])
    printed = capsys.readouterr()
    model = load_ouro(out, backend="reference")
    assert model.config.gate == "latent"
    assert result["kv_bytes_per_token_ouro"] == 3 * result["kv_bytes_per_token_melt"] == \
        kv_bytes_per_token(model.config, "looplm", torch.float64)
    assert f"{result['kv_bytes_per_token_ouro']:,}" in printed.out and "4 tokens" in printed.out
    assert "generating" in printed.err and "4/4" in printed.err
    want = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), model.new_cache("melt", 1, 9), 4, chunk_size=2)
    assert result["tokens"] == want[0].tolist()
    assert result["gate_params"] == 2 * (2 * 32 * 32 + 32)


def test_docs_state_the_packages_kv_bytes():
    """docs/models.md's memory figures are what kv_bytes_per_token computes (its doctest-style line and the
    prose)."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    looplm, melt = (kv_bytes_per_token(LoopedLMConfig(), kind) for kind in ("looplm", "melt"))
    assert f"({looplm}, {melt})" in readme
    assert f"Ouro keeps {looplm:,} bytes" in readme and f"{melt:,} (one per layer)" in readme


# ---------------------------------------------------------------- GPU: fused kernels, bf16, Ouro-1.4B's layer shape


@pytest.fixture(scope="module")
def ouro_gpu_shape(tmp_path_factory):
    """A bf16 checkpoint with Ouro-1.4B's layer shape (hidden 2048, 16 heads x 128, SwiGLU 5632, theta 1e6, T = 4)
    but 2 layers and a small vocabulary, so that the float64 reference stays quick."""
    config = tiny_config(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, head_dim=128, rope_theta=1e6,
                         total_ut_steps=4, max_position_embeddings=65536)
    path = tmp_path_factory.mktemp("ouro_gpu")
    write_checkpoint(path, config, random_weights(tensor_shapes(config), seed=21), dtype=torch.bfloat16)
    return config, path


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind,gate,chunk_size", [("looplm", None, 16), ("melt", "latent", 16), ("melt", "kv-head", 4),
                                                  ("melt", "latent", 1)])
def test_gpu_fused_kernels_run_ouro_and_melt_in_bf16_within_the_rule(ouro_gpu_shape, backend, kind, gate,
                                                                     chunk_size):
    """Ouro and converted MELT in bf16 on the GPU with the fused kernels: the logits' error against the float64
    forward (on the bf16 weights) is within FlashAttention's rule of the same model on PyTorch's bf16 path."""
    from utils import assert_within_rule

    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    config, path = ouro_gpu_shape
    model = load_ouro(path, device="cuda", backend="reference")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    if gate is not None:
        model = to_melt(model, gate)
    weights = {name: t.double().cpu() for name, t in model.state_dict().items()}
    ids = token_ids(22, batch=2, length=16, vocab=512)
    exact = forward(weights, config, ids, chunk_size, kind, gate=gate)["logits"]
    low = run(model, kind, ids.cuda(), chunk_size)[0]
    model.backend = backend
    got = run(model, kind, ids.cuda(), chunk_size)[0]
    assert_within_rule(got, exact, low)
