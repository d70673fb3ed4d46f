"""The sm_90 ahead-of-time compile's problems (benchmarks/aot_problems.py) reach every plan the planners can
choose: for a grid of calls wider than the derived set (every GQA group size 1 to 32, chunks of 1 to 300
tokens, prefixes of 0 to 65536 keys, batches of 1 to 256), each distinct forward plan (decode and chunk
paths, the decode's folded merge), each backward plan of both modes and each alternative the GPU pass's
tune step times appears among the derived problems' own.  No compile: the planners are pure functions of
the shapes."""
import itertools
import os
import sys
from dataclasses import replace

import pytest
import torch

from melt_kernels.kernels.decode import decode_rows

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from aot_problems import (DTYPES, FOLD_MERGE, GROUPS, H200_SMS, HEAD_DIMS, HEADLINE, HEADLINE_DTYPE,  # noqa: E402
                          HEADLINE_HEAD_DIM, Problem, derived_problems, groups_of, plan_choices)

SEQLENS = (1, 2, 3, 5, 8, 15, 16, 17, 21, 22, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256, 300)
PREFIXES = (0, 100, 256, 4096, 65536)
BATCHES = (1, 7, 256)


def _grid(groups_all, unaligned, fwd_overrides=(), dtype=torch.bfloat16):
    """The grid's calls; with ``fwd_overrides`` (the decode's fold_merge) those of the decode path only (for
    ``dtype``)."""
    for groups, m, prefix, batch in itertools.product(groups_all, SEQLENS, PREFIXES, BATCHES):
        if not fwd_overrides or m * groups <= decode_rows(dtype.itemsize):
            yield Problem("grid", batch, m, 2 * groups, 2, prefix + m, unaligned=unaligned,
                          fwd_overrides=fwd_overrides)


def _fwd_plans(problems, dtype, head_dim, with_groups=False):
    return {(plan_choices(p.fwd_plan(dtype, head_dim)),) + ((p.groups,) if with_groups else ()) for p in problems}


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_forward_plan_is_compiled(dname, head_dim):
    """Every (plan, G) the forward planner gives for the group sizes the set compiles for the dtype, and every
    plan for any G of 1 to 32 (G only enters the plan through the rows M * G); the folded merge's plans."""
    dtype = DTYPES[dname]
    derived = [p for p in derived_problems(dtype, head_dim) if not p.unaligned]
    compiled = _fwd_plans(derived, dtype, head_dim, with_groups=True)
    assert _fwd_plans(_grid(groups_of(dtype), False), dtype, head_dim, with_groups=True) - compiled == set()
    for overrides in ((), FOLD_MERGE):
        plans = {key[:1] for key in compiled}
        assert _fwd_plans(_grid(range(1, 33), False, overrides, dtype), dtype, head_dim) - plans == set()


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_unaligned_forward_plan_is_compiled(dname, head_dim):
    """Tensors without 16-byte alignment get smaller tiles: every such plan, for any G of 1 to 32."""
    dtype = DTYPES[dname]
    compiled = _fwd_plans([p for p in derived_problems(dtype, head_dim) if p.unaligned], dtype, head_dim)
    assert _fwd_plans(_grid(range(1, 33), True), dtype, head_dim) - compiled == set()


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("unaligned, page_size", [(False, 0), (True, 0), (False, 16)])
def test_every_backward_plan_is_compiled(dname, head_dim, unaligned, page_size):
    """Both modes' plans (atomic dQ, deterministic) of every chunk length, per alignment and paging."""
    dtype = DTYPES[dname]
    compiled = {plan_choices(plan) for p in derived_problems(dtype, head_dim)
                if p.backward and p.unaligned == unaligned and p.page_size == page_size and not p.bwd_overrides
                for plan in p.bwd_plans(dtype, head_dim)}
    wanted = {plan_choices(plan) for m in SEQLENS
              for plan in Problem("grid", 1, m, 2, 2, 4096, unaligned=unaligned, page_size=page_size)
              .bwd_plans(dtype, head_dim)}
    assert wanted - compiled == set()
    # Both dQ modes wherever the planner gives both (16-bit head_dim 256 takes the dQ kernel in either).
    modes = {dict(plan[1])["dq_atomic"] for plan in wanted}
    assert {dict(plan[1])["dq_atomic"] for plan in compiled} == modes
    assert modes == {True, False} or (dtype != torch.float32 and head_dim == 256)


