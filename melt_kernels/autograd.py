"""Autograd for the fused op, shared by every backend (SPEC §2.3).

The functional definition is ``(out, K_new, V_new) = f(q, k, v, K_old, V_old,
alpha_k, alpha_v)``; the op computes it in place.  Two autograd nodes express
it:

* :class:`GatedKVAttentionFunction` runs the backend's forward (which writes
  the caches) and returns ``out``, ``lse`` and the active slots' new values
  (B, M, Hkv, D).  Its backward is attention's backward plus the blend's
  chain rule, giving the gradients of q, k, v, the gates and the caches'
  values before the call (positions < L_b: attention's dK/dV added to what
  later uses gave them; active slots: ``alpha`` times the gradient of the new
  slot values; every other position: what later uses gave it).
* :class:`_CommitFunction`, one per cache, declares the write: it marks the
  cache dirty (its version counter moves and its history is rebased onto
  this node) and routes the cache's incoming gradient to the active slots'
  new values.  Splitting the declaration off keeps each dirty tensor the
  single output of its node, which autograd requires when a cache is a view
  (a slice of a bigger buffer, or k and v cut from one packed tensor).

Memory.  Saved per call: O(B*M*Hkv*D) (the active slots' values after the
update, before it only when a gate needs its gradient, out, lse) plus inputs
the forward was given.  The caches' gradient is one buffer per chain of calls
on a cache, allocated (or, when it comes from outside the op, copied) once
and updated in place by every call's backward (:class:`_CacheLink`), so a
call's backward allocates O(B*M*H*D) plus what its backend needs, never a
cache-sized tensor.  The gradient handed from one call to the previous one
is that buffer: a tensor hook registered on a cache between two calls sees
it before the earlier call's backward updates it.

Positions < L_b are read from the live caches at backward time, so they must
not change before the backward runs.  This op's own later calls may write
(the T loops of a chunk rewrite their active slots, later chunks write
further right), provided no later call writes below an earlier call's L_b,
as chunk-wise MELT never does.  Any other in-place write into a cache after a
call, even between two calls of this op, is detected through the cache's
version counter and makes that call's backward raise instead of returning
wrong gradients.

Backends supply two launchers with the signatures of
``melt_kernels.reference.gated_kv_attention_ref_fwd`` and ``..._bwd``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.autograd.graph import increment_version

from melt_kernels.checks import Gate, Problem
from melt_kernels.reference import active_slots, compute_dtype

_WRITE_LOG = "_melt_write_log"


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s version counter (views share their base's)."""
    return t._base if t._is_view() else t


class _WriteLog:
    """The version a cache's storage was left at by this op's last write.

    One log lives on each cache's root tensor while this op's own writes
    follow each other; a write by anything else ends it, and the next call
    starts a new log, so every call saved under the old one can tell.
    """

    __slots__ = ("version",)

    def __init__(self, version: int):
        self.version = version


def begin_write(cache: torch.Tensor) -> Optional[_WriteLog]:
    """The write log this call extends: the current one, or a new one after an outside write.

    None for inference tensors: they have no version counter and cannot be saved for backward.
    """
    root = _root(cache)
    if root.is_inference():
        return None
    log = getattr(root, _WRITE_LOG, None)
    if log is None or log.version != root._version:
        log = _WriteLog(root._version)
        setattr(root, _WRITE_LOG, log)
    return log


def end_write(cache: torch.Tensor, log: Optional[_WriteLog]) -> None:
    if log is not None:
        log.version = _root(cache)._version


def _check_not_rewritten(name: str, root_ref: weakref.ref, log: _WriteLog) -> None:
    root = root_ref()
    if root is not None and (getattr(root, _WRITE_LOG, None) is not log or root._version != log.version):
        raise RuntimeError(
            f"{name} was modified in place by something other than gated_kv_attention after a call that saved "
            f"it for backward; that backward reads the cache's positions < L_b. Run backward before writing "
            f"into the cache, or write through gated_kv_attention only.")


def _gate_tensor(gate: Gate):
    return gate if isinstance(gate, torch.Tensor) else None


def _through_blend(d_new: torch.Tensor, fresh, old, alpha: Gate, need_alpha_grad: bool):
    """Backward of ``new = alpha * old + (1 - alpha) * fresh`` at the active slots.

    ``d_new`` is the total gradient reaching the new slot values (compute dtype).
    Returns (d_fresh, d_old, d_alpha); d_old is None for write-through.  d_alpha
    is reduced to the gate's own shape (gates broadcast by strides).
    """
    if alpha is None:
        return d_new, None, None
    a = alpha.to(d_new.dtype) if isinstance(alpha, torch.Tensor) else alpha
    d_alpha = None
    if need_alpha_grad:
        d_alpha = (d_new * (old.to(d_new.dtype) - fresh.to(d_new.dtype))).sum_to_size(alpha.shape)
        d_alpha = d_alpha.to(alpha.dtype)
    return (1 - a) * d_new, a * d_new, d_alpha


