"""The public op: checks first, then the backend's kernels."""
from __future__ import annotations

import torch

from melt_kernels.autograd import run
from melt_kernels.backends import select_backend
from melt_kernels.checks import check_inputs


def gated_kv_attention(q, k, v, k_cache, v_cache, cache_seqlens, gate=None, gate_v=None, *,
                       softmax_scale=None, causal=True, return_lse=False, backend="auto", max_seqlen_k=None,
                       block_table=None):
    """Blends the active tokens' keys/values into a shared KV cache in place, then attends over it.

    This is the MELT step of a looped LM: at every loop iteration the fresh
    k/v of the M active tokens of row b are blended into cache positions
    L_b .. L_b+M-1 with a retention gate, and the queries attend over
    positions 0 .. L_b+M-1 of the updated cache (docs/op.md#the-op).

    Arguments (layout (batch, seq, heads, head_dim), as FlashAttention):
        q: (B, M, Hq, D) queries of the M active tokens.
        k, v: (B, M, Hkv, D) fresh keys/values of the active tokens.
        k_cache, v_cache: (B, S, Hkv, D), **updated in place** at positions
            L_b .. L_b+M-1 of each row b and nowhere else:
            ``K[b, L_b+i] = alpha * K_old[b, L_b+i] + (1 - alpha) * k[b, i]``
            computed in float32 (float64 for float64 tensors) and rounded
            once to the cache dtype; with ``gate=None`` the slot is written
            through (``K[b, L_b+i] = k[b, i]``, the old value is never read).
            S >= L_b + M.  Their version counters move, like any in-place op.
        cache_seqlens: L_b, the settled tokens of each row: a (B,) int32/int64
            tensor (on q's device or the CPU) or a Python int for all rows.
        gate: retention alpha of the keys (and of the values unless gate_v is
            given): None, a float, or a floating tensor broadcastable to
            (B, M, Hkv, D), e.g. (B, M, Hkv, 1) per head; broadcast by
            strides, never copied.
        gate_v: retention of the values, same forms as gate; needs gate.
        softmax_scale: defaults to 1 / sqrt(D).
        causal: active token i sees keys 0 .. L_b+i (bottom-right aligned);
            otherwise all active tokens see keys 0 .. L_b+M-1.
        return_lse: also return the log-sum-exp of the scaled scores.
        backend: "auto" (the default), "triton", "cuda", "composition" or
            "reference".  "triton" and "cuda" are this package's kernels
            (``melt_kernels.available_backends()`` lists those usable
            here); "composition" is the blend written into the cache, then
            PyTorch's own attention over it (contiguous caches, every row
            at one length known on the host); "reference" is the definition
            in PyTorch.  "auto" takes CPU tensors to the reference (to the
            Triton kernels under TRITON_INTERPRET=1) and, on a GPU, the
            fastest implementation the GPU pass measured on that GPU for
            the call's regime (decode, chunk, training) and nearest shape,
            from the committed table melt_kernels/auto_table.py; with no
            row for it, "triton", then "cuda", then "reference".
            ``melt_kernels.which_backend(...)`` takes this op's arguments and
            says which implementation and plan a call runs, and why.
        max_seqlen_k: optional Python int, an upper bound on max_b(L_b) + M
            known on the host (as vLLM's ``max_seq_len``; ``MeltCache`` keeps
            the lengths on the host for it).  With ``cache_seqlens`` on the
            GPU the kernels size their split-KV work by it instead of by the
            capacity S, with no device-to-host sync.  It is a hint: a wrong
            value costs speed, never correctness (the last split of each row
            reaches the row's true length).  Ignored when the lengths are on
            the host (the exact bound is taken from them).  Leave it None
            when capturing a CUDA graph that is replayed at growing lengths:
            the plan, sized by S, then stays balanced at every replay.
        block_table: paged caches (docs/op.md#paged-caches, FlashAttention's layout): a
            (B, max_blocks) int32 tensor on q's device; k_cache and v_cache
            are then (num_blocks, page_size, Hkv, D) pools shared by all
            rows (page_size a multiple of 16 in [16, 256]) and logical
            position p of row b lives at
            ``k_cache[block_table[b, p // page_size], p % page_size]``, so
            S = max_blocks * page_size.  Only the entries a row needs
            (blocks 0 .. (L_b + M - 1) // page_size) are read; the rest may
            hold anything.  With the table on the host, the needed entries
            are checked to lie in [0, num_blocks) and the rows' active slots
            not to alias; on the GPU nothing is checked and the kernels clamp
            every entry into the pool.  Rows may share settled pages (a
            common prompt) for reading; a row whose active slot is another
            row's settled position reads an undefined value (as in
            FlashAttention), and the backward adds both rows' gradients into
            a shared settled page only on the reference backend (the
            kernels' backward then races: give each row its own pages when
            training).

    q, k, v and the caches share one dtype (float16, bfloat16, float32;
    float64 on the reference backend) and one device; Hq is a multiple of
    Hkv (query head h reads kv head h // (Hq // Hkv)); 16 <= D <= 256; every
    tensor has a contiguous last dimension, other strides are honoured.

    Returns:
        out: (B, M, Hq, D) in q's dtype, and with ``return_lse`` also
        lse: (B, Hq, M) float32 (float64 for float64 inputs).

    Differentiable in q, k, v, gate, gate_v and the caches' values before the
    call; the backward reads positions < L_b of the live caches, which must
    not be rewritten before it runs other than by this op's own later calls
    at or after L_b (the next loops and chunks); any other in-place write is
    detected and makes the backward raise RuntimeError.  Under
    torch.compile the call is the custom op melt::gated_kv_attention
    (inference; with gradients it runs eagerly behind a graph break).  Bad
    input raises ValueError/TypeError before anything is written.
    """
    if torch.compiler.is_compiling():
        # Traced as the custom op melt::gated_kv_attention.  Its module is imported here, by the first trace,
        # not with the package: registering the op needs torch._dynamo, which costs ~1.5 s to import.
        from melt_kernels.library import compiled_call

        out, lse = compiled_call(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal,
                                 backend, max_seqlen_k, block_table)
    else:
        problem = check_inputs(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v,
                               softmax_scale=softmax_scale, causal=causal, backend=backend,
                               max_seqlen_k=max_seqlen_k, block_table=block_table)
        out, lse = run(problem, select_backend(backend, problem))
    return (out, lse) if return_lse else out
