"""Held-out evaluation of a looped LM, chunk-wise or token by token, split over the processes of a run."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from melt_kernels.model import LoopedLM
from melt_kernels.reference import compute_dtype
from melt_kernels.train.data import IGNORE, Batch, shard
from melt_kernels.train.distributed import Context


@torch.no_grad()
def evaluate(model: LoopedLM, kind: str, batch: Batch, chunk_size: Optional[int] = None, *,
             context: Optional[Context] = None, rows_per_call: Optional[int] = None) -> dict:
    """Next-token loss of ``model`` on ``batch`` = (input_ids, targets), run chunk-wise on a fresh ``kind`` cache.

    ``chunk_size`` None runs each sequence as one chunk; 1 decodes token by
    token (what serving does).  The rows are split over the processes of
    ``context`` (the batch's rows must divide evenly) and the sums reduced,
    so every process returns the same numbers.  ``rows_per_call`` bounds the
    rows run at once.  Returns ``loss`` (nats per scored target),
    ``bits_per_token`` (the same in bits: bits per byte on a byte corpus),
    ``acc`` (greedy accuracy), ``tokens`` (scored targets) and
    ``cache_bytes`` (what one sequence's cache holds).
    """
    context = context or Context(device=model.model.embed_tokens.weight.device)
    ids, targets = shard(batch, context.rank, context.world)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # nll, hits, scored
    step = rows_per_call or ids.shape[0]
    cache_bytes = None
    try:
        for start in range(0, ids.shape[0], step):
            rows = ids[start:start + step].to(context.device)
            want = targets[start:start + step].to(context.device)
            cache = model.new_cache(kind, *rows.shape)
            logits = model.prefill(rows, cache, chunk_size)
            logits = logits.to(compute_dtype(logits.dtype))
            scored = want != IGNORE
            sums += torch.tensor([F.cross_entropy(logits[scored], want[scored], reduction="sum").item(),
                                  (logits[scored].argmax(-1) == want[scored]).sum().item(), scored.sum().item()],
                                 dtype=torch.float64)
            cache_bytes = cache.nbytes // rows.shape[0]
    finally:
        model.train(was_training)
    nll, hits, scored = context.all_reduce_sum(sums).tolist()
    loss = nll / scored
    return {"loss": loss, "bits_per_token": loss / math.log(2), "acc": hits / scored, "tokens": int(scored),
            "cache_bytes": cache_bytes}
