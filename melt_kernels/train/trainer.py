"""The training loop: a :class:`~melt_kernels.train.recipe.Recipe`'s phases on one model, in 1 or N processes.

AdamW with two parameter groups (the base weights at ``recipe.lr``, the
MELT gates at ``recipe.gate_lr``), linear warm-up then constant (or cosine) rates, the
transition's lam ramp, gradient clipping, DistributedDataParallel under
``torchrun``, checkpoints that resume mid-phase with the same subsequent
losses, a progress bar and metrics as JSON lines.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional

import torch

from melt_kernels.model import LoopedLM
from melt_kernels.train import checkpoint
from melt_kernels.train.data import Source, shard
from melt_kernels.train.distributed import Context, wrap
from melt_kernels.train.recipe import COUNT_INDEX, TERMS, Phase, Recipe, chunkwise_step, step_counts

METRICS_FILE = "metrics.jsonl"


def is_gate(name: str) -> bool:
    return ".melt_gate." in name


def freeze_unused(model: LoopedLM, recipe: Recipe) -> None:
    """Turns off the gradients of what the recipe never trains, so that every trainable parameter gets a
    gradient at every step (DDP requires it):

    * Ouro's early-exit gate, unless the recipe pre-trains with Ouro's
      objective (``pretrain_objective="ouro"``), the one loss that reads it;
    * the MELT gates when no MELT phase runs or the model has one loop (the
      gate first acts at loop 2).
    """
    melt_phases = recipe.transition_steps + recipe.distill_steps
    # With one loop the exit distribution is p(1) = 1 whatever the gate says: nothing trains it.
    trains_exit = model.num_loops > 1 and any(phase.weights.uses_exit for phase in recipe.phases())
    if trains_exit and melt_phases:
        raise ValueError("Ouro's objective trains the exit gate, which the MELT phases leave without gradients: "
                         "pre-train the LoopLM, convert it (to_melt), then post-train")
    model.model.early_exit_gate.requires_grad_(trains_exit)
    for name, param in model.named_parameters():
        if is_gate(name) and (not melt_phases or model.num_loops == 1):
            param.requires_grad_(False)
    if recipe.pretrain_steps and melt_phases and any(is_gate(n) for n, _ in model.named_parameters()):
        raise ValueError("a recipe that pre-trains and then post-trains a gated model leaves the gates without "
                         "gradients while pre-training: pre-train the LoopLM, convert it (to_melt), then post-train")


def param_groups(model: LoopedLM, recipe: Recipe) -> list[dict]:
    """AdamW's groups: the base weights at ``recipe.lr``, the MELT gates at ``recipe.gate_lr`` (trainable only)."""
    base = [p for n, p in model.named_parameters() if p.requires_grad and not is_gate(n)]
    gates = [p for n, p in model.named_parameters() if p.requires_grad and is_gate(n)]
    groups = [{"params": base, "lr": recipe.lr, "name": "base"}]
    if gates:
        groups.append({"params": gates, "lr": recipe.gate_lr, "name": "gate"})
    return groups


