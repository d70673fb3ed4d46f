"""transformers integration (melt_kernels.hf): Auto classes after `import melt_kernels`, save/load round trips,
and generate() against the package's own generation, batch 1 and padded batches, on a cache of one pass's size.

Models are float32 on backend="reference" (whatever TRITON_INTERPRET says), so that both sides run the same ops.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from melt_kernels.hf_support import is_supported  # noqa: E402

if not is_supported(transformers.__version__):  # the refusal on other majors is tested in test_install.py
    pytest.skip(f"melt_kernels.hf does not support transformers {transformers.__version__}",
                allow_module_level=True)

import melt_kernels  # noqa: E402  (registers model_type "melt")
import melt_kernels.model  # noqa: E402
from melt_kernels import remote_code  # noqa: E402
from melt_kernels.hf import CACHE_NAME, LoopCache, MeltConfig, MeltForCausalLM  # noqa: E402
from melt_kernels.ouro import load_ouro, to_melt  # noqa: E402
from ouro_reference import random_weights, tensor_shapes, tiny_config, write_checkpoint  # noqa: E402
from utils import randomise_gates  # noqa: E402

PAD = 39
NEW = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ouro_dir(tmp_path_factory):
    # eos None: generation runs its full length on both sides (the package's generate never stops early).
    config = tiny_config(eos_token_id=None, pad_token_id=PAD)
    path = tmp_path_factory.mktemp("ouro")
    write_checkpoint(path, config, random_weights(tensor_shapes(config), seed=11), dtype=torch.float32)
    return path


@pytest.fixture(scope="module", params=[None, "latent", "kv-head"])
def saved(request, ouro_dir, tmp_path_factory):
    """(the package's model, its save_pretrained folder): Ouro itself (gate None) or converted."""
    model = load_ouro(ouro_dir, backend="reference")
    if request.param is not None:  # trained-looking gates, so that the gate's path matters
        model = randomise_gates(to_melt(model, request.param), seed=12)
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    return model, path


def hf_load(path) -> MeltForCausalLM:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.backend = "reference"
    return model


def ids_of(seed, batch, length):
    return torch.randint(0, PAD, (batch, length), generator=torch.Generator().manual_seed(seed))


def package_generate(model, ids, new, chunk_size=None):
    kind = "melt" if model.config.gate is not None else "looplm"
    return model.generate(ids, model.new_cache(kind, ids.shape[0], ids.shape[1] + new), new, chunk_size=chunk_size)


def test_auto_classes_load_the_package_checkpoint_and_round_trip(saved, tmp_path):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained gives a MeltForCausalLM with the same tensors and
    logits; its own save_pretrained reads back through load_ouro and the Auto classes."""
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "melt" and config["auto_map"] == remote_code.AUTO_MAP
    hf = hf_load(path)
    assert isinstance(hf, MeltForCausalLM) and isinstance(hf.config, MeltConfig)
    assert hf.config.gate == model.config.gate and hf.config.head_dim == 16
    state = model.state_dict()
    assert hf.state_dict().keys() == state.keys()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = ids_of(0, 2, 6)
    kind = "melt" if model.config.gate is not None else "looplm"
    want = model.prefill(ids, model.new_cache(kind, 2, 6))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, want)

    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == remote_code.AUTO_MAP
    back = load_ouro(tmp_path, backend="reference")
    assert back.config == model.config
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert isinstance(hf_load(tmp_path), MeltForCausalLM)


def test_greedy_generate_is_the_packages(saved):
    """Batch 1, greedy: generate()'s new tokens are the package's (prefill in one chunk, then token by token)."""
    model, path = saved
    hf = hf_load(path)
    ids = ids_of(1, 1, 6)
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out[:, :6], ids)
    assert torch.equal(out[:, 6:], package_generate(model, ids, NEW))


def test_padded_batch_generates_each_row_as_alone(saved):
    """A left-padded batch: every row's new tokens are the package's generation of that row alone."""
    model, path = saved
    hf = hf_load(path)
    lengths = [6, 3, 5]
    rows = [ids_of(2 + i, 1, n) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - row.shape[1]:], mask[b, width - row.shape[1]:] = row[0], 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for b, row in enumerate(rows):
        assert torch.equal(out[b, width:], package_generate(model, row, NEW)[0]), b


def test_chunked_prefill_is_the_packages_chunking(saved):
    """generate(prefill_chunk_size=2) prefills chunk by chunk on the cache, as the package's chunk_size=2 does
    (for MELT the chunking matters)."""
    model, path = saved
    hf = hf_load(path)
    ids = ids_of(6, 1, 7)
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, prefill_chunk_size=2)
    assert torch.equal(out[:, 7:], package_generate(model, ids, NEW, chunk_size=2))


def test_cache_is_one_pass_whatever_the_loop_depth(saved):
    """The cache generate() returns holds keys and values for prompt + new - 1 positions: MELT's the same at T = 2
    and T = 4, Ouro's (no gate) T pairs per layer."""
    model, path = saved
    hf = hf_load(path)
    ids = ids_of(7, 2, 4)
    sizes = {}
    for loops in (2, 4):
        hf.config.total_ut_steps = loops
        out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        cache = out[CACHE_NAME]
        assert isinstance(cache, LoopCache) and cache.get_seq_length() == 4 + NEW - 1
        kind = "melt" if model.config.gate is not None else "looplm"
        per_token = melt_kernels.kv_bytes_per_token(hf.config, kind, torch.float32)
        assert cache.nbytes == 2 * (4 + NEW - 1) * per_token + 2 * 4
        sizes[loops] = cache.nbytes
    if model.config.gate is not None:
        assert sizes[2] == sizes[4]
    else:
        assert sizes[4] - 8 == 2 * (sizes[2] - 8)


def test_attention_is_the_fused_op_and_cache_update_is_never_called(saved, monkeypatch):
    """Every attention call of generate() is melt_kernels.gated_kv_attention (T x layers per forward, NEW
    forwards), never transformers' Cache.update followed by a separate attention."""
    model, path = saved
    hf = hf_load(path)
    calls, updates = [], []
    fused = melt_kernels.model.gated_kv_attention
    monkeypatch.setattr(melt_kernels.model, "gated_kv_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setattr(LoopCache, "update", lambda *a, **k: updates.append(1))
    hf.generate(ids_of(8, 1, 3), max_new_tokens=NEW, do_sample=False)
    assert len(calls) == NEW * hf.config.total_ut_steps * hf.config.num_hidden_layers and not updates


def test_forward_checks_its_inputs(saved):
    _, path = saved
    hf = hf_load(path)
    ids = ids_of(9, 2, 3)
    with pytest.raises(ValueError, match="attention_mask"):
        hf(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        hf(ids, inputs_embeds=torch.zeros(2, 3, 32))
    with pytest.raises(NotImplementedError, match="beam search"):
        hf.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="gate"):
        MeltConfig(gate="head")


def test_registration_needs_only_import_melt_kernels(ouro_dir, tmp_path):
    """A fresh interpreter: `import melt_kernels` is enough for the Auto classes (no trust_remote_code)."""
    to_melt(load_ouro(ouro_dir), "latent").save_pretrained(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Either order of the imports: melt_kernels registers at once, or when transformers is first imported.
    for imports in ("transformers, melt_kernels", "melt_kernels, transformers"):
        check = (f"import sys, {imports}; "
                 "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                 "assert type(m).__name__ == 'MeltForCausalLM' and m.config.gate == 'latent', type(m)")
        done = subprocess.run([sys.executable, "-c", check, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"import {imports}: {done.stderr}"


def test_trust_remote_code_loads_without_importing_melt_kernels(saved, tmp_path):
    """The Hub's convention: a fresh interpreter that never imports melt_kernels loads the checkpoint with
    trust_remote_code=True through its auto_map (the installed package's classes, same logits), and saving
    that model again writes the same auto_map and no copy of melt_kernels' source."""
    model, path = saved
    ids = ids_of(14, 2, 5)
    kind = "melt" if model.config.gate is not None else "looplm"
    torch.save({"ids": ids, "logits": model.prefill(ids, model.new_cache(kind, 2, 5))}, tmp_path / "want.pt")
    check = """if True:
        import json, os, sys, torch, transformers
        path, out = sys.argv[1], sys.argv[2]
        torch.set_num_threads(1)  # as this test's side (one_thread): the same reduction order, the same bits
        m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        assert type(m).__module__ == "melt_kernels.hf" and type(m).__name__ == "MeltForCausalLM", type(m)
        m.backend = "reference"
        want = torch.load(os.path.join(out, "want.pt"))
        with torch.no_grad():
            assert torch.equal(m(want["ids"]).logits, want["logits"])
        m.save_pretrained(os.path.join(out, "again"))
        files = sorted(os.listdir(os.path.join(out, "again")))
        assert [f for f in files if f.endswith(".py")] == ["modeling_melt.py"], files
        print(json.dumps(json.load(open(os.path.join(out, "again", "config.json")))["auto_map"]))
    """
    # No melt_kernels import before from_pretrained: TRITON_INTERPRET unset, and the check's own imports only.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    done = subprocess.run([sys.executable, "-c", check, str(path), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == remote_code.AUTO_MAP


@pytest.mark.gpu
def test_gpu_bf16_generate_is_the_packages(ouro_dir, tmp_path):
    """On the GPU in bf16 with the fastest backend on both sides: generate()'s tokens are the package's."""
    model = to_melt(load_ouro(ouro_dir, dtype=torch.bfloat16, device="cuda"), "latent")
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()
    assert hf.backend == model.backend == "auto"
    ids = ids_of(13, 1, 6).cuda()
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out[:, 6:], model.generate(ids, model.new_cache("melt", 1, 6 + NEW), NEW))


def test_transformers_config_is_the_package_config():
    """MeltConfig is LoopedLMConfig's face: an instance of it, with its fields (inherited, not restated) and
    defaults, checking values through it."""
    import dataclasses

    config = MeltConfig(hidden_size=64, num_attention_heads=4)
    assert isinstance(config, melt_kernels.LoopedLMConfig) and config.head_dim == 16
    assert not {"vocab_size", "gate", "total_ut_steps"} & set(vars(MeltConfig))
    package = {f.name: f.default for f in dataclasses.fields(melt_kernels.LoopedLMConfig)}
    assert {f.name: f.default for f in dataclasses.fields(MeltConfig) if f.name in package} == package


@pytest.mark.parametrize("field, value, message", [
    ("sliding_window", 64, "sliding_window=64 is not implemented"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not implemented"),
    ("attention_bias", True, "attention_bias=True is not implemented"),
    ("some_new_feature", 1, "field 'some_new_feature' is not implemented")])
def test_transformers_refuses_what_load_ouro_refuses(saved, tmp_path, field, value, message):
    """One reader of config.json (melt_kernels.ouro.config_fields): a field the package does not implement stops
    AutoConfig and AutoModelForCausalLM with load_ouro's message."""
    _, path = saved
    for name in os.listdir(path):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    for load in (load_ouro, transformers.AutoConfig.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(tmp_path)


def test_transformers_private_fields_are_bookkeeping(saved, tmp_path):
    """Fields with a leading underscore are transformers' own (_commit_hash, which transformers 5.17 hands a
    config it loads): read past, on every path, while an unknown public field is refused."""
    from melt_kernels.ouro import config_fields

    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config_fields({**config, "_commit_hash": "abc"}) == config_fields(config)
    with pytest.raises(ValueError, match="field 'commit_hash' is not implemented"):
        config_fields({**config, "commit_hash": "abc"})


def test_generate_without_cache_runs_each_step_as_one_chunk(saved):
    """use_cache=False: every step runs the whole sequence as one chunk on a fresh cache (for MELT, that is not
    decoding: each step is a one-chunk prefill), so the tokens are the argmax of one-chunk prefills."""
    model, path = saved
    hf = hf_load(path)
    ids = ids_of(14, 1, 4)
    out = hf.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    kind = "melt" if model.config.gate is not None else "looplm"
    for step in range(3):
        seen = out[:, :4 + step]
        with torch.no_grad():
            logits = model.prefill(seen, model.new_cache(kind, 1, seen.shape[1]), last_only=True)
        assert out[0, 4 + step] == logits[0, -1].argmax()
