"""MELT's claim where looping pays: does MELT keep a LoopLM's lead over a standard model on a task that needs depth?

The task (melt_kernels.train.walks.PermutationWalks, generated from a seed): walks of a state under a sequence of
fixed random permutations of 5 states, ``x=3 g1 g0 g2 ...``, the model naming the state after every move; the
target after k moves needs the k permutations composed, which takes layers applied in sequence (docs/depth.md).
``--task chains`` runs the calibration's first candidate instead (melt_kernels.train.chains.VariableChains).
Every model has Ouro's architecture (melt_kernels.model.LoopedLM) and trains on the same batches:

* standard: the stack run once (T = 1), from scratch;
* standard-deep: a standard model with T times the layers (the compute-matched ceiling), from scratch;
* looplm: the same stack looped T times, one KV cache per loop, from scratch with Ouro's Stage I objective:
  the teacher;
* last-step: the LoopLM decoding with one cache per layer that keeps each token's last loop's K/V (to_melt with
  the gates at init: training-free);
* melt-latent, melt-kv-head: MELT converted from the LoopLM and post-trained with the paper's recipe (phase 1,
  interpolated transition; phase 2, KL + 0.1 x attention MSE; chunk-wise) under the serving schedule (the prompt
  prefilled in chunks, the rest run one token at a time), with the latent gate (the paper's) and the kv-head
  gate (this package's);
* melt-latent-4x: melt-latent with 4 times the post-training steps in both phases.

For every row, on held-out sequences: the accuracy of the targets per difficulty (moves made; hops for chains),
served (the prompt, every walk but the last and the last one's start, prefilled in chunks, then the last walk's
moves decoded one token at a time and scored: each target is one token, so the argmax is greedy decoding's
answer), in chunks of the training size, and token by token (both over every walk); every loop's accuracy
(served); KV-cache bytes per token (float32, as trained); training time; for MELT rows the gates' mean retention
per loop 2..T.  Then the claim's test: the share of the LoopLM's lead over the standard model (served, mean over
the difficulties) that each MELT row keeps; the claim holds, small, where a row keeps at least 90% of it at 1/T
of the LoopLM's KV bytes and beats the standard model.

    python examples/depth_claim.py --json results.json --plot results.png --work-dir runs/depth
    torchrun --nproc-per-node 2 examples/depth_claim.py ...     # the full run on 2 cores
    python examples/depth_claim.py --quick --json out.json      # every row tiny (CI)
    python examples/depth_claim.py --task chains --rows standard looplm --pretrain-steps 1500   # a calibration run

Under torchrun each process trains on its share of every global batch (gloo on CPU) and evaluates its share
of the held-out sequences.  With --work-dir every finished row and the pre-trained LoopLM are kept there as they
finish, and the same command run again (same task, sizes and seed) runs only what is missing.
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
from melt_kernels.train import Recipe, comparison, evaluate, gate_retention
from melt_kernels.train.chains import VariableChains
from melt_kernels.train.comparison import Comparison, Rows, Trained, WorkDir, add_run_arguments, sized
from melt_kernels.train.walks import PermutationWalks

HELD_OUT_SEED = 2 ** 31 - 1  # the held-out sequences' generator, apart from every training seed


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    loops: int
    states: int  # --task walks (PermutationWalks)
    generators: int
    walk_steps: int
    walks: int
    values: int  # --task chains (VariableChains)
    names: int
    variables: int
    queries: int
    max_hops: int
    definition_tokens: int
    chunk: int  # MELT's prefill chunks
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    transition_steps: int
    distill_steps: int
    lr: float
    gate_lr: float
    exit_beta: float
    eval_sequences: int
    embedding_std: float  # the token embeddings' initial standard deviation; 0: the model's own (0.02)


SIZES = {
    # Every row in seconds: a smoke test of the whole comparison, not a result.
    "quick": Size(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, loops=4, states=3,
                  generators=2, walk_steps=3, walks=2, values=4, names=8, variables=6, queries=1, max_hops=3,
                  definition_tokens=1, chunk=4, batch=4, pretrain_steps=6, pretrain_lr=3e-3, transition_steps=3,
                  distill_steps=3, lr=1e-3, gate_lr=1e-2, exit_beta=0.05, eval_sequences=8, embedding_std=0.0),
    "full": Size(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=192, loops=4, states=5,
                 generators=3, walk_steps=12, walks=3, values=8, names=24, variables=24, queries=3, max_hops=8,
                 definition_tokens=1, chunk=16, batch=32, pretrain_steps=1500, pretrain_lr=3e-3, transition_steps=100,
                 distill_steps=60, lr=3e-4, gate_lr=1e-2, exit_beta=0.05, eval_sequences=512, embedding_std=0.0),
}
TASKS = ("walks", "chains")
DIFFICULTY = {"walks": "moves", "chains": "hops"}  # what a task's difficulty counts
ROWS = ("standard", "standard-deep", "looplm", "last-step", "melt-latent", "melt-kv-head", "melt-latent-4x")
DESCRIPTIONS = {
    "standard": "standard transformer (T = 1), from scratch",
    "standard-deep": "standard transformer with T times the layers (the compute-matched ceiling), from scratch",
    "looplm": "LoopLM (T loops, one cache per loop), from scratch with Ouro's objective",
    "last-step": "the LoopLM with one cache per layer keeping the last loop's K/V (training-free)",
    "melt-latent": "MELT, latent gate (the paper's), both phases, serving schedule",
    "melt-kv-head": "MELT, kv-head gate (this package's), both phases, serving schedule",
    "melt-latent-4x": "MELT latent, both phases with 4x the steps, serving schedule",
}
KEEP = 0.9  # the share of the LoopLM's lead a MELT row must keep for the claim to hold


def make_task(size: Size, name: str):
    """The task ``name`` ("walks" or "chains") at ``size``."""
    if name == "walks":
        return PermutationWalks(states=size.states, generators=size.generators, steps=size.walk_steps,
                                walks=size.walks)
    return VariableChains(values=size.values, names=size.names, variables=size.variables, queries=size.queries,
                          max_hops=size.max_hops, definition_tokens=size.definition_tokens)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every row tiny (CI smoke test)")
    p.add_argument("--task", choices=TASKS, default="walks",
                   help="permutation walks (default) or variable chains (the calibration's first task)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="rows to run (looplm is trained whenever a row needs it)")
    p.add_argument("--json", metavar="FILE", help='write {"rows": [...], "claim": {...}, ...} as JSON')
    p.add_argument("--plot", metavar="FILE.png", help="accuracy per difficulty (needs matplotlib)")
    add_run_arguments(p, Size)
    return p.parse_args(argv)


class DepthClaim:
    def __init__(self, args, context):
        self.args, self.context = args, context
        self.size = s = sized(SIZES["quick" if args.quick else "full"], args)
        self.task = make_task(s, args.task)
        ids, targets, self.difficulty = self.task.sample_with_hops(s.eval_sequences,
                                                                   torch.Generator().manual_seed(HELD_OUT_SEED))
        self.held_out = (ids, targets)
        length = self.task.seq_len
        pretraining = Recipe(seq_len=length, chunk_size=length, batch_size=s.batch, pretrain_steps=s.pretrain_steps,
                             transition_steps=0, distill_steps=0, lr=s.pretrain_lr,
                             warmup_steps=s.pretrain_steps // 10, schedule="cosine", exit_beta=s.exit_beta)
        post_training = Recipe(seq_len=length, chunk_size=s.chunk, batch_size=s.batch,
                               transition_steps=s.transition_steps, distill_steps=s.distill_steps, lr=s.lr,
                               gate_lr=s.gate_lr, decode_tokens=length - self.task.prompt)
        self.models = Comparison(self.task, pretraining, post_training, context=context, seed=args.seed,
                                 backend=args.backend, progress=args.progress,
                                 embedding_std=s.embedding_std or None)
        self.say = print if context.main else (lambda *a, **k: None)
        self.work = WorkDir(args.work_dir, {"task": args.task, "size": dataclasses.asdict(s), "seed": args.seed},
                            context)
        self.rows = Rows(self.work, self.show)

    def config(self, layers: int, loops: int) -> LoopedLMConfig:
        s = self.size
        return LoopedLMConfig(vocab_size=self.task.vocab_size, hidden_size=s.hidden, num_hidden_layers=layers,
                              num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                              intermediate_size=s.intermediate, total_ut_steps=loops, rope_theta=1e4,
                              max_position_embeddings=max(self.task.seq_len, 128))

    def accuracy(self, model: LoopedLM, cache: str, chunk_size: int, **options) -> dict:
        return evaluate(model, cache, self.held_out, chunk_size, groups=self.difficulty, context=self.context,
                        **options)

    def record(self, name: str, trained: Trained, cache: str, gate: Optional[str] = None) -> dict:
        s, model = self.size, trained.model
        served = self.accuracy(model, cache, s.chunk, prompt=self.task.prompt, per_loop=True)
        chunked = self.accuracy(model, cache, s.chunk)
        decoded = self.accuracy(model, cache, 1)
        retention = gate_retention(model, self.held_out, s.chunk, context=self.context) if cache == "melt" else None
        row = {"model": name, "description": DESCRIPTIONS[name], "layers": model.config.num_hidden_layers,
               "loops": model.num_loops, "cache": cache, "gate": gate,
               "parameters": sum(p.numel() for p in model.parameters())}
        # Accuracy per difficulty 1 .. the hardest (label 0 holds no target), and its mean over them.
        for key, run in (("served", served), ("chunks", chunked), ("decode", decoded)):
            row[f"acc_{key}"] = mean(run["acc_per_group"][1:])
            row[f"acc_{key}_per_difficulty"] = run["acc_per_group"][1:]
        scored = self.difficulty[:, self.task.prompt:]
        row.update({"acc_served_per_loop_per_difficulty": [loop[1:] for loop in served["acc_per_group_per_loop"]],
                    "bits_served": served["bits_per_token"], "bits_chunks": chunked["bits_per_token"],
                    "answers_per_difficulty": torch.bincount(scored[scored > 0])[1:].tolist(),
                    "kv_bytes_per_token": kv_bytes_per_token(model.config, cache, torch.float32),
                    "train_seconds": trained.seconds, "steps": trained.steps,
                    "final_kl": trained.history[-1].get("kl") if trained.history else None,
                    "gate_retention_per_loop": retention})
        self.rows.add(row)
        return row

    def show(self, row: dict, kept: bool) -> None:
        levels = " ".join(f"{a:.2f}" for a in row["acc_served_per_difficulty"])
        self.say(f"[{len(self.rows.list)}] {row['model']:<15} accuracy served {row['acc_served']:.3f} (by "
                 f"{DIFFICULTY[self.args.task]}: {levels}), chunks {row['acc_chunks']:.3f}, token by token "
                 f"{row['acc_decode']:.3f}; "
                 f"{row['kv_bytes_per_token']:,} KV bytes/token; {row['train_seconds']:.0f} s"
                 + ("" if row["gate_retention_per_loop"] is None else
                    "; gate retention " + ", ".join(f"{r:.3g}" for r in row["gate_retention_per_loop"]))
                 + (f" (kept in {self.work.path})" if kept else ""), flush=True)

    def run(self) -> dict:
        rows, s = self.args.rows, self.size
        self.say(f"# {self.context.world} process(es), {torch.get_num_threads()} thread(s) each, torch "
                 f"{torch.__version__}; task: {self.task}, {self.task.seq_len} tokens a sequence; evaluation: "
                 f"{s.eval_sequences} held-out sequences", flush=True)
        self.say(f"# {s}", flush=True)
        example = self.task.render(self.held_out[0][0], self.held_out[1][0])
        self.say(f"# e.g. {example}", flush=True)
        for name, layers in (("standard", s.layers), ("standard-deep", s.layers * s.loops)):
            if name in rows and not self.rows.kept(name):
                self.record(name, self.models.pretrain(self.config(layers, 1)), "looplm")
        if any(r not in ("standard", "standard-deep", *self.work.done) for r in rows):
            looplm = self.work.teacher("looplm", lambda: self.models.pretrain(self.config(s.layers, s.loops),
                                                                               pretrain_objective="ouro"),
                                       self.args.backend)
        if "looplm" in rows and not self.rows.kept("looplm"):
            self.record("looplm", looplm, "looplm")
        if "last-step" in rows and not self.rows.kept("last-step"):
            self.record("last-step", Trained(to_melt(looplm.model, "latent"), 0.0, []), "melt", gate="latent (init)")
        variants = {"melt-latent": ("latent", {}), "melt-kv-head": ("kv-head", {}),
                    "melt-latent-4x": ("latent", dict(transition_steps=4 * s.transition_steps,
                                                      distill_steps=4 * s.distill_steps))}
        for name, (gate, changes) in variants.items():
            if name in rows and not self.rows.kept(name):
                self.record(name, self.models.post_train(looplm.model, gate, **changes), "melt", gate=gate)
        return {"rows": self.rows.list, "claim": claim(self.rows.list, self.task.chance),
                "size": dataclasses.asdict(s),
                "task": {"name": self.args.task, "difficulty": DIFFICULTY[self.args.task],
                         **dataclasses.asdict(self.task), "seq_len": self.task.seq_len, "prompt": self.task.prompt,
                         "vocab_size": self.task.vocab_size, "chance": self.task.chance,
                         "held_out_seed": HELD_OUT_SEED, "example": example},
                "recipe": {"phase1": "interpolated K/V reads, KL", "phase2": "KL + beta x attention MSE",
                           "beta": Recipe().beta, "memory": Recipe().memory,
                           "teacher_objective": "Ouro Stage I: sum_t p(t|x) CE_t - exit_beta x H(p)",
                           "exit_beta": s.exit_beta,
                           "schedule": f"the {self.task.prompt}-token prompt in chunks of {s.chunk}, the other "
                                       f"{self.task.seq_len - self.task.prompt} tokens one at a time",
                           "pretrain_schedule": "AdamW, 10% linear warm-up, cosine to 0.1x",
                           "post_train_schedule": "AdamW, constant rates", "loss": "the targets only"},
                "environment": {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                                "torch": torch.__version__, "processes": self.context.world,
                                "threads": torch.get_num_threads(), "device": str(self.context.device),
                                "machine": platform.machine()},
                "quick": self.args.quick}


def mean(values: list[Optional[float]]) -> float:
    """The mean over the difficulties that have targets (each weighs the same)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present)


