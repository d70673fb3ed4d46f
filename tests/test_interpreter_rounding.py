"""bfloat16 rounding of the Triton kernels under the interpreter.

The Triton interpreter (3.9) converts float32 to bfloat16 by truncation, not to nearest even as the GPU does.
The kernels therefore round through ``round_to`` (kernels/tile_ops.py), which under the
interpreter rounds to nearest even on the bits.  Truncation is biased (every value moves towards zero), and
a bias adds up linearly in a reduction: in the backward it made the gradient of a broadcast gate (a sum over
every token and channel) up to 10x less accurate under the interpreter than on a GPU (issue 13).
"""
import pytest
import torch

from melt_kernels.backends import triton_interpreted
from utils import make_case

if not triton_interpreted():
    pytest.skip("checks the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from melt_kernels.kernels.bwd import gated_kv_attention_bwd  # noqa: E402
from melt_kernels.kernels.tile_ops import round_to  # noqa: E402
from melt_kernels.reference import gated_kv_attention_ref_bwd  # noqa: E402


@triton.jit
def _round_kernel(x, y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y + o, round_to(tl.load(x + o), tl.bfloat16, True))


def test_round_is_round_to_nearest_even():
    """Ties (both parities), values just either side of a tie, negatives, subnormals and large values."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x) & (x.abs() < 3e38)]  # rounding may overflow to inf past bfloat16's largest
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 1 + 2**-8 - 2**-20, 2**-130])
    x = torch.cat([x, ties.float()])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    y = torch.empty(n, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, y, N=n)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_backward_rounding_is_unbiased():
    """The backward's bfloat16 roundings (P and dS before their products, dq and the cache gradients when
    stored) are to nearest: the mean signed error, in units of the bfloat16 ulp of each exact value and signed
    towards its magnitude, stays near 0.  Truncation gave -0.6 to -1.6 on this problem; nearest 0.06 to 0.37
    (correlated errors through delta, from the rounded forward output, keep it off 0)."""
    from test_triton_bwd import NAMES, _bwd_problem, _exact_args, _run

    case = make_case(11, batch=2, seqlen_q=20, heads_q=4, heads_kv=2, head_dim=32, cache_len=60,
                     dtype=torch.bfloat16)
    args, _ = _bwd_problem(case, True, 11, with_dlse=True, host_lengths=True, cache_grad="zeros")
    want = _run(gated_kv_attention_ref_bwd, _exact_args(args))  # first: the launcher adds into args' buffers
    for name, got, exact in zip(NAMES, _run(gated_kv_attention_bwd, args), want):
        nonzero = exact != 0
        got, exact = got.double()[nonzero], exact[nonzero]
        ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(exact.abs()))
        bias = ((got - exact) * exact.sign() / ulp).mean().item()
        assert bias > -0.25, f"{name}: mean signed error {bias:.2f} ulp: rounded towards zero"
