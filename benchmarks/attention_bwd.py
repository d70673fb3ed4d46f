"""Training benchmark: forward + backward of a chunk through the fused op, against PyTorch SDPA.

For a chunk of M = 256 active tokens over a cache of 8k settled tokens (D = 128, bfloat16, causal,
bottom-right aligned, one gate per kv head), it times, median of triton.testing.do_bench:

* fused: ``melt_kernels.gated_kv_attention`` forward + backward (backend "triton", and "cuda" when built),
  gradients for q, k, v, the gate and (``cache_grad``) the cache's prefix;
* sdpa: ``F.scaled_dot_product_attention`` forward + backward over the same L + M keys (no cache update),
  dK/dV over every key when ``cache_grad``, as the fused op's cache gradient;
* bwd kernels: the backend's backward launcher alone on saved inputs (what the fused backward adds to the
  blend's few element-wise ops);

with the fused/SDPA time ratio (target <= 1.5) and TFLOP/s (forward 4*M*N*D per head, backward 2.5x that,
N the keys each causal query sees).  Results go to JSON (``--out``) with device, date and commit.

    python benchmarks/attention_bwd.py                     # needs a CUDA GPU; prints a note and exits 0 without
    python benchmarks/attention_bwd.py --out results/x.json
    TRITON_INTERPRET=1 python benchmarks/attention_bwd.py --quick   # CPU smoke test of the script, no timings
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import melt_kernels
from melt_kernels.backends import select_backend
from melt_kernels.checks import check_inputs
from common import median_ms, run_meta, setup, write_results

TARGET = "fused forward + backward <= 1.5x SDPA forward + backward"


@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen_q: int
    cache_len: int  # settled tokens L of every row; the cache holds L + M positions
    heads_q: int
    heads_kv: int
    head_dim: int = 128

    @property
    def label(self) -> str:
        return f"B={self.batch} M={self.seqlen_q} L={self.cache_len} H={self.heads_q}/{self.heads_kv} " \
               f"D={self.head_dim}"


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape(1, 20, 24, 4, 2, 16)]
    return [Shape(4, 256, 8192, hq, hkv) for hq, hkv in ((16, 16), (32, 8))] + [Shape(4, 64, 8192, 32, 8)]


def flops(s: Shape) -> tuple[float, float]:
    """(forward, backward) FLOPs: QK^T and PV over the keys each causal query sees; backward 2.5x."""
    keys = s.seqlen_q * s.cache_len + s.seqlen_q * (s.seqlen_q + 1) / 2
    fwd = 4.0 * s.batch * s.heads_q * keys * s.head_dim
    return fwd, 2.5 * fwd


class _Requires(torch.autograd.Function):
    """Gives a cache a history (so the op computes its gradient) without copying it: declares a no-op
    in-place write, whose backward drops the cache gradient."""

    @staticmethod
    def forward(ctx, cache, anchor):
        ctx.mark_dirty(cache)
        return cache

    @staticmethod
    def backward(ctx, grad):
        return None, None


class Inputs:
    def __init__(self, s: Shape, dtype, device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        total = s.cache_len + s.seqlen_q
        self.shape = s
        self.q = randn(s.batch, s.seqlen_q, s.heads_q, s.head_dim).requires_grad_()
        self.k = randn(s.batch, s.seqlen_q, s.heads_kv, s.head_dim).requires_grad_()
        self.v = randn(s.batch, s.seqlen_q, s.heads_kv, s.head_dim).requires_grad_()
        self.gate = torch.rand(s.batch, s.seqlen_q, s.heads_kv, 1, generator=gen, device=device).requires_grad_()
        self.k_cache, self.v_cache = randn(s.batch, total, s.heads_kv, s.head_dim), randn(s.batch, total,
                                                                                          s.heads_kv, s.head_dim)
        self.lengths = torch.full((s.batch,), s.cache_len, dtype=torch.int32, device=device)
        self.dout = randn(s.batch, s.seqlen_q, s.heads_q, s.head_dim)
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        # SDPA's operands: (B, H, N, D) views of the same storage; bottom-right causal mask.
        self.q_t = self.q.detach().transpose(1, 2).requires_grad_()
        self.k_t = self.k_cache.transpose(1, 2).detach()
        self.v_t = self.v_cache.transpose(1, 2).detach()
        self.dout_t = self.dout.transpose(1, 2)
        self.mask = self._bottom_right_mask(device)

    def _bottom_right_mask(self, device):
        """SDPA's lower-right causal bias where its fused kernels take it, else a materialised boolean mask."""
        from torch.nn.attention.bias import causal_lower_right
        s = self.shape
        bias = causal_lower_right(s.seqlen_q, s.cache_len + s.seqlen_q)
        try:
            self.sdpa(bias, cache_grad=True)
            return bias
        except RuntimeError:
            keys = torch.arange(s.cache_len + s.seqlen_q, device=device)
            return keys[None, :] <= s.cache_len + torch.arange(s.seqlen_q, device=device)[:, None]

    def sdpa(self, mask, cache_grad: bool):
        s = self.shape
        k, v = (t.requires_grad_(cache_grad) for t in (self.k_t, self.v_t))
        out = F.scaled_dot_product_attention(self.q_t, k, v, attn_mask=mask, enable_gqa=s.heads_q != s.heads_kv)
        out.backward(self.dout_t)

    def fused(self, backend: str, cache_grad: bool):
        k_cache, v_cache = self.k_cache, self.v_cache
        if cache_grad:
            k_cache, v_cache = _Requires.apply(k_cache, self.anchor), _Requires.apply(v_cache, self.anchor)
        out = melt_kernels.gated_kv_attention(self.q, self.k, self.v, k_cache, v_cache, self.lengths, self.gate,
                                              backend=backend)
        out.backward(self.dout)
        if cache_grad:  # drop the history so the next call starts a fresh graph
            self.k_cache.detach_()
            self.v_cache.detach_()

    def bwd_kernels(self, backend: str, cache_grad: bool):
        """The backend's backward launcher alone, on the arguments its forward would have saved."""
        p = check_inputs(self.q.detach(), self.k.detach(), self.v.detach(), self.k_cache, self.v_cache,
                         self.lengths, self.gate.detach())
        impl = select_backend(backend, p)
        with torch.no_grad():
            out, lse = impl.fwd(p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v,
                                p.softmax_scale, True, p.max_seqlen_k)
        s = self.shape
        k_new = self.k_cache[:, s.cache_len:].clone()
        v_new = self.v_cache[:, s.cache_len:].clone()
        # The caches' gradient buffers the backward adds into (autograd allocates them once per chain of calls).
        buffers = [torch.zeros_like(c) for c in (p.k_cache, p.v_cache)] if cache_grad else [None, None]
        return lambda: impl.bwd(p.q, p.k_cache, p.v_cache, k_new, v_new, p.cache_seqlens, out, lse, self.dout,
                                None, p.softmax_scale, True, *buffers, p.max_seqlen_k)

    def leaves(self):
        return [self.q, self.k, self.v, self.gate, self.q_t, self.k_t, self.v_t, self.anchor]


