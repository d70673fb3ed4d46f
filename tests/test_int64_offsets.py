"""64-bit offsets in every Triton kernel (issue 13, item 4).

A tensor's batch or head offset, ``index * stride``, can pass 2**31 elements while both factors fit in 32
bits: a head-major cache view (B, S, H, D) over (B, H, S, D) storage has head stride S * D, and
(H - 1) * S * D >= 2**31 for long caches.  Computed in 32 bits it wraps, and the kernel reads and writes
another head's memory (or outside the tensor).

* On the interpreter (or compiled, on a GPU): the forward and backward launchers on views whose last head
  lies past element 2**31 of one big buffer (on the CPU virtual memory: only the pages of the elements used
  are touched; 8 GiB on a GPU), against the reference.  The head stride itself is below 2**31, so Triton
  passes it as a 32-bit integer.
* Compiled for sm_90 (no GPU needed): no kernel multiplies a stride by an index in 32-bit scalar arithmetic;
  inside a (b, h) slice, offsets may stay 32-bit unless the slice spans 2**31 elements (the backward's WIDE).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from melt_kernels.backends import triton_interpreted
from melt_kernels.reference import active_index, gated_kv_attention_ref_bwd, gated_kv_attention_ref_fwd

HEADS, HEAD_STRIDE = 3, 2**30 + 2**20  # head 2 starts at 2**31 + 2**21 elements
BATCH, SEQLEN_Q, CACHE_LEN, HEAD_DIM = 2, 5, 40, 16


DEVICE = "cpu" if triton_interpreted() else "cuda"


def _head_major_views(shapes: dict, dtype=torch.float32) -> dict:
    """(B, rows, HEADS, D) views of one buffer, heads HEAD_STRIDE elements apart, each head (B, rows, D)
    contiguous; the views sit one after the other inside each head's stretch of the buffer."""
    total = sum(b * rows * d for b, rows, d in shapes.values())
    storage = torch.UntypedStorage(((HEADS - 1) * HEAD_STRIDE + total) * torch.finfo(dtype).bits // 8,
                                   device=DEVICE)
    views, offset = {}, 0
    for name, (batch, rows, dim) in shapes.items():
        views[name] = torch.tensor([], dtype=dtype, device=DEVICE).set_(storage, offset, (batch, rows, HEADS, dim),
                                                                        (rows * dim, dim, HEAD_STRIDE, 1))
        offset += batch * rows * dim
    return views


def _problem(seed: int) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kv = (BATCH, SEQLEN_Q, HEAD_DIM)
    cache = (BATCH, CACHE_LEN, HEAD_DIM)
    views = _head_major_views(dict(q=kv, k=kv, v=kv, dout=kv, k_cache=cache, v_cache=cache, dk_cache=cache,
                                   dv_cache=cache))
    for view in views.values():
        view.copy_(torch.randn(view.shape, generator=gen))
    assert views["k_cache"][:, :, -1].storage_offset() >= 2**31 > HEAD_STRIDE
    lengths = torch.tensor([CACHE_LEN - SEQLEN_Q, 17], dtype=torch.int32, device=DEVICE)
    return views, lengths


needs_kernels = pytest.mark.skipif(not (triton_interpreted() or torch.cuda.is_available()),
                                   reason="the kernels need the interpreter or a GPU")


@needs_kernels
@pytest.mark.parametrize("path", ["decode", "chunk"])
def test_forward_far_heads(path):
    from melt_kernels.kernels.fwd import gated_kv_attention_fwd

    t, lengths = _problem(0)
    gate = torch.rand(BATCH, SEQLEN_Q, HEADS, 1, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want_k, want_v = t["k_cache"].clone(), t["v_cache"].clone()
    want = gated_kv_attention_ref_fwd(t["q"].double(), t["k"].double(), t["v"].double(), want_k, want_v, lengths,
                                      gate, gate, 0.25, True)
    got = gated_kv_attention_fwd(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], lengths, gate, gate, 0.25,
                                 True, None, block_r=16, block_n=16, split_len=16, path=path)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)
    assert torch.equal(t["k_cache"], want_k) and torch.equal(t["v_cache"], want_v)


