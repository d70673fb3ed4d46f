"""How backend="auto" chooses by the committed table (melt_kernels/backends.py, dispatch_table.py), on the CPU
with a patched GPU name and table: the call's row decides, its first ranked implementation that can run the call
runs with its plan, the nearest measured shape is the row, no row means the fixed order, deterministic mode never
gets an atomic backward, explain_backend and which_backend name the row; and the committed table file parses,
is the writer's own output and names only implementations and plan keys that exist."""
import dataclasses
import os

import pytest
import torch

import melt_kernels
from melt_kernels import backends
from melt_kernels.backends import choose, explain_backend, select_backend
from melt_kernels.checks import check_inputs
from melt_kernels.dispatch_table import IMPLEMENTATIONS, AutoTable, format_table, plan_items, read_table
from melt_kernels.table_check import table_problems
from utils import make_case

GPU = "Test GPU 80GB"
TABLE_FILE = os.path.join(os.path.dirname(melt_kernels.__file__), "auto_table.py")
TRITON_RUNS = "triton" in melt_kernels.available_backends()  # asked before any test patches the backends


def _choice(backend, fwd=None, bwd=None, us=1.0):
    return dict(backend=backend, fwd=fwd or {}, bwd=bwd or {}, us=us)


def _row(regime, ranking, batch=1, keys=1024, dtype="float32", head_dim=16, groups=1):
    return dict(regime=regime, dtype=dtype, head_dim=head_dim, groups=groups, batch=batch, keys=keys,
                timing="graph" if regime != "training" else "eager", ranking=ranking)


def _table(*rows):
    return {GPU: dict(measured=dict(date="2026-12-10"), rows=list(rows))}


@pytest.fixture
def on_gpu(monkeypatch):
    """CPU tensors seen as a GPU named GPU, with the Triton kernels runnable (the interpreter); returns a
    function that installs a table."""
    monkeypatch.setattr(backends, "gpu_name", lambda device: GPU)
    monkeypatch.setattr(backends, "triton_interpreted", lambda: True)
    monkeypatch.setattr(backends, "triton_cpu_problem", lambda: None)

    def install(table):
        assert table_problems(table) == []
        monkeypatch.setattr(backends, "auto_table", lambda: AutoTable(table))
    return install


def _problem(seqlen_q=1, cache_len=40, lengths=None, heads_q=1, requires_grad=False):
    case = make_case(0, batch=1, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=1, head_dim=16, cache_len=cache_len,
                     int_seqlens=True)
    q = case.q.requires_grad_(requires_grad)
    return check_inputs(q, case.k, case.v, case.k_cache, case.v_cache,
                        cache_len - seqlen_q if lengths is None else lengths, case.gate)


def test_the_row_decides_its_first_runnable_choice_and_its_plan(on_gpu):
    on_gpu(_table(_row("decode", [_choice("composition"), _choice("triton", {"block_n": 16})], keys=40)))
    problem = _problem()
    chosen = select_backend("auto", problem)
    assert chosen.name == "composition"
    assert GPU in explain_backend(problem)["auto"] and "batch 1 and 40 keys" in explain_backend(problem)["auto"]
    # Rows of different lengths: the composition refuses, the next ranked implementation runs with its plan.
    uneven = _problem(cache_len=40, lengths=torch.tensor([39]))
    uneven = dataclasses.replace(uneven, min_seqlen_k=3)
    chosen = select_backend("auto", uneven)
    assert (chosen.name, chosen.fwd_plan) == ("triton", (("block_n", 16),))
    said = choose("auto", uneven)
    assert said.fwd_plan == {"block_n": 16}
    assert "passed over composition" in said.reason and "same length" in said.reason


def test_the_nearest_measured_shape_is_the_row(on_gpu):
    on_gpu(_table(_row("decode", [_choice("triton", {"split_len": 64})], keys=1024),
                  _row("decode", [_choice("triton", {"split_len": 256})], keys=32768),
                  _row("decode", [_choice("composition")], batch=64, keys=1024)))
    table = backends.auto_table()
    assert table.row(GPU, "decode", "float32", 16, 1, 1, 2000).ranking[0].fwd == (("split_len", 64),)
    assert table.row(GPU, "decode", "float32", 16, 1, 1, 20000).ranking[0].fwd == (("split_len", 256),)
    assert table.row(GPU, "decode", "float32", 16, 1, 32, 1500).ranking[0].backend == "composition"
    assert table.row(GPU, "decode", "float32", 16, 1, 1, 1 << 40).keys == 32768
    assert table.row(GPU, "decode", "float32", 16, 2, 1, 2000) is None  # another group size: no row
    assert table.row(GPU, "chunk", "float32", 16, 1, 1, 2000) is None


@pytest.mark.parametrize("case", ["other gpu", "other regime", "other dtype", "no runnable choice"])
def test_no_fitting_row_means_the_fixed_order(on_gpu, monkeypatch, case):
    rows = [_row("chunk" if case == "other regime" else "decode", [_choice("cuda")], keys=40,
                 dtype="bfloat16" if case == "other dtype" else "float32")]
    on_gpu(_table(*rows))
    if case == "other gpu":
        monkeypatch.setattr(backends, "gpu_name", lambda device: "Another GPU")
    problem = _problem()
    assert select_backend("auto", problem).name == backends.KERNEL_BACKENDS[0]
    reason = explain_backend(problem)["auto"]
    assert "the fixed order" in reason
    if case == "no runnable choice":
        assert "passed over cuda" in reason and "no implementation ranked" in reason
    else:
        assert "fits this call" in reason


