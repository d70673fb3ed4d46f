"""The ``max_seqlen_k`` hint (issue 13, item 7): with the lengths on the device it sizes the kernels' split-KV
plans without a sync; a wrong hint costs speed, never correctness.

Lengths on the device are simulated on the CPU by declaring CPU lengths unreadable
(``melt_kernels.checks.lengths_on_host``), so the op takes the device path: no exact bound, the hint sizes
the plans (on a GPU the lengths are on the device anyway).  The plans are cut small (16-key splits and tiles) so that a hint decides how many splits and
key blocks there are.  tests/test_launch.py checks the plans themselves at real sizes.
"""
import pytest
import torch

import melt_kernels
import melt_kernels.checks as checks
import melt_kernels.kernels.fwd as fwd_module
from melt_kernels.backends import triton_interpreted
from melt_kernels.checks import check_inputs
from utils import make_case

DEVICE = "cpu" if triton_interpreted() else "cuda"
BATCH, SEQLEN_Q, HEADS_Q, HEADS_KV, HEAD_DIM, CACHE_LEN = 2, 9, 4, 2, 16, 80
LENGTHS = (40, 7)
LOOPS, CHUNKS = 2, 2


def test_hint_is_checked_and_only_used_without_host_lengths(monkeypatch):
    case = make_case(0, batch=2, seqlen_q=3, heads_q=2, heads_kv=1, head_dim=16, cache_len=20)
    host = check_inputs(*case.args(), max_seqlen_k=5)
    assert host.max_seqlen_k == int(case.cache_seqlens.max()) + 3 and host.seqlen_k_hint is None
    with pytest.raises(TypeError, match="max_seqlen_k must be a Python int"):
        check_inputs(*case.args(), max_seqlen_k=torch.tensor(5))
    monkeypatch.setattr(checks, "lengths_on_host", lambda lengths: False)
    assert check_inputs(*case.args()).seqlen_k_hint is None
    for hint, used in ((12, 12), (1, 3), (10**9, 20)):  # clamped to [M, S]
        p = check_inputs(*case.args(), max_seqlen_k=hint)
        assert p.max_seqlen_k is None and p.seqlen_k_hint == used


def _chain_run(case, backend, hint):
    """LOOPS x CHUNKS calls on one cache with gradients; returns outputs, lse, caches and every gradient."""
    c = case.clone()
    leaves = [c.q, c.k, c.v, c.gate]
    for t in leaves:
        t.requires_grad_()
    k_cache, v_cache = c.k_cache.clone(), c.v_cache.clone()
    results = []
    for chunk in range(CHUNKS):
        lengths = c.cache_seqlens + chunk * SEQLEN_Q
        bound = {"exact": max(LENGTHS) + (chunk + 1) * SEQLEN_Q, "small": SEQLEN_Q, "large": CACHE_LEN,
                 "none": None}[hint]
        for loop in range(LOOPS):
            results += melt_kernels.gated_kv_attention(c.q, c.k, c.v, k_cache, v_cache, lengths, c.gate,
                                                       return_lse=True, backend=backend, max_seqlen_k=bound)
    loss = sum((r.double() * (i + 1)).sum() for i, r in enumerate(results)) + (k_cache.double() ** 2).sum()
    return results + [k_cache, v_cache] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.skipif(not (triton_interpreted() or torch.cuda.is_available()),
                    reason="the Triton kernels need a GPU, or the interpreter on the CPU")
@pytest.mark.parametrize("hint", ["exact", "small", "large", "none"])
@pytest.mark.parametrize("path", ["decode", "chunk"])
def test_wrong_hints_never_change_the_result(monkeypatch, hint, path):
    """Forward (decode and chunk paths) and backward through the op, device lengths, the hint exact, far too
    small (no prefix split at all), too large or absent: the reference's results."""
    monkeypatch.setattr(checks, "lengths_on_host", lambda lengths: False)
    plan = fwd_module.plan_forward
    tiles = dict(block_n=16, split_len=16, path=path, **({"block_r": 16} if path == "chunk" else {}))
    monkeypatch.setattr(fwd_module, "plan_forward", lambda *a, **kw: plan(*a, **dict(kw, **tiles)))
    case = make_case(5, batch=BATCH, seqlen_q=SEQLEN_Q, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM,
                     cache_len=CACHE_LEN, device=DEVICE)
    case.cache_seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    got = _chain_run(case, "triton", hint)
    want = _chain_run(case.clone(), "reference", "none")
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m: f"result {i}: {m}")
