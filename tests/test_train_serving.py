"""Issue 22: Ouro's objective, the serving schedules, the served evaluation and the user's tokenized data."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from melt_kernels.model import LoopedLM, LoopedLMConfig
from melt_kernels.ouro import to_melt
from melt_kernels.train import IGNORE, CopyTask, Phase, Recipe, TokenStream, Trainer, chunkwise_step, evaluate
from melt_kernels.train.data import Tokenizer, from_file, read_documents, split_held_out
from melt_kernels.train.evaluate import gate_retention
from melt_kernels.train.recipe import chunk_lengths, step_counts
from ouro_reference import write_tokenizer
from utils import randomise_gates, train_in_one_and_two_processes

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LoopedLMConfig(vocab_size=17, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=32, total_ut_steps=3, rope_theta=1e4)
TASK = CopyTask(num_symbols=16, length=5)  # sequences of 10, the first half's targets ignored


def tiny(seed=0, dtype=torch.float64, config=CONFIG) -> LoopedLM:
    torch.manual_seed(seed)
    model = LoopedLM(config, backend="reference").to(dtype)
    with torch.no_grad():  # a fresh exit gate says the same for every token: draw one that does not
        model.model.early_exit_gate.weight.normal_(0, 1.0)
    return model


def batch(rows=4, seed=0):
    return TASK.sample(rows, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- Ouro's objective


def ouro_loss_by_hand(model: LoopedLM, ids, targets, beta: float) -> torch.Tensor:
    """sum_t p(t|x) CE_t(x) - beta H(p(.|x)), averaged over the scored tokens, with the exit distribution written
    out loop by loop from docs/models.md#ouro-checkpoints: lambda_t = sigmoid(logit_t), p(t) = lambda_t
    prod_{j<t} (1 - lambda_j) for t < T, p(T) = prod_{j<T} (1 - lambda_j)."""
    _, loops = model.prefill(ids, model.new_cache("looplm", *ids.shape), return_loops=True)
    scored = targets != IGNORE
    T = model.num_loops
    survival = torch.ones(int(scored.sum()), dtype=torch.float64)
    expected = entropy = 0
    for t in range(T):
        ce = F.cross_entropy(model.lm_head(loops.hidden_states[t][scored]), targets[scored], reduction="none")
        lam = torch.sigmoid(loops.exit_logits[t][scored])
        p = survival * lam if t < T - 1 else survival
        survival = survival * (1 - lam)
        expected = expected + p * ce
        entropy = entropy - p * torch.log(p)
    return (expected - beta * entropy).mean()


@pytest.mark.parametrize("chunk_size", [10, 3])
def test_ouro_objective_is_the_expected_loss_minus_the_entropy(chunk_size):
    """The pre-training step under pretrain_objective="ouro" computes (and differentiates) Ouro's Stage I loss
    as an independent loop-by-loop computation does, in one chunk or several."""
    model, beta = tiny(), 0.05
    ids, targets = batch()
    phase = Recipe(seq_len=10, pretrain_steps=1, transition_steps=0, distill_steps=0, pretrain_objective="ouro",
                   exit_beta=beta).phases()[0]
    sums = chunkwise_step(model, (ids, targets), phase, chunk_size=chunk_size, counts=step_counts((ids, targets),
                                                                                                     model))
    scored = int((targets != IGNORE).sum())
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = ouro_loss_by_hand(model, ids, targets, beta)
    want.backward()
    assert float(sums.exit_ce - beta * sums.entropy) / scored == pytest.approx(want.item(), rel=1e-10)
    assert float(sums.entropy) > 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(got_grads[name], param.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_exit_gate_trains_under_ouro_and_is_frozen_otherwise():
    for objective, trains in (("ouro", True), ("last-loop", False)):
        model = tiny(dtype=torch.float32)
        before = model.model.early_exit_gate.weight.detach().clone()
        recipe = Recipe(seq_len=10, chunk_size=10, batch_size=4, pretrain_steps=2, transition_steps=0,
                        distill_steps=0, lr=1e-2, pretrain_objective=objective)
        trainer = Trainer(model, recipe, TASK, progress=False)
        records = trainer.run()
        gate = model.model.early_exit_gate.weight
        assert gate.requires_grad == trains
        assert (not torch.equal(gate.detach(), before)) == trains
        assert ("entropy" in records[-1]) == trains
    with pytest.raises(ValueError, match="exit gate"):
        Trainer(tiny(dtype=torch.float32), Recipe(seq_len=10, pretrain_steps=1, pretrain_objective="ouro"), TASK,
                progress=False)
    with pytest.raises(ValueError, match="pretrain_objective"):
        Recipe(pretrain_objective="first-loop")


# ---------------------------------------------------------------- schedules


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), size=st.integers(1, 12), decode=st.integers(0, 40))
def test_chunk_lengths_prefill_in_chunks_then_decode(length, size, decode):
    if decode > length:
        with pytest.raises(ValueError, match="decode_tokens"):
            chunk_lengths(length, size, decode)
        return
    lengths = chunk_lengths(length, size, decode)
    assert sum(lengths) == length and all(n >= 1 for n in lengths)
    prefix = lengths[:len(lengths) - decode]
    assert lengths[len(prefix):] == [1] * decode
    assert all(n == size for n in prefix[:-1]) and (not prefix or prefix[-1] <= size)


def test_trainer_runs_the_chunkings_of_the_schedule():
    """Every step's model calls run the chunk widths Recipe.chunking(step) promises: the cycle's size by step,
    the decoded tail one token at a time."""
    recipe = Recipe(seq_len=10, batch_size=4, pretrain_steps=4, transition_steps=0, distill_steps=0, lr=1e-3,
                    chunk_cycle=(4, 3), decode_tokens=3)
    assert [recipe.chunking(s) for s in range(3)] == [[4, 3, 1, 1, 1], [3, 3, 1, 1, 1, 1], [4, 3, 1, 1, 1]]
    model = tiny(dtype=torch.float32)
    widths = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    trainer = Trainer(model, recipe, TASK, progress=False)
    try:
        for step in range(recipe.total_steps):
            widths.clear()
            trainer.train_step()
            assert widths == recipe.chunking(step)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="chunk_cycle"):
        Recipe(chunk_cycle=(4, 0))
    with pytest.raises(ValueError, match="decode_tokens"):
        Recipe(seq_len=8, decode_tokens=9)


def test_step_takes_chunk_lengths_and_checks_them():
    """A list of chunk lengths runs the chunks it names (a LoopLM's loss does not depend on them); lengths that do
    not cover the sequence are refused."""
    ids, targets = batch()
    phase = Phase("pretrain", 1, Recipe(seq_len=10, pretrain_steps=1).phases()[0].weights)
    losses = []
    for chunks in ([10], [3, 3, 1, 1, 1, 1], 4):
        model = tiny()
        sums = chunkwise_step(model, (ids, targets), phase, chunk_size=chunks, counts=step_counts((ids, targets),
                                                                                                   model))
        losses.append(float(sums.ce))
    assert losses[1] == pytest.approx(losses[0], rel=1e-10) and losses[2] == pytest.approx(losses[0], rel=1e-10)
    with pytest.raises(ValueError, match="chunk_size"):
        chunkwise_step(tiny(), (ids, targets), phase, chunk_size=[3, 3], counts=(1, 1, 1))


# ---------------------------------------------------------------- the served evaluation


@pytest.mark.parametrize("prompt, chunk_size", [(5, 2), (3, None)])
def test_served_evaluation_is_a_chunked_prefill_then_decoding(prompt, chunk_size):
    model = randomise_gates(to_melt(tiny(), "latent"), seed=1)
    ids, targets = batch()
    got = evaluate(model, "melt", (ids, targets), chunk_size, prompt=prompt, per_loop=True)
    cache = model.new_cache("melt", *ids.shape)
    logits = [model.prefill(ids[:, :prompt], cache, chunk_size)]
    logits += [model(ids[:, j:j + 1], cache) for j in range(prompt, ids.shape[1])]
    logits = torch.cat(logits, dim=1)[:, prompt:]
    want = targets[:, prompt:]
    scored = want != IGNORE
    loss = F.cross_entropy(logits[scored], want[scored])
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert got["tokens"] == int(scored.sum())
    # The head reads the last loop: its per-loop entry is the loss itself.
    assert got["bits_per_token_per_loop"][-1] == pytest.approx(got["bits_per_token"], rel=1e-10)
    assert len(got["bits_per_token_per_loop"]) == model.num_loops
    with pytest.raises(ValueError, match="prompt"):
        evaluate(model, "melt", (ids, targets), 2, prompt=ids.shape[1])


def test_per_loop_losses_are_each_loops_hidden_state_through_the_head():
    model = tiny()
    ids, targets = batch()
    got = evaluate(model, "looplm", (ids, targets), 4, per_loop=True)["bits_per_token_per_loop"]
    _, loops = model.prefill(ids, model.new_cache("looplm", *ids.shape), return_loops=True)
    scored = targets != IGNORE
    want = [F.cross_entropy(model.lm_head(h[scored]), targets[scored]).item() / math.log(2)
            for h in loops.hidden_states]
    assert got == pytest.approx(want, rel=1e-10)
    assert len(set(got)) == model.num_loops


@pytest.mark.parametrize("gate", ["latent", "kv-head", "kv-element"])
def test_gate_retention_is_reported_per_loop(gate):
    """At conversion every gate keeps sigmoid(-10) of the old slot at every loop 2..T; trained-looking gates give
    each loop its own value; a model without gates has none."""
    model = to_melt(tiny(), gate)
    held = batch()
    at_init = gate_retention(model, held, 4)
    assert at_init == pytest.approx([1 / (1 + math.exp(10))] * (model.num_loops - 1), rel=1e-6)
    drawn = gate_retention(randomise_gates(model, seed=2), held, 4)
    assert len(drawn) == model.num_loops - 1 and len(set(drawn)) == len(drawn)
    assert all(0 < v < 1 for v in drawn)
    assert gate_retention(tiny(), held, 4) is None


# ---------------------------------------------------------------- the user's data


LINES = ["the cat sat on the mat", "a dog sat on a log", "the dog saw the cat"]


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A checkpoint folder holding a word-level tokenizer trained on LINES (tokenizer.json) that names its
    end-of-sequence token (tokenizer_config.json)."""
    pytest.importorskip("tokenizers")
    folder = tmp_path / "checkpoint"
    return folder, write_tokenizer(folder, LINES)


def test_text_and_jsonl_are_tokenized_by_the_checkpoints_tokenizer(tmp_path, tokenizer_dir):
    folder, tok = tokenizer_dir
    eos = tok.token_to_id("</s>")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(LINES))
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join([json.dumps({"text": LINES[0]}), "",
                                json.dumps({"prompt": LINES[1] + " ", "completion": LINES[2]})]) + "\n")
    tokenizer = Tokenizer(str(folder))
    assert tokenizer.eos_id == eos and tokenizer.vocab_size == tok.get_vocab_size()
    stream = from_file(str(text), None, 4, tokenizer)
    assert stream.tokens.tolist() == tok.encode("\n".join(LINES)).ids + [eos]
    assert stream.vocab_size == tok.get_vocab_size()
    stream = from_file(str(jsonl), None, 4, tokenizer)
    assert stream.tokens.tolist() == tok.encode(LINES[0]).ids + [eos] + tok.encode(LINES[1] + " " + LINES[2]).ids \
        + [eos]
    # Without a tokenizer a text file is its bytes, as before.
    assert from_file(str(text), None, 4).tokens.tolist() == list("\n".join(LINES).encode())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_documents(str(bad))


