"""melt_kernels.graphs: the capturable decode step (docs/op.md#cuda-graphs-and-host-cost).

On the CPU: the step that CapturedDecode captures reads no tensor value on the host (every op of it is traced
with a TorchDispatchMode, and the op's host checks are made to treat the CPU lengths and table as device
tensors, as they are on a GPU), runs the same ops with the same shapes at any length (so one graph serves every
length), and stepping it (lengths advanced in place) gives the tokens and logits of eager decoding.  On a GPU
(``gpu`` marker): the real capture and replay against the same step run eagerly, bit for bit.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import melt_kernels.checks
from melt_kernels import PagedCache
from melt_kernels.backends import triton_interpreted
from melt_kernels.graphs import CapturedDecode
from test_model import tiny_model, token_ids

# Ops that read a tensor's values on the host (a device-to-host copy and sync on a GPU) or whose output shape
# depends on values (a sync too).
HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "unique", "_unique", "_unique2",
              "unique_dim", "unique_consecutive", "masked_select", "equal", "allclose", "bincount", "repeat_interleave"}


class OpTrace(TorchDispatchMode):
    """Records every aten op with the shapes and dtypes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        shapes = tuple((tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor))
        self.ops.append((func.overloadpacket.__name__, shapes))
        return out


def device_resident(monkeypatch, refuse_reads=False):
    """The op's checks treat every lengths/table tensor as on the device (no value checks), as on a GPU; with
    ``refuse_reads`` the Tensor methods that read values on the host raise."""
    monkeypatch.setattr(melt_kernels.checks, "lengths_on_host", lambda t: False)
    for name in ("tolist", "item", "numpy", "cpu") if refuse_reads else ():
        def refuse(self, *args, _name=name, **kwargs):
            raise AssertionError(f"Tensor.{_name}() in the capturable step")
        monkeypatch.setattr(torch.Tensor, name, refuse)


def traced_step(model, cache):
    step = CapturedDecode(model, cache, capture=False)
    step._host_checks(cache.batch)  # outside the graph: room and the page of position L_b
    with OpTrace() as trace:
        step._body()
    return trace.ops


def paged(model, prompt_len, seed):
    cache = PagedCache(model.new_page_pool("melt", num_blocks=8, page_size=16), batch=2, max_seqlen=64)
    model.prefill(token_ids(seed, 2, prompt_len), cache, 8)
    return cache


BACKENDS = ["reference"] + (["triton"] if triton_interpreted() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_step_reads_nothing_on_host_and_is_shape_determined(backend):
    model = tiny_model(2, loops=2, dtype=torch.float32, gate="kv-element")
    model.backend = backend
    short, long = paged(model, 5, 1), paged(model, 37, 2)  # one page per row vs three, lengths differ
    with pytest.MonkeyPatch.context() as mp:
        device_resident(mp)
        ops_short, ops_long = traced_step(model, short), traced_step(model, long)
    assert ops_short and ops_short == ops_long, "the step's ops or their shapes depend on the lengths"
    reads = [name for name, _ in ops_short if name in HOST_READS]
    assert not reads, f"the capturable step reads tensor values on the host: {reads}"
    # The device lengths advanced in place, the host's are the caller's.
    assert short.seqlens.tolist() == [6, 6] and short.seqlens_host.tolist() == [5, 5]


def test_step_reads_no_value_through_tensor_methods():
    model = tiny_model(3, loops=2, dtype=torch.float32)
    cache = PagedCache(model.new_page_pool("melt", num_blocks=4, page_size=16), batch=2, max_seqlen=32)
    step = CapturedDecode(model, cache, capture=False)
    step._host_checks(2)
    with pytest.MonkeyPatch.context() as mp:
        device_resident(mp, refuse_reads=True)
        step._body()  # raises from a patched Tensor.tolist/item/numpy/cpu if the step calls one


def test_uncapturable_forward_is_caught():
    """The trace sees a host read when there is one: the ordinary forward plans by the host lengths' values."""
    model = tiny_model(4, loops=1, dtype=torch.float32)
    cache = paged(model, 5, 4)
    with OpTrace() as trace:
        model(token_ids(0, 2, 1), cache)
    assert any(name in HOST_READS for name, _ in trace.ops)


@pytest.mark.parametrize("kind", ["melt", "looplm"])
def test_stepping_matches_eager_decoding(kind):
    """Replay semantics: tokens fed one per step, lengths advanced in place, pages taken as rows cross into
    new ones; the same tokens and logits as eager generation on a contiguous cache."""
    model = tiny_model(5, loops=3, gate="latent")
    prompt = token_ids(5, 2, 13)
    new_tokens = 7  # 13 + 7 crosses the first page boundary
    contiguous = model.new_cache(kind, 2, 32)
    expected = [model.prefill(prompt, contiguous, last_only=True)[:, -1]]
    for _ in range(new_tokens - 1):
        expected.append(model(expected[-1].argmax(-1)[:, None], contiguous, last_only=True)[:, -1])
    cache = PagedCache(model.new_page_pool(kind, num_blocks=6, page_size=16), batch=2, max_seqlen=32)
    got = [model.prefill(prompt, cache, last_only=True)[:, -1]]
    step = CapturedDecode(model, cache)
    assert not step.captured
    for _ in range(new_tokens - 1):
        got.append(step.step(got[-1].argmax(-1)))
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-12, rtol=1e-12)
    assert cache.seqlens_host.tolist() == cache.seqlens.tolist() == [13 + new_tokens - 1] * 2


# --- on a GPU -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["melt", "looplm"])
def test_gpu_graph_replay_matches_eager_bit_for_bit(backend, kind):
    if backend == "cuda" and "cuda" not in melt_kernels.available_backends():
        pytest.skip("melt_kernels._cuda is not built")
    model = tiny_model(6, loops=2, dtype=torch.bfloat16, gate="kv-head", head_dim=64, num_attention_heads=4,
                       num_key_value_heads=2).cuda()
    model.backend = backend
    prompt = token_ids(6, 3, 29).cuda()
    caches = [PagedCache(model.new_page_pool(kind, num_blocks=12, page_size=16), batch=3, max_seqlen=96)
              for _ in range(2)]
    first = [model.prefill(prompt, c, 16, last_only=True)[:, -1] for c in caches]
    graph, eager = CapturedDecode(model, caches[0]), CapturedDecode(model, caches[1], capture=False)
    assert graph.captured
    tokens = first[0].argmax(-1)
    for _ in range(20):  # 29 + 20 crosses two page boundaries
        out_graph, out_eager = graph.step(tokens), eager.step(tokens)
        assert torch.equal(out_graph, out_eager)
        tokens = out_graph.argmax(-1)
    for (k0, v0), (k1, v1) in ((c.pool.pair(i, r) for c in caches) for i in range(model.config.num_hidden_layers)
                               for r in range(1 if kind == "melt" else 2)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
