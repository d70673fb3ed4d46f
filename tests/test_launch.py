"""What the Triton launchers launch, checked on the CPU for any size: their launches are recorded instead of
run (tests/launches.py), on meta tensors (no memory, no kernel), so B = 2048 or S = 131072 cost nothing.

* Launch limits: CUDA caps gridDim.y and gridDim.z at 65535 and Triton does not check, so every grid of the
  forward and the backward must be 1-D (x allows 2**31 - 1) at sizes a real call can have; a call beyond x's
  limit raises ValueError before anything is launched.
* Device guard: every launch runs inside a guard for the tensors' device (Triton uses the current device).
* Split-KV plans (docs/op.md#cuda-graphs-and-host-cost): with lengths on the device and a max_seqlen_k hint, the plan is the one the exact
  host lengths give, not the capacity's (S = 131072, L = 2000: 320 programs working, not 64).
"""
import contextlib
import inspect

import pytest
import torch

import melt_kernels.kernels.bwd as bwd_module
import melt_kernels.kernels.fwd as fwd_module
from launches import Recorder
from melt_kernels.autograd import run
from melt_kernels.checks import check_inputs
from melt_kernels.kernels.launch import MAX_GRID, device_guard
from melt_kernels.triton_backend import BACKEND as TRITON

META = torch.device("meta")
# Where the decode kernel takes its keys per prefix split (read before a Recorder replaces the kernel).
_SPLIT_LEN = list(inspect.signature(fwd_module.decode_kernel.fn).parameters).index("SPLIT_LEN")


def _tensors(batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len, device=META, dtype=torch.bfloat16):
    """q, k, v and the two caches (halves of one packed buffer: distinct storage offsets on the meta device)."""
    q = torch.empty(batch, seqlen_q, heads_q, head_dim, dtype=dtype, device=device)
    k, v = (torch.empty(batch, seqlen_q, heads_kv, head_dim, dtype=dtype, device=device) for _ in range(2))
    caches = torch.empty(2, batch, cache_len, heads_kv, head_dim, dtype=dtype, device=device)
    return q, k, v, caches[0], caches[1]


def _launch_all(recorder, batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len, max_seqlen_k=None):
    """The forward's and the backward's (with cache gradients, both ways of making dQ) launches for one
    problem; returns the grids."""
    q, k, v, k_cache, v_cache = _tensors(batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len)
    lengths = torch.empty(batch, dtype=torch.int32, device=META)
    out, lse = fwd_module.gated_kv_attention_fwd(q, k, v, k_cache, v_cache, lengths, 0.5, None, 0.1, True,
                                                 max_seqlen_k)
    for deterministic in (False, True):
        bwd_module.gated_kv_attention_bwd(q, k_cache, v_cache, k, v, lengths, out, lse, torch.empty_like(out), None,
                                          0.1, True, torch.empty_like(k_cache), torch.empty_like(v_cache),
                                          max_seqlen_k, deterministic=deterministic)
    return [(launch.kernel, launch.grid) for launch in recorder.launches]


BIG = [
    # (B, M, Hq, Hkv, D, S): batch and heads beyond 65535 (B * Hq = 65536), long chunks, long caches
    (2048, 1, 32, 8, 128, 4096),
    (2048, 16, 32, 32, 64, 1024),
    (4096, 1, 64, 8, 128, 2048),
    (1, 8192, 64, 8, 128, 131072),
    (64, 1, 32, 8, 256, 131072),
]


@pytest.mark.parametrize("sizes", BIG)
def test_every_grid_fits_cuda_limits(monkeypatch, sizes):
    recorder = Recorder(monkeypatch)
    launched = _launch_all(recorder, *sizes)
    kernels = {name for name, _ in launched}
    assert {"bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"} <= kernels
    assert "decode_kernel" in kernels or {"blend_kernel", "chunk_attention_kernel"} <= kernels
    for name, grid in launched:
        assert all(1 <= n <= limit for n, limit in zip(grid, MAX_GRID)), f"{name}: grid {grid} beyond {MAX_GRID}"


def test_too_large_for_one_launch_raises_before_launching(monkeypatch):
    """B * Hkv = 2**29 over 1024-token chunks: the blend launch would need 2**35 programs; nothing is
    launched."""
    recorder = Recorder(monkeypatch)
    with pytest.raises(ValueError, match="blend_kernel would need a grid"):
        _launch_all(recorder, 2**23, 1024, 64, 64, 16, 2048)
    assert recorder.launches == []


