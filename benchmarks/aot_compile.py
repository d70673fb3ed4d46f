"""Ahead-of-time compile of every Triton launch plan for Hopper (sm_90), without a GPU.

The launchers (forward: decode, or blend + chunk attention, and the merge; backward: preprocess, dK/dV, dQ, the
blend's backward) are called on meta tensors for the problems derived from the planners' decision space
(benchmarks/aot_problems.py: every dtype, head_dim 64, 80, 128, 256, every plan of either path and of the
backward's two modes for GQA group sizes 1 to 32, alignment, gate kinds, the causal flag, dlse, paged caches,
cache gradients, inference and training calls, the decode's folded merge, the GPU pass's headline shapes and
the tune step's alternatives, caches whose offsets need 64 bits) with the planners' own choices for a
132-multiprocessor H200.  Each kernel launch they make is caught before it runs and kept once per compile
class (:func:`compile_class`: what changes the compiled code, not every integer Triton specializes on); the
kept launch is then compiled by Triton's own JIT path (its argument binder, specialization and options)
against a stand-in driver that names the target sm_90, so what compiles here is what a GPU would compile.
ptxas' report gives registers and spills, Triton's metadata the shared memory, the TTGIR the dots' MMA
layouts (benchmarks/ttgir_check.py).  Fails (exit 1) on a compile error, on more than ``--max-spill`` bytes
of spill stores per thread, on more shared memory than a Hopper block may have, or on a dot whose MMA layout
gives two warps the same rows or columns; the launches that already did spill or replicate
(benchmarks/aot_known.json, the plans' next work in benchmarks/NOTES.md) are tolerated up to what they did,
so that a new plan or a regression fails.

    python benchmarks/aot_compile.py --jobs 2              # everything, 2 worker processes
    python benchmarks/aot_compile.py --dtypes fp32 --head-dims 80 128 --match "G=32 M=1 "
    python benchmarks/aot_compile.py --jobs 8 --json aot.json --md aot.md --headline-md headline.md

Needs Triton with its NVIDIA backend (the PyPI wheel) and no GPU; TRITON_INTERPRET is ignored.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick their GPU plans, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from melt_kernels.kernels import bwd as bwd_module  # noqa: E402
from melt_kernels.kernels import fwd as fwd_module  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ttgir_check  # noqa: E402
from aot_problems import DTYPES, H200_SMS, HEAD_DIMS, HEADLINE, Problem, derived_problems  # noqa: E402
from melt_kernels.reference import BlendGrad  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# Hopper: at most 227 KB of shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED_BYTES = 227 * 1024
KNOWN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_known.json")


# --- catching the launchers' kernel launches ---------------------------------------------------------------

@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def caught_launches(sms: int):
    """Kernel launches are recorded instead of run; the planners see a GPU of ``sms`` multiprocessors."""
    launches: list[Launch] = []
    saved = JITFunction.run, fwd_module.num_sms, bwd_module.num_sms

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    JITFunction.run = record
    fwd_module.num_sms = bwd_module.num_sms = lambda device: sms
    try:
        yield launches
    finally:
        JITFunction.run, fwd_module.num_sms, bwd_module.num_sms = saved


def problem_launches(p: Problem, dtype: torch.dtype, head_dim: int) -> list[Launch]:
    """The launches the forward and (if asked) backward launchers make for ``p``, on meta tensors."""
    def empty(*shape, dt=dtype):
        if not p.unaligned or len(shape) != 4:
            return torch.empty(shape, dtype=dt, device="meta")
        b, n, h, d = shape
        base = torch.empty(b * n * h * (d + 1) + 1, dtype=dt, device="meta")
        return base.as_strided(shape, (n * h * (d + 1), h * (d + 1), d + 1, 1), 1)

    b, m, hq, hkv, s = p.batch, p.seqlen_q, p.heads_q, p.heads_kv, p.cache_len
    q, out, dout = (empty(b, m, hq, head_dim) for _ in range(3))
    k, v = empty(b, m, hkv, head_dim), empty(b, m, hkv, head_dim)
    table = None
    if p.page_size:
        # One pool of every row's pages; the table (B, S / page_size) int32.
        blocks = -(-s // p.page_size)
        k_cache, v_cache = (empty(b * blocks, p.page_size, hkv, head_dim) for _ in range(2))
        table = empty(b, blocks, dt=torch.int32)
    else:
        k_cache, v_cache = empty(b, s, hkv, head_dim), empty(b, s, hkv, head_dim)
    paged = {} if table is None else dict(block_table=table)
    lengths = empty(b, dt=torch.int32)
    gates = {"head": empty(b, m, hkv, 1, dt=torch.float32), "channel": empty(b, m, hkv, head_dim, dt=torch.float32),
             "scalar": 0.5, "none": None}
    gate_k, gate_v = gates[p.gate_k], gates[p.gate_v]
    scale = head_dim ** -0.5
    fwd_overrides, bwd_overrides = dict(p.fwd_overrides), dict(p.bwd_overrides)
    with caught_launches(H200_SMS) as launches:
        # A training call's forward, as melt_kernels/autograd.py makes it, writes the slots' values after the
        # update (with a gate) and before it (with a gate tensor, whose gradient is wanted); an inference
        # call's writes neither.
        def slots(wanted):  # contiguous, as the autograd allocates them
            return torch.empty((b, m, hkv, head_dim), dtype=dtype, device="meta") if wanted else None
        side = dict(k_new=slots(p.side_outputs and gate_k is not None),
                    v_new=slots(p.side_outputs and gate_v is not None),
                    k_old=slots(p.side_outputs and isinstance(gate_k, torch.Tensor)),
                    v_old=slots(p.side_outputs and isinstance(gate_v, torch.Tensor)))
        fwd_module.gated_kv_attention_fwd(q, k, v, k_cache, v_cache, lengths, gate_k, gate_v, scale, p.causal, s,
                                          **paged, **side, **fwd_overrides)
        if not p.forward:
            launches.clear()
        if p.backward:
            # The blend's chain rule folded in; dQ atomically (the default) and by its own kernel
            # (deterministic mode).
            lse = empty(b, hq, m, dt=torch.float32)
            dlse = empty(b, hq, m, dt=torch.float32) if p.with_dlse else None
            grads = (torch.empty_like(k_cache), torch.empty_like(v_cache)) if p.need_cache_grad else (None, None)
            blend = BlendGrad(k, v, side["k_old"], side["v_old"], gate_k, gate_v, True, True, p.need_cache_grad,
                              p.need_cache_grad)
            k_new = k if side["k_new"] is None else side["k_new"]
            v_new = v if side["v_new"] is None else side["v_new"]
            for deterministic in (False, True):
                bwd_module.gated_kv_attention_bwd(q, k_cache, v_cache, k_new, v_new, lengths, out, lse, dout, dlse,
                                                  scale, p.causal, *grads, s, **paged, blend=blend,
                                                  deterministic=deterministic, **bwd_overrides)
    return launches


# --- compiling one launch for sm_90 ------------------------------------------------------------------------

class Sm90Driver:
    """What Triton's JIT asks its driver while compiling: a device, a stream and the target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


