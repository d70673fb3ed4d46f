"""The pure-PyTorch reference of the fused op (docs/op.md#the-op): the definition
every kernel is tested against.

Vectorised over batch, tokens and heads (no Python loop over tokens), on any
device and in any floating dtype.  Layout and signatures are those of the
kernel launchers in ``melt_kernels.kernels``:

* :func:`gated_kv_attention_ref_fwd` blends the active slots into the caches
  in place and returns ``(out, lse)``;
* :func:`gated_kv_attention_ref_bwd` is attention's backward given the
  active slots' values as the forward read them, and with a :class:`BlendGrad`
  the blend's backward too (:func:`through_blend`): the gradients of the op's
  own inputs, which ``melt_kernels.autograd`` hands back for every backend.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from melt_kernels.checks import Gate, cache_capacity


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def active_index(cache_seqlens: torch.Tensor, kv_shape: tuple) -> torch.Tensor:
    """(B, M, Hkv, D) int64 index of the active slots L_b + i along dim 1 of a contiguous cache."""
    batch, seqlen_q, heads_kv, head_dim = kv_shape
    pos = cache_seqlens.long()[:, None] + torch.arange(seqlen_q, device=cache_seqlens.device)
    return pos[:, :, None, None].expand(batch, seqlen_q, heads_kv, head_dim)


def slot_index(positions: torch.Tensor, block_table: Optional[torch.Tensor] = None,
               page_size: int = 0, num_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Where logical positions (B, N) of each row live in a cache: ``cache[i0, i1]`` is (B, N, Hkv, D).

    Contiguous caches (no table) are the identity mapping (row b, position p); through a block table
    (docs/op.md#paged-caches) position p of row b is slot p % page_size of page block_table[b, p // page_size], the entry
    clamped to [0, num_blocks) so that positions a row does not need never index outside the pool.
    """
    if block_table is None:
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return rows.expand_as(positions), positions
    pages = block_table.long().gather(1, positions // page_size).clamp_(0, num_blocks - 1)
    return pages, positions % page_size


def active_slots(cache_seqlens: torch.Tensor, seqlen_q: int, cache: torch.Tensor,
                 block_table: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (i0, i1) index of the active slots L_b .. L_b+M-1 of ``cache`` (see :func:`slot_index`)."""
    pos = cache_seqlens.long()[:, None] + torch.arange(seqlen_q, device=cache_seqlens.device)  # [B, M]
    return slot_index(pos, block_table, cache.shape[1], cache.shape[0])


def read_active(cache: torch.Tensor, cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor],
                into: Optional[torch.Tensor]) -> None:
    """Copies the active slots of ``cache`` into ``into`` (B, M, Hkv, D), when it is not None: the side outputs
    the forward launchers write for the backward (their values before or after the update)."""
    if into is not None:
        into.copy_(cache[active_slots(cache_seqlens, into.shape[1], cache, block_table)])


def logical(cache: torch.Tensor, block_table: Optional[torch.Tensor], window: int) -> torch.Tensor:
    """Positions 0 .. window-1 of every row as a (B, window, Hkv, D) tensor: a view of a contiguous cache, a
    gathered copy of a paged pool (differentiable either way)."""
    if block_table is None:
        return cache[:, :window]
    positions = torch.arange(window, device=cache.device).expand(block_table.shape[0], window)
    return cache[slot_index(positions, block_table, cache.shape[1], cache.shape[0])]


def blend(old: Optional[torch.Tensor], fresh: torch.Tensor, alpha: Gate, dtype: torch.dtype) -> torch.Tensor:
    """alpha * old + (1 - alpha) * fresh in the compute dtype, rounded once to ``dtype``.

    With ``alpha`` None the slot is written through and ``old`` is not read.
    """
    if alpha is None:
        return fresh.to(dtype)
    ct = compute_dtype(dtype)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(ct)
    return (alpha * old.to(ct) + (1 - alpha) * fresh.to(ct)).to(dtype)


def splice(cache: torch.Tensor, active: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """``cache`` (B, W, Hkv, D) with positions L_b .. L_b+M-1 taken from ``active`` (B, M, Hkv, D).

    Out of place and differentiable in both arguments.
    """
    window, seqlen_q = cache.shape[1], active.shape[1]
    offset = torch.arange(window, device=cache.device)[None, :] - cache_seqlens.long()[:, None]  # [B, W]
    is_active = (offset >= 0) & (offset < seqlen_q)
    index = offset.clamp(0, seqlen_q - 1)[:, :, None, None].expand_as(cache)
    return torch.where(is_active[:, :, None, None], active.gather(1, index), cache)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
              softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/op.md#the-attention-read over caches already holding the active tokens; differentiable.

    Returns out (B, M, Hq, D) in q.dtype and lse (B, Hq, M) in the compute dtype.
    The caches may be cut to any window that covers max_b(L_b) + M positions.
    Positions past L_b + M - 1 of row b are selected away (``torch.where``), not
    weighted by a zero probability (0 * NaN is NaN): whatever they hold, NaN
    and inf included, reaches neither row b's result nor any gradient.  The
    active slots L_b+i+1 .. L_b+M-1 that a causal token i does not see are this
    call's own updated slots (finite unless k, v or a gated slot's old value
    are not); they get a zero probability, as in FlashAttention and SDPA.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    window, heads_kv = k_cache.shape[1], k_cache.shape[2]
    groups = heads_q // heads_kv
    ct = compute_dtype(q.dtype)
    positions = torch.arange(window, device=q.device)
    lengths = cache_seqlens.long()
    in_row = (positions[None, :] < (lengths + seqlen_q)[:, None])[:, :, None, None]  # [B, W, 1, 1]
    keys, values = (torch.where(in_row, c.to(ct), 0) for c in (k_cache, v_cache))
    q_g = q.to(ct).reshape(batch, seqlen_q, heads_kv, groups, head_dim)
    scores = torch.einsum("bmhgd,bshd->bhgms", q_g, keys) * softmax_scale  # [B, Hkv, G, M, W]
    # Active token i of row b sees keys [0, L_b + i] (causal) or [0, L_b + M - 1].
    rows = torch.arange(seqlen_q, device=q.device) if causal else torch.full((seqlen_q,), seqlen_q - 1,
                                                                               device=q.device)
    last = lengths[:, None] + rows[None, :]  # [B, M]
    visible = positions[None, None, :] <= last[:, :, None]  # [B, M, W]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, M]
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhgms,bshd->bmhgd", probs, values)
    return out.reshape(batch, seqlen_q, heads_q, head_dim).to(q.dtype), lse.reshape(batch, heads_q, seqlen_q)


def _window(max_seqlen_k: Optional[int], cache_len: int) -> int:
    return cache_len if max_seqlen_k is None else max_seqlen_k


def gated_kv_attention_ref_fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate: Gate, gate_v: Gate,
                               softmax_scale: float, causal: bool, max_seqlen_k: Optional[int] = None,
                               block_table: Optional[torch.Tensor] = None, *, k_new=None, v_new=None, k_old=None,
                               v_old=None):
    """In-place gated update of the active slots (docs/op.md#the-cache-update), then attention
    (docs/op.md#the-attention-read).

    ``cache_seqlens`` is a (B,) integer tensor on q's device; ``gate``/``gate_v``
    are None, floats or tensors broadcastable to (B, M, Hkv, D).  With
    ``block_table`` the caches are (num_blocks, page_size, Hkv, D) pools
    (docs/op.md#paged-caches).  ``k_new``/``v_new`` and ``k_old``/``v_old``:
    None or (B, M, Hkv, D) buffers that receive the active slots' values after
    and before the update.  Returns (out, lse); lse is float32 (float64 for
    float64 inputs).
    """
    slots = active_slots(cache_seqlens, k.shape[1], k_cache, block_table)
    for cache, fresh, alpha, new, old_out in ((k_cache, k, gate, k_new, k_old), (v_cache, v, gate_v, v_new, v_old)):
        old = None if alpha is None else cache[slots]
        if old_out is not None:
            old_out.copy_(old)
        # index_put_, not scatter_: PyTorch's CPU scatter_ rewrites the bits of untouched bfloat16 NaNs
        # (0x7FC0 -> 0xFFFF), a write outside the active slots.
        cache[slots] = blend(old, fresh, alpha, cache.dtype)
        read_active(cache, cache_seqlens, block_table, new)
    window = _window(max_seqlen_k, cache_capacity(k_cache, block_table))
    return attention(q, logical(k_cache, block_table, window), logical(v_cache, block_table, window),
                     cache_seqlens, softmax_scale, causal)


class BlendGrad(NamedTuple):
    """What a backward launcher needs of the blend (docs/op.md#gradients) to return the gradients of the op's
    own inputs instead of attention's gradient at the new slot values.

    ``k``/``v``: the fresh values; ``k_old``/``v_old``: the slots' values before the update, (B, M, Hkv, D)
    contiguous (None unless a gate's gradient is wanted); ``gate``/``gate_v``: None, a float or a tensor, as
    the forward took them; ``need_gate``/``need_gate_v``: whether their gradient is wanted; ``update_k``/
    ``update_v``: whether the cache gradient buffers (dk_cache/dv_cache) are to become the gradient of the
    caches before the call (attention's prefix gradient added, the active slots replaced by the old values'
    gradient), or, if False, only hold what later uses gave the new values (read at the active slots).
    """

    k: torch.Tensor
    v: torch.Tensor
    k_old: Optional[torch.Tensor]
    v_old: Optional[torch.Tensor]
    gate: Gate
    gate_v: Gate
    need_gate: bool
    need_gate_v: bool
    update_k: bool
    update_v: bool


def through_blend(d_new: torch.Tensor, fresh: torch.Tensor, old: Optional[torch.Tensor], alpha: Gate,
                  need_alpha_grad: bool):
    """Backward of ``new = alpha * old + (1 - alpha) * fresh`` at the active slots.

    ``d_new`` is the total gradient reaching the new slot values (compute dtype).  Returns (d_fresh, d_old,
    d_alpha) in the compute dtype but for d_alpha, reduced to the gate's own shape and dtype (gates broadcast
    by strides); d_old is None for write-through (the old value never reaches the output), d_alpha None
    unless asked for.
    """
    if alpha is None:
        return d_new, None, None
    a = alpha.to(d_new.dtype) if isinstance(alpha, torch.Tensor) else alpha
    d_alpha = None
    if need_alpha_grad:
        d_alpha = (d_new * (old.to(d_new.dtype) - fresh.to(d_new.dtype))).sum_to_size(alpha.shape).to(alpha.dtype)
    return (1 - a) * d_new, a * d_new, d_alpha


def gated_kv_attention_ref_bwd(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout,
                               dlse: Optional[torch.Tensor], softmax_scale: float, causal: bool,
                               dk_cache: Optional[torch.Tensor] = None, dv_cache: Optional[torch.Tensor] = None,
                               max_seqlen_k: Optional[int] = None, block_table: Optional[torch.Tensor] = None, *,
                               blend: Optional[BlendGrad] = None):
    """The backward by recomputation.

    Positions < L_b are read from the live caches; the active slots from
    ``k_new``/``v_new`` (B, M, Hkv, D), the values the forward attended to.
    ``max_seqlen_k`` must bound max_b(L_b) + M (the window attended over).
    ``out`` and ``lse`` are not needed here (kernels use them); they are
    accepted to keep one signature for every backend.

    Without ``blend``, attention's backward: ``dk_cache``/``dv_cache`` are
    None, or (B, S, Hkv, D) buffers to which attention's gradient at
    positions < L_b is added in place (nothing else of them changes, bit for
    bit); returns (dq, dk_new, dv_new).  With ``blend`` (:class:`BlendGrad`),
    the gradients of the op's inputs: the buffers hold, on entry, the
    gradient of the caches after the call (None: zero) and, where
    ``blend.update_*``, on return the gradient of the caches before it;
    returns (dq, dk, dv, dgate, dgate_v).
    """
    if blend is not None:
        return _ref_bwd_through_blend(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout, dlse,
                                      softmax_scale, causal, dk_cache, dv_cache, max_seqlen_k, block_table, blend)
    del out, lse
    window = _window(max_seqlen_k, cache_capacity(k_cache, block_table))
    buffers = (dk_cache, dv_cache)
    with torch.enable_grad():
        q_ = q.detach().requires_grad_()
        new = [t.detach().requires_grad_() for t in (k_new, v_new)]
        prefix = [logical(c, block_table, window).detach().requires_grad_(b is not None)
                  for c, b in zip((k_cache, v_cache), buffers)]
        keys, values = (splice(c, n, cache_seqlens) for c, n in zip(prefix, new))
        o, lse_ = attention(q_, keys, values, cache_seqlens, softmax_scale, causal)
        outputs, cotangents = [o], [dout]
        if dlse is not None:
            outputs.append(lse_)
            cotangents.append(dlse.to(lse_.dtype))
        inputs = [q_, *new] + [c for c in prefix if c.requires_grad]
        grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    dq, dk_new, dv_new = (torch.zeros_like(t) if g is None else g for g, t in zip(grads[:3], inputs[:3]))
    positions = torch.arange(window, device=q.device).expand(q.shape[0], window)
    settled = positions < cache_seqlens.long()[:, None]  # [B, W]
    prefix_grads = iter(grads[3:])
    for buffer in buffers:
        if buffer is not None:
            g = next(prefix_grads)
            if g is not None:
                if block_table is None:
                    part = buffer[:, :window]
                    part.copy_(torch.where(settled[:, :, None, None], part + g.to(part.dtype), part))
                else:
                    # Rows may share settled pages (a common prompt): their gradients add up.
                    i0, i1 = slot_index(positions, block_table, buffer.shape[1], buffer.shape[0])
                    buffer.index_put_((i0[settled], i1[settled]), g[settled].to(buffer.dtype), accumulate=True)
    return dq, dk_new, dv_new


def _ref_bwd_through_blend(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout, dlse, softmax_scale,
                           causal, dk_cache, dv_cache, max_seqlen_k, block_table, blend: BlendGrad):
    """:func:`gated_kv_attention_ref_bwd` with ``blend``: attention's backward, then the blend's."""
    buffers = (dk_cache, dv_cache)
    slots = active_slots(cache_seqlens, k_new.shape[1], k_cache, block_table)
    # What later uses gave the new slot values, before anything is written.
    grads_in = [None if b is None else b[slots] for b in buffers]
    updated = [b if update else None for b, update in zip(buffers, (blend.update_k, blend.update_v))]
    dq, dk_attn, dv_attn = gated_kv_attention_ref_bwd(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse,
                                                      dout, dlse, softmax_scale, causal, *updated, max_seqlen_k,
                                                      block_table)
    ct = compute_dtype(q.dtype)
    results = [dq]
    for d_attn, d_in, buffer, fresh, old, alpha, need_alpha in (
            (dk_attn, grads_in[0], updated[0], blend.k, blend.k_old, blend.gate, blend.need_gate),
            (dv_attn, grads_in[1], updated[1], blend.v, blend.v_old, blend.gate_v, blend.need_gate_v)):
        d_new = d_attn.to(ct) if d_in is None else d_attn.to(ct) + d_in.to(ct)
        d_fresh, d_old, d_alpha = through_blend(d_new, fresh, old, alpha,
                                                need_alpha and isinstance(alpha, torch.Tensor))
        if buffer is not None:
            buffer[slots] = 0. if d_old is None else d_old.to(buffer.dtype)
        results += [d_fresh.to(fresh.dtype), d_alpha]
    dq, dk, dgate, dv, dgate_v = results
    return dq, dk, dv, dgate, dgate_v