def test_launches_run_under_the_tensors_device(monkeypatch):
    recorder = Recorder(monkeypatch)
    _launch_all(recorder, 2, 3, 4, 2, 16, 64)
    assert len(recorder.launches) >= 4
    assert all(launch.guards == (META,) for launch in recorder.launches)


def test_device_guard_selects_the_tensors_cuda_device():
    """For CUDA tensors the guard is torch.cuda.device of their device (constructed, not entered: no GPU)."""
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: forward and backward match the reference on cuda:1."""
    import melt_kernels
    from utils import make_case

    if backend not in melt_kernels.available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    torch.cuda.set_device(0)
    case = make_case(0, batch=2, seqlen_q=16, heads_q=8, heads_kv=2, head_dim=128, cache_len=300,
                     dtype=torch.bfloat16, device="cuda:1")
    grads = []
    for name in (backend, "reference"):
        c = case.clone()
        q, gate = c.q.requires_grad_(), c.gate.requires_grad_()
        out = melt_kernels.gated_kv_attention(q, c.k, c.v, c.k_cache, c.v_cache, c.cache_seqlens, gate,
                                              backend=name)
        grads.append([out, *torch.autograd.grad(out.float().square().sum(), (q, gate)), c.k_cache])
    assert torch.cuda.current_device() == 0
    for got, want in zip(*grads):
        assert got.device == torch.device("cuda", 1)
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def _fwd_plan(recorder, lengths, hint, batch=8, heads_q=32, heads_kv=8, cache_len=131072):
    """(programs launched, keys per prefix split) of the forward through the op's checks and dispatch."""
    recorder.clear()
    q, k, v, k_cache, v_cache = _tensors(batch, 1, heads_q, heads_kv, 128, cache_len)
    with torch.no_grad():
        run(check_inputs(q, k, v, k_cache, v_cache, lengths, 0.5, max_seqlen_k=hint), TRITON)
    main, = [launch for launch in recorder.launches if launch.kernel == "decode_kernel"]
    return main.grid[0], main.args[_SPLIT_LEN]


def test_hint_plans_like_host_lengths(monkeypatch):
    """S = 131072, every L_b = 2000, B * Hkv = 64 on a 132-SM GPU.  Host lengths: 5 splits of 448 keys, 320
    programs all working.  Device lengths without a hint: a plan for 131071 keys, whose first split alone
    holds all 2000.  Device lengths with the hint L + M: the host plan."""
    monkeypatch.setattr(fwd_module, "num_sms", lambda device: 132)
    recorder = Recorder(monkeypatch)
    host = torch.full((8,), 2000, dtype=torch.int32)
    device = host.to(META)
    programs, split_len = _fwd_plan(recorder, host, None)
    assert programs == 64 * 5 and split_len * 5 >= 2000 > split_len * 4
    assert _fwd_plan(recorder, device, 2001) == (programs, split_len)
    assert _fwd_plan(recorder, host, 131072) == (programs, split_len)  # ignored: the host lengths are exact
    capacity_programs, capacity_split = _fwd_plan(recorder, device, None)
    assert capacity_split >= 2000, "without a hint the plan is sized by the capacity"


def test_backward_hint_plans_like_host_lengths(monkeypatch):
    monkeypatch.setattr(bwd_module, "num_sms", lambda device: 132)
    recorder = Recorder(monkeypatch)
    q, k, v, k_cache, v_cache = _tensors(2, 64, 8, 2, 128, 131072)
    lengths = torch.empty(2, dtype=torch.int32, device=META)
    grids = []
    for bound in (2064, None):
        recorder.clear()
        bwd_module.gated_kv_attention_bwd(q, k_cache, v_cache, k, v, lengths, q, torch.empty(2, 8, 64, device=META),
                                          q, None, 0.1, True, torch.empty_like(k_cache), None, bound)
        grids.append(recorder.grids())
    hinted, capacity = grids
    assert hinted["bwd_dkdv_kernel"][0] < capacity["bwd_dkdv_kernel"][0] / 32


def test_positions_beyond_32_bits_are_not_for_the_kernels():
    """The kernels index positions and rows in 32 bits (offsets are 64-bit): S = 2**31 gets a reason, so that
    "auto" falls back to the reference and "triton" raises."""
    q, k, v, k_cache, v_cache = _tensors(1, 1, 2, 1, 16, 2**31)
    reason = TRITON.unsupported(check_inputs(q, k, v, k_cache, v_cache, 5))
    assert reason is not None and "32 bits" in reason
    q, k, v, k_cache, v_cache = _tensors(1, 1, 2, 1, 16, 2**31 - 1)
    assert TRITON.unsupported(check_inputs(q, k, v, k_cache, v_cache, 5)) is None
