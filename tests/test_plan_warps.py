"""The planners' warps against their tiles, as pure host logic over the decision space: every 16-bit plan gives
each warp rows or columns of its own in every MMA, the rule benchmarks/ttgir_check.py checks on the compiled
code (CI's AOT step).  A Hopper wgmma takes 16 rows per warp of a warpgroup (4 warps, 64 rows); mma v2, which
Triton takes for tiles under 64 rows, lays a chained dot's warps along its columns, 8 per warp.  A plan with
more warps than that makes two warps issue the same instructions."""
import itertools

import pytest
import torch

from melt_kernels.kernels.bwd import plan_bwd
from melt_kernels.kernels.chunk_fwd import ChunkPlan
from melt_kernels.kernels.fwd import plan_forward

HEAD_DIMS = (64, 80, 128, 256)
CHUNKS = (1, 16, 17, 32, 64, 65, 500)
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def _warps_fit(rows: int, columns: int, warps: int) -> bool:
    """Whether ``warps`` warps each own part of a [rows, columns] MMA: along the rows of a wgmma (16 each) when
    the tile has 64 rows or more, else along the columns of mma v2 (8 each)."""
    return warps * 16 <= rows if rows >= 64 else warps * 8 <= columns


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_backward_plans_never_replicate(dtype):
    for head_dim, seqlen_q, aligned, paged, deterministic in itertools.product(
            HEAD_DIMS, CHUNKS, (True, False), (False, True), (False, True)):
        plan = plan_bwd(head_dim, seqlen_q, dtype, False, aligned, paged, deterministic)
        where = (head_dim, seqlen_q, aligned, paged, deterministic, plan)
        # dK/dV: S^T = K Q^T is [keys, query rows]; dQ: S = Q K^T is [query rows, keys].
        assert _warps_fit(plan.block_n_kv, plan.block_m_kv, plan.warps_kv), where
        assert _warps_fit(plan.block_m_q, plan.block_n_q, plan.warps_q), where


def test_head_dim_256_takes_the_dq_kernel_unless_asked():
    """The atomic dQ's [32, 256] float32 tile beside dK and dV spilled (16-bit, sm_90): at head_dim 256 dQ gets
    its own kernel by default; asked for, the atomic plan is still given, and float32 keeps it."""
    assert not plan_bwd(256, 500, torch.bfloat16, False).dq_atomic
    assert plan_bwd(256, 500, torch.bfloat16, False, dq_atomic=True).dq_atomic
    assert plan_bwd(256, 500, torch.float32, False).dq_atomic
    assert plan_bwd(128, 500, torch.bfloat16, False).dq_atomic
    assert not plan_bwd(128, 500, torch.bfloat16, False, deterministic=True).dq_atomic


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_forward_plans_never_replicate(dtype):
    for head_dim, seqlen_q, groups, aligned in itertools.product(HEAD_DIMS, CHUNKS, (1, 4, 32), (True, False)):
        plan = plan_forward(2, seqlen_q, 4 * groups, 4, head_dim, 8192, 132, dtype.itemsize, aligned=aligned)
        where = (head_dim, seqlen_q, groups, aligned, plan)
        # Q K^T is [rows, keys]; the decode path's warps go along its padded rows or, for an unpadded tile,
        # along its keys.
        assert _warps_fit(plan.block_r, plan.block_n, plan.num_warps), where
        if isinstance(plan, ChunkPlan):
            assert plan.block_r >= 64, where  # chunks have more rows than one decode program holds