def test_the_tune_steps_alternatives_are_compiled(monkeypatch):
    """Every Triton plan benchmarks/tournament.py times at its headline shapes (split lengths aside: run-time
    values) is a plan the derived set compiles at that shape's G, planned for the H200's SM count as the
    derived set is."""
    import tournament
    from melt_kernels.kernels import launch

    monkeypatch.setattr(launch, "num_sms", lambda device: H200_SMS)

    dtype, head_dim = DTYPES[HEADLINE_DTYPE], HEADLINE_HEAD_DIM
    derived = list(derived_problems(dtype, head_dim))
    compiled_fwd = _fwd_plans(derived, dtype, head_dim, with_groups=True)
    compiled_bwd = {plan_choices(plan) for p in derived if p.backward for plan in p.bwd_plans(dtype, head_dim)}
    tried = 0
    for shape in tournament.shapes(dry_run=False, full=False):
        p = Problem("tune", shape.batch, shape.seqlen_q, shape.heads_q, shape.heads_kv,
                    shape.cache_len + shape.seqlen_q)
        for fwd, bwd in tournament.triton_plans(shape, dtype, torch.device("cuda"), few=False):
            fwd = tuple((k, v) for k, v in fwd.items() if k != "split_len")
            assert _fwd_plans([replace(p, fwd_overrides=fwd)], dtype, head_dim, with_groups=True) <= compiled_fwd, \
                (shape, fwd)
            if shape.kind == "training":
                bwd = tuple((k, v) for k, v in bwd.items() if k != "deterministic")
                assert {plan_choices(plan) for plan in replace(p, bwd_overrides=bwd).bwd_plans(dtype, head_dim)} \
                    <= compiled_bwd, (shape, bwd)
            tried += 1
    assert tried > 10


def test_the_headline_problems_run_their_backward_in_both_modes():
    dtype = DTYPES[HEADLINE_DTYPE]
    derived = list(derived_problems(dtype, HEADLINE_HEAD_DIM))
    for p in HEADLINE:
        assert p in derived
        if p.backward:
            atomic, deterministic = p.bwd_plans(dtype, HEADLINE_HEAD_DIM)
            assert atomic.dq_atomic and not deterministic.dq_atomic


def test_the_float32_launches_of_issue_20_are_in_the_set():
    """MQA decode at G = 32 and 32-token chunks at G = 1, float32 at head_dim 80 and 128: 32-row tiles with one
    program that blends and attends (the decode path; issue 20 found their spills at G = 4 and 32)."""
    assert GROUPS[-1] == 32 and 32 in groups_of(torch.float32)
    for head_dim in (80, 128):
        derived = list(derived_problems(torch.float32, head_dim))
        for groups, m in ((1, 32), (32, 1)):
            want = Problem("issue 20", 1, m, 4 * groups, 4, 8192 + m, gate_k="channel").fwd_plan(torch.float32,
                                                                                                   head_dim)
            assert want.block_r == 32 and type(want).__name__ == "DecodePlan"
            assert any(p.groups == groups and p.gate_k == "channel"
                       and plan_choices(p.fwd_plan(torch.float32, head_dim)) == plan_choices(want) for p in derived)


def test_the_folded_merge_is_compiled_where_decode_splits():
    """fold_merge only changes a plan that splits; every such decode plan of the grid has its folded twin."""
    for dname, head_dim in itertools.product(DTYPES, HEAD_DIMS):
        dtype = DTYPES[dname]
        compiled = _fwd_plans(derived_problems(dtype, head_dim), dtype, head_dim)
        folded = {plan for (plan,) in compiled if ("fold_merge", True) in plan[1]}
        splitting = {replace(p, fwd_overrides=FOLD_MERGE) for p in _grid(range(1, 33), False)
                     if p.seqlen_q * p.groups <= decode_rows(dtype.itemsize) and not p.fwd_plan(dtype, head_dim).direct}
        assert splitting and {plan for (plan,) in _fwd_plans(splitting, dtype, head_dim)} <= folded
