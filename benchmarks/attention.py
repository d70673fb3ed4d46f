"""Kernel benchmark of the fused gated cache update + attention (forward), against PyTorch.

For every shape it times, median of CUDA-graph replays (triton.testing.do_bench_cudagraph):

* each kernel backend in melt_kernels.available_backends() (the public op, gated, per-head gate);
* sdpa: torch SDPA over the same cache with no update (chunk: with an explicit bottom-right causal mask);
* unfused: the PyTorch path, lerp-update of the active slots, then the same SDPA.

and reports the kernel's achieved GB/s (the bytes it must move: every input read once, every output written
once), that as a % of the device-to-device copy bandwidth measured in the same run, its time against SDPA's
and the unfused path's, and TFLOP/s for chunk shapes.  Small shapes are repeated over several copies of the
inputs so that they do not sit in L2 between replays.  Results go to JSON and a markdown table.

    python benchmarks/attention.py                      # needs a CUDA GPU; prints a note and exits 0 without
    python benchmarks/attention.py --out results/x.json
    TRITON_INTERPRET=1 python benchmarks/attention.py --quick   # CPU smoke test of this script (no timings)
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import melt_kernels
from common import median_ms, run_meta, setup, write_results

TARGETS = {
    "decode (cache >= 8k)": ">= 80% of copy bandwidth, <= 1.1x SDPA's time, >= 1.5x faster than unfused",
    "chunk": ">= 0.8x SDPA's throughput",
}


@dataclass(frozen=True)
class Shape:
    kind: str  # "decode" or "chunk"
    batch: int
    seqlen_q: int
    cache_len: int  # settled tokens L of every row; the cache holds L + M positions
    heads_q: int
    heads_kv: int
    head_dim: int = 128

    @property
    def label(self) -> str:
        return (f"{self.kind} B={self.batch} M={self.seqlen_q} L={self.cache_len} "
                f"H={self.heads_q}/{self.heads_kv} D={self.head_dim}")


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape("decode", 2, 1, 40, 4, 2, 32), Shape("chunk", 1, 20, 24, 4, 2, 16)]
    heads = [(16, 16), (32, 8)]
    out = [Shape("decode", b, 1, n, hq, hkv) for b in (1, 8, 64) for n in (1024, 8192, 32768) for hq, hkv in heads]
    out += [Shape("chunk", 4, m, 8192, hq, hkv) for m in (64, 256) for hq, hkv in heads]
    return out


def essential_bytes(s: Shape, elem: int) -> int:
    """Bytes the fused op must move: the prefix of K and V read once; at the active slots the old values,
    the fresh k/v and the gate read and the new values written; q read, out and lse written."""
    kv_prefix = 2 * s.batch * s.cache_len * s.heads_kv * s.head_dim * elem
    active = s.batch * s.seqlen_q * s.heads_kv
    slots = 2 * active * s.head_dim * elem * 3 + active * 4
    q_out = 2 * s.batch * s.seqlen_q * s.heads_q * s.head_dim * elem + s.batch * s.heads_q * s.seqlen_q * 4
    return kv_prefix + slots + q_out


def flops(s: Shape) -> float:
    """QK^T and PV over the keys each causal query sees (L + i + 1 for token i)."""
    keys = s.seqlen_q * s.cache_len + s.seqlen_q * (s.seqlen_q + 1) / 2
    return 4.0 * s.batch * s.heads_q * keys * s.head_dim


class Inputs:
    """``copies`` independent sets of tensors; each timed call runs over all of them."""

    def __init__(self, s: Shape, dtype, device, copies: int, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        total = s.cache_len + s.seqlen_q

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        self.sets = []
        for _ in range(copies):
            self.sets.append(dict(
                q=randn(s.batch, s.seqlen_q, s.heads_q, s.head_dim), k=randn(s.batch, s.seqlen_q, s.heads_kv, s.head_dim),
                v=randn(s.batch, s.seqlen_q, s.heads_kv, s.head_dim),
                k_cache=randn(s.batch, total, s.heads_kv, s.head_dim), v_cache=randn(s.batch, total, s.heads_kv, s.head_dim),
                gate=torch.rand(s.batch, s.seqlen_q, s.heads_kv, 1, generator=gen, device=device)))
        self.lengths = torch.full((s.batch,), s.cache_len, dtype=torch.int32, device=device)
        self.shape = s
        self.mask = None if s.kind == "decode" else self._bottom_right_mask(device)

    def _bottom_right_mask(self, device):
        """SDPA's lower-right causal bias (flash/efficient kernels) where it accepts these heads, else a
        materialised boolean mask: active token i sees keys 0 .. L + i."""
        from torch.nn.attention.bias import causal_lower_right
        s, t = self.shape, self.sets[0]
        window = s.cache_len + s.seqlen_q
        bias = causal_lower_right(s.seqlen_q, window)
        try:
            _sdpa(t["q"], t["k_cache"], t["v_cache"], s, bias)
            return bias
        except (RuntimeError, NotImplementedError):
            keys = torch.arange(window, device=device)
            return keys[None, :] <= s.cache_len + torch.arange(s.seqlen_q, device=device)[:, None]


def fused(inputs: Inputs, backend: str):
    def run():
        for t in inputs.sets:
            melt_kernels.gated_kv_attention(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], inputs.lengths,
                                            t["gate"], backend=backend)
    return run


def _sdpa(q, k_cache, v_cache, s: Shape, mask):
    """SDPA over the first L + M positions (decode's one query sees them all: no mask)."""
    window = s.cache_len + s.seqlen_q
    qt = q.transpose(1, 2)
    kt, vt = k_cache[:, :window].transpose(1, 2), v_cache[:, :window].transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=s.heads_q != s.heads_kv)


