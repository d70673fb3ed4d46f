"""MELT post-training from a LoopLM teacher, chunk-wise, on a synthetic copying task (arXiv 2605.07721).

1. Pre-trains a tiny LoopLM teacher (Ouro's architecture, one KV cache per loop and layer) on copying
   ``x1 .. xn SEP x1 .. xn`` (melt_kernels.train.CopyTask, drawn from a seeded torch.Generator).
2. Converts it to MELT (one gated KV cache per layer shared by the T loops): ``to_melt(teacher, gate)``,
   the teacher's weights plus gates that start as "keep nothing" (last-step reuse).
3. Runs the paper's recipe (melt_kernels.train.Recipe; docs/training.md#the-recipe): phase 1, interpolated transition
   (attention at loop r reads lam * KV_MELT + (1 - lam) * the teacher's KV of loop r, lam 0 -> 1; loss
   KL(teacher || student)); phase 2, attention-aligned distillation (KL + beta * attention-output MSE).

Training is chunk-wise: each chunk of a sequence runs all T loops against the settled cache of the
earlier chunks (what decoding sees).  The report compares teacher and student (task loss and accuracy on
held-out sequences, cache bytes); the student is evaluated in training chunks and token by token.  Every
attention call goes through melt_kernels.gated_kv_attention(backend=--backend): "auto" runs the fused
kernels on a GPU and the PyTorch reference on a CPU.  The learning rates default to ones that move a model
this small within a few hundred steps, not the paper's (8e-6 and 5e-4 for a 1.4B model).

    python examples/distill.py                                  # CPU: about a minute
    python examples/distill.py --plot losses.png --json results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from melt_kernels.checks import BACKENDS
from melt_kernels.model import GATES, LoopedLM, LoopedLMConfig
from melt_kernels.ouro import to_melt
from melt_kernels.threads import cpu_threads
from melt_kernels.train import CopyTask, Recipe, Trainer, evaluate


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="gated_kv_attention backend (default auto: the fused kernels on a GPU)")
    p.add_argument("--loops", type=int, default=2, help="loop depth T (default 2)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--gate", choices=GATES, default="kv-head", help="the student's MELT gate: latent (the MELT "
                   "paper's), kv-head or kv-element (this package's, one retention per kv head or per channel; "
                   "default kv-head)")
    p.add_argument("--rope-theta", type=float, default=1e4, help="RoPE's base (default 1e4: Ouro's 1e6 leaves the "
                   "slow channels nearly position-blind on these short sequences)")
    p.add_argument("--symbols", type=int, default=16, help="copying alphabet (default 16)")
    p.add_argument("--length", type=int, default=8, help="tokens copied; sequences are twice as long (default 8)")
    p.add_argument("--chunk", type=int, default=4, help="training chunk size (default 4: half a copy)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--transition-steps", type=int, default=75)
    p.add_argument("--distill-steps", type=int, default=75)
    p.add_argument("--beta", type=float, default=0.1, help="attention-alignment weight (default the paper's 0.1)")
    p.add_argument("--pretrain-lr", type=float, default=3e-3, help="the teacher's AdamW rate (default 3e-3)")
    p.add_argument("--lr", type=float, default=1e-3, help="post-training rate of the base weights (default 1e-3)")
    p.add_argument("--gate-lr", type=float, default=1e-2, help="post-training rate of the gates (default 1e-2)")
    p.add_argument("--eval-batch", type=int, default=256, help="held-out sequences (default 256)")
    p.add_argument("--seed", type=int, default=5, help="the teacher's initialisation and data (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: the tiny model gains nothing from more)")
    p.add_argument("--log-every", type=int, default=25, help="progress line every N steps (stderr)")
    p.add_argument("--json", metavar="FILE", help="write the results and the loss history as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot the losses through both phases (needs matplotlib)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def progress_logger(every: int, total: dict[str, int]):
    def log(record: dict) -> None:
        step, phase = record["phase_step"], record["phase"]
        if step % every and step != total[phase]:
            return
        terms = "  ".join(f"{k} {record[k]:.4f}" for k in ("loss", "ce", "kl", "attn", "lam") if k in record)
        print(f"[{phase} {step}/{total[phase]}] {terms}", file=sys.stderr, flush=True)
    return log


def write_plot(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    post = [r for r in history if r["phase"] != "pretrain"]
    steps = range(len(post))
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in (("loss", "weighted total (the loss trained)"), ("ce", "task cross-entropy (not trained)"),
                       ("kl", "KL(teacher || student)"), ("attn", "attention MSE")):
        # A floor for the log axis: at lam = 0 the student is the teacher and the KL is 0 up to rounding.
        ax.plot(steps, [max(r[key], 1e-4) for r in post], label=label, lw=1)
    boundary = sum(r["phase"] == "transition" for r in post)
    ax.axvline(boundary - 0.5, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("post-training step (phase 1: interpolated transition | phase 2: attention-aligned distillation)")
    ax.set_ylabel("loss")
    lam = ax.twinx()
    lam.plot(steps, [r.get("lam", 1.0) for r in post], color="black", ls=":", lw=1, label="lambda (MELT weight)")
    lam.set_ylabel("lambda")
    lam.set_ylim(-0.02, 1.02)
    handles = ax.get_legend_handles_labels()
    extra = lam.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.set_title("MELT post-training from a LoopLM teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    """Runs the example; returns the results (also printed, and written with --json)."""
    args = parse_args(argv)
    with cpu_threads(args.threads, args.device):
        return run(args)


def run(args) -> dict:
    task = CopyTask(args.symbols, args.length)
    config = LoopedLMConfig(vocab_size=task.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                            intermediate_size=2 * args.hidden, total_ut_steps=args.loops, rope_theta=args.rope_theta)
    pre = Recipe(seq_len=task.seq_len, chunk_size=task.seq_len, batch_size=args.batch,
                 pretrain_steps=args.pretrain_steps, transition_steps=0, distill_steps=0, lr=args.pretrain_lr)
    post = Recipe(seq_len=task.seq_len, chunk_size=args.chunk, batch_size=args.batch,
                  transition_steps=args.transition_steps, distill_steps=args.distill_steps, beta=args.beta,
                  lr=args.lr, gate_lr=args.gate_lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        teacher = LoopedLM(config, backend=args.backend).to(args.device)
    held_out = tuple(t.to(args.device) for t in task.sample(args.eval_batch,
                                                             torch.Generator().manual_seed(args.seed + 1)))
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"# MELT post-training on {where}, torch {torch.__version__}, backend {args.backend!r} -> "
          f"{teacher.attention_backend()!r}")
    print(f"# model: Ouro's architecture, {config.num_hidden_layers} layers x T={config.total_ut_steps} loops, hidden "
          f"{config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} kv) x "
          f"{config.head_dim}, {sum(p.numel() for p in teacher.parameters())} parameters, float32; student gate "
          f"{args.gate!r}")
    print(f"# task: copy {task.length} of {task.num_symbols} symbols (sequences of {task.seq_len}); batch "
          f"{args.batch}; pre-train {args.pretrain_steps} steps at {args.pretrain_lr:g}; post-train in chunks of "
          f"{args.chunk}: transition {args.transition_steps} + distillation {args.distill_steps} steps (beta "
          f"{args.beta:g}), AdamW {args.lr:g} (base) and {args.gate_lr:g} (gates); evaluated on {args.eval_batch} "
          f"held-out sequences, answers only")

    total = {"pretrain": args.pretrain_steps, "transition": args.transition_steps, "distill": args.distill_steps}
    log = progress_logger(args.log_every, total)
    seconds = {}
    start = time.perf_counter()
    history = Trainer(teacher, pre, task, seed=args.seed, progress=False, log=log).run()
    seconds["pretrain"] = time.perf_counter() - start
    student = to_melt(teacher, args.gate)
    results = {"teacher": evaluate(teacher, "looplm", held_out),
               "student_before": evaluate(student, "melt", held_out, args.chunk)}
    start = time.perf_counter()
    history += Trainer(student, post, task, teacher=teacher, seed=args.seed, progress=False, log=log).run()
    seconds["post_train"] = time.perf_counter() - start
    results["student"] = evaluate(student, "melt", held_out, args.chunk)
    results["student_decode"] = evaluate(student, "melt", held_out, 1)

    rows = (("teacher", f"LoopLM, {config.total_ut_steps} caches per layer", "one chunk", results["teacher"]),
            ("student, before", "MELT, 1 cache per layer", f"chunks of {args.chunk}", results["student_before"]),
            ("student", "MELT, 1 cache per layer", f"chunks of {args.chunk}", results["student"]),
            ("student", "MELT, 1 cache per layer", "token by token", results["student_decode"]))
    print(f"{'model':<16} {'cache':<28} {'run':<15} {'cache bytes':>12} {'loss':>8} {'acc':>7}")
    for name, cache, chunks, r in rows:
        print(f"{name:<16} {cache:<28} {chunks:<15} {r['cache_bytes'] * args.eval_batch:>12,} {r['loss']:>8.4f} "
              f"{r['acc']:>7.4f}")
    ratio = results["teacher"]["cache_bytes"] / results["student"]["cache_bytes"]
    print(f"# cache bytes for {args.eval_batch} x {task.seq_len} tokens: the teacher's is {ratio:.2f}x the "
          f"student's; wall time: pre-train {seconds['pretrain']:.1f} s, post-train {seconds['post_train']:.1f} s")

    results.update(seconds=seconds, history=history)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) if k == "device" else v for k, v in vars(args).items()}, **results}, f,
                      indent=1)
    if args.plot:
        write_plot(history, args.plot)
        print(f"# plot written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
