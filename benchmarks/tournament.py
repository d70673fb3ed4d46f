"""The tournament of the GPU pass's ``tune`` step, and the table of ``backend="auto"`` it writes.

At the headline shapes (bf16, Ouro-1.4B's attention: 16 heads x 128, one gate per kv head): 500-token chunks at
(B=4, L=0), (B=4, L=4.5k) and (B=1, L=9.5k), decode at 1k, 8k and 32k keys at batch 1 and 64 (and 128k at batch
64 with --full: 68 GB of caches), and training (forward + backward through the op, cache gradients on) at the
three chunk shapes, it runs every candidate:

* the implementations of the op, which the table may name: the Triton kernels' default plan and the
  alternatives its planners do not pick there (decode: 16-row tiles on 8 or 4 warps, the folded merge, half and
  double the split length; chunk: 64-row tiles on 4 warps, 128-key tiles, 2 stages; training: the deterministic
  backward (no atomics), 32-row and 64-key steps of the dK/dV kernel), the CUDA kernels, and the composition (the
  blend, then PyTorch's attention: FlashAttention, and cuDNN where its mask is the op's);
* peers, reported beside them: SDPA's FlashAttention and cuDNN kernels over the same cache (no update), and the
  unfused path (lerp of the active slots, then SDPA).

Each candidate is timed twice: as CUDA-graph replays (the kernels' time, common.graph_replay_ms) and as
back-to-back eager calls (what a loop pays, host included: common.eager_ms).  In training the graph replays time
the backward alone and the eager calls forward + backward.  Before it is timed, each implementation is checked
against the reference from the same inputs: the output and lse, both caches bit for bit, and in training every
gradient (q, k, v, the gate, the caches before the call).  One that fails is reported, fails the script, and is
never ranked.  Every call takes the lengths as a Python int (all rows at L, known on the host, as the
composition needs), so every implementation gets the same arguments.

The table (melt_kernels/dispatch_table.py's format): per shape, the implementations that passed, fastest first by
their graph time for decode and chunk (decode is served under CUDA graphs, and the targets are kernel times) and
by their eager time for training (a training loop's calls are eager).  This GPU's rows replace its old ones in
--base's table (default: the committed melt_kernels/auto_table.py), and the result is written to --table and read
back through the same code "auto" uses.  Results and the table are rewritten after every shape, so a run cut by
its time limit keeps what it measured.

    python benchmarks/tournament.py --out WORK/tournament.json --table WORK/auto_table.py    # a GPU
    python benchmarks/tournament.py --quick ...     # one Triton alternative per shape: a rerun in a lease
    TRITON_INTERPRET=1 python benchmarks/tournament.py --dry-run --out /tmp/t.json --table /tmp/auto_table.py

On a new GPU, one command regenerates the table: ``bash benchmarks/gpu_check.sh OUT --steps build,tune`` (the
CUDA kernels built, then this script as the pass's ``tune`` step), then ``cp OUT/auto_table.py melt_kernels/``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import attention
import attention_bwd
import melt_kernels
from attention import Shape
from common import HERE, eager_ms, fmt, graph_replay_ms, median_ms, op_call, run_meta, write_results, write_text
from gpu_summary import tournament_table
from melt_kernels import backends
from melt_kernels.autograd import run
from melt_kernels.checks import check_inputs
from melt_kernels.dispatch_table import AutoTable, format_table, plan_items, plan_text, read_table
from melt_kernels.table_check import table_problems

TABLE_FILE = os.path.join(os.path.dirname(melt_kernels.__file__), "auto_table.py")
PEERS = ("sdpa_flash", "sdpa_cudnn", "unfused")
# The Triton alternatives at each kind of shape (the default plan, {}, first); decode's split lengths are added
# per shape, as halves and doubles of its default.  Those that plan as an earlier one does are dropped.
DECODE = [dict(block_r=16, num_warps=8), dict(block_r=16, num_warps=4), dict(fold_merge=True)]
CHUNK = [dict(block_r=64, num_warps=4), dict(block_n=128), dict(num_stages=2)]
BACKWARD = [dict(deterministic=True), dict(block_m_kv=32), dict(block_n_kv=64)]
# What ranks the implementations of a regime, and what each timing of a row covers.
RANKED_BY = {"decode": "graph_us", "chunk": "graph_us", "training": "eager_us"}
TIMED = {"decode": "graph: one call; eager: one call", "chunk": "graph: one call; eager: one call",
         "training": "graph: the backward alone; eager: forward + backward"}
# A check's tolerances: the output's relative error (L2) and lse's largest difference, against the reference.
TOLERANCE = {torch.bfloat16: (1e-2, 1e-3), torch.float16: (1e-2, 1e-3), torch.float32: (1e-4, 1e-4)}
GRAD_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def shapes(dry_run: bool, full: bool) -> list[Shape]:
    """The headline shapes in the order they run (rows are written as each finishes): chunk, decode at batch 1,
    training, decode at batch 64.  The dry run's have the same regimes, tiny."""
    if dry_run:
        return [Shape("chunk", 1, 40, 24, 4, 2, 16), Shape("decode", 2, 1, 39, 4, 2, 32),
                Shape("training", 1, 20, 24, 4, 2, 16)]
    chunks = [(4, 0), (4, 4500), (1, 9500)]
    return ([Shape("chunk", b, 500, length, 16, 16) for b, length in chunks]
            + [Shape("decode", 1, 1, n - 1, 16, 16) for n in (1024, 8192, 32768)]
            + [Shape("training", b, 500, length, 16, 16) for b, length in chunks]
            + [Shape("decode", 64, 1, n - 1, 16, 16) for n in (1024, 8192, 32768) + ((131072,) if full else ())])


