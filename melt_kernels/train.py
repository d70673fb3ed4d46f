"""Chunk-wise MELT post-training from a LoopLM teacher (arXiv 2605.07721).

A LoopLM (Ouro-style, one KV cache per loop and layer) is turned into MELT
(one gated cache per layer shared by all loops) with the same weights plus
the gates, in two phases, both chunk-wise:

1. *Interpolated transition*: every attention output of the student is
   ``(1 - lam) * teacher-style attention + lam * MELT attention`` from the
   same q/k/v, the first on per-loop caches written through, the second on
   the shared gated cache (``LoopedLM(..., transition=(looplm_cache, lam))``),
   with ``lam`` ramped linearly from 0 to 1 over the phase.
2. *Attention-aligned distillation*: the pure MELT student's per-layer,
   per-loop attention outputs (what each attention layer adds to the
   residual stream) are matched to the teacher's by MSE, plus the KL
   divergence KL(teacher || student) of the logits.

Chunk-wise: a training sequence is cut into chunks and each chunk runs all T
loops against the settled cache of the earlier chunks, exactly what decoding
sees (:meth:`melt_kernels.model.LoopedLM.prefill`).  The caches are fresh per
batch and updated in place by :func:`melt_kernels.gated_kv_attention`
across loops and chunks; ONE backward runs at the end of the sequence, so
the gradient also flows through the earlier chunks' cache values into the
parameters and gates that wrote them (the op's autograd, SPEC §2.3).  That is
the exact gradient of the chunk-wise model; it keeps the whole sequence's
graph alive until the backward, as full-sequence training does.  The teacher
runs each sequence as one chunk: a LoopLM's outputs do not depend on the
chunking.

The synthetic task (:class:`CopyTask`) has the long-range structure that
makes the shared cache matter: the second copy sits in later chunks and is
read from the settled cache of earlier ones.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from melt_kernels.model import LoopedLM, LoopedLMConfig

IGNORE = -100  # target of positions that carry no task loss (F.cross_entropy's ignore_index)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CopyTask:
    """Copying: ``x1 .. xn SEP x1 .. x(n-1)``, the model predicting the second copy.

    x is drawn uniformly from tokens 0 .. num_symbols-1 and SEP is token
    num_symbols.  The first copy is unpredictable; from SEP on the target is
    the next token of the copy, n positions back, so with chunks of at most n
    tokens it is read from the settled cache of earlier chunks.
    """

    num_symbols: int = 16
    length: int = 8

    def __post_init__(self):
        if self.num_symbols < 2 or self.length < 1:
            raise ValueError(f"need num_symbols >= 2 and length >= 1, got {self}")

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1

    @property
    def seqlen(self) -> int:
        return 2 * self.length

    def sample(self, batch: int, generator: torch.Generator, device=None) -> Batch:
        """(input_ids, targets), both (batch, seqlen) int64, drawn on the CPU from ``generator``."""
        x = torch.randint(self.num_symbols, (batch, self.length), generator=generator)
        ids = torch.cat([x, torch.full((batch, 1), self.num_symbols), x[:, :-1]], dim=1)
        targets = torch.cat([torch.full((batch, self.length), IGNORE), x], dim=1)
        return ids.to(device), targets.to(device)


@dataclass(frozen=True)
class LossWeights:
    """The training loss: ``ce * task cross-entropy + kl * KL(teacher || student) + attn * attention MSE``."""

    ce: float = 0.0
    kl: float = 0.0
    attn: float = 0.0


@dataclass
class DistillConfig:
    """Steps, AdamW learning rates and losses of the three stages (teacher pre-training, transition, distillation).

    ``lr`` is the post-training (both phases) rate; gradients are clipped to norm ``clip``.
    """

    batch_size: int = 32
    # Half a copy: with chunks of 8 on the example's task the student matched the teacher in chunks but not token
    # by token (Ouro's architecture, gates starting at "keep nothing"); with 4 it matches both.
    chunk_size: int = 4
    pretrain_steps: int = 400
    transition_steps: int = 150
    distill_steps: int = 150
    pretrain_lr: float = 3e-3
    # Lower for post-training: Adam's first steps at the pre-training rate throw the student off the teacher.
    lr: float = 1e-3
    clip: float = 1.0
    pretrain: LossWeights = field(default_factory=lambda: LossWeights(ce=1.0))
    transition: LossWeights = field(default_factory=lambda: LossWeights(ce=1.0, kl=1.0))
    distill: LossWeights = field(default_factory=lambda: LossWeights(kl=1.0, attn=1.0))


# ---------------------------------------------------------------- losses


def task_metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the positions with a target; logits (B, P, V), targets (B, P)."""
    scored = targets != IGNORE
    logits, targets = logits[scored].float(), targets[scored]
    return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean()


