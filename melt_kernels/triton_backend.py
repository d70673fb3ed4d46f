"""The Triton backend: the kernels of ``melt_kernels.kernels`` behind the shared validation and autograd."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from melt_kernels.backends import Backend
from melt_kernels.checks import Problem
from melt_kernels.kernels.bwd import gated_kv_attention_bwd
from melt_kernels.kernels.fwd import gated_kv_attention_fwd
from melt_kernels.kernels.launch import size_reason


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def unsupported(problem: Problem) -> Optional[str]:
    """Why the Triton kernels cannot run ``problem`` (None when they can)."""
    reason = size_reason(problem.cache_len, problem.seqlen_q, problem.heads_q // problem.heads_kv)
    if reason is not None:
        return reason
    device = problem.q.device
    if device.type == "cuda" and problem.q.dtype == torch.bfloat16 and _capability(device) < (8, 0):
        return "backend 'triton' needs compute capability >= 8.0 for bfloat16"
    return None


BACKEND = Backend("triton", gated_kv_attention_fwd, gated_kv_attention_bwd, unsupported)
