"""The CUDA kernels' offsets are 64-bit: caches whose batch, sequence or head offsets pass 2**31 elements.

The kernels' own source runs in the host emulator (csrc/emulate.h) on caches seen through strides that put
some of their elements more than 2**31 elements (4 GiB of float16) past the first: one batch row, the last
positions of the sequence, or one kv head.  The memory is an anonymous mapping of a few GiB of address
space of which only the pages the views touch are ever backed, so this needs a few MB.  An offset computed
in 32 bits would wrap and read or write elsewhere (or fault): out, lse and the updated caches must be
bit-identical to the same call's on contiguous caches.
"""
import mmap

import pytest
import torch

from melt_kernels.checks import check_inputs
from utils import Case, bits, make_case

try:
    from melt_kernels import cuda_backend
except ImportError:
    cuda_backend = None

pytestmark = pytest.mark.skipif(cuda_backend is None, reason="melt_kernels._cuda is not built (MELT_BUILD_CUDA=1)")

WIDE = 2**31 + 256  # elements: a stride past 2**31, a multiple of 8 (16-byte rows)


def _wide_caches(shape: tuple, dim: str):
    """(mapping, k_cache, v_cache): float16 (B, S, H, D) views of one mapping, k and v interleaved at every
    position, with the stride of ``dim`` (or, for "seq", the offset of the last position) past 2**31."""
    batch, cache_len, heads, head_dim = shape
    row = 2 * head_dim  # k then v
    if dim == "batch":
        strides = (WIDE, heads * row, row, 1)
    elif dim == "seq":
        stride_s = -(-WIDE // (cache_len - 1) // 8) * 8  # the last position lies past 2**31
        strides = (heads * row, stride_s, row, 1)
    else:
        strides = (cache_len * row, row, WIDE, 1)
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + row
    mapping = mmap.mmap(-1, 2 * span)
    flat = torch.frombuffer(mapping, dtype=torch.float16)
    k_cache, v_cache = (flat.as_strided(shape, strides, offset) for offset in (0, head_dim))
    assert max((n - 1) * s for n, s in zip(shape, strides)) >= 2**31
    return mapping, k_cache, v_cache


@pytest.mark.parametrize("seqlen_q", [1, 40])  # decode (fused blend) and chunk (blend launch) paths
@pytest.mark.parametrize("dim", ["batch", "seq", "head"])
def test_offsets_past_2_31_elements(dim, seqlen_q):
    batch, heads_kv, head_dim, cache_len = 2, 2, 64, 80
    small = make_case(7, batch=batch, seqlen_q=seqlen_q, heads_q=2 * heads_kv, heads_kv=heads_kv, head_dim=head_dim,
                      cache_len=cache_len, dtype=torch.float16, gate_kind="head")
    # The longest row ends at the last position (the active slots past 2**31 in "seq").
    small.cache_seqlens = torch.tensor([cache_len - seqlen_q, (cache_len - seqlen_q) // 3], dtype=torch.int32)
    mapping, k_cache, v_cache = _wide_caches((batch, cache_len, heads_kv, head_dim), dim)
    k_cache.copy_(small.k_cache)
    v_cache.copy_(small.v_cache)
    wide = Case(small.q, small.k, small.v, k_cache, v_cache, small.cache_seqlens, small.gate)

    results = []
    for case in (small, wide):  # the same call on contiguous caches, then on the wide views
        p = check_inputs(*case.args())
        results.append(cuda_backend.gated_kv_attention_fwd_emulated(
            p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, True,
            p.max_seqlen_k, splits=2))
    # Bit for bit: only the addresses differ.  A stray write into the interleaved partner would show in the
    # other cache.
    for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), (*results[0], small.k_cache, small.v_cache),
                          (*results[1], k_cache, v_cache)):
        assert torch.equal(bits(a), bits(b)), f"{name} differs on the wide views"
    del k_cache, v_cache, wide, p, mapping
