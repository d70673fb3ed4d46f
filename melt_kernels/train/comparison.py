"""The models of a MELT comparison, trained alike: from scratch (a standard model, a LoopLM), or converted from a
LoopLM and post-trained with the paper's recipe, with every finished row and teacher kept in a work dir so that a
run longer than a sitting resumes.  What ``examples/replicate.py`` (text) and ``examples/depth_claim.py`` (a task
that needs depth) share.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Callable, NamedTuple, Optional

import torch

from melt_kernels.checks import BACKENDS
from melt_kernels.model import LoopedLM, LoopedLMConfig
from melt_kernels.ouro import load_ouro, to_melt
from melt_kernels.threads import cpu_threads
from melt_kernels.train import distributed
from melt_kernels.train.data import Source
from melt_kernels.train.distributed import Context
from melt_kernels.train.recipe import Recipe
from melt_kernels.train.trainer import Trainer


def add_run_arguments(parser: argparse.ArgumentParser, size: type) -> None:
    """The options every comparison script takes: the seed, threads, device, backend, progress bars, the work
    dir, and an option ``--field-name`` per field of dataclass ``size`` (:func:`add_size_arguments`)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads per process (default 1)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--progress", action="store_true", help="progress bars (main process)")
    parser.add_argument("--work-dir", metavar="DIR", help="keep finished rows and teachers here; a rerun resumes")
    add_size_arguments(parser, size)


def add_size_arguments(parser: argparse.ArgumentParser, size: type) -> None:
    """An option ``--field-name`` per field of dataclass ``size`` (int or float), default None: the size's."""
    for field in dataclasses.fields(size):
        parser.add_argument("--" + field.name.replace("_", "-"), type={"int": int, "float": float}[field.type],
                            default=None, help=f"override the size's {field.name}")


def sized(base, args: argparse.Namespace):
    """``base`` (a size dataclass) with the fields that ``args`` overrides (:func:`add_size_arguments`)."""
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **changes)


class Trained(NamedTuple):
    """A trained model, the seconds its training took and the trainer's records."""

    model: LoopedLM
    seconds: float
    history: list[dict]

    @property
    def steps(self) -> dict[str, int]:
        """Optimiser steps per phase, in the order run."""
        phases: dict[str, int] = {}
        for record in self.history:
            phases[record["phase"]] = phases.get(record["phase"], 0) + 1
        return phases