def test_a_plan_the_planner_refuses_is_passed_over(on_gpu):
    """A decode row measured at one token, whose 16-row tile cannot hold a call's 32 rows (M * G): the next
    ranked implementation runs."""
    on_gpu(_table(_row("decode", [_choice("triton", {"block_r": 16}), _choice("triton")], keys=40, groups=2)))
    assert select_backend("auto", _problem(heads_q=2)).fwd_plan == (("block_r", 16),)
    chosen = choose("auto", _problem(seqlen_q=16, cache_len=48, heads_q=2))
    assert chosen.fwd_plan == {} and "block_r" in chosen.reason


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_mode_never_gets_an_atomic_backward(on_gpu, monkeypatch, deterministic):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    bwd = {"deterministic": False, "block_m_kv": 32}
    on_gpu(_table(_row("training", [_choice("triton", bwd=bwd)], keys=40)))
    chosen = select_backend("auto", _problem(requires_grad=True))
    assert dict(chosen.bwd_plan) == ({"block_m_kv": 32} if deterministic else bwd)
    # Not recording gradients: a forward call, whose regime ("decode") has no row here.
    with torch.no_grad():
        assert select_backend("auto", _problem(requires_grad=True)).bwd_plan == ()


@pytest.mark.skipif(not TRITON_RUNS, reason="needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")
def test_the_op_runs_the_rows_plan(on_gpu, monkeypatch):
    """End to end through the op: the row's plan reaches the launcher (spied on), and the result is the
    reference's."""
    on_gpu(_table(_row("decode", [_choice("triton", {"block_n": 16, "num_stages": 1})], keys=24, groups=2)))
    seen = []
    base = backends._load("triton")
    monkeypatch.setitem(backends._LOADED, "triton", dataclasses.replace(
        base, fwd=lambda *a, **kw: seen.append(kw) or base.fwd(*a, **kw)))
    backends.planned.cache_clear()
    try:
        case = make_case(1, batch=2, seqlen_q=8, heads_q=4, heads_kv=2, head_dim=16, cache_len=24, full_rows=True)
        want = case.clone()
        out = melt_kernels.gated_kv_attention(*case.args())
        ref = melt_kernels.gated_kv_attention(*want.args(), backend="reference")
    finally:
        backends.planned.cache_clear()
    assert seen and seen[0]["block_n"] == 16 and seen[0]["num_stages"] == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_which_backend_takes_the_ops_arguments(on_gpu):
    on_gpu(_table(_row("decode", [_choice("composition", {"kernel": "cpu"})], keys=40)))
    case = make_case(0, batch=1, seqlen_q=1, heads_q=1, heads_kv=1, head_dim=16, cache_len=40, int_seqlens=True)
    args = (case.q, case.k, case.v, case.k_cache, case.v_cache, 39, case.gate)
    chosen = melt_kernels.which_backend(*args)
    assert (chosen.backend, chosen.fwd_plan) == ("composition", {"kernel": "cpu"})
    assert str(chosen).startswith("composition (fwd kernel='cpu'): the table's row for " + GPU)
    assert melt_kernels.which_backend(*args, backend="reference").reason == "asked for by name"
    uneven = make_case(0, batch=2, seqlen_q=1, heads_q=2, heads_kv=1, head_dim=16, cache_len=40)
    with pytest.raises(RuntimeError, match="same length"):
        melt_kernels.which_backend(*uneven.args()[:5], torch.tensor([3, 4]), backend="composition")
    with pytest.raises(ValueError, match="backend must be one of"):
        melt_kernels.which_backend(*args, backend="fastest")


def test_the_committed_table_parses_and_names_what_exists():
    table = read_table(TABLE_FILE)
    assert table_problems(table) == []
    with open(TABLE_FILE) as f:
        assert f.read() == format_table(table), "auto_table.py is not the writer's output: regenerate it"
    for entry in table.values():
        for row in entry["rows"]:
            for choice in row["ranking"]:
                assert choice["backend"] in IMPLEMENTATIONS and choice["backend"] in backends._MODULES
    AutoTable(table)


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(regime="prefill"), "regime in"),
    (lambda r: r["ranking"][0].update(backend="flash"), "backend must be one of"),
    (lambda r: r["ranking"][0]["fwd"].update(block_q=64), "takes no fwd override ['block_q']"),
    (lambda r: r["ranking"][0]["bwd"].update(kernel="flash"), "takes no bwd override"),
    (lambda r: r.update(batch=0), "positive ints"),
    (lambda r: r.update(ranking=[]), "non-empty"),
    (lambda r: r.pop("timing"), "fields must be"),
])
def test_table_problems_are_found(change, words):
    row = _row("chunk", [_choice("triton", {"block_n": 128}, {"deterministic": True})])
    assert table_problems(_table(row)) == []
    change(row)
    problems = table_problems(_table(row))
    assert problems and words in "; ".join(problems)


def test_a_table_survives_writing_and_reading(tmp_path):
    table = _table(_row("decode", [_choice("composition", {"kernel": "cudnn"}, us=8.5),
                                   _choice("triton", {"fold_merge": True}, us=9.25)]))
    path = tmp_path / "auto_table.py"
    path.write_text(format_table(table))
    assert read_table(str(path)) == table
    assert plan_items({"b": 1, "a": True}) == (("a", True), ("b", 1))
