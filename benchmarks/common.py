"""What the kernel benchmarks (attention.py, attention_bwd.py, tournament.py) share: the command line, the choice
of device, the timing harness, the op run on a given backend and plan, the peers every kernel is timed beside
(PyTorch SDPA's flash and cuDNN backends, FlexAttention, the copy bandwidth), the run's metadata and the writing
of its results.  The scripts import it as ``common`` (their folder is on sys.path when they are run as
``python benchmarks/<script>.py``)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import melt_kernels
from melt_kernels.autograd import run
from melt_kernels.backends import Backend
from melt_kernels.checks import check_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
SETS = ("quick", "headline", "full")


@dataclass(frozen=True)
class Setup:
    args: argparse.Namespace
    device: torch.device
    device_name: str
    dtype: torch.dtype
    backends: list[str]  # the reference is what the kernels are checked against, not a kernel to time
    shape_set: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup(doc: str, name: str, argv=None) -> Setup | None:
    """The command line and where to run: CUDA unless the Triton interpreter is on, which runs only the smoke
    test (``--quick`` or ``--dry-run``: tiny shapes, no timings) on the CPU.  None, after saying why, when
    there is nothing to run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--set", choices=SETS, default=None,
                        help="shapes: headline (the GPU pass), full (default on a GPU), quick (smoke test)")
    parser.add_argument("--quick", action="store_true", help="on a GPU: fewer shapes; on the CPU: the smoke test")
    parser.add_argument("--dry-run", action="store_true", help="the smoke test on the CPU (Triton interpreter)")
    parser.add_argument("--out", help="JSON path (a .md table is written beside it, both rewritten as each shape "
                        f"finishes); default benchmarks/results/{name}-<device>-<date>.json")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS),
                        help="the peers timed beside the kernels (default all; FlexAttention compiles each shape)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if torch.cuda.is_available() and not interpreted:
        device = torch.device("cuda")
        device_name, dtype = torch.cuda.get_device_name(device), torch.bfloat16
        shape_set = args.set or "full"
    elif (args.quick or args.dry_run) and interpreted:
        device, device_name, dtype, shape_set = torch.device("cpu"), "cpu-interpreter", torch.float32, "quick"
    else:
        print(f"benchmarks/{name}.py times GPU kernels and no CUDA device is available: nothing to do. "
              "(TRITON_INTERPRET=1 ... --quick runs the script on tiny CPU shapes as a smoke test.)")
        return None
    backends = [b for b in melt_kernels.available_backends() if b != "reference"]
    return Setup(args, device, device_name, dtype, backends, shape_set)


# --- timing -----------------------------------------------------------------------------------------------

def median_ms(fn, cuda: bool, bench: Callable[[Callable], float]) -> float:
    """``bench(fn)`` in ms once ``fn`` has compiled; off CUDA two runs, which check the path (and that ``fn``
    can run again, as the GPU's timing loop runs it many times) but time nothing meaningful."""
    if not cuda:
        fn()
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    fn()  # compile and warm up outside the timed runs (and outside any CUDA graph they capture)
    torch.cuda.synchronize()
    return bench(fn)


def graph_median(fn) -> float:
    """Median of CUDA-graph replays, so that launch overhead, which would dominate decode, does not count."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except RuntimeError:  # a path that cannot be captured: time with events instead
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def events_median(grad_to_none=None) -> Callable[[Callable], float]:
    """triton.testing.do_bench's median, resetting ``grad_to_none``'s gradients between runs so that a
    backward does not time their accumulation."""
    def run(fn) -> float:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")
    return run


def graph_replay_ms(fn, prepare: Optional[Callable] = None, rep_ms: float = 20) -> float:
    """Median time of one call of ``fn`` captured in a CUDA graph: about ``rep_ms`` of calls unrolled in one
    graph, replayed 10 times, so that the kernels' time counts and the host's launch gaps do not.  ``prepare``
    and a warm-up call run first on the capture's stream (``prepare``: e.g. the forward whose backward ``fn``
    is, so that autograd launches that backward on the stream being captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        if prepare is not None:
            prepare()
        fn()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        calls = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end) / 3, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end on this stream: torch.cuda.graph would also collect garbage and empty the cache at
        # every capture (tens of ms each, a hundred times in a tournament).
        graph.capture_begin()
        try:
            for _ in range(calls):
                fn()
        finally:
            graph.capture_end()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    torch.cuda.current_stream().wait_stream(stream)
    return statistics.median(times)


