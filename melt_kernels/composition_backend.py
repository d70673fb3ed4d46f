"""The composition: the blend of docs/op.md#the-cache-update written into the cache, then PyTorch's own attention
over the updated cache (docs/op.md#backends).

It is what a user would write with PyTorch alone, made an implementation of the op's contract, so that "auto"
runs it wherever the GPU pass measured it faster than the kernels (melt_kernels/auto_table.py): "auto" is then
never slower than the obvious two-step code.  ``backend="composition"`` selects it by name.

Forward.  The active slots are blended exactly as the reference does (``melt_kernels.reference.blend``: float32,
or float64 for float64 caches, rounded once), so the caches are bit-identical to the reference's; the side
outputs (the slots' values before and after the update) are copies of the slots.  Then one of PyTorch's
attention kernels reads the window [0, L + M) of the caches and returns the output and its log-sum-exp (the
launcher contract's lse, (B, Hq, M) float32):

* "flash": FlashAttention-2 (CUDA, float16/bfloat16), whose causal mask is aligned bottom-right as the op's;
* "cudnn": cuDNN's attention (CUDA, float16/bfloat16), whose causal mask is aligned top-left: it runs only where
  the two agree (one active token, no settled prefix, or no causal mask);
* "efficient": the memory-efficient kernel (CUDA, float16/bfloat16/float32), mask type "causal from bottom
  right"; GQA's kv heads are repeated for it and for cuDNN;
* "cpu": PyTorch's CPU flash kernel with an additive mask (CPU tensors: how the tests run it).

The default is "flash" where it runs, else "efficient" on CUDA, and "cpu" on the CPU; ``kernel=`` picks another
(the plan of a table row).  These kernels return the log-sum-exp only through PyTorch's private attention ops
(``torch.ops.aten._scaled_dot_product_*``, the ones SDPA dispatches to).

Backward.  Attention's gradient by autograd through ``torch.nn.functional.scaled_dot_product_attention``
(recomputing the forward: SDPA's backward needs its own saved state), over the settled prefix of the live
caches and the active slots' values the forward attended to; then the blend's chain rule
(``melt_kernels.reference.through_blend``).  A gradient reaching ``lse`` (``dlse``), which SDPA cannot take,
sends the call to the reference's backward.

Where it runs (:func:`unsupported` says why not): contiguous caches (no block table), the lengths known on the
host and equal for every row (then the window is one size, known without a device-to-host sync), and on CUDA
float16/bfloat16/float32 with head_dim a multiple of 8.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from melt_kernels.backends import Backend
from melt_kernels.checks import Problem
from melt_kernels.reference import BlendGrad, blend, compute_dtype, gated_kv_attention_ref_bwd, through_blend

KERNELS = ("flash", "cudnn", "efficient", "cpu")
_HALF = (torch.float16, torch.bfloat16)
_CUDA_DTYPES = {"flash": _HALF, "cudnn": _HALF, "efficient": (*_HALF, torch.float32)}
# _efficient_attention_forward's mask types.
_NO_MASK, _BOTTOM_RIGHT = 0, 2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_kernel(q: torch.Tensor) -> str:
    """The kernel the composition runs when no plan names one."""
    if q.device.type != "cuda":
        return "cpu"
    if q.dtype in _HALF and torch.cuda.get_device_capability(q.device) >= (8, 0):
        return "flash"
    return "efficient"


def _aligned_masks_agree(seqlen_q: int, window: int, causal: bool) -> bool:
    """Whether a top-left causal mask is the op's bottom-right one: one token, no settled prefix, or no mask."""
    return not causal or seqlen_q == 1 or seqlen_q == window


def unsupported(problem: Problem, kernel: Optional[str] = None) -> Optional[str]:
    """Why the composition (with ``kernel``, by default :func:`default_kernel`'s) cannot run ``problem``."""
    p = problem
    if p.block_table is not None:
        return ("backend 'composition' attends with PyTorch's attention over a contiguous cache window; paged "
                "caches (block_table) run on the kernels or the reference")
    if p.max_seqlen_k is None:
        return ("backend 'composition' needs cache_seqlens on the host (a Python int or a CPU tensor): PyTorch's "
                "attention takes the window's length as a host int, and reading lengths on the device would sync")
    if p.min_seqlen_k != p.max_seqlen_k:
        return (f"backend 'composition' needs every row at the same length (one mask for all rows), got lengths "
                f"from {p.min_seqlen_k - p.seqlen_q} to {p.max_seqlen_k - p.seqlen_q}")
    device = p.q.device
    if device.type not in ("cpu", "cuda"):
        return f"backend 'composition' runs on CPU and CUDA tensors, got {device.type}"
    kernel = kernel or default_kernel(p.q)
    if kernel not in KERNELS:
        return f"backend 'composition' has the kernels {KERNELS}, got {kernel!r}"
    if (kernel == "cpu") != (device.type == "cpu"):
        return f"backend 'composition': kernel {kernel!r} does not run {device.type} tensors"
    if device.type == "cuda":
        if p.q.dtype not in _CUDA_DTYPES[kernel]:
            names = ", ".join(_dtype_name(d) for d in _CUDA_DTYPES[kernel])
            return f"backend 'composition' with kernel {kernel!r} runs {names} on CUDA, got {_dtype_name(p.q.dtype)}"
        if p.head_dim % 8:
            return f"backend 'composition' needs head_dim a multiple of 8 on CUDA, got {p.head_dim}"
        if kernel == "cudnn" and not _aligned_masks_agree(p.seqlen_q, p.max_seqlen_k, p.causal):
            return ("backend 'composition' with kernel 'cudnn': cuDNN's causal mask is aligned top-left, the op's "
                    f"bottom-right, and they differ with a settled prefix (L = {p.max_seqlen_k - p.seqlen_q})")
    return None


