"""The Triton forward's launch plan against alternatives, at the GPU pass's headline shapes.

For each shape, the plan ``plan_launch`` picks and a few overrides of it (row and key tile sizes, warps,
pipeline depth, keys per prefix split), each timed by CUDA-graph replays on the same inputs, and its output
compared with the picked plan's (the active slots restored before each run).  It answers "would another plan
be faster here?" for the defaults in kernels/gated_kv_attention_fwd.py; attention.py times the defaults
beside SDPA.

    python benchmarks/tune_fwd.py --out results/tune.json            # a GPU (the GPU pass's "tune" step)
    TRITON_INTERPRET=1 python benchmarks/tune_fwd.py --dry-run --out /tmp/tune.json   # CPU smoke test
"""
from __future__ import annotations

import math
import sys

import torch

from attention import Inputs, Shape, flops
from common import fmt, graph_median, run_meta, setup, timed, write_results
from melt_kernels.kernels import fwd

# Overrides tried at each kind of shape: None is the default plan.  Chunks are matmul-bound (tiles, warps,
# stages); decode is memory-bound (how many keys each program streams, and how deep).
CHUNK = [None, dict(num_stages=3), dict(block_n=128), dict(block_n=128, num_stages=3), dict(block_n=32),
         dict(block_r=64), dict(block_r=64, num_warps=4, num_stages=3), dict(num_warps=4)]
DECODE = [None, dict(split_len=512), dict(split_len=1024), dict(split_len=2048), dict(block_n=128),
          dict(num_stages=4), dict(split_len=1024, num_stages=4)]


def shapes(dry_run: bool) -> list[tuple[Shape, list]]:
    if dry_run:
        return [(Shape("decode", 2, 1, 40, 4, 2, 32), [None, dict(split_len=16)]),
                (Shape("chunk", 1, 20, 24, 4, 2, 16), [None, dict(block_r=16, block_n=16)])]
    return ([(Shape("decode", 1, 1, n - 1, 16, 16), DECODE) for n in (8192, 32768)]
            + [(Shape("chunk", b, 500, cache_len, 16, 16), CHUNK) for b, cache_len in ((4, 0), (4, 4500), (1, 9500))])


def launcher(inputs: Inputs, overrides: dict | None):
    t = inputs.sets[0]
    scale = 1 / math.sqrt(inputs.shape.head_dim)

    def run():
        return fwd.gated_kv_attention_fwd(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], inputs.lengths,
                                          t["gate"], t["gate"], scale, True, **(overrides or {}))[0]
    return run


def run_shape(s: Shape, configs: list, dtype, device, cuda: bool) -> list[dict]:
    inputs = Inputs(s, dtype, device, copies=1)
    restore = inputs.active_slots_restorer()

    def output(overrides):
        out = launcher(inputs, overrides)()
        restore()
        return out.float()

    want = output(None)
    magnitude = want.abs().max().item() or 1.0
    rows = []
    for overrides in configs:
        try:
            diff = (output(overrides) - want).abs().max().item() / magnitude
        except Exception as e:  # a plan the compiler rejects (shared memory, registers) is a result here
            diff, why = None, f"{type(e).__name__}: {e}"[:200]
        else:
            ms, why = timed(launcher(inputs, overrides), cuda, graph_median)
            # The timed runs blended the active slots again and again: back to the inputs' for the next plan.
            restore()
        us = None if why else 1e3 * ms
        rows.append(dict(label=s.label, kind=s.kind, config=overrides or "default", us=us, error=why,
                         rel_diff_vs_default=diff, tflops=None if us is None else flops(s) / (us * 1e-6) / 1e12))
    default_us = rows[0]["us"]
    for r in rows:
        r["x_default"] = r["us"] / default_us if r["us"] and default_us else None
    if cuda:
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Triton forward plans: {meta['device']}, {meta['date']}, commit {meta['commit'][:12]}", "",
             f"{meta['dtype']}, causal, one gate per kv head; {meta['timing']}.", "",
             "| shape | plan | us | TFLOP/s | x default | max diff / max abs, vs default |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['config']} | {fmt(r['us'], '.1f')} | {fmt(r['tflops'], '.0f')} | "
                     f"{fmt(r['x_default'], '.2f')} | {fmt(r['rel_diff_vs_default'], '.1e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    env = setup(__doc__, "tune_fwd", argv)
    if env is None:
        return 0
    if "triton" not in env.backends:
        print("the Triton backend cannot run here: nothing to tune")
        return 1
    meta = run_meta(env.device_name, dtype=str(env.dtype), shape_set=env.shape_set,
                    timing="median of CUDA-graph replays" if env.cuda else "CPU smoke test: not timings")
    rows = []
    for s, configs in shapes(not env.cuda):
        rows += run_shape(s, configs, env.dtype, env.device, env.cuda)
        best = min((r for r in rows[-len(configs):] if r["us"]), key=lambda r: r["us"], default=None)
        print(f"{s.label}: default {fmt(rows[-len(configs)]['us'], '.1f')} us; best {best and best['config']} "
              f"{fmt(best and best['us'], '.1f')} us", flush=True)
        paths = write_results(env.args.out, "tune_fwd", meta, rows, markdown(meta, rows))
    print(markdown(meta, rows))
    print("wrote", *paths)
    # A plan that computes something else is a bug (tiles must not change the result beyond rounding order).
    # 16-bit: a few roundings of the output apart (bfloat16's step is 2**-8 of the value); float32 on the CPU.
    tol = 2e-2 if env.cuda else 1e-5
    wrong = [r for r in rows if r["rel_diff_vs_default"] is not None and r["rel_diff_vs_default"] > tol]
    for r in wrong:
        print(f"FAILED: {r['label']} {r['config']}: relative difference {r['rel_diff_vs_default']:.2e} > {tol}",
              file=sys.stderr)
    return int(bool(wrong) or rows[0]["us"] is None)


if __name__ == "__main__":
    sys.exit(main())
