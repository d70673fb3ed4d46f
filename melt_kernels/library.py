"""The op as a ``torch.library`` custom op, so ``torch.compile`` can trace calls to it.

``melt::gated_kv_attention`` declares that it mutates ``k_cache`` and
``v_cache`` (so functionalization, re-inplacing and the version counters
know) and has a fake implementation giving ``out``/``lse`` shapes, so
``torch.compile(fullgraph=True)`` compiles the inference path with no graph
break.  Its eager body is the public op's: the same checks, backend choice
and kernels.  This module is imported by the first trace of
``gated_kv_attention`` (or explicitly), not by ``import melt_kernels``: it
needs ``torch._dynamo`` (``torch.compiler.disable``), whose import costs
over a second.

A schema holds tensors, ints, floats, bools and strings, so the Python-level
unions of the public signature are split: ``cache_seqlens`` into an optional
tensor and an optional int, each gate into an optional tensor and an
optional float.

Training under ``torch.compile`` is not traced: a custom op that mutates its
inputs cannot carry an autograd formula, so when any input needs a gradient
:func:`compiled_call` runs the eager autograd path behind a graph break
(``fullgraph=True`` then reports it).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from melt_kernels.autograd import run
from melt_kernels.backends import select_backend
from melt_kernels.checks import check_inputs
from melt_kernels.reference import compute_dtype


def _join(tensor: Optional[Tensor], number):
    return tensor if tensor is not None else number


@torch.library.custom_op("melt::gated_kv_attention", mutates_args=("k_cache", "v_cache"))
def gated_kv_attention_op(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                          cache_seqlens: Optional[Tensor], cache_seqlens_int: Optional[int],
                          gate: Optional[Tensor], gate_v: Optional[Tensor], gate_float: Optional[float],
                          gate_v_float: Optional[float], softmax_scale: Optional[float], causal: bool,
                          backend: str, max_seqlen_k: Optional[int] = None,
                          block_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``gated_kv_attention`` without autograd; returns (out, lse), both contiguous."""
    problem = check_inputs(q, k, v, k_cache, v_cache, _join(cache_seqlens, cache_seqlens_int),
                           _join(gate, gate_float), _join(gate_v, gate_v_float), softmax_scale=softmax_scale,
                           causal=causal, backend=backend, max_seqlen_k=max_seqlen_k, block_table=block_table)
    with torch.no_grad():
        out, lse = run(problem, select_backend(backend, problem))
    # The fake implementation promises contiguous outputs; kernels produce them, the reference may not.
    return out.contiguous(), lse.contiguous()


@gated_kv_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, cache_seqlens, cache_seqlens_int, gate, gate_v, gate_float, gate_v_float,
      softmax_scale, causal, backend, max_seqlen_k=None, block_table=None):
    batch, seqlen_q, heads_q, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, heads_q, head_dim))
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=compute_dtype(q.dtype))
    return out, lse


def _split_gate(name: str, gate):
    """(tensor, float) for the schema; other types are refused as check_inputs would."""
    if gate is None or isinstance(gate, Tensor):
        return gate, None
    if isinstance(gate, numbers.Real) and not isinstance(gate, bool):
        return None, float(gate)
    raise TypeError(f"{name} must be None, a float or a floating-point tensor, got {type(gate).__name__}")


@torch.compiler.disable
def _eager(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal, backend, max_seqlen_k,
           block_table):
    problem = check_inputs(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale=softmax_scale,
                           causal=causal, backend=backend, max_seqlen_k=max_seqlen_k, block_table=block_table)
    return run(problem, select_backend(backend, problem))


def compiled_call(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal, backend,
                  max_seqlen_k=None, block_table=None):
    """What ``gated_kv_attention`` runs while torch.compile traces it; returns (out, lse)."""
    differentiable = (q, k, v, k_cache, v_cache, gate, gate_v)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in differentiable):
        return _eager(q, k, v, k_cache, v_cache, cache_seqlens, gate, gate_v, softmax_scale, causal, backend,
                      max_seqlen_k, block_table)
    if isinstance(cache_seqlens, Tensor):
        seqlens, seqlens_int = cache_seqlens, None
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        seqlens, seqlens_int = None, int(cache_seqlens)
    else:
        raise TypeError(f"cache_seqlens must be a Python int or an int32/int64 tensor, "
                        f"got {type(cache_seqlens).__name__}")
    gate, gate_float = _split_gate("gate", gate)
    gate_v, gate_v_float = _split_gate("gate_v", gate_v)
    return torch.ops.melt.gated_kv_attention(q, k, v, k_cache, v_cache, seqlens, seqlens_int, gate, gate_v,
                                             gate_float, gate_v_float, softmax_scale, causal, backend, max_seqlen_k,
                                             block_table)
