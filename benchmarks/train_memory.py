"""Peak memory of one chunk-wise MELT training step against sequence length and chunk count, per memory mode.

One optimiser step's forward and backward (melt_kernels.train.recipe.chunkwise_step) of a MELT student
distilled from a frozen LoopLM teacher (Ouro's architecture, random weights, the paper's latent gate made
to act), in the recipe's three memory modes:

* exact: one backward through every chunk (the gradient also reaches, through the cache values later
  chunks read, the weights and gates that wrote the earlier chunks): every chunk's graph stays alive until
  the backward, so memory grows with the sequence;
* detach: truncated backpropagation, a backward per chunk and the settled cache cut from the graph: one
  chunk's graph at a time, an approximate gradient;
* recompute: the exact gradient with one chunk's graph at a time: the chunks run once without a graph,
  then again one by one, last first, with their backward.

For each it reports the peak bytes of the step (on a CPU from torch.profiler's memory events; on a GPU
torch.cuda.max_memory_allocated; weights excluded, their gradients included), the median time of a step,
the caches' bytes, and how far each mode's gradient is from the exact one on the same weights and batch
(cosine and relative L2 difference, over all trainable parameters and over the gates alone).  Grids: the
sequence length at a fixed chunk size, then the number of chunks at a fixed length.  Phases: distill (phase
2) by default, --phases transition adds phase 1 (lam 0.5, the interpolated pairs, one per loop).

    python benchmarks/train_memory.py                    # CPU: ~2 minutes
    python benchmarks/train_memory.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loop_depth import PeakMemory, human, progress  # noqa: E402

from melt_kernels.checks import BACKENDS  # noqa: E402
from melt_kernels.model import GATES, LoopedLM, LoopedLMConfig  # noqa: E402
from melt_kernels.ouro import to_melt  # noqa: E402
from melt_kernels.threads import cpu_threads  # noqa: E402
from melt_kernels.train.recipe import LossWeights, Phase, chunkwise_step, step_counts  # noqa: E402

MODES = ("exact", "detach", "recompute")
PHASES = {"distill": (Phase("distill", 1, LossWeights(kl=1.0, attn=0.1)), None),
          "transition": (Phase("transition", 2, LossWeights(kl=1.0)), 0.5)}
PRESETS = {
    "quick": dict(config=LoopedLMConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, intermediate_size=64, total_ut_steps=2,
                                        rope_theta=1e4),
                  lengths=[16, 32], chunk=8, fixed_length=32, chunk_counts=[1, 4], batch=2, repeats=1),
    "cpu": dict(config=LoopedLMConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, intermediate_size=256, total_ut_steps=4,
                                      rope_theta=1e4),
                lengths=[64, 128, 256, 512], chunk=32, fixed_length=256, chunk_counts=[1, 2, 4, 8, 16], batch=4,
                repeats=3),
    "cuda": dict(config=LoopedLMConfig(vocab_size=4096, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                                       num_key_value_heads=8, head_dim=128, intermediate_size=2816,
                                       total_ut_steps=4),
                 lengths=[1024, 2048, 4096, 8192], chunk=500, fixed_length=4000, chunk_counts=[1, 2, 4, 8],
                 batch=2, repeats=5),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--gate", choices=GATES, default="latent")
    p.add_argument("--phases", nargs="+", choices=sorted(PHASES), default=["distill"])
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the records as JSON")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.preset = "quick" if args.quick else args.device.type
    return args


def models(config: LoopedLMConfig, gate: str, args):
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        teacher = LoopedLM(config, backend=args.backend, device=args.device, dtype=dtype)
        student = to_melt(teacher, gate)
        # The gates start as "keep nothing"; drawn at random they act, as after training.
        with torch.no_grad():
            for name, param in student.named_parameters():
                if ".melt_gate." in name:
                    param.normal_(0, param.shape[-1] ** -0.5)
    teacher.requires_grad_(False)
    student.model.early_exit_gate.requires_grad_(False)
    return teacher, student


def grads_of(student, teacher, batch, phase, lam, chunk, memory) -> dict[str, torch.Tensor]:
    student.zero_grad(set_to_none=True)
    chunkwise_step(student, batch, phase, chunk_size=chunk, teacher=teacher, lam=lam, memory=memory,
                   counts=step_counts(batch, student))
    return {n: p.grad.detach().double().flatten() for n, p in student.named_parameters() if p.grad is not None}


def compare(got: dict, want: dict, gates_only: bool) -> tuple[float, float]:
    names = [n for n in want if (".melt_gate." in n) == gates_only or not gates_only]
    g, w = torch.cat([got[n] for n in names]), torch.cat([want[n] for n in names])
    cosine = float(torch.dot(g, w) / (g.norm() * w.norm()))
    return cosine, float((g - w).norm() / w.norm())


def measure(student, teacher, phase_name, length, chunk, args, preset, gen) -> list[dict]:
    phase, lam = PHASES[phase_name]
    ids = torch.randint(0, student.config.vocab_size, (preset["batch"], length + 1), generator=gen)
    batch = (ids[:, :-1].to(args.device), ids[:, 1:].to(args.device))
    exact = None
    records = []
    for memory in MODES:
        grads = grads_of(student, teacher, batch, phase, lam, chunk, memory)  # warm-up; the exact one kept
        if memory == "exact":
            exact = grads
        seconds = []
        for _ in range(preset["repeats"]):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            grads_of(student, teacher, batch, phase, lam, chunk, memory)
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        student.zero_grad(set_to_none=True)
        with PeakMemory(args.device) as peak:
            grads_of(student, teacher, batch, phase, lam, chunk, memory)
        cos, rel = compare(grads, exact, gates_only=False)
        gate_cos, gate_rel = compare(grads, exact, gates_only=True)
        kind = "looplm" if phase_name == "transition" else "melt"
        cache = student.new_cache(kind, preset["batch"], length).nbytes + \
            teacher.new_cache("looplm", preset["batch"], length).nbytes
        records.append(dict(phase=phase_name, memory=memory, seq_len=length, chunk=chunk,
                            chunks=math.ceil(length / chunk), batch=preset["batch"], peak_bytes=peak.peak,
                            cache_bytes=cache, ms_per_step=1e3 * statistics.median(seconds), grad_cosine=cos,
                            grad_rel_diff=rel, gate_grad_cosine=gate_cos, gate_grad_rel_diff=gate_rel))
    return records


def print_table(records) -> None:
    header = ["phase", "memory", "length", "chunks", "caches", "peak", "ms/step", "grad cos", "rel diff",
              "gate cos"]
    rows = [[r["phase"], r["memory"], str(r["seq_len"]), str(r["chunks"]), human(r["cache_bytes"]),
             human(r["peak_bytes"]), f"{r['ms_per_step']:.0f}", f"{r['grad_cosine']:.4f}",
             f"{r['grad_rel_diff']:.3f}", f"{r['gate_grad_cosine']:.4f}"] for r in records]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    with cpu_threads(args.threads, args.device):
        return run(args)


def run(args) -> list[dict]:
    preset = PRESETS[args.preset]
    config = preset["config"]
    teacher, student = models(config, args.gate, args)
    gen = torch.Generator().manual_seed(args.seed)
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"# chunk-wise training step memory on {where}, torch {torch.__version__}, backend {args.backend!r}")
    print(f"# student: Ouro's architecture, {config.num_hidden_layers} layers x T={config.total_ut_steps}, hidden "
          f"{config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} kv) x "
          f"{config.head_dim}, gate {args.gate!r} (random), weights {human(weights)}; teacher the same LoopLM, "
          f"frozen; batch {preset['batch']}")
    print(f"# peak = {PeakMemory.describe(args.device)}, over one step's forward and backward (the gradients, "
          f"{human(weights)} at most, included); caches = student's + teacher's; grad cos / rel diff: the mode's "
          f"gradient against the exact one (all parameters; gate cos: the gates alone)")
    todo = [(phase, n, preset["chunk"]) for phase in args.phases for n in preset["lengths"]]
    todo += [(phase, preset["fixed_length"], math.ceil(preset["fixed_length"] / c)) for phase in args.phases
             for c in preset["chunk_counts"]]
    records = []
    for i, (phase, length, chunk) in enumerate(dict.fromkeys(todo)):
        progress(f"[{i + 1}/{len(todo)}] {phase}: {length} tokens in chunks of {chunk}")
        records += measure(student, teacher, phase, length, chunk, args, preset, gen)
    progress("done")
    print_table(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "gate": args.gate,
                       "config": {k: v for k, v in vars(config).items()}, "rows": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
