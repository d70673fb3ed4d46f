"""The user's path end to end (docs/walkthrough.md): an Ouro folder and a text file in, `melt train` for a few
steps, and vLLM serves its `final/` as it is, with the teacher's tokenizer: greedy completions of text prompts
are the package's tokens.  Skipped without vLLM (its own venv: .ci/vllm.sh)."""
import os
import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm")

from ouro_reference import random_weights, tensor_shapes, write_checkpoint, write_tokenizer  # noqa: E402
from vllm_checkpoints import package_tokens, served_config  # noqa: E402

LINES = ["the cat sat on the mat", "a dog sat on a log", "the dog saw the cat", "a cat saw the dog on a mat"]
PROMPTS = ["the dog sat on", "a cat saw the"]
NEW = 6


def test_melt_train_output_serves_in_vllm_with_its_tokenizer(tmp_path):
    import torch
    from transformers import AutoTokenizer

    ouro = tmp_path / "ouro"
    vocab = write_tokenizer(ouro, LINES).get_vocab_size()
    config = served_config(vocab_size=vocab)
    write_checkpoint(ouro, config, random_weights(tensor_shapes(config), seed=23), dtype=torch.float32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES[i % len(LINES)] for i in range(80)))
    melt = os.path.join(os.path.dirname(sys.executable), "melt")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([melt, "train", "--teacher", str(ouro), "--data", str(corpus), "--out", str(tmp_path / "run"),
                           "--gate", "latent", "--seq-len", "8", "--chunk", "4", "--batch", "2",
                           "--transition-steps", "2", "--distill-steps", "2", "--eval-sequences", "0",
                           "--threads", "1", "--no-progress", "--backend", "reference"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    final = tmp_path / "run" / "final"

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = vllm.LLM(model=str(final), dtype="float32", enforce_eager=True, seed=0, max_model_len=64)
    try:
        params = vllm.SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokenizer = AutoTokenizer.from_pretrained(final)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer(prompt)["input_ids"]
        assert list(output.prompt_token_ids) == ids
        assert list(output.outputs[0].token_ids) == package_tokens(final, ids, NEW), prompt
        # The text is those tokens' words (vLLM's incremental detokenizer may put a space before the first, and
        # skips special tokens by default).
        text = tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)
        assert output.outputs[0].text.split() == text.split()
