"""Host cost of the op: what one call costs the CPU before any kernel runs, and what ``import melt_kernels`` costs.

docs/op.md#cuda-graphs-and-host-cost: a decode kernel takes 5-20 us on a GPU, so the Python around it (checks,
backend choice, planning, allocations, building the launch) must stay well below that.  Measured on CPU tensors, no GPU needed:

* per call, the median CPU time over rounds of ``--calls`` calls (after warm-up) of the public op
  ``melt_kernels.gated_kv_attention`` on the Triton backend, with the Triton kernels compiled (TRITON_INTERPRET
  unset) and ``JITFunction.run`` replaced by a stub that returns at once: everything up to the kernel launch is
  timed, Triton's own launch (argument binding and the driver call, which needs a GPU) is not.  The parts are timed alone too: the
  checks (``check_inputs``), the backend choice (``select_backend``) and the launcher (the backend's fwd);
* ``import melt_kernels`` on top of ``import torch``: fresh interpreters, median CPU time over ``--imports``
  runs each.

CPU time rather than wall time, so that a busy machine does not inflate the figures.

    python benchmarks/host_cost.py                  # prints a table
    python benchmarks/host_cost.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Compiled kernels (their launch is stubbed below), never the interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

CASES = {
    # name: (B, M, Hq, Hkv, D, S, lengths, gate)
    "decode, tensor lengths": (8, 1, 32, 8, 128, 4096, "tensor", "head"),
    "decode, int length": (8, 1, 32, 8, 128, 4096, "int", "head"),
    "decode, no gate": (8, 1, 32, 8, 128, 4096, "tensor", None),
    "chunk M=256": (2, 256, 32, 8, 128, 4096, "tensor", "head"),
}


def _time_per_call(fn, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` rounds of the mean CPU seconds per call of ``calls`` calls (after warm-up).

    CPU time of this thread, not wall time: on a shared machine the wait for a core is not the op's cost
    (torch runs on one thread here, so on an idle machine the two agree)."""
    for _ in range(max(10, calls // 10)):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        rounds.append((time.thread_time() - start) / calls)
    return statistics.median(rounds)


def _stub_triton_launch() -> dict:
    """Replaces JITFunction.run (binding, specialization, driver launch) with a counter."""
    import triton.runtime.jit as jit

    count = {"launches": 0}

    def run(self, *args, grid, warmup, **kwargs):
        count["launches"] += 1

    jit.JITFunction.run = run
    return count


def _case_args(batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len, lengths, gate):
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, seqlen_q, heads_kv, head_dim, generator=gen).to(dtype) for _ in range(2))
    k_cache, v_cache = (torch.zeros(batch, cache_len, heads_kv, head_dim, dtype=dtype) for _ in range(2))
    seqlens = torch.full((batch,), cache_len // 2, dtype=torch.int32) if lengths == "tensor" else cache_len // 2
    alpha = torch.rand(batch, seqlen_q, heads_kv, 1, generator=gen) if gate == "head" else None
    return q, k, v, k_cache, v_cache, seqlens, alpha


def per_call(calls: int) -> list[dict]:
    import melt_kernels
    import melt_kernels.backends as backends
    from melt_kernels.checks import check_inputs

    launches = _stub_triton_launch()
    # Lets the dispatch send CPU tensors to the (stubbed) Triton kernels, as it does under the interpreter.
    backends.triton_interpreted = lambda: True
    triton_backend = backends.select_backend("triton", check_inputs(*_case_args(1, 1, 2, 1, 16, 4, "int", None)))
    rows = []
    for name, sizes in CASES.items():
        args = _case_args(*sizes)
        problem = check_inputs(*args)
        p = problem
        fwd_args = (p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale,
                    p.causal, p.max_seqlen_k)
        before = launches["launches"]
        melt_kernels.gated_kv_attention(*args, backend="triton")
        per_op = launches["launches"] - before
        with torch.no_grad():
            row = dict(case=name, launches=per_op,
                       op_us=1e6 * _time_per_call(lambda: melt_kernels.gated_kv_attention(*args, backend="triton"),
                                                  calls),
                       checks_us=1e6 * _time_per_call(lambda: check_inputs(*args, backend="triton"), calls),
                       dispatch_us=1e6 * _time_per_call(lambda: backends.select_backend("triton", problem), calls),
                       launcher_us=1e6 * _time_per_call(lambda: triton_backend.fwd(*fwd_args), calls))
        rows.append(row)
    return rows


def import_seconds(imports: int) -> dict:
    """Median CPU time (user + system) of fresh interpreters running ``import torch`` and
    ``import torch; import melt_kernels``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def one(code: str) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    torch_only, with_melt = [], []
    for _ in range(imports):  # interleaved, so that a busy moment hurts both alike
        torch_only.append(one("import torch"))
        with_melt.append(one("import torch; import melt_kernels"))
    t, m = statistics.median(torch_only), statistics.median(with_melt)
    return dict(import_torch_s=t, import_torch_melt_s=m, import_melt_added_s=m - t, runs=imports)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and imports (a smoke test)")
    parser.add_argument("--calls", type=int, help="calls per timing round (default 2000; --quick 100)")
    parser.add_argument("--imports", type=int, help="fresh interpreters per import timing (default 7; --quick 2)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    calls = args.calls or (100 if args.quick else 2000)
    imports = args.imports or (2 if args.quick else 7)
    torch.set_num_threads(1)

    result = dict(torch=torch.__version__, per_call=per_call(calls), imports=import_seconds(imports))
    print(f"# host cost per call, us of CPU time (median of 7 rounds of {calls} calls; CPU tensors, bfloat16, "
          f"Triton launch stubbed)")
    print(f"{'case':<24} {'launches':>8} {'op':>8} {'checks':>8} {'dispatch':>8} {'launcher':>8}")
    for r in result["per_call"]:
        print(f"{r['case']:<24} {r['launches']:>8} {r['op_us']:>8.1f} {r['checks_us']:>8.1f} "
              f"{r['dispatch_us']:>8.1f} {r['launcher_us']:>8.1f}")
    i = result["imports"]
    print(f"# import, s of CPU time (median of {i['runs']} fresh interpreters): torch {i['import_torch_s']:.2f}, "
          f"torch + melt_kernels {i['import_torch_melt_s']:.2f}, added by melt_kernels {i['import_melt_added_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
