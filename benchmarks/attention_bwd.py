"""Training benchmark: forward + backward of a chunk through the fused op, beside its peers.

For chunks of M active tokens over a cache of L settled tokens (bottom-right causal, one gate per kv
head), it times, median of triton.testing.do_bench:

* fused: ``melt_kernels.gated_kv_attention`` forward + backward (each kernel backend), gradients for q, k,
  v, the gate and (``cache_grad``) the cache's values;
* sdpa_flash, sdpa_cudnn: SDPA forward + backward on its FlashAttention / cuDNN kernel over the same
  L + M keys (no cache update), dK/dV over every key;
* flex: FlexAttention (torch.compile'd) forward + backward, likewise;
* unfused: what a PyTorch user would write: lerp of the active slots out of place, the keys and values
  concatenated, SDPA forward + backward through autograd;

with TFLOP/s (forward 4*M*N*D per head, backward 2.5x that, N the keys each causal query sees) and the
fused/SDPA time ratio (target <= 1.5).  Rows go to JSON (``--out``) and a markdown table.

    python benchmarks/attention_bwd.py                       # needs a CUDA GPU; exits 0 with a note without
    python benchmarks/attention_bwd.py --set headline --out results/x.json
    TRITON_INTERPRET=1 python benchmarks/attention_bwd.py --quick   # CPU smoke test of the script, no timings
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from common import (events_median, flex, fmt, fused_failures, op_call, peer_times, run_meta, sdpa, sdpa_backends,
                    setup, slots_restorer, timed, write_results)

TARGET = "fused forward + backward <= 1.5x SDPA-flash forward + backward"


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


def shapes(shape_set: str, quick: bool) -> list[Shape]:
    """headline: the paper's 500-token chunks of a 10k-token sequence (first, middle, last) at Ouro-1.4B's
    attention (16 heads x 128)."""
    if shape_set == "quick":
        return [Shape(1, 20, 24, 4, 2, 16)]
    out = [Shape(4, 500, 0, 16, 16), Shape(4, 500, 4500, 16, 16), Shape(1, 500, 9500, 16, 16)]
    if shape_set == "full":
        out += [Shape(4, 256, 8192, hq, hkv) for hq, hkv in ((16, 16), (32, 8))] + [Shape(4, 64, 8192, 32, 8)]
    return out[1:2] if quick else out


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
    """One set of tensors; the lengths a (B,) tensor on the device, or with ``host_lengths`` a Python int."""

    def __init__(self, s: Shape, dtype, device, seed: int = 0, host_lengths: bool = False):
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        self.shape, self.window = s, s.cache_len + s.seqlen_q
        self.q = randn(s.batch, s.seqlen_q, s.heads_q, s.head_dim).requires_grad_()
        self.k = randn(s.batch, s.seqlen_q, s.heads_kv, s.head_dim).requires_grad_()
        self.v = randn(s.batch, s.seqlen_q, s.heads_kv, s.head_dim).requires_grad_()
        self.gate = torch.rand(s.batch, s.seqlen_q, s.heads_kv, 1, generator=gen, device=device).requires_grad_()
        self.k_cache, self.v_cache = (randn(s.batch, self.window, s.heads_kv, s.head_dim) for _ in range(2))
        self.lengths = s.cache_len if host_lengths else torch.full((s.batch,), s.cache_len, dtype=torch.int32,
                                                                   device=device)
        self.dout = randn(s.batch, s.seqlen_q, s.heads_q, s.head_dim)
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        # The peers' keys/values: leaves over the same storage (their gradients cover every key).
        self.k_all = self.k_cache.detach().requires_grad_()
        self.v_all = self.v_cache.detach().requires_grad_()

    def fused_forward(self, backend, cache_grad: bool):
        """The op's forward on ``backend`` (a name, or a backend with a plan: common.op_call); returns out."""
        op = op_call(backend)

        def forward():
            k_cache, v_cache = self.k_cache, self.v_cache
            if cache_grad:
                k_cache, v_cache = _Requires.apply(k_cache, self.anchor), _Requires.apply(v_cache, self.anchor)
            return op(self.q, self.k, self.v, k_cache, v_cache, self.lengths, self.gate)
        return forward

    def active_slots_restorer(self):
        """A function that puts the caches' active slots back as they are now."""
        s = self.shape
        return slots_restorer(self.k_cache, self.v_cache, slice(s.cache_len, s.cache_len + s.seqlen_q))

    def release_caches(self):
        """The op writes gated values that carry gradients into the caches (mark_dirty), so the caches hold a
        call's graph even without cache_grad: dropped, or the next call's backward walks the freed graph."""
        self.k_cache.detach_()
        self.v_cache.detach_()

    def fused(self, backend, cache_grad: bool):
        forward = self.fused_forward(backend, cache_grad)

        def run():
            forward().backward(self.dout)
            self.release_caches()
        return run

    def peer_forward(self, name: str):
        """The peer's forward (B, Hq, M, D), differentiable in the leaves."""
        s = self.shape
        if name == "flex":
            return lambda: flex(self.q, self.k_all, self.v_all, s.seqlen_q, self.window)
        if name == "unfused":
            def attend():
                gate = self.gate.to(self.k.dtype)
                fresh_k = torch.lerp(self.k, self.k_all[:, s.cache_len:], gate)
                fresh_v = torch.lerp(self.v, self.v_all[:, s.cache_len:], gate)
                keys = torch.cat([self.k_all[:, :s.cache_len], fresh_k], dim=1)
                values = torch.cat([self.v_all[:, :s.cache_len], fresh_v], dim=1)
                return sdpa(self.q, keys, values, s.seqlen_q, self.window)
            return attend
        backend = sdpa_backends()[name]
        return lambda: sdpa(self.q, self.k_all, self.v_all, s.seqlen_q, self.window, backend)

    def peer(self, name: str):
        attend, dout = self.peer_forward(name), self.dout.transpose(1, 2)
        return lambda: attend().backward(dout)

    def leaves(self):
        return [self.q, self.k, self.v, self.gate, self.k_all, self.v_all, self.anchor]


