"""Loop-depth benchmark: MELT's one shared KV cache against the LoopLM's cache per loop.

For every loop depth T and method it reports the cache's exact size, the
measured peak memory, the latency of one generated token after a prefill,
and on a GPU the largest batch that fits a memory budget at a context length
with the tokens/s it reaches. The model is Ouro's architecture
(melt_kernels.model.LoopedLM: sandwich norms, a norm after every loop, the
exit gate, untied head) with random weights and a MELT gate (--gate,
default kv-head: this package's, fused in the kernel; latent: the paper's).
Methods (same weights, one model):

* melt: MELT cache, gated, melt_kernels.gated_kv_attention(backend="auto"),
  the fastest backend available (on a CPU that is the PyTorch reference,
  unless TRITON_INTERPRET=1 runs the Triton kernels in the interpreter);
* melt-unfused: the same with backend="reference" (unfused PyTorch);
* looplm: the Ouro-style LoopLM cache, one per loop, written through, on
  backend="auto".

    python benchmarks/loop_depth.py                     # CPU: tiny model; GPU: Ouro-1.4B shape, bf16
    python benchmarks/loop_depth.py --quick --json out.json
    python benchmarks/loop_depth.py --loops 1 4 16 --json out.json --plot out.png

``--serve`` runs the serving sweep instead: a paged, continuously batched
decode (melt_kernels.PagedCache) at a fixed KV-memory budget (--serve-kv-gb)
for melt and looplm at each T.  A queue of requests (--prompt tokens, then
--serve-new-tokens generated) is admitted while the page pool can hold a
request's whole life (no preemption), prefilled, merged into the decoding
batch, and dropped when done, its pages freed.  Per (method, T): the page
pool's pages, the sequences held at once (the batch the budget allows:
"T times the sequences" measured, not computed), the mean batch, and the
generated tokens per second of wall time (prefills included).

    python benchmarks/loop_depth.py --serve --loops 1 2 4 8 --json serve.json   # GPU: Ouro-1.4B shape
    python benchmarks/loop_depth.py --serve --quick                              # CPU, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

import torch

from melt_kernels.model import GATES, LoopedLM, LoopedLMConfig, kv_bytes_per_token
from melt_kernels.paged_cache import PagedCache
from melt_kernels.threads import cpu_threads

PRESETS = {
    "quick": LoopedLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=64),
    "tiny": LoopedLMConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, intermediate_size=256),
    # LoopedLMConfig's defaults are Ouro-1.4B's shape: 24 layers, hidden 2048, 16 heads of 128 (MHA), SwiGLU 5632,
    # vocabulary 49152, RoPE base 1e6.
    "ouro-1.4b": LoopedLMConfig(),
}
# method -> (cache kind, backend)
METHODS = {"melt": ("melt", "auto"), "melt-unfused": ("melt", "reference"), "looplm": ("looplm", "auto")}
# Defaults that depend on the mode; an explicit flag wins.
MODES = {
    "cpu": dict(config="tiny", dtype="float32", loops=[1, 2, 4, 8, 16], prompt=128, chunk=32, new_tokens=16,
                warmup=2, context=None, budget_gb=None, threads=1, serve_kv_gb=0.05, serve_new_tokens=8),
    "cuda": dict(config="ouro-1.4b", dtype="bfloat16", loops=[1, 2, 4, 8, 16], prompt=1024, chunk=256,
                 new_tokens=32, warmup=3, context=4096, budget_gb=40.0, serve_kv_gb=20.0, serve_new_tokens=32),
    "quick": dict(config="quick", dtype=None, loops=[1, 2], prompt=8, chunk=4, new_tokens=3, warmup=1, context=64,
                  budget_gb=0.25, threads=1, serve_kv_gb=2**-14, serve_new_tokens=3),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PROBE_STEPS = 2  # decode steps run where only memory is measured: every step has the same shapes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, nargs="+", help="loop depths T (default 1 2 4 8 16; 1 2 with --quick)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--gate", choices=GATES, default="kv-head",
                   help="MELT gate of the model: kv-head (default) or kv-element, this package's, fused in the "
                        "kernel; latent, the MELT paper's (two hidden x hidden GEMMs per layer and loop)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--config", help=f"a preset ({', '.join(PRESETS)}), or a JSON file of LoopedLMConfig fields "
                                    "replacing those of the preset its \"preset\" key names (default tiny); "
                                    "default: tiny on a CPU, ouro-1.4b on a GPU, quick with --quick")
    p.add_argument("--dtype", choices=list(DTYPES), help="default float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--batch", type=int, default=1, help="rows for the latency run (default 1)")
    p.add_argument("--prompt", type=int, help="prompt length prefilled before generating")
    p.add_argument("--chunk", type=int, help="prefill chunk size")
    p.add_argument("--new-tokens", type=int, help="generated tokens timed")
    p.add_argument("--warmup", type=int, help="decode steps run before timing")
    p.add_argument("--context", type=int, help="GPU: context length for the largest-batch search (default 4096)")
    p.add_argument("--budget-gb", type=float, help="GPU: memory budget in GiB, weights included (default 40)")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default 1 on a CPU: the small CPU model gains nothing from more, and "
                        "spinning OpenMP threads on a shared machine make the timings erratic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the records as a JSON list (rewritten after every run)")
    p.add_argument("--plot", metavar="FILE.png", help="plot memory and time against T (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="smallest sizes and T in {1, 2}: seconds, for CI")
    p.add_argument("--serve", action="store_true",
                   help="the serving sweep (paged, continuously batched decode at a KV budget) instead")
    p.add_argument("--serve-kv-gb", type=float, help="--serve: GiB of page pools (default 20 on a GPU)")
    p.add_argument("--serve-new-tokens", type=int, help="--serve: tokens generated per request")
    p.add_argument("--serve-requests", type=int, help="--serve: requests queued (default: twice what fits)")
    p.add_argument("--page-size", type=int, default=16, help="--serve: tokens per page")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = MODES["quick" if args.quick else args.device.type]
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.dtype = args.dtype or MODES[args.device.type]["dtype"]
    for name in ("batch", "prompt", "chunk", "new_tokens", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.loops) < 1:
        p.error("--loops must be positive")
    return args


def load_config(name: str, gate: str) -> LoopedLMConfig:
    """A fresh copy (the run changes its loop count) of a preset or of a JSON file's fields over one, with ``gate``."""
    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], gate=gate)
    if not os.path.isfile(name):
        raise SystemExit(f"--config {name!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    with open(name) as f:
        fields = json.load(f)
    base = PRESETS[fields.pop("preset", "tiny")]
    return dataclasses.replace(base, **{"gate": gate, **fields})


# ---------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class PeakMemory:
    """The most bytes held by tensors at once inside the block, above what was held when it was entered
    (``peak``), and the bytes of all tensors allocated inside it (``allocated``).

    CUDA: the caching allocator's counters. CPU: torch has no CPU allocator
    statistics and tracemalloc does not see torch's allocations, so the
    profiler's memory events (every CPU tensor allocation and free, with its
    size) are replayed in time order.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self.allocated = device, None, None

    def _cuda_allocated(self) -> int:
        return torch.cuda.memory_stats(self.device).get("allocated_bytes.all.allocated", 0)

    @staticmethod
    def describe(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated() minus the bytes allocated before (tensors only)"
        return "torch.profiler CPU memory events (every tensor allocation/free), replayed in time order"

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.base_allocated = self._cuda_allocated()
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            with quiet_stderr():
                self.profiler.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            self.allocated = self._cuda_allocated() - self.base_allocated
            return
        with quiet_stderr():
            self.profiler.stop()
        events = sorted((e.start_ns(), e.nbytes()) for e in self.profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        held = peak = 0
        for _, nbytes in events:
            held += nbytes
            peak = max(peak, held)
        self.peak = peak
        self.allocated = sum(nbytes for _, nbytes in events if nbytes > 0)


def random_ids(model: LoopedLM, batch: int, length: int, device: torch.device, gen: torch.Generator):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)


@torch.no_grad()
def decode_step_seconds(model: LoopedLM, cache, token: torch.Tensor, warmup: int, steps: int,
                        device: torch.device) -> float:
    """Median seconds of one greedy decode step (one new token per row), over ``steps`` after ``warmup``.

    The median, not the mean: the CPU may be shared, and one preempted step must not move the figure.
    """
    times = []
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        token = model(token, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(model: LoopedLM, kind: str, args, gen: torch.Generator) -> dict:
    """cache_bytes, peak_bytes and ms_per_token for a prefill of --prompt tokens then --new-tokens steps."""
    ids = random_ids(model, args.batch, args.prompt, args.device, gen)
    length = args.prompt + max(args.warmup + args.new_tokens, PROBE_STEPS)
    with PeakMemory(args.device) as memory:
        cache = model.new_cache(kind, args.batch, length)
        model.generate(ids, cache, PROBE_STEPS, chunk_size=args.chunk)
        cache_bytes = cache.nbytes
        del cache
    cache = model.new_cache(kind, args.batch, length)
    with torch.no_grad():
        token = model.prefill(ids, cache, args.chunk, last_only=True).argmax(-1)
    seconds = decode_step_seconds(model, cache, token, args.warmup, args.new_tokens, args.device)
    return dict(cache_bytes=cache_bytes, peak_bytes=memory.peak, ms_per_token=1e3 * seconds)


def free_cuda():
    gc.collect()
    torch.cuda.empty_cache()


def largest_batch(model: LoopedLM, kind: str, args, gen: torch.Generator) -> dict:
    """GPU: the most rows whose decode at --context tokens keeps the peak within --budget-gb, and its tokens/s.

    The context is not prefilled: the (zero) cache is marked as holding
    --context tokens, as a decode step's cost does not depend on the values.
    """
    budget = int(args.budget_gb * 2**30)
    length = args.context + max(args.warmup + args.new_tokens, PROBE_STEPS)

    def peak_of(batch):  # absolute peak of a few decode steps, or None when out of memory
        free_cuda()
        torch.cuda.reset_peak_memory_stats(args.device)
        try:
            cache = model.new_cache(kind, batch, length)
            cache.advance(args.context)
            decode_step_seconds(model, cache, random_ids(model, batch, 1, args.device, gen), 0, PROBE_STEPS,
                                args.device)
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            cache = None
        return torch.cuda.max_memory_allocated(args.device)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    one_row = model.new_cache(kind, 1, length).nbytes
    free_cuda()
    lo, hi = 0, max(0, (budget - weights) // one_row)  # the caches alone bound the batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        peak = peak_of(mid)
        if peak is not None and peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return dict(max_batch=0, tokens_per_s=None)
    free_cuda()
    cache = model.new_cache(kind, lo, length)
    cache.advance(args.context)
    seconds = decode_step_seconds(model, cache, random_ids(model, lo, 1, args.device, gen), args.warmup,
                                  args.new_tokens, args.device)
    del cache
    free_cuda()
    return dict(max_batch=lo, tokens_per_s=lo / seconds)


def serving(model: LoopedLM, kind: str, args, gen: torch.Generator) -> dict:
    """Continuous batching on a page pool of --serve-kv-gb (module docstring); returns the record's numbers."""
    c, dtype = model.config, model.model.embed_tokens.weight.dtype
    page_bytes = args.page_size * kv_bytes_per_token(c, kind, dtype)
    num_blocks = int(args.serve_kv_gb * 2**30) // page_bytes
    life = args.prompt + args.serve_new_tokens
    per_seq = -(-life // args.page_size)  # pages a request holds at its end
    capacity = num_blocks // per_seq
    if capacity == 0:
        return dict(pages=num_blocks, capacity=0, seqs_held=0, mean_batch=0., tokens_per_s=None)
    requests = args.serve_requests or 2 * capacity
    pool = model.new_page_pool(kind, num_blocks, args.page_size)
    batch = PagedCache(pool, 0, life)
    left, tokens = [], None  # per row: tokens still to generate; the rows' last tokens (B, 1)
    waiting, generated, held, steps, rows_stepped = requests, 0, 0, 0, 0
    sync(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        while waiting or batch.batch:
            # Admission: a request enters when the free pages cover its whole life beside what the running rows
            # will still take.
            owed = sum(per_seq - int(n) for n in batch.pages_per_row())
            admit = min(waiting, (pool.free_pages - owed) // per_seq)
            if admit:
                new = PagedCache(pool, admit, life)
                first = model.prefill(random_ids(model, admit, args.prompt, args.device, gen), new, args.chunk,
                                      last_only=True)[:, -1].argmax(-1, keepdim=True)
                batch.extend(new)
                tokens = first if tokens is None else torch.cat([tokens, first])
                left += [args.serve_new_tokens - 1] * admit
                waiting -= admit
                generated += admit
            held = max(held, batch.batch)
            done = [i for i, n in enumerate(left) if n == 0]
            if done:
                batch.drop(done)
                keep = [i for i, n in enumerate(left) if n > 0]
                tokens, left = tokens[keep], [left[i] for i in keep]
            if not batch.batch:
                continue
            tokens = model(tokens, batch, last_only=True)[:, -1].argmax(-1, keepdim=True)
            left = [n - 1 for n in left]
            generated += batch.batch
            rows_stepped += batch.batch
            steps += 1
    sync(args.device)
    seconds = time.perf_counter() - start
    return dict(pages=num_blocks, page_bytes=page_bytes, capacity=capacity, requests=requests, seqs_held=held,
                mean_batch=rows_stepped / max(steps, 1), generated_tokens=generated, tokens_per_s=generated / seconds)


def run_serving(args, model: LoopedLM, gen: torch.Generator) -> list[dict]:
    print(f"# serving: page pools of {args.serve_kv_gb:g} GiB, pages of {args.page_size} tokens; requests of "
          f"{args.prompt} prompt tokens (prefill chunks of {args.chunk}) + {args.serve_new_tokens} generated, "
          f"admitted while their whole life fits; tokens/s = generated tokens / wall time, prefills included")
    records = []
    for method in [m for m in args.methods if m != "melt-unfused"]:
        kind, backend = METHODS[method]
        for loops in args.loops:
            model.num_loops, model.backend = loops, backend
            progress(f"serving {method} T={loops}")
            records.append(dict(method=method, loops=loops, backend=model.attention_backend(backend),
                                device=args.device.type, dtype=args.dtype, **serving(model, kind, args, gen)))
            if args.json:
                write_json(records, args.json)
    header = ["method", "T", "pages", "capacity", "seqs held", "mean batch", "tokens/s"]
    rows = [[r["method"], str(r["loops"]), str(r["pages"]), str(r["capacity"]), str(r["seqs_held"]),
             f"{r['mean_batch']:.1f}", "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"]
            for r in records]
    print_columns(header, rows, left=1)
    return records


# ---------------------------------------------------------------- output


def human(nbytes) -> str:
    if nbytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def write_json(records: list[dict], path: str) -> None:
    """The records so far, written after every one so that a run cut by a time limit keeps what it measured;
    through a temporary file, so that a kill mid-write leaves the previous list, not a truncated one."""
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)


def progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}")
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def print_table(records, on_gpu: bool) -> None:
    header = ["method", "backend", "T", "cache", "peak", "ms/token"] + (["max batch", "tokens/s"] if on_gpu else [])
    rows = [[r["method"], r["backend"], str(r["loops"]), human(r["cache_bytes"]), human(r["peak_bytes"]),
             f"{r['ms_per_token']:.2f}"] +
            ([str(r["max_batch"]), "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"] if on_gpu else [])
            for r in records]
    print_columns(header, rows, left=2)


def print_columns(header: list[str], rows: list[list[str]], left: int) -> None:
    """A plain-text table: the first ``left`` columns aligned left, the rest (numbers) right."""
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def plot(records, path: str, on_gpu: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("memory (bytes)", ("cache_bytes", "peak_bytes")), ("ms per token", ("ms_per_token",))]
    if on_gpu:
        panels.append(("largest batch in budget", ("max_batch",)))
        panels.append(("tokens/s at that batch", ("tokens_per_s",)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    methods = list(dict.fromkeys(r["method"] for r in records))
    for ax, (title, keys) in zip(axes, panels):
        # One colour and marker per method (MELT's two paths overlap in memory), one line style per quantity.
        for j, method in enumerate(methods):
            mine = [r for r in records if r["method"] == method]
            for key, line in zip(keys, ("-", "--")):
                points = [(r["loops"], r[key]) for r in mine if r[key]]
                if points:
                    ax.plot(*zip(*points), line, color=f"C{j}", marker="osd^v"[j % 5], markersize=8 - 2 * j,
                            label=f"{method} {key}" if len(keys) > 1 else method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("loop depth T")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- main


def main(argv=None) -> list[dict]:
    """Runs the benchmark; returns the records (also printed, and written with --json)."""
    args = parse_args(argv)
    with cpu_threads(args.threads, args.device):
        return run(args)


def run(args) -> list[dict]:
    device, on_gpu = args.device, args.device.type == "cuda"
    config = load_config(args.config, args.gate)
    torch.manual_seed(args.seed)
    model = LoopedLM(config, device=device, dtype=DTYPES[args.dtype]).eval()
    gen = torch.Generator().manual_seed(args.seed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    backends = {m: model.attention_backend(METHODS[m][1]) for m in args.methods}

    where = torch.cuda.get_device_name(device) if on_gpu else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"# loop-depth benchmark on {where}, torch {torch.__version__}")
    print(f"# model {args.config}: Ouro's architecture, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} kv) x "
          f"{config.head_dim}, vocab {config.vocab_size}, MELT gate {config.gate!r}, {args.dtype}, weights "
          f"{human(weights)} (random)")
    print(f"# latency run: batch {args.batch}, prompt {args.prompt} prefilled in chunks of {args.chunk}, "
          f"{args.warmup} warm-up + {args.new_tokens} timed decode steps; ms/token = median decode step")
    print(f"# peak = {PeakMemory.describe(device)}, over cache allocation, prefill and {PROBE_STEPS} decode "
          f"steps, weights excluded")
    if on_gpu:
        print(f"# max batch: largest batch whose decode at context {args.context} peaks within "
              f"{args.budget_gb:g} GiB (weights included); tokens/s = batch / median decode step")
    if args.serve:
        return run_serving(args, model, gen)
    for method, name in backends.items():
        if device.type == "cpu" and METHODS[method][1] == "auto":
            note = " (the Triton interpreter: not kernel speed)" if name == "triton" else \
                " (no kernel backend on a CPU: the unfused path)"
            print(f"# {method}: backend 'auto' runs {name!r}{note}")

    # The figures that matter first, so that a run cut by its time limit holds them: MELT beside the LoopLM at
    # each T in turn, then the unfused path.
    paired = [m for m in ("melt", "looplm") if m in args.methods]
    records, todo = [], [(m, t) for t in args.loops for m in paired] + \
        [("melt-unfused", t) for t in args.loops if "melt-unfused" in args.methods]
    for i, (method, loops) in enumerate(todo):
        kind, backend = METHODS[method]
        model.num_loops, model.backend = loops, backend
        progress(f"[{i + 1}/{len(todo)}] {method} T={loops}")
        record = dict(method=method, loops=loops, backend=backends[method], device=device.type, dtype=args.dtype,
                      **latency(model, kind, args, gen))
        if on_gpu:
            progress(f"[{i + 1}/{len(todo)}] {method} T={loops}: largest batch")
            record.update(largest_batch(model, kind, args, gen))
        records.append(record)
        if args.json:
            write_json(records, args.json)
    progress(f"done: {len(todo)} runs")
    if sys.stderr.isatty():
        sys.stderr.write("\n")

    # The table and the plot by method, in --methods order (the runs' order interleaves them).
    by_method = sorted(records, key=lambda r: args.methods.index(r["method"]))
    print_table(by_method, on_gpu)
    if args.plot:
        plot(by_method, args.plot, on_gpu)
    return records


if __name__ == "__main__":
    main()