class _CacheLink:
    """How the gradient of one cache passes between one call's two backward nodes and the previous call's.

    The gradient of a cache's values flows down the chain of calls on it, last call first, as ONE buffer of
    the cache's shape: each call's commit node takes it (``grad``), its main node adds attention's gradient
    at positions < L_b and the blend's at the active slots into it in place and hands it on as the gradient of
    the cache before the call (``handed``, set on the previous call's link), so that no call allocates a
    cache-sized tensor.  A gradient that arrives from anywhere else (the loss reading the cache, another op,
    autograd summing two consumers, a view's CopySlices) is copied once, as the op never writes into a
    tensor it did not make.
    """

    __slots__ = ("grad", "handed")

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None  # the cache's gradient after this call, owned by the op
        self.handed: Optional[torch.Tensor] = None  # what the next call's main node returned for it


def _previous_link(cache: torch.Tensor) -> Optional[_CacheLink]:
    """The link of the call that last wrote ``cache``, when that write is the cache's autograd history."""
    node = cache.grad_fn
    return node.link if type(node) is _CommitFunction._backward_cls else None


class GatedKVAttentionFunction(torch.autograd.Function):
    """Fused update + attention through ``impl`` (the backend's (fwd, bwd) pair).

    Returns (out, lse, k_new, v_new), k_new/v_new the active slots after the
    update; the write itself is declared by :class:`_CommitFunction`.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                max_seqlen_k, block_table, impl, logs, links):
        ctx.set_materialize_grads(False)
        index = active_slots(cache_seqlens, k.shape[1], k_cache, block_table)
        # The old slot values and the fresh ones only enter a gate's gradient.
        need_alpha = (isinstance(gate, torch.Tensor) and ctx.needs_input_grad[6],
                      isinstance(gate_v, torch.Tensor) and ctx.needs_input_grad[7])
        k_old = k_cache[index] if need_alpha[0] else None
        v_old = v_cache[index] if need_alpha[1] else None
        out, lse = impl.fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                            max_seqlen_k, **_table(block_table))
        k_new, v_new = k_cache[index], v_cache[index]
        # No gradient reaches k/v/gate/old cache through k_new unless one of them wants it.
        for new, needs in ((k_new, (1, 3, 6)), (v_new, (2, 4, 7))):
            if not any(ctx.needs_input_grad[i] for i in needs):
                ctx.mark_non_differentiable(new)
        # ``.data`` aliases the live caches under a fresh version counter:
        # later loops legitimately rewrite the active slots, and the prefix is
        # guarded by _check_not_rewritten instead of autograd's saved-tensor check.
        ctx.save_for_backward(q, k if need_alpha[0] else None, v if need_alpha[1] else None, cache_seqlens,
                              _gate_tensor(gate), _gate_tensor(gate_v), k_old, v_old, k_new, v_new, out, lse,
                              k_cache.data, v_cache.data, block_table)
        ctx.gates = (None if isinstance(gate, torch.Tensor) else gate,
                     None if isinstance(gate_v, torch.Tensor) else gate_v)
        ctx.cache_roots = (weakref.ref(_root(k_cache)), weakref.ref(_root(v_cache)))
        ctx.logs, ctx.links = logs, links
        ctx.previous = (_previous_link(k_cache), _previous_link(v_cache))
        ctx.softmax_scale, ctx.causal, ctx.max_seqlen_k, ctx.impl = softmax_scale, causal, max_seqlen_k, impl
        return out, lse, k_new, v_new

    @staticmethod
    def backward(ctx, dout, dlse, dk_new_in, dv_new_in):
        for name, root_ref, log in zip(("k_cache", "v_cache"), ctx.cache_roots, ctx.logs):
            _check_not_rewritten(name, root_ref, log)
        (q, k, v, cache_seqlens, gate_t, gate_v_t, k_old, v_old, k_new, v_new, out, lse, k_live,
         v_live, block_table) = ctx.saved_tensors
        gate = gate_t if gate_t is not None else ctx.gates[0]
        gate_v = gate_v_t if gate_v_t is not None else ctx.gates[1]
        # The caches' gradient after this call (from this call's commit nodes), or zeros at the end of a chain.
        cache_grads = []
        for cache, link, needed in zip((k_live, v_live), ctx.links, ctx.needs_input_grad[3:5]):
            grad = None
            if needed:
                grad, link.grad = link.grad, None
                if grad is None:
                    grad = torch.zeros(cache.shape, dtype=cache.dtype, device=cache.device)
            cache_grads.append(grad)
        if dout is None:
            dout = torch.zeros_like(out)
        # Adds attention's gradient at positions < L_b into the cache gradients.
        dq, dk_attn, dv_attn = ctx.impl.bwd(q, k_live, v_live, k_new, v_new, cache_seqlens, out, lse, dout, dlse,
                                            ctx.softmax_scale, ctx.causal, *cache_grads, ctx.max_seqlen_k,
                                            **_table(block_table))

        index = active_slots(cache_seqlens, k_new.shape[1], k_live, block_table)
        ct = compute_dtype(q.dtype)
        grads = []
        for d_attn, d_in, d_cache, fresh, old, alpha, need_alpha, previous in (
                (dk_attn, dk_new_in, cache_grads[0], k, k_old, gate, ctx.needs_input_grad[6], ctx.previous[0]),
                (dv_attn, dv_new_in, cache_grads[1], v, v_old, gate_v, ctx.needs_input_grad[7], ctx.previous[1])):
            d_new = d_attn.to(ct)
            if d_in is not None:
                d_new = d_new + d_in.to(ct)
            d_fresh, d_old_active, d_alpha = _through_blend(d_new, fresh, old, alpha, need_alpha)
            if d_cache is not None:
                # The active slots' old values reach the output only through the blend (nothing with
                # write-through): their gradient replaces what the slots' new values got.
                d_cache[index] = 0. if d_old_active is None else d_old_active.to(d_cache.dtype)
                if previous is not None:
                    previous.handed = d_cache
            grads.append((d_fresh.to(k_new.dtype), d_cache, d_alpha))
        (dk, dk_cache, dgate), (dv, dv_cache, dgate_v) = grads
        return dq, dk, dv, dk_cache, dv_cache, None, dgate, dgate_v, None, None, None, None, None, None, None


class _CommitFunction(torch.autograd.Function):
    """Declares the in-place write of the active slots' new values ``new`` (B, M, Hkv, D) into ``cache``.

    Its backward routes the cache's incoming gradient to ``new`` (the active slots) and leaves it to the
    call's main node (through ``link``) to finish as the gradient of the cache before the call.
    """

    @staticmethod
    def forward(ctx, cache, new, cache_seqlens, block_table, link):
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(cache)
        ctx.save_for_backward(cache_seqlens, block_table)
        ctx.seqlen_q = new.shape[1]
        ctx.link = link
        ctx.is_view = cache._is_view()
        return cache

    @staticmethod
    def backward(ctx, d_cache):
        link = ctx.link
        handed, link.handed = link.handed, None
        if d_cache is None:
            return None, None, None, None, None
        cache_seqlens, block_table = ctx.saved_tensors
        d_new = d_cache[active_slots(cache_seqlens, ctx.seqlen_q, d_cache, block_table)] \
            if ctx.needs_input_grad[1] else None
        d_old = None
        if ctx.needs_input_grad[0]:
            # The op's own buffer is taken as it is; anything else is copied once into a buffer the op owns.
            link.grad = d_cache if d_cache is handed else d_cache.clone(memory_format=torch.contiguous_format)
            # The main node returns the whole gradient of the cache before the call.  For a view, autograd's
            # CopySlices (the base's node) drops the base's entire gradient when this one is None: zeros
            # then, broadcast from one element (no allocation).
            if ctx.is_view:
                d_old = d_cache.new_zeros(()).expand(d_cache.shape)
        return d_old, d_new, None, None, None


def _table(block_table: Optional[torch.Tensor]) -> dict:
    """The launchers' keyword for paged caches, passed only when there is a table."""
    return {} if block_table is None else {"block_table": block_table}


