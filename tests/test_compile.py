"""The op under torch.library and torch.compile (melt_kernels/library.py).

* ``torch.library.opcheck`` on ``melt::gated_kv_attention``: schema (the caches' mutation declared, nothing
  else mutated, outputs not aliasing inputs), fake implementation, AOT dispatch with dynamic shapes;
* ``torch.compile(fullgraph=True)`` of inference calls (a chunk's T loops on one cache, every gate form):
  no graph break, and the same out/lse/caches as eager, the caches updated in place;
* training under torch.compile runs the eager autograd path behind a graph break and gives eager's
  gradients; with fullgraph=True that graph break is reported.
* ``import melt_kernels`` leaves the registration (which needs torch._dynamo, ~1.5 s to import) to the first
  trace of the op, and that first trace still compiles with no graph break.
The Triton backend is compiled too when it can run here (GPU, or TRITON_INTERPRET=1).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo

import melt_kernels
import melt_kernels.library  # noqa: F401  (registers melt::gated_kv_attention)
from melt_kernels.backends import triton_interpreted
from utils import bits, make_case

BACKENDS = ["reference"] + (["triton"] if triton_interpreted() or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu"


def _case(gate_kind="head", dtype=torch.float32, layout="contiguous", int_seqlens=False, seed=0):
    return make_case(seed, batch=2, seqlen_q=3, heads_q=4, heads_kv=2, head_dim=16, cache_len=12, dtype=dtype,
                     device=DEVICE, gate_kind=gate_kind, layout=layout, int_seqlens=int_seqlens)


def _split(case):
    """The custom op's arguments for ``case`` (gates and lengths split into their schema forms)."""
    def parts(gate):
        return (gate, None) if gate is None or isinstance(gate, torch.Tensor) else (None, gate)
    seqlens = (case.cache_seqlens, None) if isinstance(case.cache_seqlens, torch.Tensor) else \
        (None, case.cache_seqlens)
    (gate, gate_f), (gate_v, gate_v_f) = parts(case.gate), parts(case.gate_v)
    return (case.q, case.k, case.v, case.k_cache, case.v_cache, *seqlens, gate, gate_v, gate_f, gate_v_f, None,
            True, "reference")


@pytest.mark.parametrize("gate_kind", ["none", "float", "head", "broadcast", "separate"])
@pytest.mark.parametrize("int_seqlens", [False, True])
def test_opcheck(gate_kind, int_seqlens):
    case = _case(gate_kind, int_seqlens=int_seqlens)
    torch.library.opcheck(torch.ops.melt.gated_kv_attention.default, _split(case))


def _loops(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, backend, loops=3):
    """A chunk's loops on one cache, as a looped model runs them."""
    outs = []
    for _ in range(loops):
        out, lse = melt_kernels.gated_kv_attention(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v,
                                                   return_lse=True, backend=backend)
        outs += [out, lse]
        q, k, v = out, out[:, :, ::2], out[:, :, 1::2]
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_kind,compiler,layout,int_seqlens", [
    ("head", "inductor", "contiguous", False),
    ("separate", "aot_eager", "padded", True),
    ("float", "aot_eager", "heads_first", False),
    ("none", "aot_eager", "contiguous", True),
])
def test_compile_inference_fullgraph(backend, gate_kind, compiler, layout, int_seqlens):
    if backend == "triton" and compiler == "inductor" and DEVICE == "cpu":
        pytest.skip("inductor's CPU code calls the op eagerly like aot_eager; one interpreted compile suffices")
    compiled_case, eager_case = _case(gate_kind, layout=layout, int_seqlens=int_seqlens).clone(), None
    eager_case = compiled_case.clone()
    k_cache, v_cache = compiled_case.k_cache, compiled_case.v_cache
    torch._dynamo.reset()
    compiled = torch.compile(_loops, fullgraph=True, backend=compiler)
    with torch.no_grad():
        got = compiled(*compiled_case.args(), backend)
        want = _loops(*eager_case.args(), backend)
    # In place: the very tensors passed in hold the update.
    assert compiled_case.k_cache is k_cache and compiled_case.v_cache is v_cache
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    for g, w in ((compiled_case.k_cache, eager_case.k_cache), (compiled_case.v_cache, eager_case.v_cache)):
        assert torch.equal(bits(g), bits(w))


def _loss(q, k, v, k_cache, v_cache, cache_seqlens, gate, backend):
    outs = _loops(q, k, v, k_cache, v_cache, cache_seqlens, gate, None, backend, loops=2)
    return sum((t * t).sum() for t in outs) + k_cache.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_training_matches_eager(backend):
    base = _case("head", seed=3)
    grads = []
    for fn in (torch.compile(_loss, backend="aot_eager"), _loss):
        case = base.clone()
        leaves = [case.q, case.k, case.v, case.gate]
        for t in leaves:
            t.requires_grad_()
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        fn(case.q, case.k, case.v, k_cache, v_cache, case.cache_seqlens, case.gate, backend).backward()
        grads.append([t.grad for t in leaves])
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_fullgraph_training_reports_the_graph_break():
    case = _case("head")
    case.q.requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compiled(case.q, case.k, case.v, case.k_cache, case.v_cache, case.cache_seqlens, case.gate, "reference")


_FIRST_TRACE_REGISTERS = r"""
import sys
import torch
import melt_kernels

assert "melt_kernels.library" not in sys.modules and "torch._dynamo" not in sys.modules, "imported eagerly"
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 2, 16, generator=gen) for _ in range(3))
caches = [torch.randn(1, 6, 2, 16, generator=gen) for _ in range(2)]
caches += [c.clone() for c in caches]


def step(q, k, v, k_cache, v_cache):
    return melt_kernels.gated_kv_attention(q, k, v, k_cache, v_cache, 3, 0.5, backend="reference")


with torch.no_grad():
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, *caches[:2])
    want = step(q, k, v, *caches[2:])
torch.testing.assert_close(got, want)
assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
print("ok")
"""


def test_first_trace_registers_the_op():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _FIRST_TRACE_REGISTERS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