def claim(rows: list[dict], chance: float) -> Optional[dict]:
    """The claim's test on ``rows`` (served accuracy): the LoopLM's lead over the standard model, per difficulty
    and in the mean over them, and for every MELT row the share of that lead it keeps, whether it beats the
    standard model, its KV bytes against the LoopLM's, and whether the claim holds for it.  None without both
    baselines."""
    by_name = {r["model"]: r for r in rows}
    if "standard" not in by_name or "looplm" not in by_name:
        return None
    standard, looplm = by_name["standard"], by_name["looplm"]
    floor = standard["acc_served_per_difficulty"]
    leads = [b - a for a, b in zip(floor, looplm["acc_served_per_difficulty"])]
    lead = looplm["acc_served"] - standard["acc_served"]
    melt = {}
    for row in rows:
        if row["cache"] != "melt":
            continue
        kept = (row["acc_served"] - standard["acc_served"]) / lead if lead > 0 else None
        kv = row["kv_bytes_per_token"] / looplm["kv_bytes_per_token"]
        beats = row["acc_served"] > standard["acc_served"]
        melt[row["model"]] = {
            "kept": kept, "over_standard": row["acc_served"] - standard["acc_served"], "beats_standard": beats,
            "kept_per_difficulty": [(m - a) / d if d > 0 else None
                                    for m, a, d in zip(row["acc_served_per_difficulty"], floor, leads)],
            "kv_vs_looplm": kv, "holds": kept is not None and kept >= KEEP and beats and kv <= 1 / looplm["loops"]}
    return {"lead": lead, "lead_per_difficulty": leads, "lead_hardest": leads[-1], "standard_easiest": floor[0],
            "chance": chance, "calibrated": leads[-1] >= 0.2 and floor[0] > chance, "keep": KEEP, "melt": melt}


