"""No program/block of a launch touches memory that another program/block of the same launch writes.

On a GPU the programs (Triton) or blocks (CUDA) of one launch run in any order and concurrently; the CPU
tests run them one after the other, where a race reads as a plausible result.  Both kernel backends are
therefore run here with every global access logged per program/block and checked, and with the programs in
three orders (forward, reverse, a seeded shuffle) whose results must agree bit for bit:

* Triton: the interpreter instrumented by tests/race_check.py (skips, saying why, if a Triton changes the
  internals it patches);
* CUDA: the host emulator of csrc/emulate.h in recording mode (``gated_kv_attention_fwd_emulated(...,
  order=..., record=True)``), which logs the kernels' own load_global/store_global/cp.async accesses.

Each checker is first shown to catch a planted race: a small Triton kernel whose non-owner programs read the
slots the owner program rewrites, and the emulator's test-only fault that makes the CUDA decode path's
non-owner splits read the active slots.  Then the real kernels, forward and (Triton) backward, are checked on
decode and chunk shapes, every gate kind, MHA/GQA/MQA, several key splits and row blocks, both masks.
"""
import pytest
import torch

from melt_kernels.backends import triton_interpreted
from melt_kernels.checks import check_inputs
from utils import bits, make_case

try:
    from melt_kernels import cuda_backend
except ImportError:
    cuda_backend = None

ORDERS = ("forward", "reverse", 20240607)
needs_emulator = pytest.mark.skipif(cuda_backend is None, reason="melt_kernels._cuda is not built (MELT_BUILD_CUDA=1)")


def _same_results(results: list, what: str) -> None:
    for order, result in zip(ORDERS[1:], results[1:]):
        for name, a, b in zip(("out", "lse", "k_cache", "v_cache", "dq", "dk", "dv", "dk_cache", "dv_cache"),
                              results[0], result):
            assert torch.equal(bits(a), bits(b)), f"{what}: {name} differs between forward and {order} order"


# --- Triton, under the interpreter ---------------------------------------------------------------------------

if triton_interpreted():
    import triton
    import triton.language as tl

    import race_check

    @triton.jit
    def _owner_kernel(buf, out, L, M, BLOCK: tl.constexpr, PLANT: tl.constexpr):
        """Program 0 owns (rewrites) slots [L, L + M) of ``buf``; the others copy the prefix [0, L) to ``out``.
        PLANT 1: they copy [0, L + M), the owner's slots included (read/write race); PLANT 2: they also write
        the owner's slots (write/write race)."""
        i_p = tl.program_id(0)
        o = tl.arange(0, BLOCK)
        if i_p == 0:
            tl.store(buf + L + o, tl.load(buf + L + o, mask=o < M) + 1., mask=o < M)
        else:
            hi = L + M if PLANT == 1 else L
            tl.store(out + i_p * BLOCK + o, tl.load(buf + o, mask=o < hi, other=0.), mask=o < hi)
            if PLANT == 2:
                tl.store(buf + L + o, tl.zeros([BLOCK], tl.float32), mask=o < M)


def _skip_without_race_check():
    if not triton_interpreted():
        pytest.skip("the Triton race check instruments the interpreter (TRITON_INTERPRET=1)")
    reason = race_check.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("plant", [0, 1, 2])
def test_triton_check_catches_planted_race(plant):
    _skip_without_race_check()
    outs, found = [], []
    for order in ORDERS:
        buf, out = torch.arange(32, dtype=torch.float32), torch.zeros(4 * 16)
        with race_check.record_launches(order) as launches:
            _owner_kernel[(4,)](buf, out, 5, 3, BLOCK=16, PLANT=plant)
        (launch,) = launches
        assert launch.programs == 4 and launch.reads > 0 and launch.writes > 0
        found.append({(w, o, kind) for _, w, o, kind in launch.conflicts})
        outs.append((buf, out))
    if plant == 0:
        assert found == [set()] * 3
        _same_results(outs, "the race-free kernel")
    else:
        # Every non-owner program is caught with the owner over the owner's slots.
        kind = "read" if plant == 1 else "write"
        assert all({p for w, o, k in f if k == kind for p in (w, o)} == {0, 1, 2, 3} for f in found), found
    if plant == 1:  # the read race also shows in the results: the owner runs first in one order, last in another
        assert not torch.equal(outs[0][1], outs[1][1])


