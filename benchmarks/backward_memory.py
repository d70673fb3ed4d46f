"""Peak memory of one chunk-wise MELT training step against the sequence length and the cache capacity.

One step as ``melt_kernels.train`` runs it: a fresh MELT cache, the sequence cut into chunks that each run all
T loops against the settled cache of the earlier chunks (``LoopedLM.prefill``), a cross-entropy loss over every
position and ONE backward at the end, which also flows through the earlier chunks' cache values.  Two sweeps:

* length: sequence lengths P with a cache of exactly P positions (what ``melt_kernels.train`` allocates);
* capacity: one length P in caches of 1, 2, 4 and 8 times P positions (a serving-sized cache reused for
  training, or a padded batch): what the step holds should follow what it touches, not the capacity.

Columns (the keys of ``--json``): ``cache_bytes`` (the MELT cache), ``step_peak_bytes`` (the most bytes held by
tensors at once from the cache's allocation to the end of the backward, above what was held before: weights and
their gradients, allocated by a first step, are not counted),
``backward_peak_bytes`` (the most held during the backward above what was held when it began),
``backward_allocated_bytes`` (all the bytes the backward allocated, freed or not).  On a GPU the
figures come from ``torch.cuda.max_memory_allocated``; on a CPU from torch.profiler's memory events replayed in
time order (as ``benchmarks/loop_depth.py``).

    python benchmarks/backward_memory.py                 # CPU: tiny model (GPU: a 4-layer bf16 model)
    python benchmarks/backward_memory.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json

import torch
import torch.nn.functional as F

from loop_depth import PeakMemory
from melt_kernels.model import LoopedLM, LoopedLMConfig

MODES = {
    "quick": dict(config=LoopedLMConfig(gate="kv-head", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        intermediate_size=64, total_ut_steps=2),
                  dtype=torch.float32, batch=1, chunk=8, lengths=[16, 32], length=16, capacities=[1, 4]),
    "cpu": dict(config=LoopedLMConfig(gate="kv-head", vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      intermediate_size=256, total_ut_steps=4),
                dtype=torch.float32, batch=2, chunk=32, lengths=[64, 128, 256, 512], length=128,
                capacities=[1, 2, 4, 8]),
    "cuda": dict(config=LoopedLMConfig(gate="kv-head", vocab_size=32000, hidden_size=1024, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                                       intermediate_size=2816, total_ut_steps=4),
                 dtype=torch.bfloat16, batch=4, chunk=512, lengths=[1024, 2048, 4096, 8192], length=2048,
                 capacities=[1, 2, 4, 8]),
}


def _step(model: LoopedLM, ids: torch.Tensor, targets: torch.Tensor, capacity: int, chunk: int, measure):
    """One training step; ``measure(phase)`` is a context manager around "step" (all of it) or "backward"."""
    with measure("step"):
        cache = model.new_cache("melt", ids.shape[0], capacity)
        logits = model.prefill(ids, cache, chunk)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        with measure("backward"):
            loss.backward()
        cache_bytes = cache.nbytes
        del cache, logits, loss
    return cache_bytes


def step_memory(model: LoopedLM, batch: int, length: int, capacity: int, chunk: int, device) -> dict:
    """Peak bytes of one training step on a sequence of ``length`` tokens in a cache of ``capacity``."""
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)
    targets = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)
    peaks = {}

    @contextlib.contextmanager
    def measure(phase, wanted=None):
        if phase != wanted:
            yield
            return
        with PeakMemory(device) as memory:
            yield
        peaks[phase] = memory

    # A first step allocates the weights' gradients, which later steps accumulate into: what is measured
    # below is the step's working memory.  One profiled run per phase (CPU profilers do not nest).
    _step(model, ids, targets, capacity, chunk, measure)
    for phase in ("step", "backward"):
        cache_bytes = _step(model, ids, targets, capacity, chunk, functools.partial(measure, wanted=phase))
    return dict(length=length, capacity=capacity, cache_bytes=cache_bytes, step_peak_bytes=peaks["step"].peak,
                backward_peak_bytes=peaks["backward"].peak, backward_allocated_bytes=peaks["backward"].allocated)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest model and two sizes (a smoke test)")
    parser.add_argument("--backend", default="auto", help="gated_kv_attention's backend (default auto)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = MODES["quick" if args.quick else device.type]
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LoopedLM(mode["config"], backend=args.backend, device=device, dtype=mode["dtype"])
    runs = [(length, length) for length in mode["lengths"]] + \
        [(mode["length"], factor * mode["length"]) for factor in mode["capacities"]]
    rows = []
    for length, capacity in dict.fromkeys(runs):
        row = step_memory(model, mode["batch"], length, capacity, mode["chunk"], device)
        rows.append(dict(row, sweep="length" if length == capacity else "capacity"))
    c = mode["config"]
    print(f"# one chunk-wise training step: {c.num_hidden_layers} layers x T={c.total_ut_steps} loops, hidden "
          f"{c.hidden_size}, {c.num_key_value_heads} kv heads x {c.head_dim}, {mode['dtype']}, batch {mode['batch']}, chunks of "
          f"{mode['chunk']}, backend {args.backend}; peak = {PeakMemory.describe(device)}")
    print(f"{'length':>7} {'capacity':>9} {'cache MiB':>10} {'step peak MiB':>14} {'backward peak MiB':>18} "
          f"{'backward allocated MiB':>23}")
    for r in rows:
        print(f"{r['length']:>7} {r['capacity']:>9} {r['cache_bytes'] / 2**20:>10.2f} "
              f"{r['step_peak_bytes'] / 2**20:>14.2f} {r['backward_peak_bytes'] / 2**20:>18.2f} "
              f"{r['backward_allocated_bytes'] / 2**20:>23.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