def table(result: dict) -> str:
    unit, hardest = result["task"]["difficulty"], len(result["rows"][0]["acc_served_per_difficulty"])
    lines = [f"| model | layers x T | cache | KV bytes/token | served, mean | served, {unit} 1..{hardest} | "
             f"chunks, mean | chunks, {unit} 1..{hardest} | token by token, mean | gate retention per loop | "
             "train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        retention = "" if r["gate_retention_per_loop"] is None else \
            ", ".join(f"{v:.3g}" for v in r["gate_retention_per_loop"])
        lines.append(f"| {r['model']} | {r['layers']} x {r['loops']} | {r['cache']} | {r['kv_bytes_per_token']:,} | "
                     f"{r['acc_served']:.3f} | {' '.join(f'{a:.2f}' for a in r['acc_served_per_difficulty'])} | "
                     f"{r['acc_chunks']:.3f} | {' '.join(f'{a:.2f}' for a in r['acc_chunks_per_difficulty'])} | "
                     f"{r['acc_decode']:.3f} | {retention} | {r['train_seconds']:.0f} |")
    test = result["claim"]
    if test is not None:
        lines += ["", f"LoopLM's lead over the standard model (served): {test['lead']:+.3f} in the mean, "
                      f"{test['lead_hardest']:+.3f} at {hardest} {unit}; the standard model at 1: "
                      f"{test['standard_easiest']:.3f} (chance {test['chance']:.3f}); calibrated (a lead of 0.2 or "
                      f"more at the hardest, the standard model above chance at the easiest): {test['calibrated']}"]
        for name, m in test["melt"].items():
            kept = "n/a" if m["kept"] is None else f"{m['kept']:.0%}"
            lines.append(f"{name}: keeps {kept} of the lead, {m['over_standard']:+.3f} over the standard model, "
                         f"KV {m['kv_vs_looplm']:.2f}x the LoopLM's: the claim "
                         f"{'holds' if m['holds'] else 'does not hold'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, unit = result["rows"], result["task"]["difficulty"]
    levels = list(range(1, len(rows[0]["acc_served_per_difficulty"]) + 1))
    fig, (served, chunks, kv) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    for ax, key, title in ((served, "acc_served_per_difficulty", "served: prompt prefilled, the rest decoded"),
                           (chunks, "acc_chunks_per_difficulty", f"in chunks of {result['size']['chunk']}")):
        for r in rows:
            ax.plot(levels, r[key], marker="o", label=r["model"], linestyle="--" if r["cache"] == "looplm" else "-")
        ax.axhline(result["task"]["chance"], color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel(unit)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=10)
    served.legend(fontsize=8)
    fig.suptitle(f"{result['task']['name']}: held-out targets")
    comparison.save_figure(fig, kv, rows, path)


def main(argv=None) -> dict:
    return comparison.main(parse_args(argv), DepthClaim, table, plot)


if __name__ == "__main__":
    main()
