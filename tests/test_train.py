"""melt_kernels.train: the interpolated transition against an independent float64 reference, the losses and their
gradients in both memory modes, the trainer (learning rates, lam ramp, checkpoints that resume mid-phase,
metrics), 1 against 2 processes under torchrun, and a seeded distillation that brings the MELT student to its
LoopLM teacher.

Everything runs on backend="reference" (the kernels have their own tests) in float64 where a result is compared
with another, float32 where the model is trained.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from melt_kernels import LoopLMCache, available_backends
from melt_kernels.model import GATES, LoopedLM, LoopedLMConfig, rope_tables
from melt_kernels.ouro import load_ouro, to_melt
from melt_kernels.train import (IGNORE, CopyTask, LossWeights, Phase, Recipe, TokenStream, Trainer, chunkwise_step,
                                evaluate, logit_kl, recorded_attention, stack_attention, stdlib_corpus,
                                task_metrics)
from melt_kernels.train.data import held_out, shard
from melt_kernels.train.recipe import step_counts
from ouro_reference import forward, random_weights, tensor_shapes, tiny_config, write_checkpoint
from utils import randomise_gates, train_in_one_and_two_processes

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-10, rtol=1e-10)
BATCH, LENGTH = 2, 7


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(config, teacher dir, student dir): two tiny random Ouro checkpoints (3 loops, GQA), the teacher and the
    base weights of the student, different so that a mix-up shows."""
    config = tiny_config()
    root = tmp_path_factory.mktemp("pair")
    for name, seed in (("teacher", 1), ("student", 2)):
        write_checkpoint(root / name, config, random_weights(tensor_shapes(config), seed=seed))
    return config, root / "teacher", root / "student"


def token_ids(seed, batch=BATCH, length=LENGTH, vocab=40):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def models(pair, gate, seed=3):
    """(teacher, student): the LoopLM teacher, and a MELT student with other base weights and random gates."""
    _, teacher_dir, student_dir = pair
    teacher = load_ouro(teacher_dir, backend="reference")
    return teacher, randomise_gates(to_melt(load_ouro(student_dir, backend="reference"), gate), seed=seed)


def run_transition(student, teacher, ids, chunk_size, lam):
    """The transition chunk-wise as the trainer runs it: the teacher on each chunk first, then the student."""
    cache, teacher_cache = (m.new_cache("looplm", *ids.shape) for m in (student, teacher))
    logits = []
    for chunk in ids.split(chunk_size, dim=1):
        with torch.no_grad():
            teacher(chunk, teacher_cache)
        logits.append(student(chunk, cache, transition=(teacher_cache, lam)))
    return torch.cat(logits, dim=1), cache


def weights_of(model, leaves=False):
    return {n: p.detach().clone().requires_grad_(leaves) for n, p in model.state_dict(keep_vars=True).items()}


# ---------------------------------------------------------------- the data


def test_copy_task_repeats_the_string_after_the_separator():
    task = CopyTask(num_symbols=5, length=6)
    ids, targets = task.sample(3, torch.Generator().manual_seed(0))
    assert task.vocab_size == 6 and task.seq_len == 12
    assert ids.shape == targets.shape == (3, 12) and ids.dtype == targets.dtype == torch.int64
    assert (ids[:, :6] < 5).all() and (ids[:, 6] == 5).all()
    assert torch.equal(ids[:, 7:], ids[:, :5])
    # Only the second copy is predictable: from the separator on, each target is the next token of the copy.
    assert (targets[:, :6] == IGNORE).all()
    assert torch.equal(targets[:, 6:], ids[:, :6])
    again = task.sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids)
    assert not torch.equal(task.sample(3, torch.Generator().manual_seed(1))[0], ids)
    with pytest.raises(ValueError, match="num_symbols"):
        CopyTask(num_symbols=1)


