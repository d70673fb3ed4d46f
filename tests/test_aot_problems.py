"""The sm_90 ahead-of-time compile's problems (benchmarks/aot_problems.py) reach every plan the planners can
choose: for a grid of calls wider than the derived set (every GQA group size 1 to 32, chunks of 1 to 300
tokens, prefixes of 0 to 65536 keys, batches of 1 and 256), each distinct forward plan and backward tile choice
appears among the derived problems' own.  No compile: the planners are pure functions of the shapes."""
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from aot_problems import DTYPES, GROUPS, HEAD_DIMS, Problem, derived_problems, plan_choices  # noqa: E402

SEQLENS = (1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256, 300)
PREFIXES = (0, 100, 256, 4096, 65536)
BATCHES = (1, 256)


def _grid(groups_all, unaligned):
    for groups, m, prefix, batch in itertools.product(groups_all, SEQLENS, PREFIXES, BATCHES):
        yield Problem("grid", batch, m, 2 * groups, 2, prefix + m, unaligned=unaligned)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_forward_plan_is_compiled(dname, head_dim):
    """Every (plan, G) the forward planner gives for the group sizes the set compiles, and every plan for any
    G of 1 to 32 (G only enters the plan through the rows M * G)."""
    dtype = DTYPES[dname]
    derived = [p for p in derived_problems(dtype, head_dim) if not p.unaligned]
    compiled = {(plan_choices(p.fwd_plan(dtype, head_dim)), p.groups) for p in derived}
    wanted = {(plan_choices(p.fwd_plan(dtype, head_dim)), p.groups) for p in _grid(GROUPS, False)}
    assert wanted - compiled == set()
    plans = {key for key, _ in compiled}
    assert {plan_choices(p.fwd_plan(dtype, head_dim)) for p in _grid(range(1, 33), False)} - plans == set()


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_unaligned_forward_plan_is_compiled(dname, head_dim):
    """Tensors without 16-byte alignment get smaller tiles: every such plan, for any G of 1 to 32."""
    dtype = DTYPES[dname]
    compiled = {plan_choices(p.fwd_plan(dtype, head_dim)) for p in derived_problems(dtype, head_dim) if p.unaligned}
    assert {plan_choices(p.fwd_plan(dtype, head_dim)) for p in _grid(range(1, 33), True)} - compiled == set()


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("unaligned, page_size", [(False, 0), (True, 0), (False, 16)])
def test_every_backward_tiling_is_compiled(dname, head_dim, unaligned, page_size):
    dtype = DTYPES[dname]
    compiled = {tuple(sorted(p.bwd_tiles(dtype, head_dim).items())) for p in derived_problems(dtype, head_dim)
                if p.backward and p.unaligned == unaligned and p.page_size == page_size}
    wanted = {tuple(sorted(Problem("grid", 1, m, 2, 2, 4096, unaligned=unaligned, page_size=page_size)
                           .bwd_tiles(dtype, head_dim).items())) for m in SEQLENS}
    assert wanted - compiled == set()


def test_the_four_float32_launches_of_issue_20_are_in_the_set():
    """Chunks of 8 tokens at G = 4 and MQA decode at G = 32, float32 at head_dim 80 and 128: 32-row tiles with
    one program that blends and attends, which the hand-picked table never planned."""
    for head_dim in (80, 128):
        derived = list(derived_problems(torch.float32, head_dim))
        for groups, m in ((4, 8), (32, 1)):
            want = Problem("issue 20", 1, m, 4 * groups, 4, 8192 + m, gate_k="channel").fwd_plan(torch.float32,
                                                                                                   head_dim)
            assert want.block_r == 32 and not want.separate_owner
            assert any(p.groups == groups and p.gate_k == "channel" and p.fwd_plan(torch.float32, head_dim) == want
                       for p in derived)
