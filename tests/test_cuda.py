"""The CUDA C++ backend (csrc/, extension melt_kernels._cuda, melt_kernels/cuda_backend.py).

Without a GPU (CI): the import error when the extension is not built, the error when a kernel is called with no
device, the reasons ``unsupported`` gives, and, when the extension is built (MELT_BUILD_CUDA=1), the kernels'
own logic on the CPU: the work split of a launch (``_cuda.plan``, the very functions the kernels call: one
writer per active slot, every visible key read exactly once), the cache update of the chunk path
(``_cuda.blend_host``), and whole forward calls with the kernels' source run by the host emulator of
csrc/emulate.h (``gated_kv_attention_fwd_emulated``).  The emulator checks indexing, fragment layouts, masks
and the online softmax; races between blocks are checked by tests/test_races.py (the emulator records each
block's global reads and writes, and runs the blocks in several orders); what the hardware itself does
(memory ordering inside a block, timing) needs a GPU.

With a GPU (``gpu`` marker): the compiled kernels through the public op against the reference, determinism,
bad lengths, dispatch and autograd.

Accuracy rule (FlashAttention's): out and lse within 2x the error of PyTorch doing the same attention with
every op in float16/bfloat16, both measured against float64, over the caches as updated.  The caches
themselves are compared bit for bit with the reference run in the same dtype (both blend in float32 with no
FMA and round once).
"""
import importlib
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import melt_kernels
from melt_kernels import backends
from melt_kernels.checks import check_inputs
from melt_kernels.reference import attention, gated_kv_attention_ref_fwd
from utils import (active_mask, assert_deterministic, assert_untouched, assert_within_rule, bits, case_params,
                   make_case)

try:
    from melt_kernels import _cuda
    from melt_kernels import cuda_backend
except ImportError:
    _cuda = cuda_backend = None

needs_extension = pytest.mark.skipif(_cuda is None, reason="melt_kernels._cuda is not built (MELT_BUILD_CUDA=1)")
HALF_DTYPES = (torch.float16, torch.bfloat16)


# --- helpers -------------------------------------------------------------------------------------------------

def low_precision_attention(q, k_cache, v_cache, lengths, softmax_scale, causal):
    """docs/op.md#the-attention-read with every PyTorch op in q's dtype: the baseline of the accuracy rule."""
    batch, seqlen_q, heads_q, _ = q.shape
    cache_len, heads_kv = k_cache.shape[1:3]
    keys = k_cache.repeat_interleave(heads_q // heads_kv, dim=2)
    values = v_cache.repeat_interleave(heads_q // heads_kv, dim=2)
    scores = torch.einsum("bmhd,bshd->bhms", q, keys) * softmax_scale
    rows = torch.arange(seqlen_q, device=q.device) if causal else torch.full((seqlen_q,), seqlen_q - 1,
                                                                             device=q.device)
    last = lengths.long()[:, None] + rows[None, :]
    visible = torch.arange(cache_len, device=q.device)[None, None, :] <= last[:, :, None]  # [B, M, S]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.einsum("bhms,bshd->bmhd", torch.softmax(scores, dim=-1), values)
    return out, torch.logsumexp(scores, dim=-1)


def check_against_reference(run, case, causal, lengths=None):
    """``run(case, causal) -> (out, lse)`` updates ``case``'s caches in place.  ``lengths``: the (clamped)
    lengths the reference uses when ``run`` was given bad ones."""
    batch, seqlen_q, heads_q, _ = case.q.shape
    same = case.clone()
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()
    out, lse = run(case, causal)

    if lengths is not None:
        same.cache_seqlens = lengths
    p = check_inputs(*same.args(), causal=causal)
    gated_kv_attention_ref_fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                               p.softmax_scale, p.causal)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads_q, seqlen_q)
    assert torch.equal(bits(case.k_cache), bits(same.k_cache)), "k_cache differs from the reference's"
    assert torch.equal(bits(case.v_cache), bits(same.v_cache)), "v_cache differs from the reference's"
    mask = active_mask(p.cache_seqlens.cpu(), batch, seqlen_q, case.k_cache.shape[1])
    assert_untouched(before_k, case.k_cache, mask)
    assert_untouched(before_v, case.v_cache, mask)

    out_exact, lse_exact = attention(p.q.double(), same.k_cache.double(), same.v_cache.double(), p.cache_seqlens,
                                     p.softmax_scale, causal)
    out_low, lse_low = low_precision_attention(p.q, same.k_cache, same.v_cache, p.cache_seqlens, p.softmax_scale,
                                               causal)
    assert_within_rule(out, out_exact, out_low)
    assert_within_rule(lse, lse_exact, lse_low)