def compile_class(launch: Launch) -> tuple:
    """What of a launch changes its compiled code in a way that matters: the kernel, its constexprs, the
    element types its pointers point to (as a set: which tensor a launcher lends an absent one's pointer is
    not code), the options (warps, stages, FMA contraction), whether every pointer is 16-byte aligned (an
    unaligned layout loads narrower and holds more registers) and, for the forward's kernels (those that
    split rows into (token, query head) by a constant G), whether the chunk length M is 1: Triton specializes
    an integer 1, and one token is decode's common case.  Launches that differ only in the rest of Triton's
    specialization (other integers that are 1 or divisible by 16: shapes and strides) compile to the same plan
    with other address arithmetic: one of them stands for all."""
    binder = launch.fn.device_caches[0][4]
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    constexprs, pointers, unaligned, unit_m = [], [], False, False
    for param, (kind, attr) in zip(launch.fn.params, specialization):
        if param.is_constexpr:
            constexprs.append((param.name, attr))
        elif kind.startswith("*"):
            pointers.append(kind)
            unaligned |= attr != "D"
        elif param.name == "M":
            unit_m = kind == "constexpr"
    forward = any(name == "G" for name, _ in constexprs)
    return launch.fn.__name__, tuple(constexprs), frozenset(pointers), str(options), unaligned, unit_m and forward


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch) -> dict:
    """Registers, spill-store bytes, shared bytes and the MMA layouts (benchmarks/ttgir_check.py) of the launch
    compiled for sm_90 through Triton's JIT: one compile gives ptxas' report and the TTGIR."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = launch.fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    report = log.getvalue()
    regs = [int(r) for r in _PTXAS_REGS.findall(report)]
    spills = [int(s) for s, _ in _PTXAS_SPILLS.findall(report)]
    ttgir = kernel.asm["ttgir"]
    return dict(registers=max(regs) if regs else None, spill_bytes=max(spills) if spills else None,
                shared_bytes=int(kernel.metadata.shared), mma=ttgir_check.layouts(ttgir),
                replicated=ttgir_check.replicated(ttgir))


def _describe(launch: Launch) -> dict:
    constexprs = {p.name for p in launch.fn.params if p.is_constexpr}
    shown = {k: v for k, v in launch.kwargs.items() if k in constexprs and k.startswith(("BLOCK", "B", "G", "D"))}
    return dict(kernel=launch.fn.__name__, constants=" ".join(f"{k}={v}" for k, v in sorted(shown.items())),
                num_warps=launch.kwargs.get("num_warps", 4), num_stages=launch.kwargs.get("num_stages", 3),
                grid=str(tuple(launch.grid)))


_WORK: list[tuple[Launch, dict]] = []  # filled before the workers fork; they read it by index


def _compile_one(index: int) -> dict:
    launch, row = _WORK[index]
    start = time.perf_counter()
    try:
        row.update(compile_launch(launch))
    except Exception as e:  # any compiler failure is a result to report, not a crash of the check
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    row["seconds"] = time.perf_counter() - start
    return row


def _init_worker(cache_root: str) -> None:
    # A fresh cache per worker: a cached kernel skips ptxas and so its report.
    knobs.cache.dir = tempfile.mkdtemp(dir=cache_root)


def collect(dtypes, head_dims, match=None, kernels=None) -> tuple[list[tuple[Launch, dict]], int]:
    """One launch per compile class (:func:`compile_class`) of the derived problems (aot_problems.py), and how
    many launches the problems made.  A class's launch is the first one made, or a headline problem's; each
    row counts the launches it stands for and names the headline problems among them (the registers table
    of benchmarks/NOTES.md)."""
    classes: dict[tuple, tuple[Launch, dict]] = {}
    made = 0
    for dname in dtypes:
        for head_dim in head_dims:
            for p in derived_problems(DTYPES[dname], head_dim):
                if match is not None and match not in p.name:
                    continue
                for launch in problem_launches(p, DTYPES[dname], head_dim):
                    if kernels is not None and launch.fn.__name__ not in kernels:
                        continue
                    made += 1
                    key = compile_class(launch)
                    headline = p in HEADLINE
                    if key not in classes or (headline and not classes[key][1]["headline_problems"]):
                        row = dict(_describe(launch), problem=p.name, dtype=dname, head_dim=head_dim,
                                   launches=0, headline_problems=[])
                        if key in classes:
                            row.update(launches=classes[key][1]["launches"],
                                       headline_problems=classes[key][1]["headline_problems"])
                        classes[key] = (launch, row)
                    row = classes[key][1]
                    row["launches"] += 1
                    if headline and p.name not in row["headline_problems"]:
                        row["headline_problems"].append(p.name)
    return list(classes.values()), made


def known_key(row: dict) -> str:
    """A compiled launch's name in the known list: its kernel, dtype, head_dim and the derived problem it was
    compiled for (the planners and the problems, not Triton, decide it)."""
    return f"{row['kernel']} {row['dtype']} D={row['head_dim']} ({row['problem']})"


def read_known(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["launches"]


def known_entries(rows: list[dict], max_spill: int, known: Optional[dict] = None) -> dict:
    """``known`` with the spills over ``max_spill`` and the replicated MMA layouts of ``rows`` added (the most
    spill of either, replicated if either is)."""
    out = dict(known or {})
    for r in rows:
        spill = r.get("spill_bytes") or 0
        if r.get("error") or (spill <= max_spill and not r.get("replicated")):
            continue
        old = out.get(known_key(r), {"spill_bytes": 0, "replicated": False})
        out[known_key(r)] = {"spill_bytes": max(old["spill_bytes"], spill if spill > max_spill else 0),
                             "replicated": old["replicated"] or bool(r.get("replicated"))}
    return dict(sorted(out.items()))


def verdicts(rows: list[dict], max_spill: int, known: Optional[dict] = None) -> tuple[list[str], list[str]]:
    """(failures, tolerated): every compile error, missing report, shared memory over Hopper's limit, spill over
    ``max_spill`` and replicated MMA layout fails, except a spill or a replicated layout that ``known`` (the
    committed list of launches that already did so, benchmarks/NOTES.md) records for the launch: up to its
    recorded spill, replicated only where recorded."""
    bad, tolerated = [], []
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} D={r['head_dim']} ({r['problem']}; {r['constants']})"
        allowed = (known or {}).get(known_key(r), {"spill_bytes": 0, "replicated": False})
        if r.get("error"):
            bad.append(f"{where}: compile error: {r['error']}")
        elif r["spill_bytes"] is None or r["registers"] is None:
            bad.append(f"{where}: no ptxas report")
        elif r["spill_bytes"] > max_spill:
            line = f"{where}: {r['spill_bytes']} bytes of spill stores > {max_spill}"
            (tolerated if r["spill_bytes"] <= allowed["spill_bytes"] else bad).append(line)
        elif r["shared_bytes"] > MAX_SHARED_BYTES:
            bad.append(f"{where}: {r['shared_bytes']} bytes of shared memory > {MAX_SHARED_BYTES}")
        lines = [f"{where}: replicated MMA: {line}" for line in r.get("replicated") or ()]
        (tolerated if allowed["replicated"] else bad).extend(lines)
    return bad, tolerated


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Triton AOT compile for sm_90: Triton {meta['triton']}, {meta['date']}", "",
             f"{len(rows)} distinct launches (of {meta['launches']}) in {meta['seconds']:.0f} s ({meta['jobs']} "
             f"processes); limit {meta['max_spill']} bytes of spill stores, {MAX_SHARED_BYTES} bytes of shared "
             "memory, no replicated MMA layout.", "",
             "| kernel | dtype | D | problem | tiles | warps | stages | regs | spill B | shared B | MMA | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['problem']} | {r['constants']} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r.get('registers')} | {r.get('spill_bytes')} | "
                     f"{r.get('shared_bytes')} | {r.get('mma') or ''} | {r.get('error') or ''} |")
    return "\n".join(lines) + "\n"


def headline_table(rows: list[dict], meta: dict) -> str:
    """The launches of each headline problem (benchmarks/NOTES.md's registers table), in the problems' order."""
    lines = [f"Triton {meta['triton']}, sm_90, {meta['date']} (`python benchmarks/aot_compile.py --headline-md "
             "FILE`); bf16, 16 heads x 128, one gate per head; chunks as inference and as training calls (the "
             "backward in both modes).", "",
             "| problem | kernel | tiles | warps, stages | regs | spill B | shared | MMA layouts |",
             "|---|---|---|---|---|---|---|---|"]
    for p in HEADLINE:
        for r in (r for r in rows if p.name in r["headline_problems"]):
            shared = r.get("shared_bytes")
            shared = f"{shared / 1024:.0f} KB" if shared and shared >= 1024 else f"{shared} B"
            lines.append(f"| {p.name.removeprefix('headline ')} | {r['kernel']} | {r['constants']} | "
                         f"{r['num_warps']}, {r['num_stages']} | {r.get('registers')} | {r.get('spill_bytes')} | "
                         f"{shared} | {r.get('mma') or r.get('error') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--max-spill", type=int, default=64, help="most spill-store bytes per thread allowed")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    parser.add_argument("--kernels", nargs="+", help="only launches of these kernels (default: all)")
    parser.add_argument("--match", help="only the derived problems whose name holds this (e.g. 'G=32 M=1 ')")
    parser.add_argument("--json", help="write the rows and the verdict here")
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--headline-md", help="write the headline problems' table (benchmarks/NOTES.md) here")
    parser.add_argument("--known", default=KNOWN_FILE,
                        help="the launches known to spill or replicate, tolerated up to what they did (default: "
                             "benchmarks/aot_known.json); 'none': no launch is")
    parser.add_argument("--update-known", action="store_true",
                        help="add this run's spills and replicated layouts to the --known file instead of failing")
    args = parser.parse_args(argv)
    known = {} if args.known == "none" else read_known(args.known)

    start = time.perf_counter()
    triton_driver.set_active(Sm90Driver())
    knobs.nvidia.dump_ptxas_log = True
    _WORK[:], made = collect(args.dtypes, args.head_dims, args.match, args.kernels)
    print(f"Triton {triton.__version__}: {made} launches of the derived problems, {len(_WORK)} distinct ones to "
          f"compile for sm_90", flush=True)
    with tempfile.TemporaryDirectory() as cache_root:
        context = multiprocessing.get_context("fork")
        with context.Pool(args.jobs, initializer=_init_worker, initargs=(cache_root,)) as pool:
            rows = []
            for row in pool.imap(_compile_one, range(len(_WORK))):
                rows.append(row)
                if len(rows) % 100 == 0:
                    print(f"{len(rows)} compiled, {time.perf_counter() - start:.0f} s", flush=True)
    meta = dict(triton=triton.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                target="cuda sm_90", jobs=args.jobs, max_spill=args.max_spill, launches=made,
                seconds=time.perf_counter() - start,
                # The workers' CPU time (ptxas included): what the compile costs whatever else the machine runs.
                cpu_seconds=resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
                + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime)
    if args.update_known:
        with open(args.known) as f:
            document = json.load(f)
        document["launches"] = known = known_entries(rows, args.max_spill, known)
        with open(args.known, "w") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
    bad, tolerated = verdicts(rows, args.max_spill, known)
    table = markdown(rows, meta)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    if args.headline_md:
        with open(args.headline_md, "w") as f:
            f.write(headline_table(rows, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, failures=bad, tolerated=tolerated), f, indent=1)
    worst = max((r["spill_bytes"] or 0 for r in rows if not r.get("error")), default=0)
    print(f"{len(rows)} launches compiled in {meta['seconds']:.0f} s ({meta['cpu_seconds']:.0f} s of CPU); most "
          f"spill {worst} bytes; "
          f"most shared {max((r['shared_bytes'] or 0 for r in rows if not r.get('error')), default=0)} bytes")
    if tolerated:
        print(f"{len(tolerated)} known spills or replicated layouts tolerated ({args.known}; benchmarks/NOTES.md; "
              "each in --json's 'tolerated')")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
