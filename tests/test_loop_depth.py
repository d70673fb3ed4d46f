"""benchmarks/loop_depth.py in --quick mode: the records it writes and the cache sizes they show."""
import io
import json
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_depth.py"
KEYS = {"method", "loops", "cache_bytes", "peak_bytes", "ms_per_token"}
GPU_KEYS = {"max_batch", "tokens_per_s"}


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    """(records returned, records written, stdout, stderr) of one --quick run with T in {1, 2, 3}."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(stdout), redirect_stderr(stderr):
        # The records' contract does not depend on the backend: keep "auto" off the Triton interpreter (the
        # kernel tests exercise it), so this stays a few seconds; CI runs the script the same way.
        mp.delenv("TRITON_INTERPRET", raising=False)
        records = bench["main"](["--quick", "--loops", "1", "2", "3", "--json", str(out)])
    return records, json.loads(out.read_text()), stdout.getvalue(), stderr.getvalue()


def test_quick_records_have_the_documented_keys(quick_run):
    records, written, stdout, stderr = quick_run
    assert written == records
    assert {(r["method"], r["loops"]) for r in records} == \
        {(m, t) for m in ("melt", "melt-unfused", "looplm") for t in (1, 2, 3)}
    on_gpu = torch.cuda.is_available()
    for r in records:
        assert KEYS | (GPU_KEYS if on_gpu else set()) <= r.keys()
        assert GPU_KEYS.isdisjoint(r) or on_gpu
        assert r["ms_per_token"] > 0
        # The cache is allocated inside the measured block, so the peak holds at least the cache.
        assert r["peak_bytes"] >= r["cache_bytes"] > 0
    assert "method" in stdout and "peak = " in stdout
    assert "[9/9]" in stderr


def test_runs_pair_melt_with_looplm_at_each_depth_before_the_unfused_path(quick_run):
    """The runs' order puts the figures that matter first (a GPU step cut by its time limit keeps them): MELT and
    the LoopLM at T = 1, 2, 3 in turn, then the unfused path; the table still groups them by method."""
    records, written, stdout, _ = quick_run
    order = [("melt", 1), ("looplm", 1), ("melt", 2), ("looplm", 2), ("melt", 3), ("looplm", 3),
             ("melt-unfused", 1), ("melt-unfused", 2), ("melt-unfused", 3)]
    assert [(r["method"], r["loops"]) for r in records] == order
    assert [(r["method"], r["loops"]) for r in written] == order
    methods = ("melt", "melt-unfused", "looplm")
    rows = [line.split() for line in stdout.splitlines()]
    assert [(row[0], int(row[2])) for row in rows if row and row[0] in methods] == \
        [(m, t) for m in methods for t in (1, 2, 3)]


def stub_latency(bench, monkeypatch, cut_at=None):
    """Replaces the measurement of a record by a stub (the real one on the first call when ``cut_at``), raising
    RuntimeError on call ``cut_at``; returns the (method's cache kind, T) of every call."""
    globals_, calls = bench["run"].__globals__, []
    real = globals_["latency"]

    def latency(model, kind, args, gen):
        calls.append((kind, model.num_loops))
        if len(calls) == cut_at:
            raise RuntimeError("cut by the time limit")
        if cut_at:
            return real(model, kind, args, gen)
        return dict(cache_bytes=1, peak_bytes=1, ms_per_token=1.0)

    monkeypatch.setitem(globals_, "latency", latency)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return calls


def test_runs_only_the_methods_asked_for_in_that_order(bench, monkeypatch):
    stub_latency(bench, monkeypatch)
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        records = bench["main"](["--quick", "--methods", "melt-unfused", "looplm", "--loops", "4", "1"])
    assert [(r["method"], r["loops"]) for r in records] == \
        [("looplm", 4), ("looplm", 1), ("melt-unfused", 4), ("melt-unfused", 1)]


def test_json_holds_the_finished_records_when_the_run_is_cut(bench, monkeypatch, tmp_path):
    """The JSON is rewritten after every record: a run stopped during its second keeps its first."""
    calls = stub_latency(bench, monkeypatch, cut_at=2)
    out = tmp_path / "cut.json"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), pytest.raises(RuntimeError):
        bench["main"](["--quick", "--loops", "1", "2", "--json", str(out)])
    assert calls == [("melt", 1), ("looplm", 1)]
    (first,) = json.loads(out.read_text())
    assert (first["method"], first["loops"]) == ("melt", 1) and first["peak_bytes"] >= first["cache_bytes"] > 0
    assert os.listdir(tmp_path) == ["cut.json"]  # the temporary file was renamed over it


def test_melt_cache_is_constant_in_loop_depth_and_looplm_linear(quick_run):
    records = quick_run[0]
    size = {(r["method"], r["loops"]): r["cache_bytes"] for r in records}
    for method in ("melt", "melt-unfused"):
        assert size[method, 1] == size[method, 2] == size[method, 3]
    per_loop = size["looplm", 2] - size["looplm", 1]
    assert per_loop > 0
    assert size["looplm", 3] == size["looplm", 1] + 2 * per_loop
    # One loop: the LoopLM cache is MELT's.
    assert size["looplm", 1] == size["melt", 1]


