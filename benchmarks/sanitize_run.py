"""A small standalone workload for compute-sanitizer (memcheck, racecheck, synccheck) in the GPU pass.

Two decode and two chunk shapes per kernel backend through the public op (gated, GQA, several key splits
and row blocks), and one forward + backward per backend, each checked loosely against the reference so a
wrong result also fails the run.  Small on purpose: the sanitizer slows kernels by orders of magnitude.

    compute-sanitizer --tool racecheck python benchmarks/sanitize_run.py
    python benchmarks/sanitize_run.py --dry-run      # the same calls on the CPU (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# (batch, M, Hq, Hkv, D, L): decode with several splits, decode MQA, a chunk of several row blocks, a chunk
# with a separate owner of the active slots.
SHAPES = [(2, 1, 8, 2, 128, 3000), (1, 1, 8, 1, 64, 700), (2, 64, 8, 2, 128, 1000), (1, 200, 4, 4, 64, 300)]
DRY_SHAPES = [(2, 1, 4, 2, 16, 40), (1, 1, 4, 1, 32, 20), (1, 17, 4, 2, 16, 30), (1, 40, 2, 2, 16, 10)]


def inputs(shape, dtype, device, seed):
    batch, m, hq, hkv, d, length = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    lengths = torch.tensor([length - 7 * b for b in range(batch)], dtype=torch.int32, device=device)
    return dict(q=randn(batch, m, hq, d), k=randn(batch, m, hkv, d), v=randn(batch, m, hkv, d),
                k_cache=randn(batch, length + m, hkv, d), v_cache=randn(batch, length + m, hkv, d),
                cache_seqlens=lengths, gate=torch.rand(batch, m, hkv, 1, generator=gen).to(device))


def run(backend: str, shape, dtype, device, seed: int, backward: bool) -> float:
    """One call on ``backend`` and on the reference from the same inputs; returns the largest difference
    relative to the reference's largest magnitude."""
    import melt_kernels

    results = []
    for b in (backend, "reference"):
        t = inputs(shape, dtype, device, seed)
        if backward:
            for name in ("q", "k", "v", "gate"):
                t[name].requires_grad_()
        out = melt_kernels.gated_kv_attention(**t, backend=b)
        if backward:
            out.float().square().sum().backward()
            results.append(torch.cat([out.detach().float().flatten()] +
                                     [t[n].grad.float().flatten() for n in ("q", "k", "v", "gate")]))
        else:
            results.append(torch.cat([out.float().flatten(), t["k_cache"].float().flatten()]))
    return ((results[0] - results[1]).abs().max() / results[1].abs().max()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import melt_kernels

    device = "cpu" if args.dry_run else "cuda"
    backends = [b for b in melt_kernels.available_backends() if b != "reference"]
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    worst = 0.
    for backend in backends:
        for i, shape in enumerate(shapes):
            dtype = torch.float16 if i % 2 else torch.bfloat16
            diff = run(backend, shape, dtype, device, i, backward=False)
            print(f"{backend} forward {shape} {dtype}: relative difference {diff:.3g}", flush=True)
            worst = max(worst, diff)
        diff = run(backend, shapes[2], torch.bfloat16, device, 9, backward=True)
        print(f"{backend} forward + backward {shapes[2]}: relative difference {diff:.3g}", flush=True)
        worst = max(worst, diff)
    if device == "cuda":
        torch.cuda.synchronize()
    # Half-precision rounding is ~1e-2 of the largest value at most; a missing key or an unwritten slot is
    # far off that.
    if not worst < 0.05:
        print(f"FAIL: results differ from the reference by {worst:.3g}")
        return 1
    print(f"ok: {len(backends)} backend(s), largest relative difference from the reference {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