def test_held_out_split_keeps_the_last_tenth():
    tokens = torch.arange(100) % 7
    train, held = split_held_out(TokenStream(tokens, 7, 4))
    assert train.tokens.tolist() == tokens[:90].tolist() and held.tokens.tolist() == tokens[90:].tolist()


def test_cli_trains_on_tokenized_jsonl_and_ends_with_the_held_out_evaluation(tmp_path, tokenizer_dir, capsys):
    """`python -m melt_kernels.train --data corpus.jsonl`: the teacher folder's tokenizer encodes the documents,
    and the run ends with teacher and student evaluated on the held-out tenth in chunks, token by token and
    served."""
    folder, tok = tokenizer_dir
    config = LoopedLMConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32,
                            total_ut_steps=2, rope_theta=1e4)
    LoopedLM(config).save_pretrained(folder)
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": LINES[i % 3]}) + "\n" for i in range(60)))
    from melt_kernels.train.__main__ import main
    result = main(["--teacher", str(folder), "--out", str(tmp_path / "run"), "--data", str(data), "--seq-len", "8",
                   "--chunk", "4", "--decode-tokens", "2", "--batch", "2", "--transition-steps", "1",
                   "--distill-steps", "1", "--threads", "1", "--no-progress", "--backend", "reference",
                   "--eval-sequences", "4"])
    evaluation = result["eval"]
    for key in ("teacher", "teacher_served", "student", "student_decode", "student_served"):
        assert math.isfinite(evaluation[key]["loss"]), key
    assert evaluation["student"]["tokens"] == 4 * 8 and evaluation["student_served"]["tokens"] == 4 * 4
    assert len(evaluation["gate_retention"]) == 1
    with pytest.raises(SystemExit) as refused:
        main(["--teacher", str(folder), "--out", str(tmp_path / "refused"), "--data", str(data), "--seq-len", "8",
              "--pretrain-steps", "1", "--no-progress"])
    assert refused.value.code == 2
    assert "error: argument --pretrain-steps:" in capsys.readouterr().err


def test_two_processes_pretrain_with_ouros_objective_like_one(tmp_path):
    """`--gate none --pretrain-objective ouro` (a copy of the LoopLM pre-trained with the exit gate) under
    torchrun with 2 gloo processes gives the single process's losses and entropies, every step."""
    LoopedLM(CONFIG, backend="reference").save_pretrained(tmp_path / "teacher")
    args = ["--teacher", str(tmp_path / "teacher"), "--data", "copy", "--copy-length", "5", "--chunk", "4",
            "--batch", "4", "--gate", "none", "--pretrain-steps", "3", "--pretrain-objective", "ouro",
            "--transition-steps", "0", "--distill-steps", "0", "--lr", "1e-2", "--threads", "1", "--no-progress",
            "--backend", "reference", "--eval-sequences", "4"]
    one, two, *runs = train_in_one_and_two_processes(args, tmp_path)
    assert len(runs[0]) == len(runs[1]) == 3
    for a, b in zip(*runs):
        for key in ("loss", "ce", "exit_ce", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (key, a, b)
    for key in ("teacher", "student", "student_served"):
        assert two["eval"][key]["loss"] == pytest.approx(one["eval"][key]["loss"], rel=1e-9)