@dataclass(frozen=True)
class Candidate:
    backend: Optional[str]  # None: a peer
    fwd: tuple = ()  # plan_items of the launchers' overrides
    bwd: tuple = ()
    peer: Optional[str] = None

    @property
    def name(self) -> str:
        return self.peer if self.backend is None else self.backend + plan_text(self.fwd, self.bwd)


def _distinct(plans: list[dict], plan_of: Callable) -> list[dict]:
    """``plans`` less those the planner refuses or plans as an earlier one."""
    seen, kept = [], []
    for overrides in plans:
        try:
            plan = plan_of(overrides)
        except ValueError:
            continue
        if plan not in seen:
            seen.append(plan)
            kept.append(overrides)
    return kept


def triton_plans(s: Shape, dtype, device, few: bool) -> list[tuple[dict, dict]]:
    """(forward, backward) overrides of the Triton candidates at ``s``, the default first (``few``: one
    alternative, as the dry run and --quick take)."""
    from melt_kernels.kernels.bwd import plan_bwd
    from melt_kernels.kernels.fwd import path_of, plan_forward
    from melt_kernels.kernels.launch import num_sms

    if s.kind == "training":
        def plan_of(o):
            o = dict(o)
            return plan_bwd(s.head_dim, s.seqlen_q, dtype, device.type == "cpu", True, False,
                            o.pop("deterministic", False), **o)
        return [({}, b) for b in _distinct([{}] + BACKWARD[:1 if few else None], plan_of)]

    def plan_of(o):
        return plan_forward(s.batch, s.seqlen_q, s.heads_q, s.heads_kv, s.head_dim, s.cache_len, num_sms(device),
                            torch.finfo(dtype).bits // 8, **o)
    decode = path_of(s.seqlen_q, s.heads_q, s.heads_kv, torch.finfo(dtype).bits // 8) == "decode"
    options = list(DECODE if decode else CHUNK)
    if decode:  # half the split length; double it where there are splits to merge
        default = plan_of({})
        options.append(dict(split_len=max(default.block_n, default.split_len // 2)))
        if default.splits > 1:
            options.append(dict(split_len=2 * default.split_len))
    return [(f, {}) for f in _distinct([{}] + options[:1 if few else None], plan_of)]


def candidates(s: Shape, dtype, device, few: bool) -> list[Candidate]:
    out = [Candidate("triton", plan_items(f), plan_items(b)) for f, b in triton_plans(s, dtype, device, few)]
    out.append(Candidate("cuda"))
    out.append(Candidate("composition"))
    if device.type == "cuda" and s.kind != "training":
        out.append(Candidate("composition", plan_items(dict(kernel="cudnn"))))
    return out + [Candidate(None, peer=name) for name in PEERS]


def implementation(c: Candidate, problem) -> tuple[Optional[backends.Backend], Optional[str]]:
    """The candidate as a backend with its plan, or why it cannot run ``problem`` here."""
    try:
        impl = backends.planned(c.backend, c.fwd, c.bwd)
    except RuntimeError as e:  # not available here (the CUDA kernels not built)
        return None, str(e)
    reason = backends.why_not(c.backend, problem, impl)
    return (None, reason) if reason is not None else (impl, None)


def checked(c: Candidate, problem, check: Callable, cleanup: Callable) -> tuple[dict, Optional[backends.Backend]]:
    """A candidate's row and, for an implementation, its backend with its plan, the row holding its check.  The
    row has an "error" instead where the implementation cannot run here or its check raised (then ``cleanup``
    runs); a peer's row is bare."""
    row = dict(candidate=c.name, backend=c.backend, fwd=dict(c.fwd), bwd=dict(c.bwd))
    if c.backend is None:
        return row, None
    impl, why = implementation(c, problem)
    if impl is None:
        return dict(row, error=why), None
    try:
        row["check"] = check(impl)
    except (RuntimeError, ValueError) as e:
        cleanup()
        return dict(row, error=f"{type(e).__name__}: {e}"[:200]), None
    return row, impl


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (L2, in float32; NaN anywhere gives NaN)."""
    ref = ref.float()
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _within(value: float, tolerance: float) -> bool:
    return value <= tolerance  # NaN is not


def measure(fn: Callable, cuda: bool, graph: bool, prepare: Optional[Callable] = None,
            per: int = 1) -> tuple[Optional[float], Optional[str]]:
    """(us per call, None) or (None, why): graph replays or eager calls of ``fn`` (``per`` calls of the op each);
    off CUDA two runs, which check the path and time nothing meaningful."""
    try:
        if not cuda:
            if prepare is not None:
                prepare()
            ms = median_ms(fn, False, None)
        else:
            ms = graph_replay_ms(fn, prepare) if graph else eager_ms(fn)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as e:
        return None, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return 1e3 * ms / per, None


# --- forward regimes (decode, chunk) --------------------------------------------------------------------------

def _reference_forward(inputs: attention.Inputs) -> dict:
    """The reference's out, lse and active slots of the first input set, computed a few rows at a time (its
    float32 window of a 32k-key batch of 64 would not fit); the caches restored after."""
    t, s = inputs.sets[0], inputs.shape
    restore = inputs.active_slots_restorer()
    keys = s.cache_len + s.seqlen_q
    rows = max(1, int(4e9 // (24 * keys * s.heads_kv * s.head_dim)))
    outs, lses = [], []
    for b in range(0, s.batch, rows):
        part = slice(b, b + rows)
        out, lse = melt_kernels.gated_kv_attention(*(t[n][part] for n in ("q", "k", "v", "k_cache", "v_cache")),
                                                   s.cache_len, t["gate"][part], return_lse=True,
                                                   backend="reference")
        outs.append(out)
        lses.append(lse)
    active = slice(s.cache_len, keys)
    expected = dict(out=torch.cat(outs), lse=torch.cat(lses), k_cache=t["k_cache"][:, active].clone(),
                    v_cache=t["v_cache"][:, active].clone())
    restore()
    return expected


def check_forward(inputs: attention.Inputs, impl, expected: dict, dtype) -> dict:
    t, s = inputs.sets[0], inputs.shape
    restore = inputs.active_slots_restorer()
    problem = check_inputs(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], s.cache_len, t["gate"],
                           backend=impl.name)
    out, lse = run(problem, impl)
    active = slice(s.cache_len, s.cache_len + s.seqlen_q)
    caches_equal = all(torch.equal(_bits(t[n][:, active]), _bits(expected[n])) for n in ("k_cache", "v_cache"))
    restore()
    out_err, lse_err = relative_error(out, expected["out"]), (lse - expected["lse"]).abs().max().item()
    out_tol, lse_tol = TOLERANCE[dtype]
    return dict(passed=caches_equal and _within(out_err, out_tol) and _within(lse_err, lse_tol),
                caches_equal=caches_equal, out_err=out_err, lse_err=lse_err)


def run_forward_shape(s: Shape, cands: list[Candidate], env, l2_bytes: int) -> list[dict]:
    dtype, device, cuda = env.dtype, env.device, env.cuda
    nbytes = attention.essential_bytes(s, torch.finfo(dtype).bits // 8)
    copies = max(1, min(16, math.ceil(3 * l2_bytes / nbytes)))  # keep the working set out of L2
    inputs = attention.Inputs(s, dtype, device, copies, host_lengths=True)
    t = inputs.sets[0]
    problem = check_inputs(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], s.cache_len, t["gate"])
    restore = inputs.active_slots_restorer()
    expected = _reference_forward(inputs)
    rows = []
    for c in cands:
        row, impl = checked(c, problem, lambda impl: check_forward(inputs, impl, expected, dtype), restore)
        rows.append(dict(row, copies=copies))
        if "error" in row:
            continue
        call = inputs.peer(c.peer) if impl is None else inputs.fused(impl)
        for kind in ("graph", "eager"):
            rows[-1][f"{kind}_us"], rows[-1][f"{kind}_error"] = measure(call, cuda, kind == "graph", per=copies)
            restore()  # the timed calls blended the active slots again and again
    del inputs, expected
    if cuda:
        torch.cuda.empty_cache()
    return rows


# --- training ---------------------------------------------------------------------------------------------------

def gradients(inputs: attention_bwd.Inputs, op: Callable) -> dict:
    """Forward + backward of ``op`` from the inputs (caches copied, so they stay as they are): out and the
    gradients of q, k, v, the gate and the caches' values before the call."""
    before = [c.detach().clone().requires_grad_() for c in (inputs.k_cache, inputs.v_cache)]
    out = op(inputs.q, inputs.k, inputs.v, *(c.clone() for c in before), inputs.lengths, inputs.gate)
    out.backward(inputs.dout)
    result = dict(out=out.detach(), q=inputs.q.grad, k=inputs.k.grad, v=inputs.v.grad, gate=inputs.gate.grad,
                  k_cache=before[0].grad, v_cache=before[1].grad)
    _zero_grads(inputs)
    return result


def _zero_grads(inputs: attention_bwd.Inputs) -> None:
    for leaf in inputs.leaves():
        leaf.grad = None


def check_training(inputs: attention_bwd.Inputs, impl, expected: dict, dtype) -> dict:
    got = gradients(inputs, op_call(impl))
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    tolerance = dict.fromkeys(errors, GRAD_TOLERANCE[dtype])
    tolerance["out"] = TOLERANCE[dtype][0]
    return dict(passed=all(_within(errors[n], tolerance[n]) for n in errors), errors=errors)


def run_training_shape(s: Shape, cands: list[Candidate], env) -> list[dict]:
    dtype, device, cuda = env.dtype, env.device, env.cuda
    bs = attention_bwd.Shape(s.batch, s.seqlen_q, s.cache_len, s.heads_q, s.heads_kv, s.head_dim)
    inputs = attention_bwd.Inputs(bs, dtype, device, host_lengths=True)
    with torch.no_grad():
        problem = check_inputs(inputs.q, inputs.k, inputs.v, inputs.k_cache, inputs.v_cache, s.cache_len,
                               inputs.gate)
    expected = gradients(inputs, op_call("reference"))
    restore = inputs.active_slots_restorer()
    rows = []
    for c in cands:
        row, impl = checked(c, problem, lambda impl: check_training(inputs, impl, expected, dtype),
                            lambda: _zero_grads(inputs))
        rows.append(dict(row, copies=1))
        if "error" in row:
            continue
        if impl is None:
            forward, dout = inputs.peer_forward(c.peer), inputs.dout.transpose(1, 2)
        else:
            forward, dout = inputs.fused_forward(impl, cache_grad=True), inputs.dout
        held = {}

        def step():
            forward().backward(dout)
            inputs.release_caches()
            _zero_grads(inputs)

        row = rows[-1]
        row["graph_us"], row["graph_error"] = measure(
            lambda: held["out"].backward(dout, retain_graph=True), cuda, True,
            prepare=lambda: held.update(out=forward()))
        held.clear()
        inputs.release_caches()
        _zero_grads(inputs)
        row["eager_us"], row["eager_error"] = measure(step, cuda, False)
        with torch.no_grad():
            restore()  # the timed calls blended the active slots again and again
    del inputs, expected
    if cuda:
        torch.cuda.empty_cache()
    return rows


# --- results, the table -------------------------------------------------------------------------------------------

def regime(s: Shape) -> str:
    """The table's regime of a shape, as "auto" reads a call (melt_kernels.backends.regime)."""
    from melt_kernels.kernels.fwd import path_of
    return "training" if s.kind == "training" else path_of(s.seqlen_q, s.heads_q, s.heads_kv)


def shape_fields(s: Shape, dtype) -> dict:
    return dict(regime=regime(s), label=s.label, batch=s.batch, seqlen_q=s.seqlen_q, keys=s.cache_len + s.seqlen_q,
                heads_q=s.heads_q, heads_kv=s.heads_kv, head_dim=s.head_dim,
                dtype=str(dtype).replace("torch.", ""), timed=TIMED[regime(s)])


def ranking(rows: list[dict]) -> list[dict]:
    """The implementations that passed their check, fastest first by their regime's timing."""
    key = RANKED_BY[rows[0]["regime"]]
    passed = [r for r in rows if r["backend"] and r.get("check", {}).get("passed") and r.get(key) is not None]
    return [dict(backend=r["backend"], fwd=r["fwd"], bwd=r["bwd"], us=round(r[key], 2))
            for r in sorted(passed, key=lambda r: r[key])]


def summary(rows: list[dict]) -> dict:
    """Per shape: the winner (what "auto" runs), and the ratios the targets are stated in (each timing: the
    winner's and the Triton default plan's time over SDPA-flash's, cuDNN's and the composition's)."""
    first = rows[0]
    key = RANKED_BY[first["regime"]]
    by_name = {r["candidate"]: r for r in rows}
    ranked = ranking(rows)
    winner = ranked[0] if ranked else None
    winner_row = next((r for r in rows if winner and r["backend"] == winner["backend"] and r["fwd"] == winner["fwd"]
                       and r["bwd"] == winner["bwd"]), None)
    default = by_name.get("triton" + plan_text((), ()))
    composition = by_name.get("composition" + plan_text((), ()))

    def ratios(r: Optional[dict]) -> dict:
        out = {}
        for timing in ("graph_us", "eager_us"):
            for peer, peer_row in (("flash", by_name.get("sdpa_flash")), ("cudnn", by_name.get("sdpa_cudnn")),
                                   ("composition", composition)):
                mine, theirs = (r or {}).get(timing), (peer_row or {}).get(timing)
                out[f"{timing[:-3]}_x_{peer}"] = mine / theirs if mine and theirs else None
        return out

    return dict(regime=first["regime"], label=first["label"], ranked_by=key, timed=first["timed"],
                winner=winner_row and winner_row["candidate"], winner_us=winner and winner["us"],
                winner_ratios=ratios(winner_row), triton_default_us=(default or {}).get(key),
                triton_default_ratios=ratios(default),
                failed=[r["candidate"] for r in rows if r.get("check") and not r["check"]["passed"]])


def table_entry(meta: dict, shape_rows: list[list[dict]]) -> dict:
    rows = []
    for group in shape_rows:
        ranked = ranking(group)
        if ranked:
            r = group[0]
            rows.append(dict(regime=r["regime"], dtype=r["dtype"], head_dim=r["head_dim"],
                             groups=r["heads_q"] // r["heads_kv"], batch=r["batch"], keys=r["keys"],
                             timing=RANKED_BY[r["regime"]][:-3], ranking=ranked))
    measured = {k: meta[k] for k in ("date", "commit", "torch", "triton")}
    return dict(measured=dict(measured, date=meta["date"][:10], commit=meta["commit"][:12]), rows=rows)


def write_table(path: str, base: dict, gpu: str, entry: dict) -> None:
    write_text(path, format_table({**{g: e for g, e in base.items() if g != gpu}, gpu: entry}))


def read_back(path: str, gpu: str, entry: dict) -> list[str]:
    """What is wrong with the written table: its structure and plans, and whether each of this GPU's rows is what
    "auto" finds at the row's own shape (read through the same code)."""
    table = read_table(path)
    problems = table_problems(table)
    if problems:
        return problems
    auto = AutoTable(table)
    for r in entry["rows"]:
        found = auto.row(gpu, r["regime"], r["dtype"], r["head_dim"], r["groups"], r["batch"], r["keys"])
        if found is None or (found.batch, found.keys, found.ranking[0].backend) != (r["batch"], r["keys"],
                                                                                   r["ranking"][0]["backend"]):
            problems.append(f"the row {r['regime']} at batch {r['batch']}, {r['keys']} keys is not found back")
    return problems


def markdown(meta: dict, rows: list[dict], summaries: list[dict]) -> str:
    lines = [f"# Tournament: {meta['device']}, {meta['date']}, commit {meta['commit'][:12]}", "",
             f"{meta['dtype']}, causal, one gate per kv head; {meta['timing']}.  'x flash': the time over SDPA-flash's "
             "in the same timing.  Ranked by graph time for decode and chunk, by eager time for training (whose "
             "graph time is the backward alone).", "",
             *tournament_table(summaries)]
    lines += ["", "| shape | candidate | check | graph us | eager us | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("check")
        verdict = "n/a" if check is None else ("passed" if check["passed"] else "FAILED")
        error = r.get("error") or "; ".join(r[k] for k in ("graph_error", "eager_error") if r.get(k))
        lines.append(f"| {r['label']} | {r['candidate']} | {verdict} | {fmt(r.get('graph_us'), '.1f')} | "
                     f"{fmt(r.get('eager_us'), '.1f')} | {error or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU smoke test (Triton interpreter, tiny shapes)")
    parser.add_argument("--quick", action="store_true", help="one Triton alternative per shape (a rerun in a lease)")
    parser.add_argument("--full", action="store_true", help="also decode at 128k keys, batch 64 (68 GB of caches)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "tournament.json"), help="rows (JSON + .md)")
    parser.add_argument("--table", required=True, help="where to write the table (melt_kernels/auto_table.py's form)")
    parser.add_argument("--base", default=TABLE_FILE, help="the table whose other GPUs' rows are kept")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not cuda and not args.dry_run:
        print("benchmarks/tournament.py times GPU kernels and no CUDA device is available: nothing to do "
              "(--dry-run runs its code on tiny CPU shapes)")
        return 0
    env = argparse.Namespace(cuda=cuda, device=torch.device("cuda" if cuda else "cpu"),
                             dtype=torch.bfloat16 if cuda else torch.float32)
    gpu = torch.cuda.get_device_name(env.device) if cuda else "cpu-interpreter"
    l2_bytes = torch.cuda.get_device_properties(env.device).L2_cache_size if cuda else 0
    meta = run_meta(gpu, dtype=str(env.dtype), timing="CUDA-graph replays and eager calls" if cuda
                    else "CPU smoke test: not timings")
    base = read_table(args.base) if os.path.exists(args.base) else {}
    rows, groups, summaries = [], [], []
    for s in shapes(args.dry_run, args.full):
        cands = candidates(s, env.dtype, env.device, args.dry_run or args.quick)
        measured = (run_training_shape(s, cands, env) if s.kind == "training"
                    else run_forward_shape(s, cands, env, l2_bytes))
        group = [dict(shape_fields(s, env.dtype), **r) for r in measured]
        rows += group
        groups.append(group)
        summaries.append(summary(group))
        entry = table_entry(meta, groups)
        write_table(args.table, base, gpu, entry)
        write_results(args.out, "tournament", meta, rows, markdown(meta, rows, summaries), summary=summaries,
                      auto_table={gpu: entry})
        m = summaries[-1]
        print(f"{s.label}: auto runs {m['winner']} ({fmt(m['winner_us'], '.1f')} us, {m['ranked_by']}); "
              f"failed checks: {', '.join(m['failed']) or 'none'}", flush=True)
    print(markdown(meta, rows, summaries))
    problems = read_back(args.table, gpu, entry)
    for p in problems:
        print(f"FAILED: the table {args.table}: {p}", file=sys.stderr)
    failed = [f"{m['label']}: {name}" for m in summaries for name in m["failed"]]
    failed += [f"{r['label']}: {r['candidate']}: {r['error']}" for r in rows
               if r["candidate"] == "triton" + plan_text((), ()) and r.get("error")]
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    print("wrote", args.out, args.table)
    return int(bool(problems or failed))


if __name__ == "__main__":
    sys.exit(main())