def _update(cache: torch.Tensor, fresh: torch.Tensor, alpha, settled: int, new: Optional[torch.Tensor],
            old_out: Optional[torch.Tensor]) -> None:
    """The blend of the active slots [settled, settled + M) of every row, in place, as the reference rounds it;
    the slots' values before and after it copied into ``old_out``/``new`` when given."""
    slots = cache[:, settled:settled + fresh.shape[1]]
    if old_out is not None:
        old_out.copy_(slots)
    if isinstance(alpha, torch.Tensor) and alpha.dtype == compute_dtype(cache.dtype):
        # The reference's roundings in four launches instead of eight: a gate in the compute dtype promotes the
        # products to it, and the sum is rounded once, on its store into the cache.
        torch.add(alpha * slots, (1 - alpha) * fresh, out=slots)
    else:
        slots.copy_(blend(None if alpha is None else slots, fresh, alpha, cache.dtype))
    if new is not None:
        new.copy_(slots)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, softmax_scale: float, causal: bool,
            kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, M, Hq, D) over keys/values (B, W, Hkv, D), the op's mask; (out (B, M, Hq, D), lse
    (B, Hq, M))."""
    batch, seqlen_q, heads_q, _ = q.shape
    window, heads_kv = keys.shape[1], keys.shape[2]
    masked = causal and seqlen_q > 1
    if kernel in ("cudnn", "efficient") and heads_q != heads_kv:
        keys, values = (t.repeat_interleave(heads_q // heads_kv, dim=2) for t in (keys, values))
    if kernel == "efficient":  # (B, M, H, D) layout; lse padded to a multiple of 32 rows
        out, lse = torch.ops.aten._efficient_attention_forward(
            q, keys, values, None, None, None, None, None, 0.0, _BOTTOM_RIGHT if masked else _NO_MASK, True,
            scale=softmax_scale)[:2]
        return out, lse[:, :, :seqlen_q]
    qt, kt, vt = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (B, H, S, D) views
    if kernel == "flash":  # is_causal: aligned bottom-right when M < W (FlashAttention >= 2.1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, masked, False,
                                                                      scale=softmax_scale)[:2]
    elif kernel == "cudnn":  # is_causal: aligned top-left, which unsupported() allowed only where they agree
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0,
                                                                      masked and seqlen_q == window, False,
                                                                      scale=softmax_scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, attn_mask=_cpu_mask(seqlen_q, window, masked, q), scale=softmax_scale)
    return out.transpose(1, 2), lse.reshape(batch, heads_q, seqlen_q)


def _cpu_mask(seqlen_q: int, window: int, masked: bool, q: torch.Tensor) -> Optional[torch.Tensor]:
    """The op's bottom-right causal mask as the additive (M, W) bias the CPU kernel takes (in q's dtype)."""
    if not masked:
        return None
    rows = torch.arange(seqlen_q, device=q.device)[:, None] + (window - seqlen_q)
    hidden = torch.arange(window, device=q.device)[None, :] > rows
    return torch.zeros((seqlen_q, window), dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))


def gated_kv_attention_composition_fwd(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale: float,
                                       causal: bool, max_seqlen_k: Optional[int] = None,
                                       block_table: Optional[torch.Tensor] = None, *, k_new=None, v_new=None,
                                       k_old=None, v_old=None, kernel: Optional[str] = None):
    """The reference's signature and result (``gated_kv_attention_ref_fwd``) for a problem :func:`unsupported`
    accepted: every row holds ``max_seqlen_k - M`` settled tokens (``cache_seqlens`` is not read).  Returns (out
    in q's dtype, lse float32, float64 for float64 inputs)."""
    if block_table is not None or max_seqlen_k is None:
        raise RuntimeError("backend 'composition' needs contiguous caches and max_seqlen_k (every row's L + M)")
    settled = max_seqlen_k - q.shape[1]
    _update(k_cache, k, gate, settled, k_new, k_old)
    _update(v_cache, v, gate_v, settled, v_new, v_old)
    out, lse = _attend(q, k_cache[:, :max_seqlen_k], v_cache[:, :max_seqlen_k], softmax_scale, causal,
                       kernel or default_kernel(q))
    return out, lse.to(compute_dtype(q.dtype))


def _attention_grads(q, keys, values, dout, softmax_scale: float, causal: bool):
    """(dq, dkeys, dvalues) of the op's attention by autograd through SDPA (PyTorch picks its kernel)."""
    from torch.nn.attention.bias import causal_lower_right

    seqlen_q, heads_q = q.shape[1], q.shape[2]
    window, heads_kv = keys.shape[1], keys.shape[2]
    masked = causal and seqlen_q > 1
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, keys, values)]
        # GQA's kv heads repeated (their gradients summed by autograd): every SDPA kernel takes that.
        qt, kt, vt = (t.transpose(1, 2) if t is leaves[0] or heads_q == heads_kv else
                      t.repeat_interleave(heads_q // heads_kv, dim=2).transpose(1, 2) for t in leaves)
        if q.device.type == "cpu":
            mask, top_left = _cpu_mask(seqlen_q, window, masked, q), False
        else:  # SDPA takes the bottom-right mask lazily (no (M, W) tensor) and runs FlashAttention or its kin
            mask = causal_lower_right(seqlen_q, window) if masked and seqlen_q < window else None
            top_left = masked and seqlen_q == window
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=top_left, scale=softmax_scale)
        return torch.autograd.grad(out.transpose(1, 2), leaves, dout)


def gated_kv_attention_composition_bwd(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout,
                                       dlse: Optional[torch.Tensor], softmax_scale: float, causal: bool,
                                       dk_cache: Optional[torch.Tensor] = None,
                                       dv_cache: Optional[torch.Tensor] = None, max_seqlen_k: Optional[int] = None,
                                       block_table: Optional[torch.Tensor] = None, *,
                                       blend: Optional[BlendGrad] = None):
    """The reference's signature and results (``gated_kv_attention_ref_bwd``) for a problem :func:`unsupported`
    accepted.  It takes no plan: SDPA picks its own kernel for the recomputation."""
    if dlse is not None:  # SDPA has no gradient input for its log-sum-exp: the reference's math
        return gated_kv_attention_ref_bwd(q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, lse, dout, dlse,
                                          softmax_scale, causal, dk_cache, dv_cache, max_seqlen_k, block_table,
                                          blend=blend)
    seqlen_q = q.shape[1]
    settled = max_seqlen_k - seqlen_q
    active = slice(settled, max_seqlen_k)
    keys, values = (torch.cat([c[:, :settled], new], dim=1)
                    for c, new in ((k_cache, k_new), (v_cache, v_new)))
    dq, dkeys, dvalues = _attention_grads(q, keys, values, dout, softmax_scale, causal)
    # The caches' gradient after the call at the active slots (what later uses gave the new values), read
    # before anything is written; with a blend, only the buffers of caches whose gradient is wanted change.
    ct = compute_dtype(q.dtype)
    buffers = (dk_cache, dv_cache)
    incoming = (None, None) if blend is None else buffers
    updated = buffers if blend is None else tuple(b if update else None
                                                  for b, update in zip(buffers, (blend.update_k, blend.update_v)))
    d_new = [d[:, active] if b is None else d[:, active].to(ct) + b[:, active]
             for d, b in zip((dkeys, dvalues), incoming)]
    for buffer, d in zip(updated, (dkeys, dvalues)):
        if buffer is not None:
            buffer[:, :settled] += d[:, :settled].to(buffer.dtype)
    if blend is None:
        return dq, d_new[0], d_new[1]
    results = [dq]
    for d, buffer, fresh, old, alpha, need_alpha in (
            (d_new[0], updated[0], blend.k, blend.k_old, blend.gate, blend.need_gate),
            (d_new[1], updated[1], blend.v, blend.v_old, blend.gate_v, blend.need_gate_v)):
        d_fresh, d_old, d_alpha = through_blend(d.to(ct), fresh, old, alpha,
                                                need_alpha and isinstance(alpha, torch.Tensor))
        if buffer is not None:
            buffer[:, active] = 0. if d_old is None else d_old.to(buffer.dtype)
        results += [d_fresh.to(fresh.dtype), d_alpha]
    dq, dk, dgate, dv, dgate_v = results
    return dq, dk, dv, dgate, dgate_v


BACKEND = Backend("composition", gated_kv_attention_composition_fwd, gated_kv_attention_composition_bwd,
                  unsupported, needs_true_bound=True)
