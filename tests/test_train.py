"""melt_kernels.train and examples/distill.py: the interpolated transition, the losses, one step of each phase,
and a seeded chunk-wise distillation that brings the MELT student to its LoopLM teacher.

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
from hypothesis import given, strategies as st

from melt_kernels import LoopLMCache, available_backends
from melt_kernels.model import Attention, LoopedLM, LoopedLMConfig, rope_tables
from melt_kernels.train import (IGNORE, CopyTask, DistillConfig, LossWeights, evaluate, logit_kl, make_student,
                                make_teacher, post_train, pretrain, recorded_attention, stack_attention,
                                task_metrics, teacher_outputs, train_step)
from utils import active_mask, assert_untouched, reseed

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "distill.py"
TOL = dict(atol=1e-10, rtol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


def float64_model(seed, loops=2, **sizes):
    config = LoopedLMConfig(**{**dict(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=48, total_ut_steps=loops,
                                      gate="kv-head"), **sizes})
    return reseed(LoopedLM(config, backend="reference", dtype=torch.float64), seed)


def token_ids(seed, batch, length, vocab=24):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the task


def test_copy_task_repeats_the_string_after_the_separator():
    task = CopyTask(num_symbols=5, length=6)
    ids, targets = task.sample(3, torch.Generator().manual_seed(0))
    assert task.vocab_size == 6 and task.seqlen == 12
    assert ids.shape == targets.shape == (3, 12) and ids.dtype == targets.dtype == torch.int64
    assert (ids[:, :6] < 5).all() and (ids[:, 6] == 5).all()
    assert torch.equal(ids[:, 7:], ids[:, :5])
    # Only the second copy is predictable: from the separator on, each target is the next token of the copy.
    assert (targets[:, :6] == IGNORE).all()
    assert torch.equal(targets[:, 6:], ids[:, :6])
    assert torch.equal(targets[:, 6:-1], ids[:, 7:])
    again = task.sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids)
    assert not torch.equal(task.sample(3, torch.Generator().manual_seed(1))[0], ids)
    with pytest.raises(ValueError, match="num_symbols"):
        CopyTask(num_symbols=1)


# ---------------------------------------------------------------- the interpolated transition


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), seqlen=st.integers(1, 3), extra=st.integers(0, 3),
       heads_kv=st.integers(1, 2), groups=st.integers(1, 2), gate=st.sampled_from(["latent", "kv-head", "kv-element"]),
       loops=st.integers(1, 3), lam=st.floats(0, 1))
def test_transition_attention_blends_the_looplm_and_melt_layers(seed, batch, seqlen, extra, heads_kv, groups, gate,
                                                                  loops, lam):
    """With transition=(k_loop, v_loop, lam) the layer returns (1 - lam) * the write-through layer on the loop's
    own cache + lam * the gated layer on the shared cache, and leaves each cache as that layer alone would (the
    latent gate's h carried from loop to loop as the MELT layer alone carries it)."""
    hidden, length, head_dim = 32, seqlen + extra, 16
    gen = torch.Generator().manual_seed(seed)
    config = LoopedLMConfig(vocab_size=8, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=heads_kv * groups, num_key_value_heads=heads_kv, head_dim=head_dim,
                            gate=gate)
    attn = reseed(Attention(config, dtype=torch.float64), seed)
    lengths = torch.randint(0, extra + 1, (batch,), generator=gen, dtype=torch.int32)
    rope = rope_tables(lengths.long()[:, None] + torch.arange(seqlen), head_dim, config.rope_theta, torch.float64)

    def random_cache():
        return torch.randn(batch, length, heads_kv, head_dim, generator=gen, dtype=torch.float64)

    shared = [random_cache(), random_cache()]
    per_loop = [[random_cache(), random_cache()] for _ in range(loops)]
    before = [t.clone() for t in shared + sum(per_loop, [])]
    want_shared = [t.clone() for t in shared]
    want_per_loop = [[t.clone() for t in pair] for pair in per_loop]
    latent = want_latent = None
    for loop in range(loops):
        x = torch.randn(batch, seqlen, hidden, generator=gen, dtype=torch.float64)
        got, latent = attn(x, *shared, lengths, loop, rope, shared=True, latent=latent,
                           transition=(*per_loop[loop], lam), backend="reference")
        looplm, _ = attn(x, *want_per_loop[loop], lengths, loop, rope, shared=False, backend="reference")
        melt, want_latent = attn(x, *want_shared, lengths, loop, rope, shared=True, latent=want_latent,
                                 backend="reference")
        torch.testing.assert_close(got, (1 - lam) * looplm + lam * melt, **TOL)
    after = shared + sum(per_loop, [])
    for got, want in zip(after, want_shared + sum(want_per_loop, [])):
        assert torch.equal(got, want)
    mask = active_mask(lengths, batch, seqlen, length)
    for old, new in zip(before, after):
        assert_untouched(old, new, mask)


def test_transition_endpoints_are_the_looplm_and_the_melt_model():
    """lam = 0 is the LoopLM (the teacher), lam = 1 is MELT, chunk-wise; both caches settle every chunk."""
    model = float64_model(1, loops=3)
    ids = token_ids(1, 2, 7)

    def run(kind, lam=None):
        cache = model.new_cache(kind, 2, 7)
        looplm = model.new_cache("looplm", 2, 7)
        logits = model.prefill(ids, cache, 3, transition=None if lam is None else (looplm, lam))
        return logits, cache, looplm

    looplm_logits, looplm_cache, _ = run("looplm")
    melt_logits, melt_cache, _ = run("melt")
    for lam, want_logits, want_cache, which in ((0.0, looplm_logits, looplm_cache, 1),
                                                (1.0, melt_logits, melt_cache, 0)):
        logits, *caches = run("melt", lam)
        torch.testing.assert_close(logits, want_logits, **TOL)
        for got, want in zip(caches[which].keys + caches[which].values, want_cache.keys + want_cache.values):
            torch.testing.assert_close(got, want, **TOL)
        assert caches[0].seqlens_host.tolist() == caches[1].seqlens_host.tolist() == [7, 7]
        assert caches[0].seqlens.tolist() == caches[1].seqlens.tolist() == [7, 7]
    halfway = run("melt", 0.5)[0]
    assert min((halfway - looplm_logits).abs().max(), (halfway - melt_logits).abs().max()) > 1e-6


def test_transition_input_is_checked_before_anything_is_written():
    model = float64_model(2, loops=2)
    ids = token_ids(2, 1, 4)
    melt, looplm = model.new_cache("melt", 1, 8), model.new_cache("looplm", 1, 8)
    state = [t.clone() for t in melt.keys + looplm.keys]
    with pytest.raises(TypeError, match="MeltCache"):
        model(ids, looplm, transition=(model.new_cache("looplm", 1, 8), 0.5))
    with pytest.raises(TypeError, match="MeltCache"):
        model(ids, melt, transition=(model.new_cache("melt", 1, 8), 0.5))
    with pytest.raises(ValueError, match="holds 3 loops"):
        model(ids, melt, transition=(LoopLMCache(3, 2, 1, 8, 2, 16, dtype=torch.float64), 0.5))
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        model(ids, melt, transition=(looplm, 1.5))
    with pytest.raises(ValueError, match="do not fit"):
        model.prefill(token_ids(2, 1, 6), melt, 2, transition=(model.new_cache("looplm", 1, 4), 0.5))
    ahead = model.new_cache("looplm", 1, 8)
    ahead.advance(2)
    with pytest.raises(ValueError, match="lengths"):
        model(ids, melt, transition=(ahead, 0.5))
    for old, new in zip(state, melt.keys + looplm.keys):
        assert torch.equal(old, new)
    assert melt.seqlens_host.tolist() == looplm.seqlens_host.tolist() == [0]
    attn = model.model.layers[0].self_attn
    rope = rope_tables(torch.zeros(1, 1, dtype=torch.long), 16, 1e6, torch.float64)
    with pytest.raises(ValueError, match="shared=True"):
        attn(torch.zeros(1, 1, 32, dtype=torch.float64), *looplm.layer(0, 0), 0, 0, rope, shared=False,
             transition=(*looplm.layer(0, 1), 0.5))


# ---------------------------------------------------------------- losses and recorded attention


def test_teacher_attention_is_recorded_per_loop_and_layer_and_joined_across_chunks():
    """The LoopLM's outputs do not depend on the chunking, so the (T, N, B, P, hidden) stack of a run in chunks
    of 3 equals teacher_outputs' single chunk: the calls are joined in (chunk, loop, layer) order."""
    teacher = float64_model(3, loops=3)
    ids = token_ids(3, 2, 8)
    logits, attn = teacher_outputs(teacher, ids)
    assert attn.shape == (3, 2, 2, 8, 32)
    with recorded_attention(teacher) as outputs:
        chunked = teacher.prefill(ids, teacher.new_cache("looplm", 2, 8), 3)
    assert len(outputs) == 3 * 3 * 2
    torch.testing.assert_close(stack_attention(outputs, 3, 2), attn, **TOL)
    torch.testing.assert_close(chunked, logits, **TOL)
    # Each entry is what that layer adds to the residual stream: not the same for every loop.
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
    want_kl = (p_t * (p_t.log() - student.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(logit_kl(student, teacher).double(), want_kl, atol=1e-6, rtol=1e-6)
    assert abs(logit_kl(teacher, teacher).item()) < 1e-6
    ce, acc = task_metrics(student, targets)
    scored = targets != IGNORE
    torch.testing.assert_close(ce.double(), F.cross_entropy(student[scored], targets[scored]), atol=1e-6, rtol=1e-6)
    hits = (student[scored].argmax(-1) == targets[scored]).sum().item()
    assert acc.item() == pytest.approx(hits / scored.sum().item(), abs=1e-7)


# ---------------------------------------------------------------- one step of each phase


# RoPE's base 1e4 rather than Ouro's 1e6: on 16-token sequences 1e6 leaves the slow channels nearly position-blind.
TINY = LoopedLMConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64, total_ut_steps=2, gate="kv-head",
                      rope_theta=1e4)


def gate_grads(model):
    return [[p.grad for p in layer.self_attn.melt_gate.parameters()] for layer in model.model.layers]


@pytest.mark.parametrize("gate", ["latent", "kv-head", "kv-element"])
def test_one_step_of_each_phase_runs_and_reaches_the_gates(gate):
    task = CopyTask(16, 4)
    teacher = make_teacher(dataclasses.replace(TINY, gate=gate), seed=0, backend="reference")
    batch = task.sample(4, torch.Generator().manual_seed(0))

    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    record = train_step(teacher, batch, optimizer, LossWeights(ce=1.0), kind="looplm")
    assert record.keys() == {"loss", "ce", "acc"} and record["loss"] == record["ce"] > 0
    # The LoopLM writes every loop through: its gates are never used.
    assert all(g is None for grads in gate_grads(teacher) for g in grads)

    student = make_student(teacher)
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    for name, param in student.named_parameters():
        assert torch.equal(param, frozen[name])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    weights = {"transition": LossWeights(ce=1.0, kl=0.5), "distill": LossWeights(kl=1.0, attn=2.0)}
    for phase, lam in (("transition", 0.5), ("distill", None)):
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        record = train_step(student, batch, optimizer, weights[phase], chunk_size=3, teacher=teacher, lam=lam)
        assert {"loss", "ce", "kl", "attn", "acc"} <= record.keys() and record.get("lam") == lam
        w = weights[phase]
        assert record["loss"] == pytest.approx(w.ce * record["ce"] + w.kl * record["kl"] + w.attn * record["attn"])
        assert all(math.isfinite(v) for v in record.values() if v is not None)
        assert record["kl"] > 0 and record["attn"] > 0
        for grads in gate_grads(student):
            assert all(g.abs().max() > 0 for g in grads)
        assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters() if ".melt_gate." in n)
    # The teacher is only read.
    for name, param in teacher.named_parameters():
        assert torch.equal(param, frozen[name])


def test_train_step_refuses_what_it_cannot_do():
    model = make_teacher(TINY, backend="reference")
    batch = CopyTask(16, 4).sample(2, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="need a teacher"):
        train_step(model, batch, optimizer, LossWeights(kl=1.0))
    with pytest.raises(ValueError, match="MELT student"):
        train_step(model, batch, optimizer, LossWeights(ce=1.0), kind="looplm", lam=0.5)


# ---------------------------------------------------------------- a seeded distillation


# The student is within this of the teacher after post-training, and far outside it before.
LOSS_MARGIN, ACC_MARGIN = 0.05, 0.02


def test_seeded_distillation_brings_the_student_to_the_teacher():
    """300 steps on copying (8 of 16 symbols, chunks of 4, T = 2): 150 pre-training the LoopLM teacher, 75 of
    interpolated transition, 75 of attention-aligned distillation.  On held-out sequences the MELT student is
    then within LOSS_MARGIN nats and ACC_MARGIN accuracy of the teacher, in training chunks and token by token,
    with half the teacher's cache; before post-training it is far outside."""
    task = CopyTask(16, 8)
    config = DistillConfig(batch_size=16, chunk_size=4, pretrain_steps=150, transition_steps=75, distill_steps=75)
    teacher = make_teacher(TINY, seed=0, backend="reference")
    data = torch.Generator().manual_seed(0)
    held_out = task.sample(256, torch.Generator().manual_seed(1))

    history = pretrain(teacher, task, config, data)
    want = evaluate(teacher, "looplm", held_out)
    assert want["acc"] >= 0.99, want
    student = make_student(teacher)
    untrained = evaluate(student, "melt", held_out, config.chunk_size)
    assert untrained["loss"] > want["loss"] + 10 * LOSS_MARGIN and untrained["acc"] < want["acc"] - 10 * ACC_MARGIN

    history += post_train(student, teacher, task, config, data)
    assert [r["phase"] for r in history] == ["pretrain"] * 150 + ["transition"] * 75 + ["distill"] * 75
    lams = [r["lam"] for r in history if r["phase"] == "transition"]
    assert lams[0] == 0 and lams[-1] == 1 and lams == sorted(lams)
    for chunk_size in (config.chunk_size, 1):
        got = evaluate(student, "melt", held_out, chunk_size)
        assert got["loss"] <= want["loss"] + LOSS_MARGIN, (chunk_size, got, want)
        assert got["acc"] >= want["acc"] - ACC_MARGIN, (chunk_size, got, want)
    assert 2 * (got["cache_bytes"] - 4 * 256) == want["cache_bytes"] - 4 * 256


# ---------------------------------------------------------------- the example


def test_example_runs_writes_json_and_never_imports_matplotlib_without_plot(tmp_path):
    """As a user runs it: a fresh interpreter, exit status 0, the report table, matplotlib never imported."""
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert 'matplotlib' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", check, str(SCRIPT), "--loops", "2", "--hidden", "32",
                           "--pretrain-steps", "3", "--transition-steps", "3", "--distill-steps", "2",
                           "--eval-batch", "8", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "backend 'auto' -> 'reference'" in done.stdout
    for row in ("teacher ", "student, before", "chunks of 4", "token by token", "2.00x the student's"):
        assert row in done.stdout, done.stdout
    assert "[distill 2/2]" in done.stderr
    results = json.loads(out.read_text())
    assert [r["phase"] for r in results["history"]] == ["pretrain"] * 3 + ["transition"] * 3 + ["distill"] * 2
    for key in ("teacher", "student_before", "student", "student_decode"):
        assert results[key].keys() == {"loss", "acc", "cache_bytes"}
    assert results["teacher"]["cache_bytes"] > results["student"]["cache_bytes"]


def test_example_plot_is_written(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import runpy
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "losses.png"
    main(["--loops", "2", "--hidden", "32", "--pretrain-steps", "2", "--transition-steps", "2", "--distill-steps",
          "2", "--eval-batch", "4", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
def test_kernel_backends_train_like_the_reference(backend):
    """Whatever kernel backend runs here (the Triton interpreter under TRITON_INTERPRET=1, Triton/CUDA on a GPU)
    gives the reference backend's losses and gradients for a transition step and a distillation step, float32,
    chunks of 3 over 2 loops x 2 layers."""
    teacher = make_teacher(TINY, seed=5, backend="reference", device=DEVICE)
    student = make_student(teacher)
    batch = CopyTask(16, 3).sample(2, torch.Generator().manual_seed(5), DEVICE)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    for lam, weights in ((0.5, LossWeights(ce=1.0, kl=1.0, attn=1.0)), (None, LossWeights(kl=1.0, attn=1.0))):
        runs = []
        for name in ("reference", backend):
            student.backend = teacher.backend = name
            record = train_step(student, batch, optimizer, weights, chunk_size=3, teacher=teacher, lam=lam, clip=None)
            # The exit gate gets no gradient: the last loop feeds the head.
            runs.append((record, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
        (want, want_grads), (got, got_grads) = runs
        assert got.keys() == want.keys() and got_grads.keys() == want_grads.keys()
        assert not any(n.startswith("model.early_exit_gate") for n in want_grads)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
