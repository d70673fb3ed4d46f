"""Autograd for the fused op, shared by every backend (docs/op.md#gradients).

The functional definition is ``(out, K_new, V_new) = f(q, k, v, K_old, V_old,
alpha_k, alpha_v)``; the op computes it in place.  Two autograd nodes express
it:

* :class:`GatedKVAttentionFunction` runs the backend's forward (which writes
  the caches, and what the backward reads of the active slots: their values
  after the update, and before it for a gate's gradient) and returns ``out``
  and ``lse``.  Its backward is the backend's backward with the blend's chain
  rule (``melt_kernels.reference.BlendGrad``): the gradients of q, k, v, the
  gates and the caches' values before the call (positions < L_b: attention's
  dK/dV added to what later uses gave them; active slots: ``alpha`` times the
  gradient of the new slot values; every other position: what later uses
  gave it).
* :class:`_CommitFunction`, one per cache, declares the write: it marks the
  cache dirty (its version counter moves and its history is rebased onto
  this node) and hands the cache's incoming gradient to the main node, whose
  ``lse`` it takes as input so that its backward runs first.  Splitting the
  declaration off keeps each dirty tensor the single output of its node,
  which autograd requires when a cache is a view (a slice of a bigger buffer,
  or k and v cut from one packed tensor).

Memory.  Saved per call: O(B*M*Hkv*D) (the active slots' values after the
update when a gate is given, before it only when a gate needs its gradient,
out, lse) plus inputs the forward was given.  The caches' gradient is one
buffer per chain of calls on a cache, allocated (or, when it comes from
outside the op, copied) once and updated in place by every call's backward
(:class:`_CacheLink`), so a call's backward allocates O(B*M*H*D) plus what its
backend needs, never a cache-sized tensor.  The gradient handed from one call
to the previous one is that buffer: a tensor hook registered on a cache
between two calls sees it before the earlier call's backward updates it.

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
from melt_kernels.reference import BlendGrad

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
        # The cache's gradient after this call: the op's own when the main node writes into it, else borrowed.
        self.grad: Optional[torch.Tensor] = None
        self.handed: Optional[torch.Tensor] = None  # what the next call's main node returned for it


def _previous_link(cache: torch.Tensor) -> Optional[_CacheLink]:
    """The link of the call that last wrote ``cache``, when that write is the cache's autograd history."""
    node = cache.grad_fn
    return node.link if type(node) is _CommitFunction._backward_cls else None


