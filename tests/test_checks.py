"""Bad input (docs/op.md#bad-input): a clear ValueError/TypeError naming the argument, both caches left
bit-identical."""
import pytest
import torch

import melt_kernels
from melt_kernels import backends
from melt_kernels.backends import interpreter_incompatibility, select_backend, triton_interpreted
from melt_kernels.checks import check_inputs
from utils import bits, make_case

B, M, HQ, HKV, D, S = 2, 3, 4, 2, 16, 8


def _base():
    case = make_case(0, batch=B, seqlen_q=M, heads_q=HQ, heads_kv=HKV, head_dim=D, cache_len=S, gate_kind="head")
    return dict(q=case.q, k=case.k, v=case.v, k_cache=case.k_cache, v_cache=case.v_cache,
                cache_seqlens=case.cache_seqlens, gate=case.gate, gate_v=None)


def _set(**changes):
    return lambda a: {**a, **changes}


def _with(name, fn):
    return lambda a: {**a, name: fn(a[name])}


def _head_dim(d):
    def change(a):
        return {**a, **{n: torch.randn(*a[n].shape[:3], d) for n in ("q", "k", "v", "k_cache", "v_cache")},
                "gate": None}
    return change


BAD = [
    # (case id, change to the valid arguments, exception, words the message must contain)
    ("q not a tensor", _with("q", lambda t: t.numpy()), TypeError, "q must be a torch.Tensor"),
    ("q rank 3", _with("q", lambda t: t[0]), ValueError, "q must have 4 dimensions"),
    ("k_cache rank 5", _with("k_cache", lambda t: t[None]), ValueError, "k_cache must have 4 dimensions"),
    ("k batch mismatch", _with("k", lambda t: t[:1]), ValueError, "k must have shape"),
    ("v seq mismatch", _with("v", lambda t: t[:, :2]), ValueError, "v must have shape"),
    ("k head_dim mismatch", _with("k", lambda t: torch.randn(B, M, HKV, D + 1)), ValueError, "k must have shape"),
    ("k_cache heads mismatch", _with("k_cache", lambda t: torch.randn(B, S, HKV + 1, D)), ValueError,
     "k_cache must have shape"),
    ("v_cache length differs", _with("v_cache", lambda t: torch.randn(B, S + 1, HKV, D)), ValueError,
     "v_cache must have shape"),
    ("v_cache batch", _with("v_cache", lambda t: torch.randn(B + 1, S, HKV, D)), ValueError,
     "v_cache must have shape"),
    ("Hq not multiple of Hkv", lambda a: {**a, "q": torch.randn(B, M, 3, D)}, ValueError, "multiple of the number"),
    ("mixed dtype", _with("v", lambda t: t.double()), TypeError, "v must have q's dtype"),
    ("mixed cache dtype", _with("k_cache", lambda t: t.half()), TypeError, "k_cache must have q's dtype"),
    ("integer q", lambda a: {**a, **{n: a[n].to(torch.int32) for n in ("q", "k", "v", "k_cache", "v_cache")}},
     TypeError, "q must be float16, bfloat16, float32 or float64"),
    ("device mismatch", _with("k", lambda t: t.to("meta")), ValueError, "k must be on q's device"),
    ("q last dim strided", _with("q", lambda t: torch.randn(B, M, HQ, 2 * D)[..., ::2]), ValueError,
     "q must have a contiguous last dimension"),
    ("k_cache last dim strided", _with("k_cache", lambda t: torch.randn(B, S, HKV, 2 * D)[..., ::2]), ValueError,
     "k_cache must have a contiguous last dimension"),
    ("k_cache expanded", _with("k_cache", lambda t: t[:1].expand(B, S, HKV, D)), ValueError,
     "k_cache has a stride-0"),
    ("same cache twice", lambda a: {**a, "v_cache": a["k_cache"]}, ValueError, "k_cache and v_cache must be distinct"),
    ("head_dim 8", _head_dim(8), ValueError, "head_dim (q.shape[3]) must be in [16, 256]"),
    ("head_dim 264", _head_dim(264), ValueError, "head_dim (q.shape[3]) must be in [16, 256]"),
    ("seqlens float", _set(cache_seqlens=torch.zeros(B)), TypeError, "cache_seqlens must be int32 or int64"),
    ("seqlens bool", _set(cache_seqlens=True), TypeError, "cache_seqlens must be a Python int"),
    ("seqlens list", _set(cache_seqlens=[0, 1]), TypeError, "cache_seqlens must be a Python int"),
    ("seqlens shape", _set(cache_seqlens=torch.zeros(B, 1, dtype=torch.int32)), ValueError,
     "cache_seqlens must have shape (2,)"),
    ("seqlens negative", _set(cache_seqlens=torch.tensor([0, -1], dtype=torch.int32)), ValueError,
     "cache_seqlens[1] = -1 is outside [0, S - M] = [0, 5]"),
    ("seqlens overflow", _set(cache_seqlens=torch.tensor([6, 0])), ValueError,
     "cache_seqlens[0] = 6 is outside [0, S - M] = [0, 5]"),
    ("int seqlens overflow", _set(cache_seqlens=6), ValueError, "cache_seqlens must be in [0, S - M] = [0, 5]"),
    ("cache shorter than M", lambda a: {**a, "k_cache": a["k_cache"][:, :2], "v_cache": a["v_cache"][:, :2]},
     ValueError, "fewer than the M=3 active tokens"),
    ("int seqlens negative", _set(cache_seqlens=-1), ValueError, "cache_seqlens must be in [0, S - M]"),
    ("gate does not broadcast", _set(gate=torch.rand(B, M, 3, 1)), ValueError,
     "gate of shape (2, 3, 3, 1) does not broadcast to (B, M, Hkv, D) = (2, 3, 2, 16)"),
    ("gate too many dims", _set(gate=torch.rand(1, B, M, HKV, 1)), ValueError, "gate of shape (1, 2, 3, 2, 1)"),
    ("gate_v does not broadcast", _set(gate_v=torch.rand(D + 1)), ValueError, "gate_v of shape (17,)"),
    ("gate integer tensor", _set(gate=torch.ones(B, M, HKV, 1, dtype=torch.int64)), TypeError,
     "gate must be a floating-point tensor"),
    ("gate string", _set(gate="0.5"), TypeError, "gate must be None, a float or a floating-point tensor"),
    ("gate nan float", _set(gate=float("nan")), ValueError, "gate must be finite"),
    ("gate on other device", _set(gate=torch.rand(1, device="meta")), ValueError, "gate must be on cpu"),
    ("gate_v without gate", _set(gate=None, gate_v=0.5), ValueError, "gate_v was given without gate"),
    ("softmax_scale string", lambda a: {**a, "softmax_scale": "1"}, TypeError, "softmax_scale must be a float"),
    ("softmax_scale inf", lambda a: {**a, "softmax_scale": float("inf")}, ValueError, "softmax_scale must be finite"),
    ("causal int", lambda a: {**a, "causal": 1}, TypeError, "causal must be a bool"),
    ("unknown backend", lambda a: {**a, "backend": "flash"}, ValueError, "backend must be one of"),
    ("leaf cache requiring grad", _with("k_cache", lambda t: t.clone().requires_grad_()), ValueError,
     "k_cache is (a view of) a leaf tensor that requires grad"),
    ("empty batch", lambda a: {**a, **{n: a[n][:0] for n in ("q", "k", "v", "k_cache", "v_cache")},
                               "cache_seqlens": 0, "gate": None}, ValueError, "at least one row"),
]


