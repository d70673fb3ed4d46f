"""The Triton forward (kernels/fwd.py: the decode and chunk paths) against the reference.

On a machine without a GPU they run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1), with
tiny shapes and tiles forced small so that split-KV and the chunk path's several row blocks are exercised, and
each problem run by the path it would take and by the chunk path (which small problems never take by default).
With a GPU (and no interpreter) the same tests run compiled on CUDA tensors, and the `gpu` tests add
realistic sizes and a determinism check.

Tolerances: float32 outputs and lse within 1e-5 (absolute and relative) of the float64 reference; measured
errors are below 1e-6 on these sizes, and the kernels compute float32 dot products in IEEE float32, not TF32.
float16/bfloat16 outputs and lse follow FlashAttention's rule (tests/utils.assert_within_rule): error against
the float64 reference at most 2x that of the reference run in the low precision.  Caches are compared bit
for bit with the reference run in the same dtype: both blend in float32 and round once (no FMA contraction).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import melt_kernels
from melt_kernels.backends import triton_interpreted
from melt_kernels.checks import check_inputs
from melt_kernels.reference import gated_kv_attention_ref_fwd
from utils import (GATE_KINDS, LAYOUTS, active_mask, assert_deterministic, assert_untouched, assert_within_rule, bits,
                   case_params, make_case)

if not (triton_interpreted() or torch.cuda.is_available()):
    pytest.skip("the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on the CPU",
                allow_module_level=True)

from melt_kernels.kernels.decode import DECODE_ROWS, DECODE_ROWS_FP32, DecodePlan  # noqa: E402  (needs TRITON_INTERPRET first)
from melt_kernels.kernels.fwd import gated_kv_attention_fwd, num_sms, path_of, plan_forward  # noqa: E402

DEVICE = "cpu" if triton_interpreted() else "cuda"
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def small(case, path=None):
    """Tiles small enough that a few dozen cache positions make several splits and several row blocks: 16-row
    tiles on the chunk path, the fewest rows that hold a decode call's on the decode path."""
    b, m, hq, d = case.q.shape
    rows = m * (hq // case.k.shape[2])
    if (path or path_of(m, hq, case.k.shape[2], case.q.element_size())) == "decode":
        return dict(block_n=16, split_len=16, block_r=max(16, 1 << (rows - 1).bit_length()), path="decode")
    return dict(block_n=16, split_len=16, block_r=16, path="chunk")


# The paths a problem can take: its own, and the chunk path whatever its size.
paths = st.sampled_from([None, "chunk"])


def _launch(fn, case, causal, softmax_scale=None, **overrides):
    """Runs a launcher on ``case`` (its caches updated in place) after the one validation path."""
    p = check_inputs(*case.args(), softmax_scale=softmax_scale, causal=causal)
    return fn(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, p.causal,
              p.max_seqlen_k, **overrides)


def _plan(case, **overrides):
    b, m, hq, d = case.q.shape
    s = case.k_cache.shape[1]
    return plan_forward(b, m, hq, case.k.shape[2], d, s - m, num_sms(case.q.device), case.q.element_size(),
                        **overrides)


def check_against_reference(case, causal, softmax_scale=None, **overrides):
    """Kernel vs reference: out and lse (float32: tolerance; half: the 2x rule), caches bit for bit, and
    nothing written outside the active slots."""
    dtype = case.q.dtype
    batch, seqlen_q = case.q.shape[:2]
    cache_len = case.k_cache.shape[1]
    exact, same = case.clone(dtype=torch.float64), case.clone()
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()

    out, lse = _launch(gated_kv_attention_fwd, case, causal, softmax_scale, **overrides)
    out_exact, lse_exact = _launch(gated_kv_attention_ref_fwd, exact, causal, softmax_scale)
    out_same, lse_same = _launch(gated_kv_attention_ref_fwd, same, causal, softmax_scale)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == case.q.shape and lse.shape == (batch, case.q.shape[2], seqlen_q)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), out_exact, **FP32_TOL)
        torch.testing.assert_close(lse.double(), lse_exact, **FP32_TOL)
    else:
        assert_within_rule(out, out_exact, out_same)
        assert_within_rule(lse, lse_exact, lse_same)
    assert torch.equal(bits(case.k_cache), bits(same.k_cache)), "k_cache differs from the reference's"
    assert torch.equal(bits(case.v_cache), bits(same.v_cache)), "v_cache differs from the reference's"
    mask = active_mask(case.cache_seqlens, batch, seqlen_q, cache_len)
    assert_untouched(before_k, case.k_cache, mask)
    assert_untouched(before_v, case.v_cache, mask)