def logit_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over every position."""
    log_s = F.log_softmax(student.float().flatten(0, -2), dim=-1)
    log_t = F.log_softmax(teacher.float().flatten(0, -2), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


@contextmanager
def recorded_attention(model: LoopedLM) -> Iterator[list[torch.Tensor]]:
    """Collects the output of every attention layer call (B, M, hidden), in call order, while inside: o_proj's
    output, before the sandwich norm ``input_layernorm_2``."""
    outputs: list[torch.Tensor] = []
    handles = [layer.self_attn.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
               for layer in model.model.layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def stack_attention(outputs: list[torch.Tensor], num_loops: int, num_layers: int) -> torch.Tensor:
    """The recorded calls of a chunk-wise run as one (T, N, B, P, hidden) tensor, chunks joined along P.

    Calls come chunk by chunk, loop by loop, layer by layer.
    """
    per_chunk = num_loops * num_layers
    if not outputs or len(outputs) % per_chunk:
        raise ValueError(f"expected a multiple of T*N = {per_chunk} attention calls, got {len(outputs)}")
    joined = [torch.cat(outputs[j::per_chunk], dim=1) for j in range(per_chunk)]
    return torch.stack(joined).unflatten(0, (num_loops, num_layers))


@torch.no_grad()
def teacher_outputs(teacher: LoopedLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits (B, P, V) and attention outputs (T, N, B, P, hidden): one chunk, LoopLM cache."""
    cache = teacher.new_cache("looplm", *ids.shape)
    with recorded_attention(teacher) as outputs:
        logits = teacher.prefill(ids, cache)
    return logits, stack_attention(outputs, teacher.num_loops, teacher.config.num_hidden_layers)


# ---------------------------------------------------------------- one step


def train_step(model: LoopedLM, batch: Batch, optimizer: torch.optim.Optimizer, weights: LossWeights, *,
               kind: str = "melt", chunk_size: Optional[int] = None, teacher: Optional[LoopedLM] = None,
               lam: Optional[float] = None, clip: Optional[float] = 1.0) -> dict[str, float]:
    """One optimiser step on ``batch`` = (input_ids, targets), run chunk-wise on a fresh ``kind`` cache.

    ``lam`` (MELT only) runs the interpolated transition with that weight on
    the MELT attention (its per-loop caches are a second, fresh LoopLM
    cache).  ``teacher`` is needed when ``weights.kl`` or ``weights.attn`` is
    non-zero.  The caches start as plain zero tensors; the op's first write
    puts them in the graph (non-leaf from then on), so the single backward at
    the end of the sequence also reaches the earlier chunks' cache values.
    Returns the step's terms as floats: ``loss`` (the weighted total), ``ce``,
    ``acc`` and, with a teacher, ``kl`` and ``attn`` (computed, and logged,
    whatever their weights), plus ``lam`` when given.
    """
    ids, targets = batch
    if (weights.kl or weights.attn) and teacher is None:
        raise ValueError("the KL and attention losses need a teacher")
    if lam is not None and kind != "melt":
        raise ValueError(f"the interpolated transition trains a MELT student, got kind={kind!r}")
    model.train()
    cache = model.new_cache(kind, *ids.shape)
    transition = None if lam is None else (model.new_cache("looplm", *ids.shape), lam)
    with recorded_attention(model) as outputs:
        logits = model.prefill(ids, cache, chunk_size, transition=transition)
    ce, acc = task_metrics(logits, targets)
    terms = {"ce": ce}
    if teacher is not None:
        teacher_logits, teacher_attn = teacher_outputs(teacher, ids)
        terms["kl"] = logit_kl(logits, teacher_logits)
        attn = stack_attention(outputs, model.num_loops, model.config.num_hidden_layers)
        terms["attn"] = F.mse_loss(attn.float(), teacher_attn.float())
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    record = {name: value.item() for name, value in terms.items()}
    return {"loss": loss.item(), **record, "acc": acc.item(), **({} if lam is None else {"lam": lam})}