# (batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len, gate_kind, causal, dtype, block_r, split_len)
# block_r 16 cuts M * G rows into several row blocks (the chunk path's separate owner program), split_len
# several key splits; None lets the launcher choose.
# The decode path's folded merge (the split that finishes last reads the others' partial results, ordered by
# an atomic arrival counter) is communication this check cannot see (atomics are not logged): not run here.
TRITON_CASES = [
    (2, 1, 4, 2, 16, 70, "head", True, torch.float32, 16, 16, "decode"),         # GQA, 4 splits, owner = split 0
    (3, 2, 3, 1, 24, 50, "float", False, torch.bfloat16, 16, 32, "decode"),      # MQA, 2 active tokens
    (2, 20, 2, 1, 16, 60, "element", True, torch.float32, 16, 16, "chunk"),      # blend, 3 row blocks x 4 splits
    (1, 9, 4, 2, 16, 45, "separate", False, torch.float16, 16, None, "chunk"),   # GQA, launcher's own splits
    (2, 12, 2, 2, 32, 40, "none", True, torch.float32, 16, 16, "chunk"),         # write-through, MHA, row blocks
    (2, 5, 4, 2, 16, 30, "broadcast", True, torch.bfloat16, None, 16, "decode"),  # one gate per kv head, 2 splits
]


def _triton_call(case, causal, block_r, split_len, seed, path):
    """Forward launcher on ``case`` (caches updated in place, the active slots' old and new values written
    aside), then the backward launcher on its results with the blend's backward, deterministic (dQ by its own
    kernel: the atomic dQ is not logged)."""
    from melt_kernels.kernels.bwd import gated_kv_attention_bwd
    from melt_kernels.kernels.fwd import gated_kv_attention_fwd
    from melt_kernels.reference import BlendGrad

    p = check_inputs(*case.args(), causal=causal)
    k_new, v_new, k_old, v_old = (torch.empty(p.k.shape, dtype=p.k.dtype) for _ in range(4))
    out, lse = gated_kv_attention_fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                                      p.softmax_scale, causal, p.max_seqlen_k, block_r=block_r, block_n=16,
                                      split_len=split_len, path=path, k_new=k_new, v_new=v_new,
                                      k_old=k_old if p.gate is not None else None,
                                      v_old=v_old if p.gate_v is not None else None)
    if p.gate is None:
        k_new, v_new = p.k, p.v
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=gen)
    # The cache gradients: what later uses gave the caches (here random), turned into the caches' gradient
    # before the call in place.
    dk_cache, dv_cache = (torch.randn(c.shape, generator=gen).to(c.dtype) for c in (p.k_cache, p.v_cache))
    blend = BlendGrad(p.k, p.v, k_old, v_old, p.gate, p.gate_v, True, True, True, True)
    grads = gated_kv_attention_bwd(p.q, p.k_cache, p.v_cache, k_new, v_new, p.cache_seqlens, out, lse, dout, dlse,
                                   p.softmax_scale, causal, dk_cache, dv_cache, p.max_seqlen_k, blend=blend,
                                   deterministic=True)
    results = (out, lse, p.k_cache, p.v_cache, *(g for g in grads if g is not None), dk_cache, dv_cache)
    return results, dict(q=p.q, k=p.k, v=p.v, k_cache=p.k_cache, v_cache=p.v_cache, out=out, lse=lse,
                         k_old=k_old, v_old=v_old, k_new=k_new, v_new=v_new, dk_cache=dk_cache, dv_cache=dv_cache)


@pytest.mark.parametrize(
    "batch,seqlen_q,heads_q,heads_kv,head_dim,cache_len,gate_kind,causal,dtype,block_r,split_len,path", TRITON_CASES)
def test_triton_kernels_race_free(batch, seqlen_q, heads_q, heads_kv, head_dim, cache_len, gate_kind, causal, dtype,
                                  block_r, split_len, path):
    _skip_without_race_check()
    case = make_case(seqlen_q, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
                     head_dim=head_dim, cache_len=cache_len, dtype=dtype, gate_kind=gate_kind, layout="padded")
    results = []
    for order in ORDERS:
        copy = case.clone()
        with race_check.record_launches(order) as launches:
            result, names = _triton_call(copy, causal, block_r, split_len, seqlen_q, path)
        kernels = [launch.kernel for launch in launches]
        assert {"decode": "decode_kernel", "chunk": "chunk_attention_kernel"}[path] in kernels, kernels
        assert "bwd_dkdv_kernel" in kernels, kernels
        assert all(launch.reads > 0 and launch.writes > 0 for launch in launches)
        assert not any(launch.conflicts for launch in launches), \
            f"{order} order: {race_check.describe(launches, names)}"
        results.append(result)
    _same_results(results, "Triton forward + backward")