def eager_ms(fn, min_ms: float = 10, repeats: int = 5) -> float:
    """Median over ``repeats`` rounds of the time per call of back-to-back eager calls (at least ``min_ms`` a
    round), between events: what a loop of calls pays, the host's work included wherever it is the slower."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(3, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def slots_restorer(k_cache: torch.Tensor, v_cache: torch.Tensor, active: slice) -> Callable[[], None]:
    """A function that puts the caches' ``active`` positions back as they are now (every call of the op, and the
    unfused path, blends into them)."""
    saved = k_cache[:, active].clone(), v_cache[:, active].clone()

    def restore():
        k_cache[:, active], v_cache[:, active] = saved
    return restore


def op_call(backend) -> Callable:
    """``melt_kernels.gated_kv_attention`` on ``backend``: a name (the public op), or a
    ``melt_kernels.backends.Backend`` with a plan (``backends.planned``), which runs the op's own path (checks,
    autograd, launches) on it, as "auto" runs a table row's plan.  Returns the op's ``out``."""
    if not isinstance(backend, Backend):
        return functools.partial(melt_kernels.gated_kv_attention, backend=backend)

    def call(*args, **kwargs):
        return run(check_inputs(*args, backend=backend.name, **kwargs), backend)[0]
    return call


# The same attention by other means, timed beside the kernels in every run (functions below).
PEERS = ("sdpa_flash", "sdpa_cudnn", "flex", "unfused")


def timed(fn, cuda: bool, bench) -> tuple[Optional[float], Optional[str]]:
    """(ms, None), or (None, why) when ``fn`` cannot run here (a peer without a kernel for these inputs)."""
    try:
        return median_ms(fn, cuda, bench), None
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AssertionError) as e:
        return None, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def fused_failures(rows: list[dict]) -> int:
    """1 (the script's exit status) when a row of this package's op has an error, after printing them: the
    op failing at a shape the benchmark asks for is a bug, where a peer may lack a kernel for it."""
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"FAILED: {r['label']} {r['backend']}: {r['error']}", file=sys.stderr)
    return int(bool(failed))


def peer_times(peer, cuda: bool, bench, names, calls: int = 1) -> dict:
    """``{name}_us`` for each of PEERS, ``peer(name)`` timed with ``bench`` and divided by the ``calls`` it
    makes, for those in ``names``; ``{name}_error`` where it was not run or cannot run here."""
    times = {}
    for name in PEERS:
        if name not in names:
            times[f"{name}_us"], times[f"{name}_error"] = None, "not asked for (--peers)"
            continue
        if name == "flex" and not cuda:  # inductor compiles it for the CPU in minutes: the smoke test skips it
            times["flex_us"], times["flex_error"] = None, "not run on the CPU"
            continue
        ms, why = timed(peer(name), cuda, bench)
        times[f"{name}_us"] = None if ms is None else 1e3 * ms / calls
        if why:
            times[f"{name}_error"] = why
    return times


def copy_bandwidth(device, cuda: bool) -> float:
    """Device-to-device copy in bytes/s, counting bytes read plus bytes written: the bandwidth ceiling."""
    numel = (1 << 30) // 4 if cuda else (1 << 20)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), cuda, graph_median)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# --- peers: the same attention by other means ---------------------------------------------------------------

def sdpa_backends() -> dict:
    """SDPA forced onto one kernel each: {peer name: SDPBackend}."""
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa(q, k, v, seqlen_q: int, window: int, backend=None):
    """SDPA of q (B, M, Hq, D) over the first ``window`` positions of k, v (B, S, Hkv, D), causal
    bottom-right (token i sees keys 0 .. window - M + i), on ``backend`` (an SDPBackend) or PyTorch's pick.
    Returns (B, Hq, M, D)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    qt = q.transpose(1, 2)
    kt, vt = k[:, :window].transpose(1, 2), v[:, :window].transpose(1, 2)
    mask = None if seqlen_q == 1 else causal_lower_right(seqlen_q, window)
    gqa = q.shape[2] != k.shape[2]
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)


_FLEX = {}


def flex(q, k, v, seqlen_q: int, window: int):
    """FlexAttention (compiled) of the same attention as :func:`sdpa`; returns (B, Hq, M, D)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    settled = window - seqlen_q
    qt = q.transpose(1, 2)
    kt, vt = k[:, :window].transpose(1, 2), v[:, :window].transpose(1, 2)
    block_mask = None
    if seqlen_q > 1:
        key = (seqlen_q, window, q.device)
        if key not in _FLEX:
            def bottom_right(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + settled
            _FLEX[key] = create_block_mask(bottom_right, None, None, seqlen_q, window, device=q.device)
        block_mask = _FLEX[key]
    return _FLEX["fn"](qt, kt, vt, block_mask=block_mask, enable_gqa=q.shape[2] != k.shape[2])


# --- results ------------------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_meta(device_name: str, **fields) -> dict:
    """Where and from what the results came, then the script's own ``fields``."""
    import triton
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(device=device_name, date=now.isoformat(timespec="seconds"), commit=git_commit(),
                torch=torch.__version__, triton=triton.__version__, **fields)


def write_text(path: str, text: str) -> None:
    """Replaces ``path`` whole with ``text``, never leaving it half-written (its folder made if need be)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_results(out: str | None, name: str, meta: dict, rows: list[dict], table: str, **extra) -> tuple[str, str]:
    """``{"meta", "rows", **extra}`` as JSON to ``out`` (by default benchmarks/results/<name>-<device>-<date>.json)
    and the markdown ``table`` beside it; returns both paths.  Called after every shape, so that a run cut by a
    time limit keeps the rows it finished."""
    day = datetime.datetime.fromisoformat(meta["date"])
    out = out or os.path.join(HERE, "results", f"{name}-{meta['device'].replace(' ', '_')}-{day:%Y%m%d}.json")
    md = os.path.splitext(out)[0] + ".md"
    write_text(out, json.dumps(dict(meta=meta, rows=rows, **extra), indent=1))
    write_text(md, table)
    return out, md


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)