def sdpa(inputs: Inputs):
    def run():
        for t in inputs.sets:
            _sdpa(t["q"], t["k_cache"], t["v_cache"], inputs.shape, inputs.mask)
    return run


def unfused(inputs: Inputs):
    s = inputs.shape
    active = slice(s.cache_len, s.cache_len + s.seqlen_q)

    def run():
        for t in inputs.sets:
            gate = t["gate"].to(t["k"].dtype)
            # lerp(fresh, old, alpha) = fresh + alpha * (old - fresh), in float32 inside, rounded once.
            t["k_cache"][:, active] = torch.lerp(t["k"], t["k_cache"][:, active], gate)
            t["v_cache"][:, active] = torch.lerp(t["v"], t["v_cache"][:, active], gate)
            _sdpa(t["q"], t["k_cache"], t["v_cache"], s, inputs.mask)
    return run


def graph_median(fn) -> float:
    """Median of CUDA-graph replays, so that launch overhead, which would dominate decode, does not count."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except RuntimeError:  # a path that cannot be captured: time with events instead
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device, cuda: bool) -> float:
    """Device-to-device copy in bytes/s, counting bytes read plus bytes written."""
    numel = (1 << 30) // 4 if cuda else (1 << 24)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), cuda, graph_median)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def agree(inputs: Inputs, backend: str) -> float:
    """Max |fused - unfused| on the first input set, its active slots restored after each run."""
    t = inputs.sets[0]
    s = inputs.shape
    active = slice(s.cache_len, s.cache_len + s.seqlen_q)
    saved = t["k_cache"][:, active].clone(), t["v_cache"][:, active].clone()
    outs = []
    for path in ("fused", "unfused"):
        if path == "fused":
            outs.append(melt_kernels.gated_kv_attention(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"],
                                                        inputs.lengths, t["gate"], backend=backend))
        else:
            gate = t["gate"].to(t["k"].dtype)
            for cache, fresh in ((t["k_cache"], t["k"]), (t["v_cache"], t["v"])):
                cache[:, active] = torch.lerp(fresh, cache[:, active], gate)
            outs.append(_sdpa(t["q"], t["k_cache"], t["v_cache"], s, inputs.mask).transpose(1, 2))
        t["k_cache"][:, active], t["v_cache"][:, active] = saved
    return (outs[0].float() - outs[1].float()).abs().max().item()


def run_shape(s: Shape, backends: list[str], dtype, device, cuda: bool, copy_bps: float, l2_bytes: int) -> dict:
    elem = torch.finfo(dtype).bits // 8
    nbytes = essential_bytes(s, elem)
    copies = max(1, min(16, math.ceil(3 * l2_bytes / nbytes)))  # keep the working set out of L2
    inputs = Inputs(s, dtype, device, copies)
    row = dict(shape=asdict(s), label=s.label, bytes=nbytes, flops=flops(s), copies=copies)
    for name, fn in [("sdpa", sdpa(inputs)), ("unfused", unfused(inputs))]:
        try:
            row[f"{name}_ms"] = median_ms(fn, cuda, graph_median) / copies
        except (RuntimeError, NotImplementedError) as e:
            row[f"{name}_ms"], row[f"{name}_error"] = None, (str(e).splitlines() or [type(e).__name__])[0]
    for b in backends:
        ms = median_ms(fused(inputs, b), cuda, graph_median) / copies
        row[b] = dict(ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, pct_copy=100 * nbytes / (ms * 1e-3) / copy_bps,
                      tflops=flops(s) / (ms * 1e-3) / 1e12, max_diff_vs_unfused=agree(inputs, b))
        for base in ("sdpa", "unfused"):
            if row.get(f"{base}_ms"):
                row[b][f"{base}_over_kernel"] = row[f"{base}_ms"] / ms
    del inputs
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(meta: dict, rows: list[dict], backends: list[str]) -> str:
    lines = [f"# Attention forward benchmark: {meta['device']}, {meta['date']}, commit {meta['commit'][:12]}", "",
             f"Copy bandwidth (read + write): {meta['copy_gbps']:.0f} GB/s.  {meta['dtype']}, gated (one gate "
             f"per kv head); {meta['timing']}.",
             "Targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()), "",
             "GB/s and % copy count the bytes the op must move.  'x SDPA' is SDPA's time over the kernel's "
             "(>= 0.91 meets decode's <= 1.1x time target; >= 0.8 meets chunk's throughput target); "
             "'x unfused' likewise (>= 1.5 meets decode's).  'max diff': the kernel's output against the "
             "unfused path's, from the same caches.", ""]
    head = ["shape", "sdpa ms", "unfused ms"]
    for b in backends:
        head += [f"{b} ms", f"{b} GB/s", f"{b} % copy", f"{b} x SDPA", f"{b} x unfused", f"{b} TFLOP/s",
                 f"{b} max diff"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    for r in rows:
        cells = [r["label"], fmt(r.get("sdpa_ms"), ".4f"), fmt(r.get("unfused_ms"), ".4f")]
        for b in backends:
            k = r[b]
            cells += [fmt(k["ms"], ".4f"), fmt(k["gbps"], ".0f"), fmt(k["pct_copy"], ".0f"),
                      fmt(k.get("sdpa_over_kernel"), ".2f"), fmt(k.get("unfused_over_kernel"), ".2f"),
                      fmt(k["tflops"], ".1f") if r["shape"]["kind"] == "chunk" else "-",
                      fmt(k["max_diff_vs_unfused"], ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    env = setup(__doc__, "attention", argv)
    if env is None:
        return 0
    cuda, device, dtype, backends = env.cuda, env.device, env.dtype, env.backends
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0
    copy_bps = copy_bandwidth(device, cuda)
    meta = run_meta(env.device_name, copy_gbps=copy_bps / 1e9, dtype=str(dtype), backends=backends, targets=TARGETS,
                    timing="median of CUDA-graph replays" if cuda else "CPU smoke test: not timings")
    print(f"{env.device_name}: copy bandwidth {copy_bps / 1e9:.0f} GB/s; backends {backends}", flush=True)
    rows = []
    for s in shapes(env.args.quick):
        rows.append(run_shape(s, backends, dtype, device, cuda, copy_bps, l2_bytes))
        summary = "  ".join(f"{b}: {rows[-1][b]['ms']:.4f} ms {rows[-1][b]['pct_copy']:.0f}% copy"
                            for b in backends)
        print(f"{s.label}: sdpa {rows[-1].get('sdpa_ms')} ms, unfused {rows[-1].get('unfused_ms')} ms; {summary}",
              flush=True)
    write_results(env.args.out, "attention", meta, rows, markdown(meta, rows, backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