def test_token_stream_windows_predict_the_next_token():
    tokens = torch.arange(50) % 7
    stream = TokenStream(tokens, 7, seq_len=5)
    ids, targets = stream.sample(4, torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (4, 5)
    for row_ids, row_targets in zip(ids, targets):
        start = int(torch.nonzero(tokens == row_ids[0])[0])  # tokens repeat with period 7: any match will do
        assert torch.equal(row_targets[:-1], row_ids[1:]) and int(row_targets[-1]) == (int(row_ids[-1]) + 1) % 7
        assert start >= 0
    ids, targets = stream.windows(8)
    assert torch.equal(ids[:, 0], tokens[torch.arange(8) * 6])  # non-overlapping, evenly spread
    with pytest.raises(ValueError, match="do not fit"):
        stream.windows(9)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TokenStream(tokens, 6, 5)


def test_stdlib_corpus_split_is_by_file_name_and_complete():
    corpus = stdlib_corpus()
    train_names, held_names = corpus.files
    assert held_names and train_names and not set(train_names) & set(held_names)
    assert all(held_out(n) for n in held_names) and not any(held_out(n) for n in train_names)
    assert sorted(train_names + held_names) == sorted(n for n in os.listdir(corpus.root) if n.endswith(".py"))
    root = Path(corpus.root)
    assert corpus.held_out == b"".join((root / n).read_bytes() for n in held_names)
    assert len(corpus.train) == sum((root / n).stat().st_size for n in train_names)
    train, held = corpus.streams(16)
    assert train.vocab_size == held.vocab_size == 256
    assert corpus.describe()["held_out_bytes"] == len(corpus.held_out)


def test_shards_partition_the_global_batch():
    batch = CopyTask(4, 3).sample(6, torch.Generator().manual_seed(0))
    parts = [shard(batch, r, 3) for r in range(3)]
    for i in range(2):
        assert torch.equal(torch.cat([p[i] for p in parts]), batch[i])
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        shard(batch, 0, 4)


# ---------------------------------------------------------------- the interpolated transition


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("chunk_size,lam", [(3, 0.35), (1, 0.8), (LENGTH, 0.5), (2, 1.0), (3, 0.0)])
def test_transition_is_the_interpolated_model_of_spec(pair, gate, chunk_size, lam):
    """docs/training.md#the-recipe, phase 1, chunk-wise: at loop r, attention reads lam * KV_MELT + (1 - lam) *
    KV_LoopLM(r) at every position, the teacher's per-loop caches from its own run; logits against the
    independent float64 forward of tests/ouro_reference.py, teacher and student with different weights and
    trained-looking gates."""
    config = pair[0]
    teacher, student = models(pair, gate)
    ids = token_ids(4)
    got, _ = run_transition(student, teacher, ids, chunk_size, lam)
    want = forward(weights_of(student), config, ids, chunk_size, "melt", gate=gate,
                   teacher=(weights_of(teacher), lam))["logits"]
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("gate", GATES)
def test_transition_gradients_match_the_reference(pair, gate):
    """Gradients of every student parameter through the in-place chunk-wise transition (the interpolated pairs
    written by the op, the settled slots rewritten after each chunk) against autograd through the out-of-place
    reference: chunks of 3 + 3 + 1, lam 0.6."""
    config = pair[0]
    teacher, student = models(pair, gate, seed=6)
    ids = token_ids(6)
    probe = torch.randn(BATCH, LENGTH, config["vocab_size"], generator=torch.Generator().manual_seed(6),
                        dtype=torch.float64)
    params = dict(student.named_parameters())
    leaves = weights_of(student, leaves=True)
    got = torch.autograd.grad((run_transition(student, teacher, ids, 3, 0.6)[0] * probe).sum(), list(params.values()),
                              allow_unused=True)
    logits = forward(leaves, config, ids, 3, "melt", gate=gate, teacher=(weights_of(teacher), 0.6))["logits"]
    want = torch.autograd.grad((logits * probe).sum(), [leaves[n] for n in params], allow_unused=True)
    for name, g, w in zip(params, got, want):
        if name.startswith("model.early_exit_gate"):
            assert g is None and w is None
            continue
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name}: {m}")
    assert all(g.abs().max() > 0 for n, g in zip(params, got) if ".melt_gate." in n)


@pytest.mark.parametrize("gate", GATES)
def test_transition_endpoints_are_the_teacher_and_melt(pair, gate):
    """lam = 0 with the teacher's own weights is the teacher (whatever the gates); lam = 1 is MELT on a MELT cache,
    and the interpolated pairs then all hold MELT's settled cache."""
    teacher, _ = models(pair, gate)
    student = randomise_gates(to_melt(teacher, gate), seed=7)
    ids = token_ids(8)
    want_teacher = teacher.prefill(ids, teacher.new_cache("looplm", *ids.shape))
    melt_cache = student.new_cache("melt", *ids.shape)
    want_melt = student.prefill(ids, melt_cache, 3)
    torch.testing.assert_close(run_transition(student, teacher, ids, 3, 0.0)[0], want_teacher, **TOL)
    got, cache = run_transition(student, teacher, ids, 3, 1.0)
    torch.testing.assert_close(got, want_melt, **TOL)
    for loop in range(student.num_loops):
        for layer in range(student.config.num_hidden_layers):
            for got_t, want_t in zip(cache.layer(layer, loop), melt_cache.layer(layer)):
                torch.testing.assert_close(got_t, want_t, **TOL)
    assert (run_transition(student, teacher, ids, 3, 0.5)[0] - want_melt).abs().max() > 1e-6