# --- CUDA, the host emulator -----------------------------------------------------------------------------------

def _emulated(case, causal, splits, order, fault=None):
    p = check_inputs(*case.args(), causal=causal)
    return cuda_backend.gated_kv_attention_fwd_emulated(
        p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, causal,
        p.max_seqlen_k, splits=splits, order=order, record=True, fault=fault)


@needs_emulator
def test_cuda_recording_catches_planted_race():
    """The test-only fault: in the decode path the splits that do not own the active slots read them too.  The
    recording reports the owner's writes read by other blocks, in k_cache and v_cache, in every order."""
    case = make_case(0, batch=1, seqlen_q=1, heads_q=4, heads_kv=2, head_dim=64, cache_len=200,
                     dtype=torch.float16, gate_kind="head", int_seqlens=True)
    case.cache_seqlens = 150  # every split of 3 holds keys, so every non-owner split reads the active tile
    for order in ORDERS:
        *_, launches = _emulated(case.clone(), True, 3, order, fault="non_owner_reads_active")
        attention = next(launch for launch in launches if launch["kernel"] == "attention")
        assert attention["conflict_bytes"] > 0
        assert {tensor for _, tensor, *_ in attention["conflicts"]} <= {"k_cache", "v_cache"}
        assert all(kind == "read" and writer != other for *_, writer, other, kind in attention["conflicts"])
        # Without the fault, the same call is clean.
        *_, launches = _emulated(case.clone(), True, 3, order)
        assert not any(launch["conflicts"] for launch in launches)


# (batch, seqlen_q, heads_q, heads_kv, head_dim, gate_kind, causal, dtype, splits, extra)
CUDA_CASES = [
    (2, 1, 8, 2, 64, "head", True, torch.bfloat16, 3, 150),        # decode, GQA 4, owner in the last split
    (1, 2, 2, 2, 64, "separate", False, torch.float16, 2, 100),    # decode path with 2 active tokens, MHA
    (1, 33, 4, 2, 64, "element", True, torch.float16, 2, 40),      # chunk path: blend launch, 2 row tiles
    (1, 66, 1, 1, 128, "float", False, torch.bfloat16, 1, 10),     # chunk path, M > BLOCK_N, one split
    (1, 22, 3, 1, 64, "none", True, torch.float16, None, 90),      # MQA, G = 3, write-through, own splits
    (2, 4, 4, 1, 64, "broadcast", True, torch.bfloat16, 4, 200),   # decode, one gate per kv head, 4 splits
]


@needs_emulator
@pytest.mark.parametrize("batch,seqlen_q,heads_q,heads_kv,head_dim,gate_kind,causal,dtype,splits,extra", CUDA_CASES)
def test_cuda_kernels_race_free(batch, seqlen_q, heads_q, heads_kv, head_dim, gate_kind, causal, dtype, splits,
                                extra):
    case = make_case(seqlen_q, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
                     head_dim=head_dim, cache_len=seqlen_q + extra, dtype=dtype, gate_kind=gate_kind,
                     layout="padded")
    results = []
    for order in ORDERS:
        copy = case.clone()
        out, lse, launches = _emulated(copy, causal, splits, order)
        assert "attention" in [launch["kernel"] for launch in launches]
        assert all(launch["reads"] > 0 and launch["writes"] > 0 for launch in launches)
        conflicts = [(launch["kernel"], c) for launch in launches for c in launch["conflicts"]]
        assert not conflicts, f"{order} order: {conflicts[:4]}"
        results.append((out, lse, copy.k_cache, copy.v_cache))
    _same_results(results, "CUDA forward (emulated)")


# --- paged caches (docs/op.md#paged-caches): rows' pages shuffled through one pool ----------------------------------------------

def _paged(case, page_size, seed):
    from utils import page_case

    paged = page_case(case, page_size, seed)
    p = check_inputs(case.q, case.k, case.v, paged.k_pool, paged.v_pool, case.cache_seqlens, case.gate, case.gate_v,
                     block_table=paged.block_table)
    return p, paged


@pytest.mark.parametrize("seqlen_q,heads_q,block_r,gate_kind,path", [(1, 4, None, "element", "decode"),
                                                                     (12, 4, 16, "head", "chunk")])