class Trainer:
    """Runs ``recipe`` on ``model``, drawing global batches of ``source`` from a generator seeded with ``seed``.

    ``teacher`` (the frozen LoopLM the MELT phases distil from) is put in
    eval mode with its gradients off.  ``context`` (from
    :func:`melt_kernels.train.distributed.init`) says which process this is;
    each keeps its rows of the global batch and DDP averages the gradients.
    With ``out_dir``, the main process writes ``metrics.jsonl`` there and a
    checkpoint every ``save_every`` steps (and at the end) under
    ``out_dir/checkpoints``; :meth:`resume` continues from the newest.
    ``log`` receives every step's record (main process only).
    """

    def __init__(self, model: LoopedLM, recipe: Recipe, source: Source, *, teacher: Optional[LoopedLM] = None,
                 context: Optional[Context] = None, seed: int = 0, out_dir: Optional[str] = None,
                 save_every: int = 0, keep: int = 2, progress: bool = True,
                 log: Optional[Callable[[dict], None]] = None):
        if source.seq_len != recipe.seq_len:
            raise ValueError(f"the data's sequences have {source.seq_len} tokens, the recipe's {recipe.seq_len}")
        if source.vocab_size > model.config.vocab_size:
            raise ValueError(f"the data's vocabulary ({source.vocab_size}) exceeds the model's "
                             f"({model.config.vocab_size})")
        self.context = context or Context(device=model.model.embed_tokens.weight.device)
        if recipe.batch_size % self.context.world:
            raise ValueError(f"batch_size ({recipe.batch_size}) must be a multiple of the number of processes "
                             f"({self.context.world})")
        self.model, self.recipe, self.source, self.teacher = model, recipe, source, teacher
        self.seed, self.out_dir, self.save_every, self.keep = seed, out_dir, save_every, keep
        self.progress, self.log = progress, log
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        freeze_unused(model, recipe)
        model.train()
        self.ddp = wrap(model, self.context)
        self.optimizer = torch.optim.AdamW(param_groups(model, recipe), weight_decay=recipe.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, recipe.lr_factor)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # optimiser steps done
        self.phases = recipe.phases()
        self.history: list[dict] = []

    # ------------------------------------------------------------ where we are

    def position(self, step: int) -> tuple[Phase, int]:
        """The phase of 0-based global ``step`` and the step's index within it."""
        for phase in self.phases:
            if step < phase.steps:
                return phase, step
            step -= phase.steps
        raise ValueError("the recipe has no steps left")

    @property
    def done(self) -> bool:
        return self.step >= self.recipe.total_steps

    # ------------------------------------------------------------ one step

    def train_step(self) -> dict:
        """One optimiser step on the next global batch; returns its record (global means, the same in every
        process)."""
        phase, phase_step = self.position(self.step)
        lam = phase.lam(phase_step)
        start = time.perf_counter()
        full = self.source.sample(self.recipe.batch_size, self.generator)
        counts = step_counts(full, self.model)
        device = self.context.device
        rows = tuple(t.to(device) for t in shard(full, self.context.rank, self.context.world))
        self.optimizer.zero_grad(set_to_none=True)
        sums = chunkwise_step(self.ddp, rows, phase, chunk_size=self.recipe.chunking(self.step),
                              teacher=self.teacher, lam=lam, memory=self.recipe.memory, counts=counts,
                              world=self.context.world)
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.recipe.clip if self.recipe.clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
        rates = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        total = self.context.all_reduce_sum(sums.as_tensor()).tolist()
        means = {name: value / counts[COUNT_INDEX[name]] for name, value in zip(TERMS, total)}
        record = {"step": self.step, "phase": phase.name, "phase_step": phase_step + 1,
                  "loss": phase.weights.combine(means), "ce": means["ce"]}
        if phase.name != "pretrain":
            record.update(kl=means["kl"], attn=means["attn"])
        if phase.weights.uses_exit:
            record.update(exit_ce=means["exit_ce"], entropy=means["entropy"])
        if lam is not None:
            record["lam"] = lam
        record.update(grad_norm=grad_norm, lr=rates.get("base"), **({"gate_lr": rates["gate"]} if "gate" in rates
                                                                     else {}),
                      tokens=self.step * full[0].numel(), seconds=time.perf_counter() - start)
        return record

    def run(self, steps: Optional[int] = None) -> list[dict]:
        """Trains to the end of the recipe (or ``steps`` more steps); returns the new records."""
        end = self.recipe.total_steps if steps is None else min(self.step + steps, self.recipe.total_steps)
        bar = None
        if self.progress and self.context.main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.recipe.total_steps, initial=self.step, desc="training", unit="step",
                       dynamic_ncols=True)
        records = []
        try:
            while self.step < end:
                record = self.train_step()
                records.append(record)
                self.history.append(record)
                if self.context.main:
                    self._write_metrics(record)
                    if self.log is not None:
                        self.log(record)
                if bar is not None:
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "kl", "lam") if k in record},
                                    refresh=False)
                    bar.set_description(record["phase"])
                    bar.update(1)
                if self.out_dir and ((self.save_every and self.step % self.save_every == 0) or self.done):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        return records

    # ------------------------------------------------------------ checkpoints and metrics

    def _write_metrics(self, record: dict) -> None:
        if not self.out_dir:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")

    def state(self) -> dict:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "data_rng": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "seed": self.seed,
                 "recipe": json.dumps(dataclasses.asdict(self.recipe))}
        if self.context.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.context.device)
        return state

    def save(self, path: Optional[str] = None) -> str:
        """Writes a checkpoint (default: ``out_dir/checkpoints/step-NNNNNN``) from the main process; returns its
        path.  Every process must call it (they wait for the write)."""
        path = path or checkpoint.checkpoint_dir(self.out_dir, self.step)
        if self.context.main:
            checkpoint.save(path, self.model, self.state(), keep=self.keep)
        self.context.barrier()
        return path

    def load(self, path: str) -> None:
        """Restores checkpoint ``path``: the weights, the optimiser, the scheduler, the step, the RNG states."""
        state = checkpoint.load(path, self.model)
        saved = json.loads(state["recipe"])
        if saved != json.loads(json.dumps(dataclasses.asdict(self.recipe))):
            raise ValueError(f"checkpoint {path} was written by another recipe: {saved}, this run's "
                             f"{dataclasses.asdict(self.recipe)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.context.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.context.device)
        self.step = state["step"]
        if self.context.main and self.out_dir:
            self._truncate_metrics()
        self.context.barrier()

    def resume(self) -> Optional[str]:
        """Loads the newest checkpoint under ``out_dir`` if there is one; returns its path (or None)."""
        path = checkpoint.latest(self.out_dir) if self.out_dir else None
        if path is not None:
            self.load(path)
        return path

    def _truncate_metrics(self) -> None:
        """Drops the records past the restored step (written after the checkpoint by the run that stopped)."""
        path = os.path.join(self.out_dir, METRICS_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        with open(path, "w") as f:
            f.writelines(kept)