def _overrides(case, small_tiles, path):
    return small(case, path) if small_tiles else ({} if path is None else dict(path=path))


@given(case_params(max_seqlen_q=12, dtypes=(torch.float32,), head_dims=(16, 24, 32), max_extra=40), st.booleans(),
       st.sampled_from([None, 0.3]), paths)
def test_float32_matches_reference(params, small_tiles, softmax_scale, path):
    causal = params.pop("causal")
    case = make_case(device=DEVICE, **params)
    check_against_reference(case, causal, softmax_scale, **_overrides(case, small_tiles, path))


@given(case_params(dtypes=(torch.float16, torch.bfloat16), head_dims=(16, 32), max_extra=40), st.booleans(), paths)
def test_half_precision_within_rule(params, small_tiles, path):
    causal = params.pop("causal")
    case = make_case(device=DEVICE, **params)
    check_against_reference(case, causal, **_overrides(case, small_tiles, path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("fold_merge", [False, True])
def test_decode_split_kv(dtype, heads_q, heads_kv, fold_merge):
    """M = 1 over a cache cut into several splits merged by their lse (MHA, GQA, MQA), rows of unequal length,
    by a merge launch or by the split that finishes last."""
    case = make_case(11, batch=3, seqlen_q=1, heads_q=heads_q, heads_kv=heads_kv, head_dim=32, cache_len=75,
                     dtype=dtype, device=DEVICE, gate_kind="head")
    overrides = dict(small(case), fold_merge=fold_merge)
    plan = _plan(case, **overrides)
    assert isinstance(plan, DecodePlan) and plan.splits > 3 and plan.fold_merge == fold_merge
    check_against_reference(case, True, **overrides)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen_q,split_len", [(19, 16), (19, 48), (40, 16)])
def test_chunk_row_blocks_and_splits(causal, seqlen_q, split_len):
    """M * G rows over several row blocks, their keys in several splits (a split that some rows of a block do
    not reach included) or one (the output written directly)."""
    case = make_case(12, batch=2, seqlen_q=seqlen_q, heads_q=4, heads_kv=2, head_dim=16, cache_len=seqlen_q + 33,
                     device=DEVICE, gate_kind="element", layout="padded")
    overrides = dict(small(case, "chunk"), split_len=split_len)
    plan = _plan(case, **overrides)
    assert plan.row_blocks > 2 and plan.splits > 1
    check_against_reference(case, causal, **overrides)


@pytest.mark.parametrize("gate_kind,layout", [(g, LAYOUTS[i % len(LAYOUTS)]) for i, g in enumerate(GATE_KINDS)])
def test_gate_kinds_and_layouts(gate_kind, layout):
    case = make_case(13, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=16, cache_len=30, device=DEVICE,
                     gate_kind=gate_kind, layout=layout)
    for path in ("decode", "chunk"):
        check_against_reference(case.clone(), True, **small(case, path))


@pytest.mark.parametrize("head_dim", [24, 80])
def test_head_dim_not_power_of_two(head_dim):
    case = make_case(14, batch=1, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=head_dim, cache_len=20,
                     device=DEVICE, gate_kind="separate", layout="heads_first")
    check_against_reference(case, True)


@pytest.mark.parametrize("path", ["decode", "chunk"])
@pytest.mark.parametrize("paged", [False, True])
def test_wide_offsets(monkeypatch, path, paged):
    """The 64-bit in-slice offsets taken for caches spanning 2**31 elements (forced here on a small problem;
    tests/test_int64_offsets.py runs far heads for real), on contiguous caches and through a block table."""
    import melt_kernels.kernels.fwd as module
    from utils import page_case

    monkeypatch.setattr(module, "needs_wide_offsets", lambda tensors, block, pools=(): True)
    case = make_case(22, batch=2, seqlen_q=5, heads_q=4, heads_kv=2, head_dim=24, cache_len=48, device=DEVICE,
                     layout="padded", gate_kind="element")
    if not paged:
        check_against_reference(case, True, **small(case, path))
        return
    want = case.clone()
    pages = page_case(case, 16, 22)
    p = check_inputs(case.q, case.k, case.v, pages.k_pool, pages.v_pool, case.cache_seqlens, case.gate,
                     block_table=pages.block_table)
    out, lse = gated_kv_attention_fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                                      p.softmax_scale, True, p.max_seqlen_k, block_table=pages.block_table,
                                      **small(case, path))
    out_want, lse_want = _launch(gated_kv_attention_ref_fwd, want, True)
    torch.testing.assert_close(out, out_want, **FP32_TOL)
    torch.testing.assert_close(lse, lse_want, **FP32_TOL)


def test_int_seqlens_and_default_plan():
    """A Python int length for all rows, and the launcher's own tiles and split count."""
    case = make_case(15, batch=2, seqlen_q=4, heads_q=8, heads_kv=2, head_dim=32, cache_len=40, device=DEVICE,
                     int_seqlens=True, gate_kind="float")
    check_against_reference(case, False)


def test_write_through_never_reads_old_slot():
    case = make_case(16, batch=2, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=12, device=DEVICE,
                     gate_kind="none")
    mask = active_mask(case.cache_seqlens, 2, 2, 12).to(DEVICE)
    case.k_cache[mask] = float("nan")
    case.v_cache[mask] = float("nan")
    for path in ("decode", "chunk"):
        check_against_reference(case.clone(), True, **small(case, path))


def test_public_op_through_triton_backend():
    """gated_kv_attention(backend="triton"): the op's checks, dispatch and autograd around the kernels."""
    case = make_case(17, batch=2, seqlen_q=2, heads_q=4, heads_kv=2, head_dim=16, cache_len=10, device=DEVICE)
    ref = case.clone()
    out, lse = melt_kernels.gated_kv_attention(*case.args(), return_lse=True, backend="triton")
    want, want_lse = melt_kernels.gated_kv_attention(*ref.args(), return_lse=True, backend="reference")
    torch.testing.assert_close(out, want, **FP32_TOL)
    torch.testing.assert_close(lse, want_lse, **FP32_TOL)
    assert torch.equal(case.k_cache, ref.k_cache) and torch.equal(case.v_cache, ref.v_cache)


def test_public_op_gradients_through_triton_forward():
    case = make_case(18, batch=1, seqlen_q=2, heads_q=2, heads_kv=1, head_dim=16, cache_len=6, device=DEVICE)
    grads = []
    for backend, c in (("triton", case.clone()), ("reference", case.clone())):
        q, gate = c.q.requires_grad_(), c.gate.requires_grad_()
        out = melt_kernels.gated_kv_attention(q, c.k, c.v, c.k_cache, c.v_cache, c.cache_seqlens, gate,
                                              backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), (q, gate)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("lengths", [(-7, 100), (2**30, -(2**30))])
@pytest.mark.parametrize("path", ["decode", "chunk"])
def test_bad_lengths_stay_inside_the_cache(lengths, path):
    """Lengths the host never checked (as with a CUDA tensor) are clamped to [0, S - M] inside the kernel:
    nothing around the caches is read (the NaN guard would show in the output) or written."""
    batch, seqlen_q, heads_kv, head_dim, cache_len, pad = 2, 3, 2, 16, 20, 4
    case = make_case(19, batch=batch, seqlen_q=seqlen_q, heads_q=4, heads_kv=heads_kv, head_dim=head_dim,
                     cache_len=cache_len, device=DEVICE, gate_kind="head")
    caches = []
    for cache in (case.k_cache, case.v_cache):
        guarded = torch.full((batch, cache_len + 2 * pad, heads_kv, head_dim + pad), float("nan"), device=DEVICE)
        view = guarded[:, pad:pad + cache_len, :, :head_dim]
        view.copy_(cache)
        caches.append((guarded, view))
    (k_guarded, k_view), (v_guarded, v_view) = caches
    outside = torch.ones_like(k_guarded, dtype=torch.bool)
    outside[:, pad:pad + cache_len, :, :head_dim] = False
    before = bits(k_guarded)[outside.cpu()], bits(v_guarded)[outside.cpu()]

    bad = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = gated_kv_attention_fwd(case.q, case.k, case.v, k_view, v_view, bad, case.gate, case.gate, 0.25, True,
                                      None, **small(case, path))

    assert torch.equal(bits(k_guarded)[outside.cpu()], before[0])
    assert torch.equal(bits(v_guarded)[outside.cpu()], before[1])
    clamped = bad.long().clamp(0, cache_len - seqlen_q).int()
    want, want_lse = gated_kv_attention_ref_fwd(case.q, case.k, case.v, case.k_cache, case.v_cache, clamped,
                                                case.gate, case.gate, 0.25, True)
    torch.testing.assert_close(out, want, **FP32_TOL)
    torch.testing.assert_close(lse, want_lse, **FP32_TOL)
    assert torch.equal(k_view, case.k_cache) and torch.equal(v_view, case.v_cache)


def test_plans_fill_a_large_gpu():
    """Pure host logic.  Decode with a small batch is split to give 132 SMs two programs each, none shorter
    than two key tiles; with a large batch not at all.  A chunk's row blocks are split only when they do not
    fill a wave, and then to about one wave; the heaviest headline chunks are not split.  Rows beyond one
    decode program take the chunk path."""
    decode = plan_forward(1, 1, 32, 8, 128, 32768, 132)
    assert isinstance(decode, DecodePlan) and 132 < decode.splits * 8 <= 2 * 132
    assert decode.split_len % decode.block_n == 0
    assert decode.block_r == 16 * decode.num_warps  # warps along the rows
    short = plan_forward(1, 1, 16, 16, 128, 1023, 132)
    assert short.splits == 8 and short.split_len == 2 * short.block_n
    big_batch = plan_forward(64, 1, 16, 16, 128, 8192, 132)
    assert big_batch.splits == 1 and big_batch.direct
    assert not isinstance(plan_forward(1, DECODE_ROWS + 1, 1, 1, 128, 0, 132), DecodePlan)
    assert isinstance(plan_forward(1, DECODE_ROWS_FP32, 1, 1, 128, 0, 132, 4), DecodePlan)
    assert not isinstance(plan_forward(1, DECODE_ROWS_FP32 + 1, 1, 1, 128, 0, 132, 4), DecodePlan)
    chunk = plan_forward(8, 512, 32, 8, 128, 8192, 132)
    assert chunk.row_blocks == 16 and chunk.splits == 1
    assert plan_forward(4, 500, 16, 16, 128, 4500, 132).splits == 1  # 256 programs: two waves, no split
    lone = plan_forward(1, 500, 16, 16, 128, 9500, 132)  # 64 programs: two splits make one wave
    assert lone.splits == 2 and 16 * 4 * lone.splits <= 132
    assert plan_forward(1, 1, 16, 16, 256, 0, 132).splits == 1


# Compiles the forward's kernels for sm_90 with this machine's Triton, no GPU needed: the interpreter runs Python,
# so only a real compile catches what the compiler rejects (globals, types, shapes) or what it lowers badly.
_COMPILE_SM90 = r"""
from sm90 import compile_sm90
from melt_kernels.kernels import blend, chunk_fwd, decode, fwd, merge
from melt_kernels.kernels.tile_ops import GATE_SCALAR, GATE_TENSOR

for dtype, elem, (batch, seqlen_q, heads_q, heads_kv, head_dim), paged in [
        ("bf16", 2, (1, 1, 32, 8, 128), False), ("fp16", 2, (2, 512, 32, 8, 256), False),
        ("fp32", 4, (2, 4, 8, 8, 80), False), ("bf16", 2, (8, 1, 32, 8, 128), True),
        ("fp16", 2, (2, 64, 16, 4, 64), True)]:
    plan = fwd.plan_forward(batch, seqlen_q, heads_q, heads_kv, head_dim, 8192, 132, elem)
    groups = heads_q // heads_kv
    gates = dict(GATE_K=GATE_TENSOR, GATE_V=GATE_SCALAR, SAVE_NEW_K=True, SAVE_NEW_V=True, SAVE_OLD_K=True,
                 SAVE_OLD_V=False, PAGED=paged, WIDE=False, FIX_BF16=False)
    precision = "ieee" if elem == 4 else None
    if isinstance(plan, decode.DecodePlan):
        compile_sm90(decode.decode_kernel, dtype, dict(
            G=groups, D=head_dim, CAUSAL=True, DIRECT=plan.direct, FOLD_MERGE=not plan.direct,
            PRECISION=precision, BLOCK_R=plan.block_r, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d, **gates),
            num_warps=plan.num_warps, num_stages=plan.num_stages, enable_fp_fusion=False)
    else:
        compile_sm90(blend.blend_kernel, dtype, dict(D=head_dim, BLOCK_N=blend.BLOCK_SLOTS, BLOCK_D=plan.block_d,
                                                     **gates), num_warps=4, enable_fp_fusion=False)
        compile_sm90(chunk_fwd.chunk_attention_kernel, dtype, dict(
            G=groups, D=head_dim, CAUSAL=True, DIRECT=plan.direct, PAGED=paged, WIDE=False, PRECISION=precision,
            FIX_BF16=False, BLOCK_R=plan.block_r, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d),
            num_warps=plan.num_warps, num_stages=plan.num_stages, enable_fp_fusion=True)
    compile_sm90(merge.merge_kernel, dtype, dict(G=groups, D=head_dim, BLOCK_R=16, BLOCK_D=plan.block_d,
                                                 FIX_BF16=False), num_warps=4, enable_fp_fusion=True)
"""


def test_kernels_compile_for_sm90():
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    del nvidia
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-4000:]