def test_triton_paged_kernels_race_free(seqlen_q, heads_q, block_r, gate_kind, path):
    """Forward and backward through a block table (decode; chunk with several row blocks), pages of 16."""
    _skip_without_race_check()
    from melt_kernels.kernels.bwd import gated_kv_attention_bwd
    from melt_kernels.kernels.fwd import gated_kv_attention_fwd
    from melt_kernels.reference import active_slots

    case = make_case(seqlen_q, batch=2, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=2, head_dim=16, cache_len=64,
                     dtype=torch.float32, gate_kind=gate_kind)
    case.cache_seqlens = torch.tensor([40, 64 - seqlen_q], dtype=torch.int32)
    results = []
    for order in ORDERS:
        p, paged = _paged(case.clone(), 16, 3)
        table = dict(block_table=paged.block_table)
        with race_check.record_launches(order) as launches:
            out, lse = gated_kv_attention_fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                                              p.softmax_scale, True, p.max_seqlen_k, block_r=block_r, block_n=16,
                                              split_len=16, path=path, **table)
            slots = active_slots(p.cache_seqlens, seqlen_q, p.k_cache, paged.block_table)
            dk_cache, dv_cache = torch.zeros_like(p.k_cache), torch.zeros_like(p.v_cache)
            gen = torch.Generator().manual_seed(seqlen_q)
            grads = gated_kv_attention_bwd(p.q, p.k_cache, p.v_cache, p.k_cache[slots], p.v_cache[slots],
                                           p.cache_seqlens, out, lse, torch.randn(out.shape, generator=gen),
                                           torch.randn(lse.shape, generator=gen), p.softmax_scale, True, dk_cache,
                                           dv_cache, p.max_seqlen_k, **table, deterministic=True)
        names = dict(q=p.q, k=p.k, v=p.v, k_cache=p.k_cache, v_cache=p.v_cache, out=out, lse=lse,
                     block_table=paged.block_table)
        assert "bwd_dkdv_kernel" in [launch.kernel for launch in launches]
        assert not any(launch.conflicts for launch in launches), \
            f"{order} order: {race_check.describe(launches, names)}"
        results.append((out, lse, p.k_cache, p.v_cache, *grads, dk_cache, dv_cache))
    _same_results(results, "Triton paged forward + backward")


@needs_emulator
@pytest.mark.parametrize("seqlen_q,heads_q,splits", [(1, 8, 3), (33, 4, 2)])
def test_cuda_paged_kernels_race_free(seqlen_q, heads_q, splits):
    """The CUDA forward through a block table (decode path; chunk path with its blend launch), pages of 32."""
    case = make_case(seqlen_q, batch=2, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=2, head_dim=64, cache_len=128,
                     dtype=torch.float16, gate_kind="element")
    case.cache_seqlens = torch.tensor([70, 128 - seqlen_q], dtype=torch.int32)
    results = []
    for order in ORDERS:
        p, paged = _paged(case.clone(), 32, 5)
        out, lse, launches = cuda_backend.gated_kv_attention_fwd_emulated(
            p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, True,
            p.max_seqlen_k, block_table=paged.block_table, splits=splits, order=order, record=True)
        assert all(launch["reads"] > 0 and launch["writes"] > 0 for launch in launches)
        conflicts = [(launch["kernel"], c) for launch in launches for c in launch["conflicts"]]
        assert not conflicts, f"{order} order: {conflicts[:4]}"
        results.append((out, lse, p.k_cache, p.v_cache))
    _same_results(results, "CUDA paged forward (emulated)")


@needs_emulator
def test_cuda_recording_sees_aliased_active_pages():
    """Two rows whose tables put their active slots in one page (which the host check refuses, docs/op.md#paged-caches): the
    recording reports the write/write race, so the paged tests above would see a kernel that aliased pages."""
    case = make_case(1, batch=2, seqlen_q=1, heads_q=2, heads_kv=1, head_dim=64, cache_len=64, dtype=torch.float16,
                     gate_kind="head")
    case.cache_seqlens = torch.tensor([40, 40], dtype=torch.int32)
    p, paged = _paged(case, 32, 5)
    table = paged.block_table.clone()
    table[1] = table[0]  # launched directly: check_inputs would refuse it
    *_, launches = cuda_backend.gated_kv_attention_fwd_emulated(
        p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, True,
        p.max_seqlen_k, block_table=table, splits=1, record=True)
    conflicts = [c for launch in launches for c in launch["conflicts"]]
    assert any(kind == "write" and tensor in ("k_cache", "v_cache") for _, tensor, _, _, kind in conflicts)