class WorkDir:
    """The finished pieces of one run (``--work-dir``): ``run.json`` names the settings they belong to,
    ``rows.jsonl`` holds a line per finished row, ``<teacher>/`` each pre-trained teacher with its
    ``training.json`` (seconds, history).  Only the main process writes; every process reads."""

    def __init__(self, path: Optional[str], fingerprint: dict, context: Context):
        self.path, self.context = path, context
        self.done: dict[str, dict] = {}
        if path is None:
            return
        run = os.path.join(path, "run.json")
        if os.path.exists(run):
            with open(run) as f:
                held = json.load(f)
            if held != fingerprint:
                raise ValueError(f"--work-dir {path} holds a run of {held}, not of {fingerprint}: pass another "
                                 "folder (or delete it)")
            rows = os.path.join(path, "rows.jsonl")
            if os.path.exists(rows):
                with open(rows) as f:
                    self.done = {row["model"]: row for row in map(json.loads, f)}
        context.barrier()  # every process has read run.json before the main one may write it
        if context.main and not os.path.exists(run):
            os.makedirs(path, exist_ok=True)
            with open(run, "w") as f:
                json.dump(fingerprint, f, indent=1)

    def add(self, row: dict) -> None:
        if self.path is not None and self.context.main:
            with open(os.path.join(self.path, "rows.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def teacher(self, name: str, train: Callable[[], Trained], backend: str) -> Trained:
        """The teacher kept under ``name``, or ``train()``'s, then kept."""
        folder = None if self.path is None else os.path.join(self.path, name)
        if folder is not None and os.path.exists(os.path.join(folder, "training.json")):
            with open(os.path.join(folder, "training.json")) as f:
                training = json.load(f)
            model = load_ouro(folder, device=self.context.device, backend=backend)
            return Trained(model, training["seconds"], training["history"])
        trained = train()
        if folder is not None and self.context.main:
            trained.model.save_pretrained(folder)
            with open(os.path.join(folder, "training.json"), "w") as f:
                json.dump({"seconds": trained.seconds, "history": trained.history}, f)
        self.context.barrier()
        return trained


class Rows:
    """A run's finished rows in order (``.list``): those an earlier run kept in the work dir, then new ones, each
    kept there as it finishes; ``show(row, kept)`` reports each (kept: it came from the work dir)."""

    def __init__(self, work: WorkDir, show: Callable[[dict, bool], None]):
        self.work, self.show = work, show
        self.list: list[dict] = []

    def kept(self, name: str) -> bool:
        """Whether row ``name`` finished in an earlier run (then it is this run's next row)."""
        row = self.work.done.get(name)
        if row is not None:
            self.list.append(row)
            self.show(row, True)
        return row is not None

    def add(self, row: dict) -> None:
        self.list.append(row)
        self.work.add(row)
        self.show(row, False)


class Comparison:
    """Trains the models of a comparison on ``source``: :meth:`pretrain` from scratch with ``pretraining``,
    :meth:`post_train` a LoopLM converted to MELT with ``post_training`` (each with changes of a row's own).

    Every model starts from the weights ``seed`` gives and every trainer draws its batches from ``seed``, so
    rows differ only in what they set out to differ in.  ``embedding_std``: the token embeddings are drawn from
    N(0, embedding_std^2) instead of the model's own initialisation (:func:`melt_kernels.model.init_weights`).
    """

    def __init__(self, source: Source, pretraining: Recipe, post_training: Recipe, *, context: Context,
                 seed: int = 0, backend: str = "auto", progress: bool = False,
                 embedding_std: Optional[float] = None):
        self.source, self.pretraining, self.post_training = source, pretraining, post_training
        self.context, self.seed, self.backend, self.progress = context, seed, backend, progress
        self.embedding_std = embedding_std

    def new_model(self, config: LoopedLMConfig) -> LoopedLM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LoopedLM(config, backend=self.backend)
            if self.embedding_std is not None:
                torch.nn.init.normal_(model.model.embed_tokens.weight, std=self.embedding_std)
            return model.to(self.context.device)

    def train(self, model: LoopedLM, recipe: Recipe, teacher: Optional[LoopedLM] = None) -> Trained:
        trainer = Trainer(model, recipe, self.source, teacher=teacher, context=self.context, seed=self.seed,
                          progress=self.progress)
        start = time.perf_counter()
        history = trainer.run()
        return Trained(model, time.perf_counter() - start, history)

    def pretrain(self, config: LoopedLMConfig, **changes) -> Trained:
        """A model of ``config`` trained from scratch with ``pretraining`` (and ``changes`` to it)."""
        return self.train(self.new_model(config), dataclasses.replace(self.pretraining, **changes))

    def post_train(self, teacher: LoopedLM, gate: str, **changes) -> Trained:
        """MELT with ``gate`` converted from ``teacher`` (:func:`~melt_kernels.ouro.to_melt`) and post-trained
        from it with ``post_training`` (and ``changes``)."""
        recipe = dataclasses.replace(self.post_training, **changes)
        return self.train(to_melt(teacher, gate), recipe, teacher=teacher)


def main(args: argparse.Namespace, build: Callable[[argparse.Namespace, Context], "object"],
         table: Callable[[dict], str], plot: Callable[[dict, str], None]) -> dict:
    """Runs a comparison script: ``build(args, context).run()`` in this process's share of a run (``args.device``,
    ``args.threads`` intra-op threads), then, in the main process, prints ``table(result)`` and writes
    ``args.json`` and ``args.plot`` (``plot(result, path)``) when asked for; returns the result."""
    with cpu_threads(args.threads):
        with distributed.session(args.device) as context:
            result = build(args, context).run()
            if context.main:
                print(table(result))
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=1)
                if args.plot:
                    plot(result, args.plot)
            return result


def kv_panel(ax, rows: list[dict]) -> None:
    """Draws the rows' KV-cache bytes per token (``kv_bytes_per_token``) as bars on matplotlib axes ``ax``."""
    ax.bar(range(len(rows)), [r["kv_bytes_per_token"] for r in rows], color="gray")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("KV-cache bytes per token (float32)")
    ax.set_title("cache per token")


def save_figure(fig, kv_ax, rows: list[dict], path: str) -> None:
    """Draws the rows' KV bytes (:func:`kv_panel`) on ``kv_ax``, then writes ``fig`` to ``path`` and closes it."""
    import matplotlib.pyplot as plt

    kv_panel(kv_ax, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