def run(problem: Problem, impl) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the op through ``impl``, with autograd when any input needs it; returns (out, lse)."""
    p = problem
    # The reference cuts its window at max_seqlen_k, so it gets only a true bound; the kernels only size
    # their work split by it, and take the caller's hint when the lengths are not on the host.
    bound = p.max_seqlen_k if p.max_seqlen_k is not None or impl.needs_true_bound else p.seqlen_k_hint
    args = (p.q, p.k, p.v, p.k_cache, p.v_cache, p.cache_seqlens, p.gate, p.gate_v, p.softmax_scale, p.causal,
            bound)
    table = p.block_table
    logs = (begin_write(p.k_cache), begin_write(p.v_cache))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            p.q, p.k, p.v, p.k_cache, p.v_cache, _gate_tensor(p.gate), _gate_tensor(p.gate_v))):
        # The backward keeps its own copy of the (B,) lengths: callers advance theirs in place
        # (MeltCache.advance) before the backward runs; likewise the table (a page allocator grows it in place).
        lengths = p.cache_seqlens.clone()
        table = None if table is None else table.clone()
        links = (_CacheLink(), _CacheLink())
        out, lse, k_new, v_new = GatedKVAttentionFunction.apply(*args[:5], lengths, *args[6:], table, impl, logs,
                                                                links)
        _CommitFunction.apply(p.k_cache, k_new, lengths, table, links[0])
        _CommitFunction.apply(p.v_cache, v_new, lengths, table, links[1])
    else:
        out, lse = impl.fwd(*args, **_table(table))
        # Kernel writes do not move the version counter; declare the mutation.
        increment_version(p.k_cache)
        increment_version(p.v_cache)
    end_write(p.k_cache, logs[0])
    end_write(p.v_cache, logs[1])
    return out, lse