# --- GPU: realistic sizes, compiled kernels -------------------------------------------------------------------

gpu = pytest.mark.skipif(triton_interpreted(), reason="compiled kernels on CUDA tensors, not the interpreter")

GPU_SHAPES = [
    # (batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len)
    (4, 1, 32, 8, 128, 4096),  # decode, GQA, split-KV
    (2, 4, 16, 16, 64, 2048),  # small M, MHA
    (1, 1, 8, 1, 256, 8192),  # MQA, head_dim 256
    (2, 128, 16, 4, 128, 1536),  # chunk
    (1, 512, 8, 8, 80, 1024),  # chunk, M = 512, head_dim not a power of two
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_realistic_sizes(shape, dtype, causal):
    batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len = shape
    gate_kind = ("head", "element", "separate", "float", "none")[GPU_SHAPES.index(shape)]
    case = make_case(20, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                     cache_len=cache_len, dtype=dtype, device="cuda", gate_kind=gate_kind)
    check_against_reference(case, causal)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seqlen_q", [1, 256])
def test_gpu_deterministic(seqlen_q):
    """20 runs from the same caches give identical bits: no race between the programs of a launch."""
    case = make_case(21, batch=2, seqlen_q=seqlen_q, heads_q=32, heads_kv=8, head_dim=128, cache_len=4096,
                     dtype=torch.bfloat16, device="cuda", gate_kind="element")
    assert_deterministic(lambda c: _launch(gated_kv_attention_fwd, c, True), case)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["decode", "chunk"])
def test_gpu_bad_cuda_lengths_stay_inside_the_cache(path):
    test_bad_lengths_stay_inside_the_cache((-3, 10**9), path)