def test_transition_input_is_checked_before_anything_is_written(pair):
    teacher, student = models(pair, "kv-head")
    ids = token_ids(2, batch=1, length=4)
    cache, teacher_cache = student.new_cache("looplm", 1, 8), teacher.new_cache("looplm", 1, 8)
    teacher(ids, teacher_cache)
    state = [t.clone() for t in cache.keys + teacher_cache.keys]
    with pytest.raises(TypeError, match="LoopLMCache"):
        student(ids, student.new_cache("melt", 1, 8), transition=(teacher_cache, 0.5))
    with pytest.raises(TypeError, match="LoopLMCache"):
        student(ids, cache, transition=(teacher.new_cache("melt", 1, 8), 0.5))
    with pytest.raises(ValueError, match="loops"):
        student(ids, cache, transition=(LoopLMCache(2, 2, 1, 8, 2, 16, dtype=torch.float64), 0.5))
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        student(ids, cache, transition=(teacher_cache, 1.5))
    with pytest.raises(ValueError, match="must hold this chunk"):
        student(ids, cache, transition=(teacher.new_cache("looplm", 1, 8), 0.5))
    with pytest.raises(ValueError, match="float32"):
        student(ids, cache, transition=(LoopLMCache(3, 2, 1, 8, 2, 16, dtype=torch.float32), 0.5))
    uneven = student.new_cache("looplm", 2, 8)
    uneven.advance(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one length"):
        student(token_ids(2, batch=2, length=1), uneven, transition=(teacher.new_cache("looplm", 2, 8), 0.5))
    for old, new in zip(state, cache.keys + teacher_cache.keys):
        assert torch.equal(old, new)
    assert cache.seqlens_host.tolist() == [0]
    attn = student.model.layers[0].self_attn
    rope = rope_tables(torch.zeros(1, 1, dtype=torch.long), 16, 1e4, torch.float64)
    with pytest.raises(ValueError, match="shared=False"):
        attn(torch.zeros(1, 1, 32, dtype=torch.float64), *cache.layer(0, 0), 0, 0, rope, shared=True,
             transition=(cache.keys[1][:, :1], cache.values[1][:, :1], 0.5))


# ---------------------------------------------------------------- losses and their gradients


def test_teacher_attention_is_recorded_per_loop_and_layer_and_joined_across_chunks(pair):
    """A LoopLM's outputs do not depend on the chunking, so the (T, N, B, P, hidden) stack of a run in chunks of 3
    equals a one-chunk run's: the calls are joined in (chunk, loop, layer) order."""
    teacher, _ = models(pair, "latent")
    ids = token_ids(3, length=8)
    with recorded_attention(teacher) as whole:
        logits = teacher.prefill(ids, teacher.new_cache("looplm", 2, 8))
    with recorded_attention(teacher) as outputs:
        chunked = teacher.prefill(ids, teacher.new_cache("looplm", 2, 8), 3)
    assert len(outputs) == 3 * 3 * 2
    attn = stack_attention(whole, 3, 2)
    assert attn.shape == (3, 2, 2, 8, 32)
    torch.testing.assert_close(stack_attention(outputs, 3, 2), attn, **TOL)
    torch.testing.assert_close(chunked, logits, **TOL)
    assert (attn[0] - attn[1]).abs().max() > 1e-6
    for layer in teacher.model.layers:
        assert not layer.self_attn._forward_hooks
    with pytest.raises(ValueError, match="multiple of T\\*N"):
        stack_attention(outputs[:-1], 3, 2)


def test_losses():
    gen = torch.Generator().manual_seed(4)
    student, teacher = (torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    targets = torch.tensor([[IGNORE, 3, IGNORE, 0, 6], [1, IGNORE, IGNORE, IGNORE, 2]])
    p_t = teacher.softmax(-1)
    want_kl = (p_t * (p_t.log() - student.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(logit_kl(student, teacher).double(), want_kl.mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logit_kl(student, teacher, "sum").double(), want_kl.sum(), atol=1e-5, rtol=1e-6)
    assert abs(logit_kl(teacher, teacher).item()) < 1e-6
    ce, acc = task_metrics(student, targets)
    scored = targets != IGNORE
    torch.testing.assert_close(ce.double(), F.cross_entropy(student[scored], targets[scored]), atol=1e-6, rtol=1e-6)
    hits = (student[scored].argmax(-1) == targets[scored]).sum().item()
    assert acc.item() == pytest.approx(hits / scored.sum().item(), abs=1e-7)


def step_grads(student, teacher, ids, phase, memory, lam=None, chunk_size=3):
    student.zero_grad(set_to_none=True)
    batch = (ids, ids.roll(-1, 1))
    sums = chunkwise_step(student, batch, phase, chunk_size=chunk_size, teacher=teacher, lam=lam, memory=memory,
                          counts=step_counts(batch, student))
    return sums, {n: p.grad for n, p in student.named_parameters()}


def reference_kl_grads(pair, student, teacher, ids, gate, **options):
    """Gradients of KL(teacher || student), averaged over positions, through the reference."""
    config = pair[0]
    leaves = weights_of(student, leaves=True)
    transition = options.pop("lam", None)
    teacher_w = weights_of(teacher)
    student_logits = forward(leaves, config, ids, 3, "melt", gate=gate,
                             teacher=None if transition is None else (teacher_w, transition), **options)["logits"]
    teacher_logits = forward(teacher_w, config, ids, LENGTH, "looplm")["logits"]
    log_s, log_t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return dict(zip(leaves, torch.autograd.grad(kl, list(leaves.values()), allow_unused=True)))


@pytest.mark.parametrize("gate", ["latent", "kv-element"])
@pytest.mark.parametrize("phase,lam", [("distill", None), ("transition", 0.6)])
def test_exact_step_is_the_gradient_of_the_chunkwise_loss(pair, gate, phase, lam):
    """memory="exact" and "recompute": the step's gradient of the KL term (averaged over the batch's positions)
    is autograd's through the whole chunk-wise reference, earlier chunks' cache writes included;
    memory="detach" is the gradient with the caches cut at every chunk boundary, and it differs from the exact
    one.  Chunks of 3 + 3 + 1."""
    teacher, student = models(pair, gate, seed=9)
    ids = token_ids(9)
    step = Phase(phase, 1, LossWeights(kl=1.0))
    _, got = step_grads(student, teacher, ids, step, "exact", lam)
    _, recomputed = step_grads(student, teacher, ids, step, "recompute", lam)
    want = reference_kl_grads(pair, student, teacher, ids, gate, lam=lam)
    _, truncated = step_grads(student, teacher, ids, step, "detach", lam)
    want_truncated = reference_kl_grads(pair, student, teacher, ids, gate, lam=lam, truncate=True)
    differs = False
    for name, grad in got.items():
        if name.startswith("model.early_exit_gate"):
            assert grad is None
            continue
        torch.testing.assert_close(grad, want[name], **TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(recomputed[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(truncated[name], want_truncated[name], **TOL, msg=lambda m: f"{name}: {m}")
        differs |= bool((grad - truncated[name]).abs().max() > 1e-8)
    assert differs


@pytest.mark.parametrize("memory", ["exact", "detach", "recompute"])
def test_step_terms_are_the_global_sums(pair, memory):
    """The step returns the sums of cross-entropy, KL and squared attention error over its rows, which the counts
    turn into the means the loss is made of; the attention term is against the teacher's outputs loop by loop.
    Every memory mode computes the same values."""
    teacher, student = models(pair, "kv-head")
    ids = token_ids(10)
    batch = (ids, ids.roll(-1, 1))
    sums = chunkwise_step(student, batch, Phase("distill", 1, LossWeights(kl=1.0, attn=0.1)), chunk_size=3,
                          teacher=teacher, counts=step_counts(batch, student), memory=memory)
    with torch.no_grad(), recorded_attention(student) as attn:
        logits = student.prefill(ids, student.new_cache("melt", *ids.shape), 3)
    with torch.no_grad(), recorded_attention(teacher) as teacher_attn:
        teacher_logits = teacher.prefill(ids, teacher.new_cache("looplm", *ids.shape))
    torch.testing.assert_close(sums.kl, logit_kl(logits, teacher_logits, "sum").double(), **TOL)
    want_attn = (stack_attention(attn, 3, 2) - stack_attention(teacher_attn, 3, 2)).pow(2).sum()
    torch.testing.assert_close(sums.attn, want_attn, **TOL)
    torch.testing.assert_close(sums.ce, F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), reduction="sum"),
                               **TOL)
    assert step_counts(batch, student) == (BATCH * LENGTH, BATCH * LENGTH, BATCH * LENGTH * 3 * 2 * 32)


def test_step_refuses_what_it_cannot_do(pair):
    teacher, student = models(pair, "latent")
    batch = (token_ids(1), token_ids(1))
    counts = step_counts(batch, student)
    with pytest.raises(ValueError, match="teacher"):
        chunkwise_step(student, batch, Phase("distill", 1, LossWeights(kl=1.0)), chunk_size=3, counts=counts)
    with pytest.raises(ValueError, match="lam"):
        chunkwise_step(student, batch, Phase("distill", 1, LossWeights(kl=1.0)), chunk_size=3, teacher=teacher,
                       lam=0.5, counts=counts)
    with pytest.raises(ValueError, match="lam"):
        chunkwise_step(student, batch, Phase("transition", 1, LossWeights(kl=1.0)), chunk_size=3, teacher=teacher,
                       counts=counts)
    with pytest.raises(ValueError, match="memory"):
        chunkwise_step(student, batch, Phase("pretrain", 1, LossWeights(ce=1.0)), chunk_size=3, counts=counts,
                       memory="checkpoint")


# ---------------------------------------------------------------- the recipe and the trainer


def test_recipe_defaults_are_the_papers():
    r = Recipe()
    assert (r.seq_len, r.chunk_size, r.batch_size * r.seq_len) == (10_000, 500, 320_000)
    assert (r.transition_steps, r.distill_steps, r.beta, r.lr, r.gate_lr) == (500, 300, 0.1, 8e-6, 5e-4)
    assert [(p.name, p.steps, p.weights) for p in r.phases()] == [
        ("transition", 500, LossWeights(kl=1.0)), ("distill", 300, LossWeights(kl=1.0, attn=0.1))]
    transition = r.phases()[0]
    assert transition.lam(0) == 1 / 500 and transition.lam(499) == 1 and transition.lam(249) == 0.5
    assert r.phases()[1].lam(3) is None
    with pytest.raises(ValueError, match="memory"):
        Recipe(memory="all")


# Copying, 8 of 16 symbols: a float32 tiny model with Ouro's architecture.  RoPE's base 1e4 rather than Ouro's
# 1e6: on 16-token sequences 1e6 leaves the slow channels nearly position-blind.
TINY = LoopedLMConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64, total_ut_steps=2, rope_theta=1e4)


def tiny_pair(gate="kv-head", seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = LoopedLM(TINY, backend="reference")
    return teacher, randomise_gates(to_melt(teacher, gate), seed=seed)


def test_trainer_uses_the_base_and_gate_learning_rates():
    """AdamW's first step moves every parameter with a gradient by its group's rate: the gates by gate_lr, the
    rest by lr; the early-exit gate (never in the loss) is frozen, the teacher untouched."""
    teacher, student = tiny_pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    recipe = Recipe(seq_len=16, chunk_size=4, batch_size=4, transition_steps=0, distill_steps=1, lr=1e-4,
                    gate_lr=3e-3)
    Trainer(student, recipe, CopyTask(16, 8), teacher=teacher, progress=False).run()
    for name, param in student.named_parameters():
        moved = (param - before[name]).abs()
        if name.startswith("model.early_exit_gate"):
            assert not param.requires_grad and moved.max() == 0
            continue
        rate = 3e-3 if ".melt_gate." in name else 1e-4
        assert moved.max().item() == pytest.approx(rate, rel=1e-3), name
    for name, param in teacher.named_parameters():
        assert torch.equal(param, frozen[name]) and not param.requires_grad


def test_trainer_runs_the_phases_with_the_lam_ramp(tmp_path):
    teacher, student = tiny_pair("latent")
    recipe = Recipe(seq_len=16, chunk_size=4, batch_size=4, transition_steps=4, distill_steps=2, lr=1e-3,
                    gate_lr=1e-2)
    records = Trainer(student, recipe, CopyTask(16, 8), teacher=teacher, progress=False, out_dir=tmp_path).run()
    assert [(r["phase"], r["phase_step"]) for r in records] == [("transition", i) for i in range(1, 5)] + \
        [("distill", 1), ("distill", 2)]
    assert [r.get("lam") for r in records] == [0.25, 0.5, 0.75, 1, None, None]
    for r in records:
        want = r["kl"] + (0.1 * r["attn"] if r["phase"] == "distill" else 0)
        assert r["loss"] == pytest.approx(want) and all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    assert (tmp_path / "checkpoints" / "step-000006" / "model.safetensors").exists()


@pytest.mark.parametrize("memory", ["exact", "recompute"])
def test_resume_mid_phase_gives_the_same_losses(tmp_path, memory):
    """A run checkpointed every 2 steps, resumed in fresh objects from mid-transition (step 2) and from
    mid-distillation (step 5), repeats the uninterrupted run's losses exactly, and its metrics file is the
    uninterrupted run's."""
    recipe = Recipe(seq_len=16, chunk_size=4, batch_size=4, transition_steps=3, distill_steps=4, lr=1e-3,
                    gate_lr=1e-2, warmup_steps=2, memory=memory)
    task = CopyTask(16, 8)

    def trainer(out):
        teacher, student = tiny_pair("kv-element")
        return Trainer(student, recipe, task, teacher=teacher, progress=False, out_dir=out, save_every=1, keep=10,
                       seed=5)

    straight = trainer(tmp_path / "straight").run()
    keys = ("loss", "kl", "attn", "ce", "grad_norm", "lr", "gate_lr", "lam", "step", "phase")
    for stop in (2, 5):
        again = trainer(tmp_path / "straight")
        again.load(tmp_path / "straight" / "checkpoints" / f"step-{stop:06d}")
        assert again.step == stop
        assert [json.loads(x)["step"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()] \
            == list(range(1, stop + 1))
        resumed = again.run()
        assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys}
                                                                  for r in straight[stop:]]
    other = Recipe(**{**dataclasses.asdict(recipe), "beta": 0.2})
    teacher, student = tiny_pair("kv-element")
    with pytest.raises(ValueError, match="another recipe"):
        Trainer(student, other, task, teacher=teacher, progress=False).load(
            tmp_path / "straight" / "checkpoints" / "step-000002")


def test_trainer_refuses_what_it_cannot_do():
    teacher, student = tiny_pair()
    task = CopyTask(16, 8)
    with pytest.raises(ValueError, match="sequences have 16"):
        Trainer(student, Recipe(seq_len=32, chunk_size=4, batch_size=4), task, teacher=teacher)
    with pytest.raises(ValueError, match="convert"):
        Trainer(student, Recipe(seq_len=16, chunk_size=4, batch_size=4, pretrain_steps=2), task, teacher=teacher)


# ---------------------------------------------------------------- 1 against 2 processes


def test_two_processes_give_the_losses_of_one(tmp_path):
    """`python -m melt_kernels.train` under torchrun with 2 gloo processes (2 + 2 steps of a global batch of 4
    copies, chunk sizes 4 and 2 by turns with the last 3 tokens decoded one at a time, latent gate) gives the
    single process's losses, every step, and evaluations, up to rounding."""
    teacher = LoopedLM(TINY, backend="reference")
    teacher.save_pretrained(tmp_path / "teacher")
    args = ["--teacher", str(tmp_path / "teacher"), "--data", "copy", "--chunk-cycle", "4", "2", "--decode-tokens",
            "3", "--batch", "4",
            "--transition-steps", "2", "--distill-steps", "2", "--lr", "1e-3", "--gate-lr", "1e-2", "--threads", "1",
            "--no-progress", "--backend", "reference", "--eval-sequences", "8"]
    one, two, *runs = train_in_one_and_two_processes(args, tmp_path)
    assert len(runs[0]) == len(runs[1]) == 4
    for a, b in zip(*runs):
        for key in ("loss", "kl", "attn", "ce", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (key, a, b)
    for key in ("teacher", "teacher_served", "student", "student_decode", "student_served"):
        assert two["eval"][key]["loss"] == pytest.approx(one["eval"][key]["loss"], rel=1e-9)
    saved = load_ouro(tmp_path / "two" / "final", backend="reference")
    assert saved.config.gate == "latent"


# ---------------------------------------------------------------- a seeded distillation


# The student is within this of the teacher after post-training, and far outside it before.
LOSS_MARGIN, ACC_MARGIN = 0.05, 0.02


def test_seeded_distillation_brings_the_student_to_the_teacher():
    """Copying (8 of 16 symbols, T = 2): 150 steps pre-training the LoopLM teacher, then the paper's recipe in
    chunks of 4 (75 steps of phase 1, KL with the interpolated reads; 75 of phase 2, KL + 0.1 x attention MSE;
    rates 1e-3 and 1e-2 for the gates).  On held-out sequences the MELT student is then within LOSS_MARGIN nats
    and ACC_MARGIN accuracy of the teacher, in training chunks and token by token, with half the teacher's cache;
    before post-training it is far outside.

    The teacher is seeded: what it learns decides how far last-step reuse is from it.  Of teachers seeded 1-5 this
    way, four were matched in chunks of 4 and two (3, 5) also token by token; trained in chunks of 1 the student
    matches token by token more often (2 of the 3 others), a chunking effect the replication measures."""
    task = CopyTask(16, 8)
    torch.manual_seed(5)
    teacher = LoopedLM(TINY, backend="reference")
    Trainer(teacher, Recipe(seq_len=16, chunk_size=16, batch_size=16, pretrain_steps=150, transition_steps=0,
                            distill_steps=0, lr=3e-3), task, progress=False, seed=5).run()
    held = task.sample(256, torch.Generator().manual_seed(1))
    want = evaluate(teacher, "looplm", held)
    assert want["acc"] >= 0.99, want
    student = to_melt(teacher, "kv-head")
    untrained = evaluate(student, "melt", held, 4)
    assert untrained["loss"] > want["loss"] + 10 * LOSS_MARGIN and untrained["acc"] < want["acc"] - 10 * ACC_MARGIN
    recipe = Recipe(seq_len=16, chunk_size=4, batch_size=16, transition_steps=75, distill_steps=75, lr=1e-3,
                    gate_lr=1e-2)
    records = Trainer(student, recipe, task, teacher=teacher, progress=False).run()
    assert [r["phase"] for r in records] == ["transition"] * 75 + ["distill"] * 75
    for chunk_size in (4, 1):
        got = evaluate(student, "melt", held, chunk_size)
        assert got["loss"] <= want["loss"] + LOSS_MARGIN, (chunk_size, got, want)
        assert got["acc"] >= want["acc"] - ACC_MARGIN, (chunk_size, got, want)
    assert 2 * (got["cache_bytes"] - 4) == want["cache_bytes"] - 4


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
def test_kernel_backends_train_like_the_reference(backend):
    """Whatever kernel backend runs here (the Triton interpreter under TRITON_INTERPRET=1, Triton/CUDA on a GPU)
    gives the reference backend's loss terms and gradients for a transition step and a distillation step,
    float32, chunks of 3 over 2 loops x 2 layers."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, student = tiny_pair("kv-head", seed=5)
    teacher, student = teacher.to(device), student.to(device)
    batch = tuple(t.to(device) for t in CopyTask(16, 3).sample(2, torch.Generator().manual_seed(5)))
    for phase, lam in ((Phase("transition", 1, LossWeights(kl=1.0, attn=1.0)), 0.5),
                       (Phase("distill", 1, LossWeights(kl=1.0, attn=1.0)), None)):
        runs = []
        for name in ("reference", backend):
            student.backend = teacher.backend = name
            student.zero_grad(set_to_none=True)
            sums = chunkwise_step(student, batch, phase, chunk_size=3, teacher=teacher, lam=lam,
                                  counts=step_counts(batch, student))
            runs.append((sums.as_tensor(), {n: p.grad.clone() for n, p in student.named_parameters()
                                            if p.grad is not None}))
        (want, want_grads), (got, got_grads) = runs
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- the example


SCRIPT = ROOT / "examples" / "distill.py"


def test_example_runs_writes_json_and_never_imports_matplotlib_without_plot(tmp_path):
    """As a user runs it: a fresh interpreter, exit status 0, the report table, matplotlib never imported."""
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert 'matplotlib' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", check, str(SCRIPT), "--pretrain-steps", "3", "--transition-steps",
                           "3", "--distill-steps", "2", "--eval-batch", "8", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "backend 'auto' -> 'reference'" in done.stdout
    for row in ("teacher ", "student, before", "chunks of 4", "token by token", "2.00x the student's"):
        assert row in done.stdout, done.stdout
    assert "[distill 2/2]" in done.stderr
    results = json.loads(out.read_text())
    assert [r["phase"] for r in results["history"]] == ["pretrain"] * 3 + ["transition"] * 3 + ["distill"] * 2
    for key in ("teacher", "student_before", "student", "student_decode"):
        assert {"loss", "acc", "cache_bytes"} <= results[key].keys()
    assert results["teacher"]["cache_bytes"] > results["student"]["cache_bytes"]


def test_example_plot_is_written(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import runpy
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "losses.png"
    main(["--pretrain-steps", "2", "--transition-steps", "2", "--distill-steps", "2", "--eval-batch", "4",
          "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the replication


def test_replicate_quick_writes_every_row(tmp_path, monkeypatch):
    """examples/replicate.py --quick (every row tiny) writes {"rows": [...]} with a row per model of the
    comparison, the cache kinds and KV bytes per token the models hold, the gates at init for last-step reuse,
    and a plot."""
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import runpy
    main = runpy.run_path(str(ROOT / "examples" / "replicate.py"))["main"]
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = main(["--quick", "--json", str(out), "--plot", str(png)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["standard", "looplm", "looplm-last-loop", "last-step", "last-step-last-loop",
                          "melt-latent", "melt-kv-head", "melt-kv-element", "melt-latent-fixed-chunks",
                          "melt-latent-fixed-1", "melt-latent-no-interpolation", "melt-latent-no-alignment",
                          "melt-latent-shared-lr", "melt-latent-4x"]
    per_pass = rows["standard"]["kv_bytes_per_token"]
    for name, row in rows.items():
        for key in ("eval_loss", "eval_loss_decode", "eval_loss_served"):
            assert math.isfinite(row[key]), (key, row)
        assert len(row["eval_loss_per_loop"]) == row["loops"]
        assert row["kv_bytes_per_token"] == per_pass * (4 if name.startswith("looplm") else 1)
        assert (row["cache"] == "melt") == (name.startswith("melt") or name.startswith("last-step"))
        assert (row["gate_retention_per_loop"] is None) == (row["cache"] != "melt")
    # A LoopLM cache does not depend on the chunking; MELT's does.
    for name in ("standard", "looplm", "looplm-last-loop"):
        assert rows[name]["eval_loss"] == pytest.approx(rows[name]["eval_loss_decode"], rel=1e-5)
    assert rows["last-step"]["gate_retention_per_loop"] == pytest.approx([1 / (1 + math.exp(10))] * 3, rel=1e-3)
    # The two teachers differ only in their objective.
    assert rows["looplm"]["eval_loss_per_loop"] != rows["looplm-last-loop"]["eval_loss_per_loop"]
    assert rows["melt-latent-no-interpolation"]["steps"] == {"distill": 6}
    assert rows["melt-latent"]["steps"] == {"transition": 3, "distill": 3}
    assert rows["melt-latent-4x"]["steps"] == {"transition": 12, "distill": 12}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replicate_work_dir_resumes_with_the_kept_rows_and_teacher(tmp_path, monkeypatch):
    """With --work-dir a second run reuses the first's finished rows and its pre-trained LoopLM (the MELT row
    it adds is the one a single run gives), and a work dir of another size or seed is refused."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import runpy
    main = runpy.run_path(str(ROOT / "examples" / "replicate.py"))["main"]
    work = tmp_path / "work"
    quick = ["--quick", "--eval-sequences", "2", "--pretrain-steps", "3"]
    first = main(quick + ["--rows", "looplm", "last-step", "--work-dir", str(work)])
    assert [r["model"] for r in first["rows"]] == ["looplm", "last-step"]
    assert (work / "looplm" / "training.json").exists() and not (work / "looplm-last-loop").exists()
    second = main(quick + ["--rows", "looplm", "last-step", "melt-latent", "--work-dir", str(work)])
    assert second["rows"][:2] == first["rows"]
    assert second["rows"][0]["steps"] == {"pretrain": 3}
    alone = main(quick + ["--rows", "melt-latent"])
    for key in ("eval_loss", "eval_loss_decode", "eval_loss_served", "steps"):
        assert second["rows"][2][key] == alone["rows"][0][key], key
    lines = (work / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["model"] for line in lines] == ["looplm", "last-step", "melt-latent"]
    with pytest.raises(ValueError, match="work-dir"):
        main(quick + ["--rows", "looplm", "--seed", "1", "--work-dir", str(work)])


def test_learning_rate_schedules():
    constant = Recipe(seq_len=16, chunk_size=4, transition_steps=6, distill_steps=4, warmup_steps=3)
    assert [constant.lr_factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = dataclasses.replace(constant, schedule="cosine")
    factors = [cosine.lr_factor(s) for s in range(10)]
    assert factors[:3] == [0.25, 0.5, 0.75] and factors[3] == pytest.approx(1.0) and factors[9] == pytest.approx(0.1)
    assert factors[3:] == sorted(factors[3:], reverse=True)
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="linear")
