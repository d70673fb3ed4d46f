"""Chained problems for the gradient tests: T loops of C chunks on one cache, run in place through the op
and out of place through the functional definition of docs/op.md#gradients.

A chain starts from caches with row lengths L_b; chunk c's M tokens occupy positions L_b + c*M ..
L_b + (c+1)*M - 1 and run ``loops`` calls there; then the next chunk.  Every step draws its own q, k, v and
gates through tests/utils.make_case, so the layouts and gate kinds are those of the forward tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

import melt_kernels
from melt_kernels.reference import active_index, attention, blend, splice
from utils import Case, make_case


@dataclass
class Chain:
    steps: list  # Case per (chunk, loop), chunk-major; their caches and lengths are unused
    k_cache: torch.Tensor  # (B, S, Hkv, D) before the first call
    v_cache: torch.Tensor
    lengths: object  # L_b of the first chunk: an int or a (B,) int32 tensor
    loops: int
    chunks: int

    @property
    def seqlen_q(self) -> int:
        return self.steps[0].q.shape[1]

    def step_lengths(self, chunk: int):
        return self.lengths + chunk * self.seqlen_q

    def leaves(self) -> list:
        """Every differentiable tensor: per step q, k, v and tensor gates, then the two caches."""
        out = []
        for s in self.steps:
            out += [s.q, s.k, s.v] + [g for g in (s.gate, s.gate_v) if isinstance(g, torch.Tensor)]
        return out + [self.k_cache, self.v_cache]

    def with_leaves(self, values) -> "Chain":
        """The same chain on other tensors, given in :meth:`leaves` order (for gradcheck)."""
        it = iter(values)
        take = lambda t: next(it) if isinstance(t, torch.Tensor) else t  # noqa: E731
        steps = [replace(s, q=take(s.q), k=take(s.k), v=take(s.v), gate=take(s.gate), gate_v=take(s.gate_v))
                 for s in self.steps]
        return Chain(steps, take(self.k_cache), take(self.v_cache), self.lengths, self.loops, self.chunks)

    def clone(self, dtype: Optional[torch.dtype] = None, requires_grad: bool = True,
              cache_requires_grad: bool = True) -> "Chain":
        """A deep copy (layouts kept), cast to ``dtype``; the copies are leaves that require grad."""
        steps = [s.clone(dtype=dtype) for s in self.steps]
        for s in steps:
            for t in (s.q, s.k, s.v, s.gate, s.gate_v):
                if isinstance(t, torch.Tensor):
                    t.requires_grad_(requires_grad)
        caches = Case(*([None] * 3), self.k_cache, self.v_cache, None).clone(dtype=dtype)
        for t in (caches.k_cache, caches.v_cache):
            t.requires_grad_(requires_grad and cache_requires_grad)
        return Chain(steps, caches.k_cache, caches.v_cache, self.lengths, self.loops, self.chunks)


def make_chain(seed: int, *, loops: int, chunks: int, batch: int, seqlen_q: int, heads_q: int, heads_kv: int,
               head_dim: int, extra: int, dtype=torch.float64, device="cpu", gate_kind: str = "head",
               layout: str = "contiguous", int_seqlens: bool = False) -> Chain:
    """A chain whose first chunk starts at L_b in [0, extra]; the cache holds every chunk."""
    cache_len = extra + chunks * seqlen_q
    kw = dict(batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
              cache_len=cache_len, dtype=dtype, device=device, gate_kind=gate_kind, layout=layout)
    steps = [make_case(seed + 1 + i, **kw) for i in range(loops * chunks)]
    first = make_case(seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    if int_seqlens:
        lengths = int(torch.randint(0, extra + 1, (1,), generator=gen))
    else:
        lengths = torch.randint(0, extra + 1, (batch,), generator=gen, dtype=torch.int32).to(device)
    return Chain(steps, first.k_cache, first.v_cache, lengths, loops, chunks)


def _writable_copy(t: torch.Tensor) -> torch.Tensor:
    """A non-leaf copy of a leaf cache with its strides, which the op may update in place."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def run_in_place(chain: Chain, causal: bool, backend: str) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The chain through ``melt_kernels.gated_kv_attention``: ([(out, lse)] per step, K, V after the last)."""
    k_cache, v_cache = _writable_copy(chain.k_cache), _writable_copy(chain.v_cache)
    results = []
    for i, s in enumerate(chain.steps):
        results.append(melt_kernels.gated_kv_attention(
            s.q, s.k, s.v, k_cache, v_cache, chain.step_lengths(i // chain.loops), s.gate, s.gate_v,
            causal=causal, return_lse=True, backend=backend))
    return results, k_cache, v_cache


def attention_low_precision(q, keys, values, cache_seqlens, softmax_scale, causal):
    """docs/op.md#the-attention-read computed by PyTorch in q's dtype throughout (no upcast), as FlashAttention's
    tests build their low-precision baseline; lse is returned in float32."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    window, heads_kv = keys.shape[1], keys.shape[2]
    q_g = q.reshape(batch, seqlen_q, heads_kv, heads_q // heads_kv, head_dim)
    scores = torch.einsum("bmhgd,bshd->bhgms", q_g, keys) * softmax_scale  # [B, Hkv, G, M, W]
    rows = torch.arange(seqlen_q) if causal else torch.full((seqlen_q,), seqlen_q - 1)
    last = torch.as_tensor(cache_seqlens).long().reshape(-1, 1) + rows[None, :].to(q.device)  # [B, M]
    visible = torch.arange(window, device=q.device)[None, None, :] <= last[:, :, None]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhgms,bshd->bmhgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(batch, seqlen_q, heads_q, head_dim), lse.reshape(batch, heads_q, seqlen_q).float()


def run_functional(chain: Chain, causal: bool, attend: Callable = attention) -> tuple[list, torch.Tensor,
                                                                                     torch.Tensor]:
    """The same chain out of place: each step is (out, K, V) = f(q, k, v, K, V, alpha_k, alpha_v)."""
    k_cache, v_cache = chain.k_cache, chain.v_cache
    results = []
    for i, s in enumerate(chain.steps):
        lengths = torch.as_tensor(chain.step_lengths(i // chain.loops)).reshape(-1).expand(s.q.shape[0])
        index = active_index(lengths.to(s.q.device), tuple(s.k.shape))
        gate_v = s.gate if s.gate_v is None else s.gate_v
        new = []
        for cache, fresh, alpha in ((k_cache, s.k, s.gate), (v_cache, s.v, gate_v)):
            old = cache.gather(1, index) if alpha is not None else None
            new.append(splice(cache, blend(old, fresh, alpha, cache.dtype), lengths))
        k_cache, v_cache = new
        results.append(attend(s.q, k_cache, v_cache, lengths, s.q.shape[-1] ** -0.5, causal))
    return results, k_cache, v_cache


def loss_weights(chain: Chain, seed: int, use: tuple) -> dict:
    """Fixed random cotangents for (out, lse, caches) of a chain; ``use`` says which enter the loss.

    Each is representable in the dtype of the tensor it weighs in ``chain`` (out and the caches in the
    chain's dtype, lse in float32 unless float64), as FlashAttention's tests draw dout in the low dtype: the
    gradient reaching a bfloat16 output is bfloat16 whatever the loss, so a float64 reference fed unrounded
    cotangents would blame the kernel for the rounding of its own inputs."""
    gen = torch.Generator().manual_seed(seed)
    batch, seqlen_q, heads_q, head_dim = chain.steps[0].q.shape
    dtype = chain.steps[0].q.dtype
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def draw(shape, like):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(like).double()

    return dict(
        out=[draw((batch, seqlen_q, heads_q, head_dim), dtype) if use[0] else None for _ in chain.steps],
        lse=[draw((batch, heads_q, seqlen_q), lse_dtype) if use[1] else None for _ in chain.steps],
        cache=[draw(chain.k_cache.shape, dtype) if use[2] else None for _ in range(2)])


def loss(results, k_cache, v_cache, weights: dict) -> torch.Tensor:
    total = 0
    for (out, lse), w_out, w_lse in zip(results, weights["out"], weights["lse"]):
        if w_out is not None:
            total = total + (out.double() * w_out.to(out.device)).sum()
        if w_lse is not None:
            total = total + (lse.double() * w_lse.to(lse.device)).sum()
    for cache, w in zip((k_cache, v_cache), weights["cache"]):
        if w is not None:
            total = total + (cache.double() * w.to(cache.device)).sum()
    return total


def chain_grads(chain: Chain, weights: dict, run: Callable) -> list:
    """Gradients of the weighted loss for every leaf of ``chain`` (zeros where a leaf is not reached)."""
    leaves = [t for t in chain.leaves() if t.requires_grad]
    grads = torch.autograd.grad(loss(*run(chain), weights), leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def term_norms(chain: Chain, weights: dict, causal: bool) -> list:
    """For every leaf of ``chain`` that requires grad (:func:`chain_grads` order): the magnitude at which one
    rounding of its exact gradient is measured.  A gate broadcast by strides (one per kv head, per token, ...)
    gets the sum of ``d_new * (old - fresh)`` over every element it serves, keys and values alike; for it this
    is, per gate element, the L2 norm of those terms (independent roundings of n terms add up in quadrature:
    the sum itself can be far smaller when they cancel), and its largest value over the gate.  For every other
    leaf (and element-wise gates, whose terms are their gradient) it is None: the gradient's own largest
    magnitude.  Computed in float64 by the functional chain with each gate use made its own element-wise
    leaf, whose gradient is then the terms themselves."""
    exact = chain.clone(torch.float64)
    steps, uses = [], []
    for s in exact.steps:
        kv = tuple(s.k.shape)
        spread = lambda g: g.detach().expand(kv).clone().requires_grad_() if isinstance(g, torch.Tensor) else g  # noqa: E731
        gate_k, gate_v = spread(s.gate), spread(s.gate if s.gate_v is None else s.gate_v)
        steps.append(replace(s, gate=gate_k, gate_v=gate_v))
        uses.append((gate_k, gate_v))
    spread_chain = Chain(steps, exact.k_cache, exact.v_cache, exact.lengths, exact.loops, exact.chunks)
    leaves = [g for pair in uses for g in pair if isinstance(g, torch.Tensor)]
    terms = iter(torch.autograd.grad(loss(*run_functional(spread_chain, causal), weights), leaves,
                                     allow_unused=True, materialize_grads=True) if leaves else ())
    norms = []
    for s, (gate_k, gate_v) in zip(chain.steps, uses):
        t_k = next(terms) if isinstance(gate_k, torch.Tensor) else None
        t_v = next(terms) if isinstance(gate_v, torch.Tensor) else None
        norms += [None] * 3
        for gate, own in ((s.gate, [t_k] if s.gate_v is not None else [t_k, t_v]), (s.gate_v, [t_v])):
            if isinstance(gate, torch.Tensor):
                squares = sum(t.square() for t in own)
                norms.append(squares.sum_to_size(gate.shape).sqrt().max().item()
                             if gate.numel() < squares.numel() else None)
    norms += [None, None]
    return [n for n, t in zip(norms, chain.leaves()) if t.requires_grad]


def stored_output_effect(chain: Chain, weights: dict, causal: bool, outs: list) -> list:
    """For every leaf of ``chain`` that requires grad (:func:`chain_grads` order): the largest change of its
    exact gradient when each call's backward takes delta = rowsum(dout * out) - dlse over ``outs`` (per call,
    the output a kernel stored: rounded to q's dtype, with its forward's own error), as FlashAttention-style
    backward kernels do, instead of over the exact output.  That change is the exact gradient for an lse
    cotangent moved by -rowsum(dout * (stored - exact)): it does not shrink with the rounding of anything the
    backward computes, and on a row with a few keys it can exceed the gradient's ulp several times.  dout is
    the loss's weight of each out (out enters the loss directly); zero without it."""
    exact = chain.clone(torch.float64)
    with torch.no_grad():
        results, _, _ = run_functional(exact, causal)
    moved = []
    for (out, _), stored, w_out in zip(results, outs, weights["out"]):
        shift = None if w_out is None else (w_out * (stored.double().cpu() - out.cpu())).sum(-1).transpose(1, 2)
        moved.append(None if shift is None else -shift)  # (B, Hq, M), lse's layout
    if all(m is None for m in moved):
        return [0.0 for t in chain.leaves() if t.requires_grad]
    effect = chain_grads(exact, dict(out=[None] * len(moved), lse=moved, cache=[None, None]),
                         lambda c: run_functional(c, causal))
    return [g.abs().max().item() for g in effect]


def grad_names(chain: Chain) -> list:
    """Names of the leaves that require grad, in :func:`chain_grads` order, for failure messages."""
    names = []
    for i, s in enumerate(chain.steps):
        step = f"chunk {i // chain.loops} loop {i % chain.loops}"
        names += [f"{step} {n}" for n, t in (("q", s.q), ("k", s.k), ("v", s.v), ("gate", s.gate),
                                               ("gate_v", s.gate_v)) if isinstance(t, torch.Tensor)]
    names += ["k_cache", "v_cache"]
    return [n for n, t in zip(names, chain.leaves()) if t.requires_grad]