@pytest.mark.parametrize("change, error, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_before_any_write(change, error, words):
    args = change(_base())
    caches = [t for t in (args["k_cache"], args["v_cache"]) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = [bits(t) for t in caches]
    backend = args.pop("backend", "reference")
    with pytest.raises(error) as info:
        melt_kernels.gated_kv_attention(**args, backend=backend)
    assert words in str(info.value)
    for t, b in zip(caches, before):
        assert torch.equal(bits(t), b)


def test_valid_edge_cases_are_accepted():
    """The bounds themselves are legal: L_b = S - M, L_b = 0, int64 lengths, D = 16 and 256, a 0-d gate."""
    for d in (16, 256):
        a = _head_dim(d)(_base())
        melt_kernels.gated_kv_attention(**{**a, "cache_seqlens": torch.tensor([S - M, 0])}, backend="reference")
    melt_kernels.gated_kv_attention(**{**_base(), "gate": torch.tensor(0.5)}, backend="reference")
    melt_kernels.gated_kv_attention(**{**_base(), "gate": 0.5, "gate_v": 1}, backend="reference")


def test_unavailable_backends_raise_clearly():
    a = _base()
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        melt_kernels.gated_kv_attention(**a, backend="cuda")
    if not torch.cuda.is_available() and not triton_interpreted():
        with pytest.raises(RuntimeError, match="backend 'triton'"):
            melt_kernels.gated_kv_attention(**a, backend="triton")
    if "triton" not in melt_kernels.available_backends():
        return
    with pytest.raises(RuntimeError, match="float64"):
        melt_kernels.gated_kv_attention(**{n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                           else t for n, t in a.items()}, backend="triton")


def test_auto_takes_the_backends_in_the_measured_order(monkeypatch):
    """Where both kernel backends could run a problem, "auto" takes the one the GPU pass measured faster
    (Triton), and falls to the other only when the first cannot run it."""
    loaded = {name: backends.Backend(name, None, None) for name in backends.KERNEL_BACKENDS}
    refusals = {}
    monkeypatch.setattr(backends, "_usable", lambda name: None)
    monkeypatch.setattr(backends, "why_not", lambda name, problem: refusals.get(name))
    monkeypatch.setattr(backends, "_load", loaded.__getitem__)
    monkeypatch.setattr(backends, "triton_interpreted", lambda: True)
    assert backends.KERNEL_BACKENDS == ("triton", "cuda")
    assert melt_kernels.available_backends() == ["triton", "cuda", "reference"]
    problem = check_inputs(**_base())
    assert select_backend("auto", problem).name == "triton"
    refusals["triton"] = "no"
    assert select_backend("auto", problem).name == "cuda"
    refusals["cuda"] = "no"
    assert select_backend("auto", problem).name == "reference"


def test_auto_picks_reference_on_cpu_unless_interpreted():
    available = melt_kernels.available_backends()
    assert available[-1] == "reference"
    problem = check_inputs(**_base())
    chosen = select_backend("auto", problem).name
    assert chosen == ("triton" if triton_interpreted() and "triton" in available else "reference")
    problem64 = check_inputs(**{n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                for n, t in _base().items()})
    assert select_backend("auto", problem64).name == "reference"


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.6.1+git5a1b2c3", "2.4.0rc1", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.1", False), ("3.10.0", "3.0.0", False)])
def test_interpreter_incompatibility_by_version(triton_version, numpy_version, broken):
    """Triton < 3.7's interpreter cannot run beside NumPy >= 2.4; the reason names both and the way out."""
    reason = interpreter_incompatibility(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert triton_version in reason and numpy_version in reason and "numpy<2.4" in reason


def test_broken_interpreter_is_never_chosen_and_is_named(monkeypatch):
    """Where the interpreter cannot run the kernels, auto keeps CPU tensors on the reference and an explicit
    backend="triton" raises the reason before anything is written."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "interpreter_incompatibility", lambda *versions: "broken: install 'numpy<2.4'")
    a = _base()
    before = [bits(a["k_cache"]), bits(a["v_cache"])]
    assert select_backend("auto", check_inputs(**a)).name == "reference"
    with pytest.raises(RuntimeError, match="numpy<2.4"):
        melt_kernels.gated_kv_attention(**a, backend="triton")
    assert all(torch.equal(bits(a[name]), b) for name, b in zip(("k_cache", "v_cache"), before))
    if not torch.cuda.is_available():
        assert "triton" not in melt_kernels.available_backends()
