"""The paper's post-training recipe (docs/training.md#the-recipe): its settings, its losses and one chunk-wise
training step.

A LoopLM teacher (Ouro-style, one KV cache per loop and layer, frozen) is
turned into MELT (one gated cache per layer shared by the T loops) with the
same weights plus the gates, in two phases, both chunk-wise:

1. *Interpolated transition* (``transition_steps``, the paper's 500):
   attention at loop r reads ``lam * KV_MELT + (1 - lam) * KV_LoopLM(r)``,
   the teacher's K/V of the same loop r coming from the teacher run on the
   same chunk with its own per-loop caches, lam ramped linearly 0 -> 1
   (from 1/steps: :meth:`Phase.lam`)
   (:meth:`melt_kernels.model.LoopedModel.forward`'s ``transition``).  Loss:
   ``transition`` weights, by default the logits' KL distillation alone (the
   paper's text gives phase 1 no loss of its own; both phases distil from
   the same teacher).
2. *Attention-aligned distillation* (``distill_steps``, the paper's 300):
   the pure MELT student on a MELT cache; loss KL(teacher || student) of the
   logits + beta * the mean over layers and loops of the squared error of
   the attention outputs against the frozen teacher's (beta = 0.1).

Chunk-wise: a sequence is cut into ``chunk_size`` chunks (the paper: 500 of
10,000 tokens); each chunk runs all T loops against the settled cache of the
earlier chunks, which is what decoding sees, and the teacher runs the same
chunk just before on its own caches.  :meth:`Recipe.chunking` says how step
s cuts its sequences: ``chunk_cycle`` cycles the chunk size over the steps,
and ``decode_tokens`` runs the last tokens of every sequence one at a time,
as serving decodes a continuation after prefilling its prompt in chunks.

Pre-training (``pretrain_steps``) minimises the last loop's cross-entropy
(``pretrain_objective="last-loop"``) or Ouro's Stage I objective
(``"ouro"``; arXiv 2510.25741, section 3, the entropy-regularized objective
of the exit gate's Stage I): per scored token x, the expected loss over the
exit distribution minus ``exit_beta`` times its entropy, ``sum_t p(t|x)
CE_t(x) - exit_beta * H(p(.|x))``, p from the early-exit gate's logits
(:func:`melt_kernels.model.exit_probabilities`) and CE_t the cross-entropy
of loop t's head.  The exit gate trains with it.

AdamW with separate learning rates for the base weights (``lr``, the
paper's 8e-6) and the gates (``gate_lr``, 5e-4).

Losses are averaged over the *global* batch: each process divides its sums
by the global count and multiplies by the number of processes, which DDP's
gradient averaging undoes, so 1 and N processes compute the same loss.

Memory (``memory``):

* ``"exact"``: one backward per step through every chunk: the gradient also
  flows from later chunks, through the cache values they read, into the
  weights and gates that wrote the earlier chunks (the op's autograd,
  docs/op.md#gradients).  The exact gradient of the chunk-wise model; it keeps every chunk's
  graph until the backward, so memory grows with the sequence length.
* ``"detach"``: truncated backpropagation across chunks: each chunk's loss
  is backpropagated as soon as the chunk has run, then the settled cache is
  cut from the graph (:meth:`~melt_kernels.cache.MeltCache.detach_`).  Only
  one chunk's graph is alive at a time; the gradient loses the paths from a
  chunk's loss into the earlier chunks' cache writes (what it costs is
  measured by ``benchmarks/train_memory.py``).
* ``"recompute"``: the exact gradient with one chunk's graph at a time: a
  first pass settles the caches without a graph, then each chunk, last
  first, is run again with a graph and backpropagated, its cache reads
  collecting the gradient that the earlier chunks' slots receive
  (:meth:`_Run.recompute`).  Memory: the caches and a buffer of their
  gradients, plus one chunk's graph; time: about one more forward.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from melt_kernels.model import LoopedLM, exit_probabilities
from melt_kernels.reference import compute_dtype
from melt_kernels.train.data import IGNORE, Batch

MEMORY_MODES = ("exact", "detach", "recompute")
SCHEDULES = ("constant", "cosine")
PRETRAIN_OBJECTIVES = ("last-loop", "ouro")
TERMS = ("ce", "kl", "attn", "exit_ce", "entropy")
# Which of step_counts' (scored targets, positions, attention elements) each term is averaged over.
COUNT_INDEX = {"ce": 0, "kl": 1, "attn": 2, "exit_ce": 0, "entropy": 0}


@dataclass(frozen=True)
class LossWeights:
    """A phase's loss: ``ce * cross-entropy + kl * KL(teacher || student) + attn * attention MSE + exit_ce *
    expected cross-entropy over the exit distribution - entropy * the exit distribution's entropy``."""

    ce: float = 0.0
    kl: float = 0.0
    attn: float = 0.0
    exit_ce: float = 0.0
    entropy: float = 0.0

    @property
    def uses_exit(self) -> bool:
        """Whether the loss reads the early-exit gate (Ouro's objective)."""
        return bool(self.exit_ce or self.entropy)

    def combine(self, terms: dict) -> torch.Tensor:
        """The weighted loss of ``terms`` (a value per name of :data:`TERMS`, missing ones 0); the entropy is
        subtracted: Ouro's regulariser rewards an exit distribution that keeps every loop in play."""
        signed = {"ce": self.ce, "kl": self.kl, "attn": self.attn, "exit_ce": self.exit_ce, "entropy": -self.entropy}
        return sum(weight * terms[name] for name, weight in signed.items() if weight and name in terms)


