"""Autograd for the fused op, shared by every backend (SPEC §2.3).

The functional definition is ``(out, K_new, V_new) = f(q, k, v, K_old, V_old,
alpha_k, alpha_v)``; the op computes it in place.  The forward keeps
O(B*M*Hkv*D) per call: the active slots' values before (only when a gate
needs its gradient) and after the update, plus ``out``/``lse`` and the
inputs.  Positions < L_b are read from the live caches at backward time, so
they must not be rewritten between the forward and the backward.  Writes by
this op itself are fine (the T loops of a chunk rewrite only their active
slots); any other write into a cache after a call is detected through the
cache's version counter and makes the backward raise instead of returning
wrong gradients.

Backends supply two launchers with the signatures of
``melt_kernels.reference.gated_kv_attention_ref_fwd`` and ``..._bwd``; the
blend's part of the chain rule is computed here, once for all of them.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.autograd.graph import increment_version

from melt_kernels.checks import Gate, Problem
from melt_kernels.reference import active_index, compute_dtype

_WRITTEN_VERSION = "_melt_written_version"


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s version counter (views share their base's)."""
    return t._base if t._is_view() else t


def record_write(cache: torch.Tensor) -> None:
    """Remembers the version this op left ``cache`` at, to tell its own writes from others."""
    root = _root(cache)
    setattr(root, _WRITTEN_VERSION, root._version)


def _check_not_rewritten(name: str, ref: Optional[weakref.ref]) -> None:
    root = ref() if ref is not None else None
    if root is not None and root._version != getattr(root, _WRITTEN_VERSION, root._version):
        raise RuntimeError(
            f"{name} was modified in place by something other than gated_kv_attention after a call that saved "
            f"it for backward; its positions < L_b + M are read by that backward. Run backward before writing "
            f"into the cache, or write through gated_kv_attention only.")


def _gate_tensor(gate: Gate) -> Optional[torch.Tensor]:
    return gate if isinstance(gate, torch.Tensor) else None


def _through_blend(d_new: torch.Tensor, fresh: torch.Tensor, old: Optional[torch.Tensor], alpha: Gate,
                   need_alpha_grad: bool):
    """Backward of ``new = alpha * old + (1 - alpha) * fresh`` at the active slots.

    ``d_new`` is the total gradient reaching the new slot values (compute dtype).
    Returns (d_fresh, d_old, d_alpha); d_old is None for write-through.
    """
    if alpha is None:
        return d_new, None, None
    a = alpha.to(d_new.dtype) if isinstance(alpha, torch.Tensor) else alpha
    d_alpha = None
    if need_alpha_grad:
        d_alpha = (d_new * (old.to(d_new.dtype) - fresh.to(d_new.dtype))).sum_to_size(alpha.shape)
        d_alpha = d_alpha.to(alpha.dtype)
    return (1 - a) * d_new, a * d_new, d_alpha


class GatedKVAttentionFunction(torch.autograd.Function):
    """In-place fused update + attention; ``impl`` is the backend's (fwd, bwd) pair."""

    @staticmethod
    def forward(ctx, q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                max_seqlen_k, impl):
        index = active_index(cache_seqlens, tuple(k.shape))
        need_old = (isinstance(gate, torch.Tensor) and ctx.needs_input_grad[6],
                    isinstance(gate_v, torch.Tensor) and ctx.needs_input_grad[7])
        k_old = k_cache.gather(1, index) if need_old[0] else None
        v_old = v_cache.gather(1, index) if need_old[1] else None
        out, lse = impl.fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                            max_seqlen_k)
        k_new, v_new = k_cache.gather(1, index), v_cache.gather(1, index)
        ctx.mark_dirty(k_cache, v_cache)
        # ``.data`` aliases the live caches under a fresh version counter: later
        # loops legitimately rewrite the active slots, and the prefix is guarded
        # by _check_not_rewritten instead of autograd's saved-tensor check.
        ctx.save_for_backward(q, k, v, cache_seqlens, _gate_tensor(gate), _gate_tensor(gate_v), k_old, v_old,
                              k_new, v_new, out, lse, k_cache.data, v_cache.data)
        ctx.gates = (None if isinstance(gate, torch.Tensor) else gate,
                     None if isinstance(gate_v, torch.Tensor) else gate_v)
        ctx.cache_roots = (weakref.ref(_root(k_cache)), weakref.ref(_root(v_cache)))
        ctx.softmax_scale, ctx.causal, ctx.max_seqlen_k, ctx.impl = softmax_scale, causal, max_seqlen_k, impl
        return out, lse, k_cache, v_cache

    @staticmethod
    def backward(ctx, dout, dlse, dk_cache_in, dv_cache_in):
        for name, ref in zip(("k_cache", "v_cache"), ctx.cache_roots):
            _check_not_rewritten(name, ref)
        (q, k, v, cache_seqlens, gate_t, gate_v_t, k_old, v_old, k_new, v_new, out, lse, k_live,
         v_live) = ctx.saved_tensors
        gate = gate_t if gate_t is not None else ctx.gates[0]
        gate_v = gate_v_t if gate_v_t is not None else ctx.gates[1]
        need_cache_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk_attn, dv_attn, dk_prefix, dv_prefix = ctx.impl.bwd(
            q, k_live, v_live, k_new, v_new, cache_seqlens, out, lse, dout, dlse, ctx.softmax_scale, ctx.causal,
            need_cache_grad, ctx.max_seqlen_k)

        index = active_index(cache_seqlens, tuple(k.shape))
        ct = compute_dtype(q.dtype)
        grads = []
        for d_attn, d_in, d_prefix, fresh, old, alpha, need_alpha in (
                (dk_attn, dk_cache_in, dk_prefix, k, k_old, gate, ctx.needs_input_grad[6]),
                (dv_attn, dv_cache_in, dv_prefix, v, v_old, gate_v, ctx.needs_input_grad[7])):
            d_new = d_attn.to(ct)
            if d_in is not None:
                d_new = d_new + d_in.gather(1, index).to(ct)
            d_fresh, d_old_active, d_alpha = _through_blend(d_new, fresh, old, alpha, need_alpha)
            d_cache = None
            if need_cache_grad:
                d_cache = d_prefix if d_in is None else d_prefix + d_in
                d_active = torch.zeros_like(d_fresh) if d_old_active is None else d_old_active
                d_cache = d_cache.scatter(1, index, d_active.to(d_cache.dtype))
            grads.append((d_fresh.to(fresh.dtype), d_cache, d_alpha))
        (dk, dk_cache, dgate), (dv, dv_cache, dgate_v) = grads
        return dq, dk, dv, dk_cache, dv_cache, None, dgate, dgate_v, None, None, None, None


def run(problem: Problem, impl) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the op through ``impl``, with autograd when any input needs it; returns (out, lse)."""
    p = problem
    args = (p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, p.causal,
            p.max_seqlen_k)
    differentiable = [p.q, p.k, p.v, p.k_cache, p.v_cache, _gate_tensor(p.gate), _gate_tensor(p.gate_v)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        out, lse, _, _ = GatedKVAttentionFunction.apply(*args, impl)
    else:
        out, lse = impl.fwd(*args)
        # Kernel writes do not move the version counter; declare the mutation.
        increment_version(p.k_cache)
        increment_version(p.v_cache)
    record_write(p.k_cache)
    record_write(p.v_cache)
    return out, lse