class GatedKVAttentionFunction(torch.autograd.Function):
    """Fused update + attention through ``impl`` (the backend's (fwd, bwd) pair); returns (out, lse).  The
    write itself is declared by :class:`_CommitFunction`."""

    @staticmethod
    def forward(ctx, q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                max_seqlen_k, block_table, impl, logs, links):
        ctx.set_materialize_grads(False)
        # What the backward reads of the active slots, written by the forward: their values after the update
        # (with write-through they are k and v themselves) and, for a gate's gradient, before it.
        def slots(gated: bool):
            return torch.empty(k.shape, dtype=k_cache.dtype, device=k.device) if gated else None
        need_alpha = (isinstance(gate, torch.Tensor) and ctx.needs_input_grad[6],
                      isinstance(gate_v, torch.Tensor) and ctx.needs_input_grad[7])
        k_new, v_new = slots(gate is not None), slots(gate_v is not None)
        k_old, v_old = slots(need_alpha[0]), slots(need_alpha[1])
        out, lse = impl.fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                            max_seqlen_k, **_table(block_table), k_new=k_new, v_new=v_new, k_old=k_old, v_old=v_old)
        # ``.data`` aliases the live caches under a fresh version counter:
        # later loops legitimately rewrite the active slots, and the prefix is
        # guarded by _check_not_rewritten instead of autograd's saved-tensor check.
        ctx.save_for_backward(q, k, v, cache_seqlens, _gate_tensor(gate), _gate_tensor(gate_v), k_old, v_old,
                              k_new, v_new, out, lse, k_cache.data, v_cache.data, block_table)
        ctx.gates = (None if isinstance(gate, torch.Tensor) else gate,
                     None if isinstance(gate_v, torch.Tensor) else gate_v)
        ctx.cache_roots = (weakref.ref(_root(k_cache)), weakref.ref(_root(v_cache)))
        ctx.logs, ctx.links = logs, links
        ctx.previous = (_previous_link(k_cache), _previous_link(v_cache))
        ctx.softmax_scale, ctx.causal, ctx.max_seqlen_k, ctx.impl = softmax_scale, causal, max_seqlen_k, impl
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        for name, root_ref, log in zip(("k_cache", "v_cache"), ctx.cache_roots, ctx.logs):
            _check_not_rewritten(name, root_ref, log)
        (q, k, v, cache_seqlens, gate_t, gate_v_t, k_old, v_old, k_new, v_new, out, lse, k_live,
         v_live, block_table) = ctx.saved_tensors
        gate = gate_t if gate_t is not None else ctx.gates[0]
        gate_v = gate_v_t if gate_v_t is not None else ctx.gates[1]
        updates = ctx.needs_input_grad[3:5]
        # The caches' gradient after this call, as the commit nodes took it (None: nothing reached it); a cache
        # whose gradient is wanted gets zeros at the end of a chain.
        buffers = []
        for cache, link, update in zip((k_live, v_live), ctx.links, updates):
            grad, link.grad = link.grad, None
            if grad is None and update:
                grad = torch.zeros(cache.shape, dtype=cache.dtype, device=cache.device)
            buffers.append(grad)
        if dout is None:
            dout = torch.zeros_like(out)
        blend = BlendGrad(k, v, k_old, v_old, gate, gate_v, ctx.needs_input_grad[6], ctx.needs_input_grad[7],
                          *updates)
        # The buffers of updated caches become the caches' gradient before the call, in place.
        dq, dk, dv, dgate, dgate_v = ctx.impl.bwd(
            q, k_live, v_live, k if k_new is None else k_new, v if v_new is None else v_new, cache_seqlens, out,
            lse, dout, dlse, ctx.softmax_scale, ctx.causal, *buffers, ctx.max_seqlen_k, **_table(block_table),
            blend=blend)
        cache_grads = []
        for buffer, update, previous in zip(buffers, updates, ctx.previous):
            cache_grads.append(buffer if update else None)
            if update and previous is not None:
                previous.handed = buffer
        return (dq, dk, dv, *cache_grads, None, dgate, dgate_v, None, None, None, None, None, None, None)


class _CommitFunction(torch.autograd.Function):
    """Declares the in-place write of the active slots into ``cache``; ``after`` is an output of the call's
    main node (its lse), so that this node's backward runs before the main node's.

    Its backward hands the cache's incoming gradient to the main node (through ``link``), which finishes it
    as the gradient of the cache before the call.
    """

    @staticmethod
    def forward(ctx, cache, after, link):
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(cache)
        ctx.link = link
        ctx.is_view = cache._is_view()
        return cache

    @staticmethod
    def backward(ctx, d_cache):
        link = ctx.link
        handed, link.handed = link.handed, None
        if d_cache is None:
            return None, None, None
        writes = ctx.needs_input_grad[0]
        # The main node reads the new slots' gradient here and, when the cache's own gradient is wanted, writes
        # into it: the op's own buffer is taken as it is, anything else is copied once into a buffer the op
        # owns (read-only, it is taken as it is).
        link.grad = d_cache if d_cache is handed or not writes else d_cache.clone(memory_format=torch.contiguous_format)
        d_old = None
        if writes and ctx.is_view:
            # The main node returns the whole gradient of the cache before the call.  For a view, autograd's
            # CopySlices (the base's node) drops the base's entire gradient when this one is None: zeros
            # then, broadcast from one element (no allocation).
            d_old = d_cache.new_zeros(()).expand(d_cache.shape)
        return d_old, None, None


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
        out, lse = GatedKVAttentionFunction.apply(*args[:5], lengths, *args[6:], table, impl, logs, links)
        _CommitFunction.apply(p.k_cache, lse, links[0])
        _CommitFunction.apply(p.v_cache, lse, links[1])
    else:
        out, lse = impl.fwd(*args, **_table(table))
        # Kernel writes do not move the version counter; declare the mutation.
        increment_version(p.k_cache)
        increment_version(p.v_cache)
    end_write(p.k_cache, logs[0])
    end_write(p.v_cache, logs[1])
    return out, lse