@dataclass(frozen=True)
class Phase:
    """One phase of a run: ``name`` ("pretrain", "transition" or "distill"), its steps and loss; the cache
    kind the model trains on follows from the name ("looplm" for pre-training, MELT otherwise)."""

    name: str
    steps: int
    weights: LossWeights

    @property
    def kind(self) -> str:
        return "looplm" if self.name == "pretrain" else "melt"

    def lam(self, step: int) -> Optional[float]:
        """The transition's lam at 0-based ``step`` of the phase: ``(step + 1) / steps``, linear up to 1 at the
        last step.  It starts at 1/steps, not 0: at lam = 0 a student converted from the teacher IS the teacher,
        its gradient is rounding noise, and Adam (which normalises the gradient's scale away) would turn that
        noise into a step of size lr on every weight in a random direction."""
        return (step + 1) / self.steps if self.name == "transition" else None


@dataclass
class Recipe:
    """Everything a run needs besides the models and the data; the defaults are the paper's post-training.

    ``pretrain_steps`` (0 in the paper's recipe) first trains the model itself
    with a LoopLM cache, on ``pretrain_objective`` ("last-loop": the last
    loop's cross-entropy; "ouro": Ouro's Stage I, the expected cross-entropy
    over the exit distribution minus ``exit_beta`` times its entropy): how the
    examples make a teacher from scratch.  ``batch_size`` counts sequences of
    the global batch (the paper's 320k tokens: 32 x 10,000).  The chunking of
    step s is :meth:`chunking`: chunks of ``chunk_size``, or of
    ``chunk_cycle[s % len(chunk_cycle)]`` when a cycle is given, with the last
    ``decode_tokens`` tokens of every sequence run one at a time.
    """

    seq_len: int = 10_000
    chunk_size: int = 500
    batch_size: int = 32
    pretrain_steps: int = 0
    transition_steps: int = 500
    distill_steps: int = 300
    beta: float = 0.1
    transition: LossWeights = field(default_factory=lambda: LossWeights(kl=1.0))
    lr: float = 8e-6
    gate_lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    clip: Optional[float] = 1.0
    memory: str = "exact"
    pretrain_objective: str = "last-loop"
    exit_beta: float = 0.05
    chunk_cycle: tuple[int, ...] = ()
    decode_tokens: int = 0

    def __post_init__(self):
        for name in ("seq_len", "chunk_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("pretrain_steps", "transition_steps", "distill_steps", "warmup_steps", "decode_tokens",
                     "exit_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pretrain_objective not in PRETRAIN_OBJECTIVES:
            raise ValueError(f"pretrain_objective must be one of {PRETRAIN_OBJECTIVES}, got "
                             f"{self.pretrain_objective!r}")
        self.chunk_cycle = tuple(self.chunk_cycle)  # a list when read back from a checkpoint's JSON
        if any(not isinstance(c, int) or c < 1 for c in self.chunk_cycle):
            raise ValueError(f"chunk_cycle must hold positive chunk sizes, got {self.chunk_cycle}")
        if self.decode_tokens > self.seq_len:
            raise ValueError(f"decode_tokens ({self.decode_tokens}) exceeds seq_len ({self.seq_len})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if isinstance(self.transition, dict):  # read back from a checkpoint's JSON
            self.transition = LossWeights(**self.transition)

    def phases(self) -> list[Phase]:
        """The run's phases in order, those with no steps left out."""
        pretrain = LossWeights(exit_ce=1.0, entropy=self.exit_beta) if self.pretrain_objective == "ouro" \
            else LossWeights(ce=1.0)
        phases = [Phase("pretrain", self.pretrain_steps, pretrain),
                  Phase("transition", self.transition_steps, self.transition),
                  Phase("distill", self.distill_steps, LossWeights(kl=1.0, attn=self.beta))]
        return [p for p in phases if p.steps]

    def chunking(self, step: int) -> list[int]:
        """The chunk lengths that 0-based ``step`` cuts its sequences into (they sum to ``seq_len``)."""
        size = self.chunk_cycle[step % len(self.chunk_cycle)] if self.chunk_cycle else self.chunk_size
        return chunk_lengths(self.seq_len, size, self.decode_tokens)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases())

    def lr_factor(self, step: int) -> float:
        """The learning rates' multiplier at 0-based ``step``: linear warm-up over ``warmup_steps``, then 1
        (``schedule="constant"``) or a cosine down to 0.1 at the last step (``"cosine"``)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(self.total_steps - 1 - self.warmup_steps, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def chunk_lengths(length: int, chunk_size: int, decode_tokens: int = 0) -> list[int]:
    """``length`` tokens as chunks: the first ``length - decode_tokens`` in chunks of ``chunk_size`` (the last
    one shorter if it does not divide), then ``decode_tokens`` chunks of one token."""
    if chunk_size < 1 or not 0 <= decode_tokens <= length:
        raise ValueError(f"need chunk_size >= 1 and 0 <= decode_tokens <= length, got chunk_size={chunk_size}, "
                         f"decode_tokens={decode_tokens}, length={length}")
    prefix = length - decode_tokens
    return [min(chunk_size, prefix - start) for start in range(0, prefix, chunk_size)] + [1] * decode_tokens


# ---------------------------------------------------------------- losses


def task_metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the positions with a target; logits (B, P, V), targets (B, P)."""
    scored = targets != IGNORE
    logits, targets = logits[scored].to(compute_dtype(logits.dtype)), targets[scored]
    return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean()


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, in float32 (float64 for float64), averaged (or
    summed) over positions."""
    work = compute_dtype(student.dtype)
    log_s = F.log_softmax(student.to(work).flatten(0, -2), dim=-1)
    log_t = F.log_softmax(teacher.to(work).flatten(0, -2), dim=-1)
    total = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return total / log_s.shape[0] if reduction == "mean" else total


@contextlib.contextmanager
def recorded_attention(model: LoopedLM) -> Iterator[list[torch.Tensor]]:
    """Collects the output of every attention layer call (B, M, hidden), in call order, while inside: o_proj's
    output, what the layer adds to the residual stream before its sandwich norm ``input_layernorm_2``."""
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


# ---------------------------------------------------------------- one step


def unwrap(model: torch.nn.Module) -> LoopedLM:
    """The LoopedLM inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


@dataclass
class StepTotals:
    """A process's sums over its rows of the global batch (in :data:`TERMS` order); divided by their counts
    (:data:`COUNT_INDEX`) they are the global means."""

    ce: torch.Tensor
    kl: torch.Tensor
    attn: torch.Tensor
    exit_ce: torch.Tensor
    entropy: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([getattr(self, name) for name in TERMS]).detach().double()


def chunkwise_step(model: torch.nn.Module, batch: Batch, phase: Phase, *, chunk_size: Union[int, Sequence[int]],
                   teacher: Optional[LoopedLM] = None, lam: Optional[float] = None, memory: str = "exact",
                   counts: tuple[int, int, int], world: int = 1) -> StepTotals:
    """Forward and backward of one step's loss on this process's rows ``batch`` = (input_ids, targets).

    ``chunk_size``: the sequences are cut into chunks of that size, or, a
    sequence of lengths, into those chunks in order (:meth:`Recipe.chunking`).
    ``model`` is the LoopedLM trained (or its DDP wrapper, called once per
    chunk), run chunk-wise on fresh caches: a LoopLM cache for
    "pretrain", the interpolated pairs (a LoopLM cache of its own) with
    ``lam`` for "transition", a MELT cache for "distill".  ``teacher`` (the
    frozen LoopLM, needed for the KL and attention terms) runs each chunk
    just before the student, on its own LoopLM cache, without gradients.
    ``counts`` = the global batch's scored targets, positions, and attention
    output elements (T * N * positions * hidden): each loss term is the
    global sum over it, so the gradient (after DDP's average over ``world``
    processes) is the global batch's.  ``memory`` is one of
    :data:`MEMORY_MODES` (module docstring).  Gradients accumulate into
    ``.grad``; the caller steps the optimiser.  Returns this process's sums
    of each term (the last loop's cross-entropy is computed in every phase,
    as a metric; the exit terms when the phase's loss uses them).
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if phase.name != "pretrain" and teacher is None:
        raise ValueError(f"the {phase.name!r} phase distils from a teacher: pass teacher=")
    if (phase.name == "transition") != (lam is not None):
        raise ValueError(f"lam is given in (and only in) the transition phase, got lam={lam!r} in {phase.name!r}")
    length = batch[0].shape[1]
    lengths = chunk_lengths(length, chunk_size) if isinstance(chunk_size, int) else list(chunk_size)
    if not lengths or any(n < 1 for n in lengths) or sum(lengths) != length:
        raise ValueError(f"chunk_size must be a positive size or chunk lengths summing to the sequence length "
                         f"({length}), got {chunk_size!r}")
    run = _Run(model, batch, phase, lengths, teacher, lam, counts, world)
    if memory == "recompute":
        return run.recompute()
    pending = []
    for index, start in enumerate(run.starts):
        # A backward per chunk (truncated): only the last one reduces gradients across processes.
        with run.sync(memory == "detach" and index < len(run.starts) - 1):
            loss = run.chunk(start, run.cache, run.teacher_cache)
            if memory == "detach":
                run.backward(loss)
                run.cache.detach_()
            else:
                pending.append(loss)
    if pending:
        run.backward(sum(pending))
    return run.totals()


class _Run:
    """One step's chunk-wise run: its caches, the per-chunk loss, the running sums."""

    def __init__(self, model, batch, phase, lengths, teacher, lam, counts, world):
        self.model, self.core, self.phase, self.teacher, self.lam = model, unwrap(model), phase, teacher, lam
        self.ids, self.targets = batch
        rows, self.length = self.ids.shape
        self.counts, self.world = counts, world
        self.starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self.ends = dict(zip(self.starts, [s + n for s, n in zip(self.starts, lengths)]))
        self.cache = self.core.new_cache("melt" if phase.name == "distill" else "looplm", rows, self.length)
        self.teacher_cache = teacher.new_cache("looplm", rows, self.length) if phase.name != "pretrain" else None
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=self.ids.device) for name in TERMS}

    def sync(self, skip: bool):
        """DDP's no_sync() when ``skip`` (gradients accumulate locally until a backward outside it)."""
        return self.model.no_sync() if skip and hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def chunk(self, start: int, cache, teacher_cache, record: bool = True):
        """Runs the teacher (if any) then the model on the chunk at ``start``; returns its weighted loss (its
        terms added to the sums when ``record``)."""
        end = self.ends[start]
        chunk, targets = self.ids[:, start:end], self.targets[:, start:end]
        if teacher_cache is not None:
            with torch.no_grad(), recorded_attention(self.teacher) as teacher_attn:
                teacher_logits = self.teacher(chunk, teacher_cache)
        with recorded_attention(self.core) as attn:
            logits, loops = self.model(chunk, cache, transition=None if self.lam is None else (teacher_cache, self.lam),
                                       return_loops=True)
        work = compute_dtype(logits.dtype)
        scored = targets != IGNORE
        terms = {"ce": F.cross_entropy(logits[scored].to(work), targets[scored], reduction="sum")}
        if self.phase.weights.uses_exit:
            terms.update(exit_terms(self.core, loops, targets))
        if teacher_cache is not None:
            terms["kl"] = logit_kl(logits, teacher_logits, reduction="sum")
            student = stack_attention(attn, self.core.num_loops, self.core.config.num_hidden_layers).to(work)
            want = stack_attention(teacher_attn, self.teacher.num_loops, self.teacher.config.num_hidden_layers)
            terms["attn"] = (student - want.to(work)).pow(2).sum()
        if record:
            for name, value in terms.items():
                self.sums[name] += value.detach().double()
        return self.phase.weights.combine({name: value * (self.world / self.counts[COUNT_INDEX[name]])
                                           for name, value in terms.items()})

    @staticmethod
    def backward(loss) -> None:
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()

    def totals(self) -> StepTotals:
        return StepTotals(**self.sums)

    def recompute(self) -> StepTotals:
        """memory="recompute": the exact gradient, one chunk's graph at a time.

        A first pass runs every chunk without a graph, which settles the
        caches.  Then, last chunk first, each chunk is run again with a graph
        on a replay of the caches (positions before it as leaves that collect
        their gradient, its own slots rewritten as in the first pass), and its
        loss is backpropagated together with ``<slots, G>``: G, the gradient
        that the later chunks' losses sent to this chunk's settled slots
        (gathered from their replays' leaves).  Every position a chunk reads
        before it was settled by earlier chunks and is never written again,
        so the replay computes what the first pass did.
        """
        with torch.no_grad():
            for start in self.starts:
                self.chunk(start, self.cache, self.teacher_cache)
        settled = self.cache.keys + self.cache.values
        grads = [torch.zeros_like(t) for t in settled]  # d(later chunks' loss) / d(settled cache)
        for index in reversed(range(len(self.starts))):
            start = self.starts[index]
            end = self.ends[start]
            leaves = [t[:, :start].detach().requires_grad_() for t in settled]
            cache = _replay(self.cache, start, [torch.cat((leaf, t[:, start:end]), dim=1)
                                                for leaf, t in zip(leaves, settled)])
            teacher_cache = None if self.teacher_cache is None else \
                _replay(self.teacher_cache, start, self.teacher_cache.keys + self.teacher_cache.values)
            with self.sync(index > 0):
                loss = self.chunk(start, cache, teacher_cache, record=False)
                later = [(t[:, start:end] * g[:, start:end]).sum() for t, g in zip(cache.keys + cache.values, grads)]
                self.backward(loss + sum(later))
            for leaf, g in zip(leaves, grads):
                if leaf.grad is not None:
                    g[:, :start] += leaf.grad
        return self.totals()