def bench(grad_to_none=None):
    """triton.testing.do_bench's median, resetting ``grad_to_none``'s gradients between runs so that backward
    does not time their accumulation."""
    def run(fn) -> float:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")
    return run


def run_shape(s: Shape, backends: list[str], dtype, device, cuda: bool) -> dict:
    inputs = Inputs(s, dtype, device)
    fwd_flops, bwd_flops = flops(s)
    row = dict(shape=asdict(s), label=s.label, fwd_flops=fwd_flops, bwd_flops=bwd_flops,
               sdpa_mask="lower-right bias" if not isinstance(inputs.mask, torch.Tensor) else "boolean mask")
    for cache_grad in (True, False):
        key = "cache_grad" if cache_grad else "no_cache_grad"
        entry = row[key] = {}
        entry["sdpa_ms"] = median_ms(lambda: inputs.sdpa(inputs.mask, cache_grad), cuda, bench(inputs.leaves()))
        for b in backends:
            ms = median_ms(lambda: inputs.fused(b, cache_grad), cuda, bench(inputs.leaves()))
            bwd_ms = median_ms(inputs.bwd_kernels(b, cache_grad), cuda, bench())
            entry[b] = dict(ms=ms, over_sdpa=ms / entry["sdpa_ms"], tflops=(fwd_flops + bwd_flops) / (ms * 1e-3) / 1e12,
                            bwd_kernels_ms=bwd_ms, bwd_kernels_tflops=bwd_flops / (bwd_ms * 1e-3) / 1e12)
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(meta: dict, rows: list[dict], backends: list[str]) -> str:
    lines = [f"# Attention forward + backward benchmark: {meta['device']}, {meta['date']}, commit "
             f"{meta['commit'][:12]}", "", f"{meta['dtype']}, causal, one gate per kv head; {meta['timing']}. "
             f"Target: {TARGET}.", "",
             "'x SDPA' is the fused op's forward + backward time over SDPA's on the same keys; 'bwd kernels' "
             "the backward launcher alone.", ""]
    head = ["shape", "cache grad", "sdpa ms"]
    for b in backends:
        head += [f"{b} ms", f"{b} x SDPA", f"{b} TFLOP/s", f"{b} bwd kernels ms", f"{b} bwd TFLOP/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for key in ("cache_grad", "no_cache_grad"):
            e = r[key]
            cells = [r["label"], "yes" if key == "cache_grad" else "no", f"{e['sdpa_ms']:.3f}"]
            for b in backends:
                k = e[b]
                cells += [f"{k['ms']:.3f}", f"{k['over_sdpa']:.2f}", f"{k['tflops']:.0f}",
                          f"{k['bwd_kernels_ms']:.3f}", f"{k['bwd_kernels_tflops']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    env = setup(__doc__, "attention_bwd", argv)
    if env is None:
        return 0
    import triton
    timing = "median of triton.testing.do_bench" if env.cuda else "CPU smoke test: not timings"
    meta = run_meta(env.device_name, triton=triton.__version__, dtype=str(env.dtype), backends=env.backends,
                    target=TARGET, timing=timing)
    print(f"{env.device_name}: backends {env.backends}", flush=True)
    rows = []
    for s in shapes(env.args.quick):
        rows.append(run_shape(s, env.backends, env.dtype, env.device, env.cuda))
        print(s.label, json.dumps({k: rows[-1][k] for k in ("cache_grad", "no_cache_grad")}), flush=True)
    write_results(env.args.out, "attention_bwd", meta, rows, markdown(meta, rows, env.backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