def run_shape(s: Shape, backends: list[str], peer_names: list[str], dtype, device, cuda: bool) -> list[dict]:
    inputs = Inputs(s, dtype, device)
    fwd_flops, bwd_flops = flops(s)
    bench = events_median(inputs.leaves())
    peers = peer_times(inputs.peer, cuda, bench, peer_names)
    rows = []
    for b in backends:
        for cache_grad in (True, False):
            ms, why = timed(inputs.fused(b, cache_grad), cuda, bench)
            us = None if ms is None else 1e3 * ms
            rows.append(dict(label=s.label, batch=s.batch, seqlen_q=s.seqlen_q, seqlen_k=inputs.window,
                             heads_q=s.heads_q, heads_kv=s.heads_kv, head_dim=s.head_dim,
                             dtype=str(dtype).replace("torch.", ""), gate="per kv head", backend=b,
                             cache_grad=cache_grad, us=us, error=why, flops=fwd_flops + bwd_flops,
                             tflops=None if us is None else (fwd_flops + bwd_flops) / (us * 1e-6) / 1e12, **peers))
    if cuda:
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Attention forward + backward: {meta['device']}, {meta['date']}, commit {meta['commit'][:12]}",
             "", f"{meta['dtype']}, causal, one gate per kv head; {meta['timing']}.  Target: {TARGET}.", "",
             "'x flash' is the fused op's forward + backward time over SDPA-flash's on the same keys.", "",
             "| shape | backend | cache grad | us | TFLOP/s | flash us | cuDNN us | flex us | unfused us | x flash |",
             "|" + "---|" * 10]
    for r in rows:
        ratio = r["us"] / r["sdpa_flash_us"] if r["us"] and r.get("sdpa_flash_us") else None
        lines.append(f"| {r['label']} | {r['backend']} | {'yes' if r['cache_grad'] else 'no'} | {fmt(r['us'], '.0f')} | "
                     f"{fmt(r['tflops'], '.0f')} | {fmt(r['sdpa_flash_us'], '.0f')} | {fmt(r['sdpa_cudnn_us'], '.0f')} | "
                     f"{fmt(r['flex_us'], '.0f')} | {fmt(r['unfused_us'], '.0f')} | {fmt(ratio, '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    env = setup(__doc__, "attention_bwd", argv)
    if env is None:
        return 0
    timing = "median of triton.testing.do_bench" if env.cuda else "CPU smoke test: not timings"
    meta = run_meta(env.device_name, dtype=str(env.dtype), backends=env.backends, target=TARGET,
                    shape_set=env.shape_set, timing=timing)
    print(f"{env.device_name}: backends {env.backends}", flush=True)
    rows = []
    for s in shapes(env.shape_set, env.args.quick):
        rows += run_shape(s, env.backends, env.args.peers, env.dtype, env.device, env.cuda)
        print(s.label, "; ".join(f"{r['backend']} cache_grad={r['cache_grad']}: {fmt(r['us'], '.0f')} us" for r in
                                 rows[-2 * len(env.backends):]), f"flash {fmt(rows[-1]['sdpa_flash_us'], '.0f')} us",
              flush=True)
        paths = write_results(env.args.out, "attention_bwd", meta, rows, markdown(meta, rows))
    print(markdown(meta, rows))
    print("wrote", *paths)
    return fused_failures(rows)


if __name__ == "__main__":
    sys.exit(main())