def exit_terms(model: LoopedLM, loops, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ouro's Stage I terms summed over the scored targets of a chunk: ``exit_ce`` = sum_t p(t|x) CE_t(x) and
    ``entropy`` = H(p(.|x)), from ``loops`` (the chunk's :class:`~melt_kernels.model.LoopOutput`) and every
    loop's logits through the model's head."""
    scored = targets != IGNORE
    hidden = loops.hidden_states[:, scored]  # (T, S, hidden)
    logits = model.lm_head(hidden)
    work = compute_dtype(logits.dtype)
    per_loop = F.cross_entropy(logits.to(work).flatten(0, 1), targets[scored].repeat(hidden.shape[0]),
                               reduction="none").view(hidden.shape[:2])
    p = exit_probabilities(loops.exit_logits[:, scored])
    return {"exit_ce": (p * per_loop).sum(), "entropy": -torch.special.xlogy(p, p).sum()}


def _replay(cache, start: int, tensors: list[torch.Tensor]):
    """A cache like ``cache`` whose K/V tensors are ``tensors`` (keys then values) and whose rows all hold
    ``start`` settled tokens: what the chunk at ``start`` saw."""
    replay = copy.copy(cache)
    half = len(tensors) // 2
    replay.keys, replay.values = tensors[:half], tensors[half:]
    replay.seqlens = torch.full_like(cache.seqlens, start)
    replay.seqlens_host = torch.full_like(cache.seqlens_host, start)
    return replay


def step_counts(batch: Batch, model: LoopedLM) -> tuple[int, int, int]:
    """The global batch's (scored targets, positions, attention output elements) that the losses average over."""
    ids, targets = batch
    c = model.config
    positions = ids.numel()
    return int((targets != IGNORE).sum()), positions, positions * c.total_ut_steps * c.num_hidden_layers * \
        c.hidden_size