def emulated(splits=None, sms=4):
    def run(case, causal):
        p = check_inputs(*case.args(), causal=causal)
        return cuda_backend.gated_kv_attention_fwd_emulated(
            p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, p.causal,
            p.max_seqlen_k, splits=splits, sms=sms)
    return run


def problem(**kwargs):
    case = make_case(0, **{**dict(batch=1, seqlen_q=1, heads_q=2, heads_kv=1, head_dim=64, cache_len=8,
                                  dtype=torch.float16), **kwargs})
    return check_inputs(*case.args())


# --- without a GPU ------------------------------------------------------------------------------------------

def test_unbuilt_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "melt_kernels._cuda", None)  # what an unbuilt extension looks like
    monkeypatch.delattr(melt_kernels, "_cuda", raising=False)
    monkeypatch.delitem(sys.modules, "melt_kernels.cuda_backend", raising=False)
    monkeypatch.delattr(melt_kernels, "cuda_backend", raising=False)
    monkeypatch.setattr(backends, "_LOADED", {})  # as in a fresh process: nothing imported yet
    with pytest.raises(ModuleNotFoundError, match="MELT_BUILD_CUDA=1"):
        importlib.import_module("melt_kernels.cuda_backend")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available here: .*MELT_BUILD_CUDA=1"):
        backends._load("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_not_listed_without_gpu():
    assert "cuda" not in melt_kernels.available_backends()
    assert backends.explain_backend(problem())["cuda"] is not None
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        melt_kernels.gated_kv_attention(*make_case(0, batch=1, seqlen_q=1, heads_q=2, heads_kv=1, head_dim=64,
                                                   cache_len=8, dtype=torch.float16).args(), backend="cuda")


@needs_extension
def test_extension_imports():
    assert _cuda.built_archs() and all(t.startswith(("sm_", "compute_")) for t in _cuda.built_archs())
    assert (_cuda.BLOCK_M, _cuda.BLOCK_N) == (64, 64)
    assert cuda_backend.BACKEND.name == "cuda"


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_kernel_call_without_gpu_raises():
    null = (0, (0, 0, 0))
    no_gate = (_cuda.GATE_NONE, 0, (0, 0, 0, 0), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        _cuda.fwd(null, null, null, null, null, null, 0, 0, 0, 0, (1, 1, 1, 1, 64, 8), no_gate, no_gate, 1.0, True, 1,
                  _cuda.FLOAT16, 0)
    p = problem()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda_backend.gated_kv_attention_fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, None, None,
                                            p.softmax_scale, True)


@needs_extension
def test_unsupported_reasons():
    unsupported = cuda_backend.BACKEND.unsupported
    assert unsupported(problem()) is None
    assert unsupported(problem(head_dim=128, heads_q=4, heads_kv=2, layout="heads_first")) is None
    assert "head_dim 64 and 128, got 32" in unsupported(problem(head_dim=32))
    assert "float16 and bfloat16, got float32" in unsupported(problem(dtype=torch.float32))
    base = torch.zeros(1, 8, 1, 80, dtype=torch.float16)
    p = problem()
    shifted = check_inputs(p.q, p.k, p.v, base[..., 4:68], p.v_cache, 0)  # rows start 8 bytes past a 16-byte boundary
    assert "16-byte aligned" in unsupported(shifted) and "k_cache" in unsupported(shifted)


@needs_extension
@pytest.mark.parametrize("sizes", [(2048, 1, 32, 8, 128, 4096), (2048, 64, 32, 8, 128, 4096),
                                   (4096, 512, 64, 8, 128, 8192), (1, 1, 32, 8, 128, 2**31 - 1)])
def test_launch_grids_within_cuda_limits(sizes):
    """Every launch of the forward is 1-D and within gridDim.x < 2**31 at the sizes a call can have (B = 2048,
    Hq = 32 and beyond), with the split count the launcher would choose on a 132-SM GPU; beyond that a
    clear error before any launch."""
    batch, seqlen_q, heads_q, heads_kv, _, cache_len = sizes
    row_tiles = -(-seqlen_q * (heads_q // heads_kv) // _cuda.BLOCK_M)
    splits = cuda_backend.num_splits(batch * heads_kv * row_tiles, -(-cache_len // _cuda.BLOCK_N), 132)
    grids = _cuda.grids(sizes, splits)
    assert grids["attention"] == batch * heads_kv * row_tiles * splits
    assert all(0 <= blocks < 2**31 for blocks in grids.values()), grids
    _cuda.check_launch_sizes(sizes, splits)
    with pytest.raises(ValueError, match="attention launch would need .* blocks"):
        _cuda.check_launch_sizes((2**15, 1, 2**15, 2**15, 64, 4096), 64)
    with pytest.raises(ValueError, match="too many query rows"):
        _cuda.check_launch_sizes((2**16, 2**15, 2**15, 2**15, 64, 2**20), 1)


@needs_extension
def test_sizes_beyond_32_bits_fall_back():
    """Positions or rows past 2**31 are not for the CUDA kernels: a reason, so that "auto" picks another."""
    meta = dict(device="meta", dtype=torch.float16)
    q, k = torch.empty(2**16, 2**8, 2**8, 64, **meta), torch.empty(2**16, 2**8, 2**8, 64, **meta)
    cache = torch.empty(1, 2**31, 1, 64, **meta)
    assert "32 bits" in cuda_backend._kernel_reason(q, k, k, k, k)
    assert "32 bits" in cuda_backend._kernel_reason(q[:1, :1, :1], k[:1, :1, :1], k[:1, :1, :1], cache, cache)


@needs_extension
@given(lengths=st.lists(st.integers(-3, 200), min_size=1, max_size=3), seqlen_q=st.integers(1, 70),
       groups=st.integers(1, 5), heads_kv=st.integers(1, 2), extra=st.integers(0, 140), causal=st.booleans(),
       splits=st.integers(1, 6))
def test_plan_one_writer_and_every_key_once(lengths, seqlen_q, groups, heads_kv, extra, causal, splits):
    """The launch's work split, computed by the kernels' own functions: in the decode path exactly one block
    writes the active slots [L, L+M) and no other block reads them; in the chunk path no attention block
    writes; each packed row sees exactly keys 0..L+i (causal) or 0..L+M-1, each once; all within [0, S)."""
    cache_len = seqlen_q + extra
    heads_q = heads_kv * groups
    blocks = _cuda.plan(lengths, cache_len, seqlen_q, heads_q, heads_kv, causal, splits)
    fused = _cuda.fused_update(seqlen_q, heads_q, heads_kv)
    assert fused == (seqlen_q * groups <= _cuda.BLOCK_M)
    n_rows, n_tiles = seqlen_q * groups, -(-seqlen_q * groups // _cuda.BLOCK_M)
    assert len(blocks) == len(lengths) * n_tiles * splits
    for b, raw in enumerate(lengths):
        L = min(max(raw, 0), cache_len - seqlen_q)
        mine = [blk for blk in blocks if blk["batch"] == b]
        writers = [blk for blk in mine if blk["writes"]]
        if fused:
            assert len(writers) == 1 and writers[0]["writes"] == [(L, seqlen_q)]
            for blk in mine:
                if blk is not writers[0]:
                    assert all(start + n <= L for start, n in blk["tiles"]), "a non-owner reads an active slot"
        else:
            assert not writers
        for tile in range(n_tiles):
            parts = [blk for blk in mine if blk["row_tile"] == tile]
            for start, n in (t for blk in parts for t in blk["tiles"]):
                assert 0 <= start and start + n <= cache_len
            for rr in range(min(_cuda.BLOCK_M, n_rows - tile * _cuda.BLOCK_M)):
                i = (tile * _cuda.BLOCK_M + rr) // groups
                seen = sorted(pos for blk in parts for pos in blk["visible"][rr])
                assert seen == list(range(L + (i if causal else seqlen_q - 1) + 1))


@needs_extension
@given(case_params(dtypes=HALF_DTYPES, head_dims=(16, 64), max_seqlen_q=6, max_extra=10),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), st.booleans())
def test_blend_host_matches_reference(params, gate_dtype, bad_lengths):
    """The chunk path's cache update (blend_kernel's own code, run over host memory) is bit-identical to the
    reference's, for every gate form and dtype, and clamps bad lengths like the kernels."""
    params.pop("causal")
    case = make_case(**{**params, "int_seqlens": False})
    for name in ("gate", "gate_v"):
        g = getattr(case, name)
        if isinstance(g, torch.Tensor):
            setattr(case, name, g.to(gate_dtype))
    if case.gate_v is None:
        case.gate_v = case.gate
    batch, seqlen_q, heads_q, head_dim = case.q.shape
    cache_len = case.k_cache.shape[1]
    raw = case.cache_seqlens
    if bad_lengths:
        raw = raw + torch.tensor([-7, 1000, 0][:batch], dtype=torch.int32)[:batch]
    lengths = raw.clamp(0, cache_len - seqlen_q)
    same = case.clone()
    same.cache_seqlens = lengths
    p = check_inputs(*same.args())
    gated_kv_attention_ref_fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                               p.softmax_scale, True)

    kv_shape = tuple(case.k.shape)

    def arg(t):
        return t.data_ptr(), cuda_backend._row_strides(t)

    raw = raw.contiguous()
    _cuda.blend_host(arg(case.k), arg(case.v), arg(case.k_cache), arg(case.v_cache), raw.data_ptr(),
                     (batch, seqlen_q, heads_q, case.k.shape[2], head_dim, cache_len),
                     cuda_backend._gate_arg(case.gate, kv_shape), cuda_backend._gate_arg(case.gate_v, kv_shape),
                     cuda_backend._DTYPES[case.q.dtype])
    assert torch.equal(bits(case.k_cache), bits(same.k_cache))
    assert torch.equal(bits(case.v_cache), bits(same.v_cache))


@needs_extension
@given(case_params(dtypes=HALF_DTYPES, head_dims=(64, 128), max_batch=2, max_seqlen_q=24, max_extra=70,
                   max_groups=3), st.sampled_from([None, 1, 2, 3]))
def test_emulated_kernels_match_reference(params, splits):
    causal = params.pop("causal")
    check_against_reference(emulated(splits), make_case(**params), causal)


@needs_extension
@pytest.mark.parametrize("seqlen_q,heads_q,heads_kv,head_dim,dtype,gate_kind,causal,splits", [
    (1, 8, 2, 128, torch.bfloat16, "head", True, 3),        # decode, GQA, owner in the last of 3 splits
    (2, 4, 4, 64, torch.float16, "separate", False, 2),     # decode path with 2 active tokens, MHA
    (40, 4, 2, 64, torch.float16, "element", True, 2),      # chunk path: 2 row tiles, blend launch, splits
    (70, 1, 1, 128, torch.bfloat16, "float", False, 1),     # chunk path, M > BLOCK_N, non-causal
    (22, 3, 1, 64, torch.float16, "none", True, None),      # MQA, G = 3 (rows of a token across tiles)
])
def test_emulated_paths(seqlen_q, heads_q, heads_kv, head_dim, dtype, gate_kind, causal, splits):
    case = make_case(3, batch=2, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                     cache_len=seqlen_q + 90, dtype=dtype, gate_kind=gate_kind, layout="padded")
    check_against_reference(emulated(splits), case, causal)


@needs_extension
@pytest.mark.parametrize("seqlen_q", [1, 30])
def test_emulated_bad_lengths_are_clamped(seqlen_q):
    """Lengths outside [0, S - M] (possible only in a device tensor, which is not checked on the host) are
    clamped: nothing is touched outside the clamped rows' slots, and the result is the clamped call's."""
    case = make_case(4, batch=3, seqlen_q=seqlen_q, heads_q=2, heads_kv=1, head_dim=64, cache_len=seqlen_q + 40,
                     dtype=torch.float16, gate_kind="head")
    bad = torch.tensor([-5, 10**6, 7], dtype=torch.int32)
    clamped = bad.clamp(0, 40)

    def run(c, causal):  # check_inputs would reject these host lengths: call the launcher directly
        return cuda_backend.gated_kv_attention_fwd_emulated(c.q, c.k, c.v, c.k_cache, c.v_cache, bad, c.gate,
                                                            c.gate, 0.125, causal, splits=2)

    check_against_reference(run, case, True, lengths=clamped)


# --- on a GPU -----------------------------------------------------------------------------------------------

def on_gpu(**kwargs):
    def run(case, causal):
        return melt_kernels.gated_kv_attention(*case.args(), causal=causal, return_lse=True, backend="cuda",
                                               **kwargs)
    return run


@pytest.mark.gpu
@needs_extension
@given(case_params(dtypes=HALF_DTYPES, head_dims=(64, 128), max_batch=4, max_seqlen_q=80, max_extra=300,
                   max_groups=8, max_heads_kv=4))
def test_gpu_matches_reference(params):
    causal = params.pop("causal")
    check_against_reference(on_gpu(), make_case(device="cuda", **params), causal)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("seqlen_q,heads_q,heads_kv,cache_len", [(1, 32, 8, 4096), (4, 16, 2, 3000),
                                                                 (512, 16, 4, 1536), (600, 8, 8, 700)])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gpu_realistic_sizes(seqlen_q, heads_q, heads_kv, cache_len, dtype):
    case = make_case(5, batch=2, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv, head_dim=128,
                     cache_len=cache_len, dtype=dtype, device="cuda", gate_kind="head")
    check_against_reference(on_gpu(), case, True)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("seqlen_q", [1, 200])
def test_gpu_deterministic(seqlen_q):
    case = make_case(6, batch=2, seqlen_q=seqlen_q, heads_q=8, heads_kv=2, head_dim=128, cache_len=2048,
                     dtype=torch.bfloat16, device="cuda", gate_kind="element")
    assert_deterministic(lambda c: on_gpu()(c, True), case)


@pytest.mark.gpu
@needs_extension
def test_gpu_bad_lengths_stay_in_bounds():
    """A device tensor of lengths is not checked on the host: bad values are clamped in the kernels, and the
    caches, cut out of a larger buffer, are not written outside their own rows."""
    batch, seqlen_q, cache_len = 3, 5, 60
    case = make_case(7, batch=batch, seqlen_q=seqlen_q, heads_q=4, heads_kv=2, head_dim=64, cache_len=cache_len,
                     dtype=torch.float16, device="cuda", gate_kind="head")
    buffers = [torch.randn(batch, cache_len + 20, 2, 64, device="cuda").half() for _ in range(2)]
    case.k_cache, case.v_cache = (buf[:, 10:10 + cache_len].copy_(c) for buf, c in
                                  zip(buffers, (case.k_cache, case.v_cache)))
    guard = [torch.cat([buf[:, :10], buf[:, 10 + cache_len:]], 1).clone() for buf in buffers]
    case.cache_seqlens = torch.tensor([-9, 10**7, 3], dtype=torch.int32, device="cuda")
    check_against_reference(on_gpu(), case, True,
                            lengths=torch.tensor([0, cache_len - seqlen_q, 3], dtype=torch.int32, device="cuda"))
    for buf, g in zip(buffers, guard):
        assert torch.equal(bits(torch.cat([buf[:, :10], buf[:, 10 + cache_len:]], 1)), bits(g))


@pytest.mark.gpu
@needs_extension
def test_gpu_dispatch():
    supported = problem(device="cuda", head_dim=128)
    # "auto" takes Triton first on a GPU (backends.KERNEL_BACKENDS, the GPU pass's order); CUDA runs by name.
    assert backends.select_backend("auto", supported).name == "triton"
    assert backends.select_backend("cuda", supported).name == "cuda"
    for p, words in ((problem(device="cuda", head_dim=32), "head_dim"),
                     (problem(device="cuda", dtype=torch.float32), "float32")):
        assert words in backends.explain_backend(p)["cuda"]
        assert backends.select_backend("auto", p).name == "triton"
        with pytest.raises(RuntimeError, match=words):
            backends.select_backend("cuda", p)


@pytest.mark.gpu
@needs_extension
def test_gpu_gradients():
    """Backward is the Triton backend's, fed the CUDA forward's out and lse: as accurate as the Triton path."""
    case = make_case(8, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=64, cache_len=100,
                     dtype=torch.bfloat16, device="cuda", gate_kind="head")

    def grads(c, backend):
        c = c.clone()
        leaves = [c.q, c.k, c.v, c.gate]
        for t in leaves:
            t.requires_grad_(True)
        k_cache, v_cache = c.k_cache.clone(), c.v_cache.clone()
        out = melt_kernels.gated_kv_attention(c.q, c.k, c.v, k_cache, v_cache, c.cache_seqlens, c.gate,
                                              backend=backend)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
        return torch.autograd.grad(out, leaves, dout.to(out.dtype))

    exact = grads(case.clone(dtype=torch.float64), "reference")
    for g, g_exact, g_triton in zip(grads(case, "cuda"), exact, grads(case, "triton")):
        assert_within_rule(g, g_exact, g_triton)