def test_plot_is_written(bench, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "loops.png"
    bench["main"](["--quick", "--methods", "melt", "looplm", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_runs_without_matplotlib(tmp_path):
    """As CI runs it: a fresh interpreter, exit status 0, matplotlib never imported without --plot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = ("import runpy, sys; sys.argv = [sys.argv[1], '--quick', '--methods', 'melt', '--loops', '1']; "
             "runpy.run_path(sys.argv[0], run_name='__main__'); assert 'matplotlib' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", check, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "melt" in done.stdout


def test_benchmark_runs_ouros_architecture_at_ouro_1_4b_shape_on_a_gpu(bench, quick_run):
    """The GPU default is Ouro-1.4B's shape (786,432 KV bytes per token in bf16 at T = 4, one pass 196,608), and
    the records' cache bytes are the model's KV bytes per token times the positions, plus the lengths."""
    from melt_kernels.model import LoopedLM, kv_bytes_per_token

    assert bench["LoopedLM"] is LoopedLM
    ouro = bench["load_config"]("ouro-1.4b", "kv-head")
    assert (ouro.num_hidden_layers, ouro.hidden_size, ouro.num_key_value_heads, ouro.head_dim, ouro.rope_theta,
            ouro.tie_word_embeddings) == (24, 2048, 16, 128, 1e6, False)
    assert kv_bytes_per_token(ouro, "looplm", torch.bfloat16) == 786_432
    assert kv_bytes_per_token(ouro, "melt", torch.bfloat16) == 196_608
    assert bench["MODES"]["cuda"]["config"] == "ouro-1.4b"
    args = bench["parse_args"](["--quick"])
    positions = args.batch * (args.prompt + max(args.warmup + args.new_tokens, bench["PROBE_STEPS"]))
    for r in quick_run[0]:
        config = bench["load_config"]("quick", "kv-head")
        config.total_ut_steps = r["loops"]
        kind = "looplm" if r["method"] == "looplm" else "melt"
        assert r["cache_bytes"] == positions * kv_bytes_per_token(config, kind, torch.float32) + 4 * args.batch


def test_serving_sweep_holds_t_times_the_sequences(bench, tmp_path):
    """--serve --quick: at a fixed page budget MELT holds the same sequences at every T, the LoopLM 1/T of
    them (pages of T pairs), every request is served, and the pool's pages are what the budget buys."""
    out = tmp_path / "serve.json"
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        mp.delenv("TRITON_INTERPRET", raising=False)
        records = bench["main"](["--quick", "--serve", "--loops", "1", "2", "4", "--json", str(out)])
    assert json.loads(out.read_text()) == records
    held = {(r["method"], r["loops"]): r for r in records}
    assert set(held) == {(m, t) for m in ("melt", "looplm") for t in (1, 2, 4)}
    for t in (1, 2, 4):
        melt, looplm = held["melt", t], held["looplm", t]
        assert melt["pages"] * melt["page_bytes"] <= 2**-14 * 2**30 < (melt["pages"] + 1) * melt["page_bytes"]
        assert looplm["page_bytes"] == t * melt["page_bytes"]
        assert melt["seqs_held"] == melt["capacity"] == held["melt", 1]["capacity"]
        assert looplm["seqs_held"] == looplm["capacity"] == melt["capacity"] // t
        for r in (melt, looplm):  # every request generated its tokens: 3 each (--quick)
            assert r["generated_tokens"] == 3 * r["requests"] and r["tokens_per_s"] > 0


def test_largest_batch_search_with_a_simulated_gpu_allocator(bench, monkeypatch, one_thread):
    """The GPU-only max-batch search (its table's "max batch at a memory budget"), run on the CPU with the CUDA
    allocator's counters simulated: the peak is the weights plus every cache allocated since the last reset, and
    an allocation past the device's memory raises OutOfMemoryError.  The search must return the largest batch
    whose peak fits the budget, for MELT and the LoopLM, and time it."""
    from melt_kernels.model import LoopedLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the reference: the search is under test, not a kernel
    args = bench["parse_args"](["--quick", "--device", "cpu", "--context", "40"])
    model = LoopedLM(bench["load_config"]("quick", "kv-head")).eval()
    model.num_loops = 3
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    held = {"peak": weights}
    new_cache = model.new_cache

    def allocating_new_cache(kind, batch, max_seqlen):
        cache = new_cache(kind, batch, max_seqlen)
        if weights + cache.nbytes > device_memory:
            raise torch.cuda.OutOfMemoryError("simulated")
        held["peak"] = max(held["peak"], weights + cache.nbytes)
        return cache

    monkeypatch.setattr(model, "new_cache", allocating_new_cache)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: held.update(peak=weights))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: held["peak"])
    for kind, rows in (("melt", 7), ("looplm", 3)):
        length = args.context + max(args.warmup + args.new_tokens, bench["PROBE_STEPS"])
        one_row = new_cache(kind, 1, length).nbytes
        # A budget just short of rows + 1 rows (the cache's few length bytes are per row too), and a device that
        # cannot even hold that many: the search must meet both bounds.
        args.budget_gb = (weights + (rows + 1) * one_row - 1) / 2**30
        device_memory = weights + (rows + 2) * one_row
        found = bench["largest_batch"](model, kind, args, torch.Generator().manual_seed(0))
        assert found["max_batch"] == rows, (kind, found)
        assert found["tokens_per_s"] > 0
        device_memory = weights + (rows - 2) * one_row  # now the device runs out first
        assert bench["largest_batch"](model, kind, args, torch.Generator().manual_seed(0))["max_batch"] == rows - 2