@needs_kernels
@pytest.mark.parametrize("bound", [None, SEQLEN_Q])
def test_backward_far_heads(bound):
    """Every gradient, the cache gradients added into far-head views too; ``bound`` SEQLEN_Q is a
    max_seqlen_k hint far too small (one prefix block that walks to L_b)."""
    from melt_kernels.kernels.bwd import gated_kv_attention_bwd

    t, lengths = _problem(2)
    out, lse = gated_kv_attention_ref_fwd(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], lengths, None, None,
                                          0.25, True)
    index = active_index(lengths, (BATCH, SEQLEN_Q, HEADS, HEAD_DIM))
    k_new, v_new = t["k_cache"].gather(1, index), t["v_cache"].gather(1, index)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    exact = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
             for a in (t["q"], t["k_cache"], t["v_cache"], k_new, v_new, lengths, out, lse, t["dout"], dlse, 0.25,
                       True, t["dk_cache"], t["dv_cache"], None)]
    want = list(gated_kv_attention_ref_bwd(*exact)) + exact[12:14]
    got = list(gated_kv_attention_bwd(t["q"], t["k_cache"], t["v_cache"], k_new, v_new, lengths, out, lse, t["dout"],
                                      dlse, 0.25, True, t["dk_cache"], t["dv_cache"], bound))
    got += [t["dk_cache"], t["dv_cache"]]
    for name, g, w in zip(("dq", "dk_new", "dv_new", "dk_cache", "dv_cache"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# Compiles every kernel for sm_90 in its 32-bit in-slice mode and lists the scalar 32-bit multiplications of
# a stride argument (the forward names its strides s_*, the backward stride_*).
_SCALAR_I32_STRIDE_PRODUCTS = r"""
import json
import re
from sm90 import compile_sm90
from melt_kernels.kernels import blend, bwd, chunk_fwd, decode, merge
from melt_kernels.kernels.tile_ops import GATE_TENSOR

side = dict(GATE_K=GATE_TENSOR, GATE_V=GATE_TENSOR, SAVE_NEW_K=True, SAVE_NEW_V=True, SAVE_OLD_K=True,
            SAVE_OLD_V=True, PAGED=False, WIDE=False, FIX_BF16=False)
common = dict(D=128, BD=128, UPCAST=False, WIDE=False, IS_CAUSAL=True, PAGED=False)
gates = dict(GATE_K=GATE_TENSOR, GATE_V=GATE_TENSOR, GRAD_IN_K=True, GRAD_IN_V=True, UPDATE_K=True, UPDATE_V=True,
             NEED_DGATE_K=True, NEED_DGATE_V=True, DGATE_ROWS_K=True, DGATE_ROWS_V=False)
kernels = {
    "decode": (decode.decode_kernel, dict(side, G=4, D=128, CAUSAL=True, DIRECT=False, FOLD_MERGE=True,
               PRECISION=None, BLOCK_R=64, BLOCK_N=64, BLOCK_D=128), dict(num_warps=4, enable_fp_fusion=False)),
    "blend": (blend.blend_kernel, dict(side, D=128, BLOCK_N=16, BLOCK_D=128), dict(enable_fp_fusion=False)),
    "chunk": (chunk_fwd.chunk_attention_kernel, dict(G=4, D=128, CAUSAL=True, DIRECT=False, PAGED=False, WIDE=False,
              PRECISION=None, FIX_BF16=False, BLOCK_R=128, BLOCK_N=64, BLOCK_D=128), dict(num_warps=8)),
    "merge": (merge.merge_kernel, dict(G=4, D=128, BLOCK_R=16, BLOCK_D=128, FIX_BF16=False), {}),
    "preprocess": (bwd.bwd_preprocess_kernel, dict(D=128, BD=128, BM=32, HAS_DLSE=True, ZERO_DQ=True, WIDE=False),
                   {}),
    "dkdv": (bwd.bwd_dkdv_kernel, dict(common, BM=16, BN=128, PREFIX_DK=True, PREFIX_DV=True, DQ_ATOMIC=True,
                                        WIDE_Q=False),
             dict(num_warps=8)),
    "blend_bwd": (blend.blend_bwd_kernel, dict(gates, D=128, PAGED=False, WIDE=False, UPCAST=False, BLOCK_N=16,
                  BLOCK_D=128), {}),
    "dq": (bwd.bwd_dq_kernel, dict(common, BM=128, BN=64), dict(num_warps=8)),
}
found = {}
for name, (fn, consts, options) in kernels.items():
    body = [line.strip() for line in compile_sm90(fn, "bf16", consts, **options).asm["ttir"].splitlines()
            if "=" in line and not line.lstrip().startswith(("#", "tt.func"))]
    uses = [line for line in body if re.search(r"%(s|stride)_\w+", line)]
    found[name] = dict(uses=len(uses), i32=[line for line in uses if re.search(r"arith\.muli .* : i32( |$)", line)])
print(json.dumps(found))
"""


def test_no_32_bit_stride_products_compiled():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCALAR_I32_STRIDE_PRODUCTS], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found) == {"decode", "blend", "chunk", "merge", "preprocess", "dkdv", "dq", "blend_bwd"}
    # The IR names the arguments (%stride_kch); without that this test would see nothing.
    assert all(f["uses"] > 0 for f in found.values()), f"no stride argument found in the IR: {found}"
    assert not any(f["i32"] for f in found.values()), f"32-bit index * stride products: {found}"
