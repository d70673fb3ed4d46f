"""MELT's claim, small, on real text: a looped LM keeps its quality with one KV cache instead of T.

Trains, on the source of Python's standard library read as bytes (melt_kernels.train.data.stdlib_corpus:
its top-level *.py files, one in ten held out by a hash of the file name), every model of the comparison at
a size these CPUs train, all with Ouro's architecture (melt_kernels.model.LoopedLM):

* standard: the same stack run once (T = 1), trained from scratch;
* looplm: the LoopLM, T = 4 loops, one KV cache per loop, trained from scratch with Ouro's Stage I objective
  (expected cross-entropy over the exit distribution - exit_beta x its entropy; the exit gate trained): the
  teacher;
* looplm-last-loop: the same LoopLM trained on the last loop's cross-entropy alone (the earlier teacher);
* last-step, last-step-last-loop: those LoopLMs decoding with one cache per layer that keeps each token's last
  loop's K/V (to_melt with gates at init: training-free);
* melt-<gate>: MELT converted from the LoopLM (to_melt) and post-trained with the paper's recipe (phase 1,
  interpolated transition; phase 2, KL + 0.1 x attention MSE; chunk-wise; separate gate learning rate) under
  the serving schedule (sequences prefilled in chunks, their last `decode` tokens run one at a time), for each
  gate: latent (the paper's), kv-head, kv-element (this package's);
* melt-latent-fixed-chunks, melt-latent-fixed-1: melt-latent trained in fixed chunks of `chunk` and of 1;
* ablations of melt-latent: no-interpolation (phase 2 only, for both phases' steps), no-alignment
  (beta = 0), shared-lr (the gates at the base learning rate);
* melt-latent-4x: melt-latent with 4 times the post-training steps in both phases (whether the gap to the
  LoopLM is a question of the post-training budget).

For every row: held-out loss in bits per byte run in training-size chunks, decoded token by token (a model
with one cache per layer and T > 1 depends on the chunking), and served (the first `prompt` bytes prefilled in
chunks, the rest decoded token by token, the continuation scored), each loop's bits per byte (chunks), KV-cache
bytes per token (float32, as trained), training time, and for MELT rows how open the gate ended up (mean
retention over the held-out tokens, per loop 2..T and their mean; at init 4.5e-5).

    python examples/replicate.py --json results.json --plot results.png --work-dir runs/replication
                                                         # the full run: about two hours on 2 cores
    python examples/replicate.py --quick --json out.json                     # every row tiny (CI)
    torchrun --nproc-per-node 2 examples/replicate.py --quick --json out.json  # the same eval losses

Under torchrun each process trains on its share of every global batch (gloo on CPU) and evaluates its share
of the held-out sequences; the numbers are the same as in one process up to rounding.

With --work-dir every finished row (rows.jsonl) and every pre-trained teacher is kept there as it finishes;
the same command run again (same size and seed) reuses them and runs only what is missing, so a run longer
than a sitting can be stopped and picked up.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
from dataclasses import dataclass
from typing import Optional

import torch

from melt_kernels.model import LoopedLM, LoopedLMConfig, kv_bytes_per_token
from melt_kernels.ouro import to_melt
from melt_kernels.train import Recipe, comparison, evaluate, gate_retention, stdlib_corpus
from melt_kernels.train.comparison import Comparison, Rows, Trained, WorkDir, add_run_arguments, sized


DECODE_FULL = 16  # the serving schedule's decoded tail at full size: benchmarks/NOTES.md, issue 22


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    loops: int
    seq_len: int
    chunk: int
    batch: int
    pretrain_steps: int
    transition_steps: int
    distill_steps: int
    eval_sequences: int
    pretrain_lr: float
    lr: float
    gate_lr: float
    decode: int  # the serving schedule: the last `decode` tokens of every training sequence run one at a time
    prompt: int  # the served evaluation's prompt, prefilled in chunks
    exit_beta: float


SIZES = {
    # Every row in well under a minute on 2 cores: a smoke test of the whole comparison, not a result.
    "quick": Size(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, loops=4, seq_len=32,
                  chunk=8, batch=4, pretrain_steps=6, transition_steps=3, distill_steps=3, eval_sequences=4,
                  pretrain_lr=3e-3, lr=1e-3, gate_lr=1e-2, decode=16, prompt=16, exit_beta=0.05),
    "full": Size(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=384, loops=4, seq_len=128,
                 chunk=16, batch=16, pretrain_steps=1200, transition_steps=100, distill_steps=60, eval_sequences=96,
                 pretrain_lr=3e-3, lr=3e-4, gate_lr=1e-2, decode=DECODE_FULL, prompt=64, exit_beta=0.05),
}
ROWS = ("standard", "looplm", "looplm-last-loop", "last-step", "last-step-last-loop", "melt-latent", "melt-kv-head",
        "melt-kv-element", "melt-latent-fixed-chunks", "melt-latent-fixed-1", "melt-latent-no-interpolation",
        "melt-latent-no-alignment", "melt-latent-shared-lr", "melt-latent-4x")
DESCRIPTIONS = {
    "standard": "standard transformer (T = 1), from scratch",
    "looplm": "LoopLM (T loops, one cache per loop), from scratch with Ouro's objective",
    "looplm-last-loop": "LoopLM, from scratch on the last loop's cross-entropy",
    "last-step": "LoopLM (Ouro's objective), one cache per layer keeping the last loop's K/V (training-free)",
    "last-step-last-loop": "LoopLM (last loop), one cache per layer keeping the last loop's K/V (training-free)",
    "melt-latent": "MELT, latent gate (the paper's), both phases, serving schedule",
    "melt-kv-head": "MELT, kv-head gate (this package's), both phases, serving schedule",
    "melt-kv-element": "MELT, kv-element gate (this package's), both phases, serving schedule",
    "melt-latent-fixed-chunks": "MELT latent, trained in fixed chunks of the chunk size",
    "melt-latent-fixed-1": "MELT latent, trained token by token (fixed chunks of 1)",
    "melt-latent-no-interpolation": "MELT latent, no interpolated transition (phase 2 for all steps)",
    "melt-latent-no-alignment": "MELT latent, no attention alignment (beta = 0)",
    "melt-latent-shared-lr": "MELT latent, gates at the base learning rate",
    "melt-latent-4x": "MELT latent, both phases with 4x the steps, serving schedule",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every row tiny (CI smoke test)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="rows to run (looplm is trained whenever a row needs it)")
    p.add_argument("--json", metavar="FILE", help='write {"rows": [...], ...} as JSON')
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the rows (needs matplotlib)")
    add_run_arguments(p, Size)
    return p.parse_args(argv)


def model_config(size: Size, loops: int) -> LoopedLMConfig:
    return LoopedLMConfig(vocab_size=256, hidden_size=size.hidden, num_hidden_layers=size.layers,
                          num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
                          intermediate_size=size.intermediate, total_ut_steps=loops, rope_theta=1e4,
                          max_position_embeddings=max(size.seq_len, 128))


class Replication:
    def __init__(self, args, context):
        self.args, self.context, self.size = args, context, sized(SIZES["quick" if args.quick else "full"], args)
        s = self.size
        corpus = stdlib_corpus()
        self.corpus = corpus.describe()
        train, held = corpus.streams(s.seq_len)
        self.held_out = held.windows(s.eval_sequences)
        pretraining = Recipe(seq_len=s.seq_len, chunk_size=s.seq_len, batch_size=s.batch,
                             pretrain_steps=s.pretrain_steps, transition_steps=0, distill_steps=0, lr=s.pretrain_lr,
                             warmup_steps=s.pretrain_steps // 10, schedule="cosine", exit_beta=s.exit_beta)
        post_training = Recipe(seq_len=s.seq_len, chunk_size=s.chunk, batch_size=s.batch,
                               transition_steps=s.transition_steps, distill_steps=s.distill_steps, lr=s.lr,
                               gate_lr=s.gate_lr, decode_tokens=s.decode)
        self.models = Comparison(train, pretraining, post_training, context=context, seed=args.seed,
                                 backend=args.backend, progress=args.progress)
        self.looplm: Optional[LoopedLM] = None
        self.looplm_last_loop: Optional[LoopedLM] = None
        self.say = print if context.main else (lambda *a, **k: None)
        self.work = WorkDir(args.work_dir, {"size": dataclasses.asdict(self.size), "seed": args.seed}, context)
        self.rows = Rows(self.work, self.show)

    def record(self, name: str, trained: Trained, cache: str, gate: Optional[str] = None) -> dict:
        s, model, history = self.size, trained.model, trained.history
        chunked = evaluate(model, cache, self.held_out, s.chunk, per_loop=True, context=self.context)
        decoded = evaluate(model, cache, self.held_out, 1, context=self.context)
        served = evaluate(model, cache, self.held_out, s.chunk, prompt=s.prompt, context=self.context)
        retention = gate_retention(model, self.held_out, s.chunk, context=self.context) if cache == "melt" else None
        row = {"model": name, "description": DESCRIPTIONS[name], "loops": model.num_loops, "cache": cache,
               "gate": gate, "parameters": sum(p.numel() for p in model.parameters()),
               "eval_loss": chunked["bits_per_token"], "eval_loss_decode": decoded["bits_per_token"],
               "eval_loss_served": served["bits_per_token"], "eval_loss_per_loop": chunked["bits_per_token_per_loop"],
               "eval_tokens": chunked["tokens"],
               "kv_bytes_per_token": kv_bytes_per_token(model.config, cache, torch.float32),
               "train_seconds": trained.seconds, "steps": trained.steps,
               "final_kl": history[-1].get("kl") if history else None,
               "gate_retention": None if retention is None else sum(retention) / len(retention),
               "gate_retention_per_loop": retention}
        self.rows.add(row)
        return row

    def show(self, row: dict, kept: bool) -> None:
        s = self.size
        self.say(f"[{len(self.rows.list)}] {row['model']:<30} bits/byte {row['eval_loss']:.4f} (chunks of {s.chunk}), "
                 f"{row['eval_loss_decode']:.4f} (token by token), {row['eval_loss_served']:.4f} (served); "
                 f"per loop {', '.join(f'{b:.3f}' for b in row['eval_loss_per_loop'])}; "
                 f"{row['kv_bytes_per_token']:,} KV bytes/token; "
                 f"{row['train_seconds']:.0f} s" + (f"; gate retention {row['gate_retention']:.3g}"
                                                    if row["gate_retention"] is not None else "")
                 + (f" (kept in {self.work.path})" if kept else ""), flush=True)

    def run(self) -> dict:
        rows, s = self.args.rows, self.size
        self.say(f"# {self.context.world} process(es), {torch.get_num_threads()} thread(s) each, torch "
                 f"{torch.__version__}; corpus: {self.corpus['train_bytes']:,} training and "
                 f"{self.corpus['held_out_bytes']:,} held-out bytes ({self.corpus['split']}); evaluation: "
                 f"{s.eval_sequences} x {s.seq_len} held-out bytes", flush=True)
        self.say(f"# {s}", flush=True)
        missing = [r for r in rows if r not in self.work.done]
        backend = self.args.backend
        if "standard" in rows and not self.rows.kept("standard"):
            self.record("standard", self.models.pretrain(model_config(s, 1)), "looplm")
        if any(r not in ("standard", "looplm-last-loop", "last-step-last-loop") for r in missing):
            looplm = self.work.teacher(
                "looplm", lambda: self.models.pretrain(model_config(s, s.loops), pretrain_objective="ouro"), backend)
            self.looplm = looplm.model
        if "looplm" in rows and not self.rows.kept("looplm"):
            self.record("looplm", looplm, "looplm")
        if "looplm-last-loop" in missing or "last-step-last-loop" in missing:
            looplm_last_loop = self.work.teacher("looplm-last-loop",
                                                 lambda: self.models.pretrain(model_config(s, s.loops)), backend)
            self.looplm_last_loop = looplm_last_loop.model
        if "looplm-last-loop" in rows and not self.rows.kept("looplm-last-loop"):
            self.record("looplm-last-loop", looplm_last_loop, "looplm")
        for name, teacher in (("last-step", self.looplm), ("last-step-last-loop", self.looplm_last_loop)):
            if name in rows and not self.rows.kept(name):
                self.record(name, Trained(to_melt(teacher, "latent"), 0.0, []), "melt", gate="latent (init)")
        variants = {"melt-latent": ("latent", {}), "melt-kv-head": ("kv-head", {}),
                    "melt-kv-element": ("kv-element", {}),
                    "melt-latent-fixed-chunks": ("latent", dict(decode_tokens=0)),
                    "melt-latent-fixed-1": ("latent", dict(chunk_size=1, decode_tokens=0)),
                    "melt-latent-no-interpolation": ("latent", dict(
                        transition_steps=0, distill_steps=s.transition_steps + s.distill_steps)),
                    "melt-latent-no-alignment": ("latent", dict(beta=0.0)),
                    "melt-latent-shared-lr": ("latent", dict(gate_lr=s.lr)),
                    "melt-latent-4x": ("latent", dict(transition_steps=4 * s.transition_steps,
                                                      distill_steps=4 * s.distill_steps))}
        for name, (gate, changes) in variants.items():
            if name in rows and not self.rows.kept(name):
                self.record(name, self.models.post_train(self.looplm, gate, **changes), "melt", gate=gate)
        return {"rows": self.rows.list, "size": dataclasses.asdict(s), "corpus": self.corpus,
                "recipe": {"phase1": "interpolated K/V reads, KL", "phase2": "KL + beta x attention MSE",
                           "beta": Recipe().beta, "memory": Recipe().memory,
                           "teacher_objective": "Ouro Stage I: sum_t p(t|x) CE_t - exit_beta x H(p)",
                           "exit_beta": s.exit_beta,
                           "schedule": f"chunks of {s.chunk}, the last {s.decode} tokens one at a time",
                           "pretrain_schedule": "AdamW, 10% linear warm-up, cosine to 0.1x",
                           "post_train_schedule": "AdamW, constant rates"},
                "environment": {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                                "torch": torch.__version__, "processes": self.context.world,
                                "threads": torch.get_num_threads(), "device": str(self.context.device),
                                "machine": platform.machine()},
                "quick": self.args.quick}


def table(result: dict) -> str:
    lines = ["| model | T | cache | bits/byte, chunks | bits/byte, token by token | bits/byte, served | "
             "bits/byte per loop | KV bytes/token | train s | gate retention per loop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        retention = "" if r["gate_retention_per_loop"] is None else \
            ", ".join(f"{v:.3g}" for v in r["gate_retention_per_loop"])
        per_loop = ", ".join(f"{v:.3f}" for v in r["eval_loss_per_loop"])
        lines.append(f"| {r['model']} | {r['loops']} | {r['cache']} | {r['eval_loss']:.4f} | "
                     f"{r['eval_loss_decode']:.4f} | {r['eval_loss_served']:.4f} | {per_loop} | "
                     f"{r['kv_bytes_per_token']:,} | {r['train_seconds']:.0f} | {retention} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["model"] for r in rows]
    x = range(len(rows))
    fig, (ax, kv) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.27
    columns = (("eval_loss", f"in chunks of {result['size']['chunk']}"), ("eval_loss_decode", "token by token"),
               ("eval_loss_served", f"served ({result['size']['prompt']} prefilled, the rest decoded)"))
    for offset, (key, label) in zip((-width, 0, width), columns):
        ax.bar([i + offset for i in x], [r[key] for r in rows], width, label=label)
    low = min(r[key] for r in rows for key, _ in columns)
    high = max(r[key] for r in rows for key, _ in columns)
    ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.05 * (high - low + 1e-9))
    ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("Python stdlib source, held-out files")
    ax.legend(fontsize=8)
    comparison.save_figure(fig, kv, rows, path)


def main(argv=None) -> dict:
    return comparison.main(parse_args(argv), Replication, table, plot)


if __name__ == "__main__":
    main()
