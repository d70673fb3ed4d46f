"""The `melt` console script as a new user runs it: an Ouro folder and a text file in, a model out that loads in
transformers with its tokenizer and generates the package's tokens; status 0 and the summary printed once on
success; one line naming the argument, and status 2, on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ouro_reference import random_weights, tensor_shapes, tiny_config, write_checkpoint, write_tokenizer

MELT = os.path.join(os.path.dirname(sys.executable), "melt")
if not os.path.exists(MELT):
    pytest.skip("the package is not installed with its console scripts in this environment", allow_module_level=True)

LINES = ["the cat sat on the mat", "a dog sat on a log", "the dog saw the cat", "a cat saw the dog on a mat"]
TRAIN = ["--seq-len", "8", "--chunk", "4", "--batch", "2", "--transition-steps", "1", "--distill-steps", "1",
         "--threads", "1", "--no-progress", "--backend", "reference", "--eval-sequences", "2"]


def melt(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([MELT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ouro(tmp_path_factory):
    """A tiny Ouro checkpoint folder with its tokenizer, and a text corpus."""
    root = tmp_path_factory.mktemp("user")
    folder = root / "ouro"
    pytest.importorskip("tokenizers")
    vocab = write_tokenizer(folder, LINES).get_vocab_size()
    # eos None: transformers' generate and the package's both run their full length.
    config = tiny_config(vocab_size=vocab, eos_token_id=None, bos_token_id=None)
    write_checkpoint(folder, config, random_weights(tensor_shapes(config), seed=5), dtype=torch.float32)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(LINES[i % len(LINES)] for i in range(80)))
    return folder, corpus


def test_train_writes_a_model_that_transformers_loads_with_its_tokenizer(ouro, tmp_path):
    """`melt train --teacher OURO --data corpus.txt`: status 0, the summary once on stdout and no Python dict on
    stderr; final/ holds the tokenizer, and transformers' generate from text gives the package's tokens."""
    transformers = pytest.importorskip("transformers")
    from melt_kernels.hf_support import is_supported
    from melt_kernels.ouro import load_ouro

    folder, corpus = ouro
    done = melt("train", "--teacher", folder, "--data", corpus, "--out", tmp_path / "run", "--gate", "kv-head", *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["final"] == str(tmp_path / "run" / "final")
    assert not [line for line in done.stderr.splitlines() if line.startswith("{")], done.stderr
    final = tmp_path / "run" / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    if not is_supported(transformers.__version__):
        pytest.skip(f"melt_kernels.hf does not support transformers {transformers.__version__}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    model.backend = "reference"
    ids = tokenizer("the dog sat on", return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 4 and int(ids.max()) < model.config.vocab_size
    out = model.generate(ids, max_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
    package = load_ouro(final, backend="reference")
    want = package.generate(ids, package.new_cache("melt", 1, ids.shape[1] + 5), 5)
    assert torch.equal(out, want)


def test_convert_exits_zero_and_carries_the_tokenizer(ouro, tmp_path):
    folder, _ = ouro
    done = melt("convert", folder, tmp_path / "melt", "--device", "cpu", "--prompt-ids", "3 4 5", "--new-tokens", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("generated (2 tokens") == 1 and "{" not in done.stderr, done.stderr
    assert (tmp_path / "melt" / "tokenizer.json").is_file()


def truncated(folder, tmp_path):
    bad = tmp_path / "truncated"
    bad.mkdir()
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        (bad / name).write_bytes(data[:len(data) // 2] if name == "model.safetensors" else data)
    return bad


@pytest.mark.parametrize("case", ["no config.json", "truncated safetensors", "missing data file", "bad prompt ids"])
def test_bad_input_ends_in_one_line_naming_the_argument(ouro, tmp_path, case):
    folder, corpus = ouro
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "no config.json":
        runs = [(["train", "--teacher", empty, "--data", corpus], "melt train: error: argument --teacher: ",
                 "has no config.json"),
                (["convert", empty, tmp_path / "out"], "melt convert: error: argument ouro_dir: ",
                 "has no config.json")]
    elif case == "truncated safetensors":
        bad = truncated(folder, tmp_path)
        runs = [(["train", "--teacher", bad, "--data", corpus], "melt train: error: argument --teacher: ",
                 "model.safetensors cannot be read as safetensors"),
                (["convert", bad, tmp_path / "out"], "melt convert: error: argument ouro_dir: ",
                 "model.safetensors cannot be read as safetensors")]
    elif case == "missing data file":
        runs = [(["train", "--teacher", folder, "--data", tmp_path / "nowhere.txt"],
                 "melt train: error: argument --data: ", "nowhere.txt")]
    else:
        runs = [(["convert", folder, tmp_path / "out", "--prompt-ids", "1 x"], "melt convert: error: argument "
                 "--prompt-ids: ", "token ids"),
                (["convert", folder, tmp_path / "out", "--prompt-ids", "1 999"], "melt convert: error: argument "
                 "--prompt-ids: ", "below the vocabulary size")]
    for args, start, why in runs:
        extra = TRAIN if args[0] == "train" else []
        done = melt(*args, *extra, *(["--out", tmp_path / "run"] if args[0] == "train" else []))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines and lines[-1].startswith(start) and why in lines[-1], done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        if "token ids" not in why:  # argparse's own errors print the usage first
            assert len(lines) == 1, done.stderr
