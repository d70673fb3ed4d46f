"""A slow, loop-by-loop, out-of-place model of the op (docs/op.md#the-op), written independently of melt_kernels.

Python loops over rows, tokens and heads; float64 unless told otherwise;
differentiable with respect to every tensor argument.  The reference is
tested against it, and the kernels against the reference.
"""
import torch


def gate_at(gate, b, i, h, head_dim, dtype):
    """The retention of row b, token i, kv head h as a (D,) vector, or None for write-through."""
    if gate is None:
        return None
    if isinstance(gate, float):
        return torch.full((head_dim,), gate, dtype=dtype)
    g = gate.to(dtype)
    while g.dim() < 4:
        g = g.unsqueeze(0)
    idx = tuple(0 if size == 1 else j for size, j in zip(g.shape[:3], (b, i, h)))
    return g[idx].expand(head_dim)


def loop_model(q, k, v, k_cache, v_cache, cache_seqlens, gate=None, gate_v=None, softmax_scale=None, causal=True,
               dtype=torch.float64):
    """Returns (out, lse, K_new, V_new): new tensors, the caches' inputs untouched.

    The cache update and the attention are computed in ``dtype``; the new
    cache values are rounded to the caches' dtype once, and attention reads
    the rounded values, as docs/op.md#the-cache-update says.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    if gate_v is None:
        gate_v = gate
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    lengths = [int(x) for x in torch.as_tensor(cache_seqlens).reshape(-1).expand(batch)]
    cache_dtype = k_cache.dtype
    new_k, new_v = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        for i in range(seqlen_q):
            p = lengths[b] + i
            for h in range(heads_kv):
                for cache, old_cache, fresh, alpha in ((new_k, k_cache, k, gate), (new_v, v_cache, v, gate_v)):
                    a = gate_at(alpha, b, i, h, head_dim, dtype)
                    x = fresh[b, i, h].to(dtype)
                    if a is not None:
                        x = a * old_cache[b, p, h].to(dtype) + (1 - a) * x
                    cache[b, p, h] = x.to(cache_dtype)
    outs, lses = [], []
    for b in range(batch):
        row_out, row_lse = [], []
        for i in range(seqlen_q):
            last = lengths[b] + (i if causal else seqlen_q - 1)
            tok_out, tok_lse = [], []
            for hq in range(heads_q):
                h = hq // group
                keys = new_k[b, :last + 1, h].to(dtype)
                values = new_v[b, :last + 1, h].to(dtype)
                scores = softmax_scale * (keys @ q[b, i, hq].to(dtype))
                lse = torch.logsumexp(scores, 0)
                tok_out.append(torch.exp(scores - lse) @ values)
                tok_lse.append(lse)
            row_out.append(torch.stack(tok_out))
            row_lse.append(torch.stack(tok_lse))
        outs.append(torch.stack(row_out))
        lses.append(torch.stack(row_lse, dim=1))
    return torch.stack(outs).to(q.dtype), torch.stack(lses), new_k, new_v