# ---------------------------------------------------------------- the stages


def make_teacher(config: LoopedLMConfig, seed: int = 0, backend: str = "auto", device=None) -> LoopedLM:
    """A freshly initialised LoopLM, its weights drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoopedLM(config, backend=backend).to(device)


def make_student(teacher: LoopedLM) -> LoopedLM:
    """The MELT student: the teacher's weights and its (so far unused) gate parameters, copied."""
    return copy.deepcopy(teacher)


Log = Optional[Callable[[dict], None]]


def _run_phase(phase: str, steps: int, model: LoopedLM, optimizer: torch.optim.Optimizer, task: CopyTask,
               config: DistillConfig, generator: torch.Generator, log: Log, ramp: bool = False,
               **step_kwargs) -> list[dict]:
    """``steps`` calls of :func:`train_step` on fresh batches; ``ramp`` sets lam = 0 -> 1 linearly."""
    history = []
    for step in range(steps):
        batch = task.sample(config.batch_size, generator, model.model.embed_tokens.weight.device)
        lam = step / max(steps - 1, 1) if ramp else None
        record = {"phase": phase, "step": step,
                  **train_step(model, batch, optimizer, lam=lam, clip=config.clip, **step_kwargs)}
        history.append(record)
        if log is not None:
            log(record)
    return history


def pretrain(teacher: LoopedLM, task: CopyTask, config: DistillConfig, generator: torch.Generator,
             log: Log = None) -> list[dict]:
    """Trains the LoopLM teacher on ``task``: LoopLM cache, one chunk per sequence, ``config.pretrain`` loss.

    Returns one record per step (:func:`train_step`'s, with ``phase`` and ``step``), also passed to ``log``.
    """
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    return _run_phase("pretrain", config.pretrain_steps, teacher, optimizer, task, config, generator, log,
                      weights=config.pretrain, kind="looplm")


def post_train(student: LoopedLM, teacher: LoopedLM, task: CopyTask, config: DistillConfig,
               generator: torch.Generator, log: Log = None) -> list[dict]:
    """Phase 1, interpolated transition (lam 0 -> 1), then phase 2, attention-aligned distillation.

    Both run ``student`` chunk-wise in chunks of ``config.chunk_size`` on a
    MELT cache with one AdamW optimiser.  Returns the records of every step,
    phase "transition" then "distill".
    """
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    common = dict(task=task, config=config, generator=generator, log=log, chunk_size=config.chunk_size,
                  teacher=teacher)
    return _run_phase("transition", config.transition_steps, student, optimizer, weights=config.transition,
                      ramp=True, **common) + \
        _run_phase("distill", config.distill_steps, student, optimizer, weights=config.distill, **common)


@torch.no_grad()
def evaluate(model: LoopedLM, kind: str, batch: Batch, chunk_size: Optional[int] = None) -> dict[str, float]:
    """Task loss and accuracy of ``model`` run chunk-wise on a ``kind`` cache, and that cache's bytes."""
    ids, targets = batch
    model.eval()
    cache = model.new_cache(kind, *ids.shape)
    ce, acc = task_metrics(model.prefill(ids, cache, chunk_size), targets)
    return {"loss": float(ce), "acc": float(acc), "cache_bytes": cache.nbytes}
