"""Held-out evaluation of a looped LM, chunk-wise or token by token, split over the processes of a run."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from melt_kernels.model import KVGate, LatentGate, LoopedLM
from melt_kernels.reference import compute_dtype
from melt_kernels.train.data import IGNORE, Batch, shard
from melt_kernels.train.distributed import Context


@torch.no_grad()
def evaluate(model: LoopedLM, kind: str, batch: Batch, chunk_size: Optional[int] = None, *,
             prompt: Optional[int] = None, per_loop: bool = False, groups: Optional[torch.Tensor] = None,
             context: Optional[Context] = None, rows_per_call: Optional[int] = None) -> dict:
    """Next-token loss of ``model`` on ``batch`` = (input_ids, targets), run chunk-wise on a fresh ``kind`` cache.

    ``chunk_size`` None runs each sequence as one chunk; 1 decodes token by
    token.  ``prompt`` = P evaluates as models are served: the first P
    tokens are prefilled in chunks of ``chunk_size``, the rest decoded one
    token at a time, and only the continuation's targets are scored (the
    prompt's are what the chunked evaluation measures).  ``per_loop`` adds
    ``bits_per_token_per_loop``: the loss of every loop's h through the head
    (for MELT, on the cache the full T loops settle).  The rows are split
    over the processes of ``context`` (the batch's rows must divide evenly)
    and the sums reduced, so every process returns the same numbers.
    ``rows_per_call`` bounds the rows run at once.  Returns ``loss`` (nats
    per scored target), ``bits_per_token`` (the same in bits: bits per byte
    on a byte corpus), ``acc`` (greedy accuracy), ``tokens`` (scored
    targets) and ``cache_bytes`` (what one sequence's cache holds).
    ``groups`` (the batch's shape, ints >= 0) labels every scored target
    with a group, such as a task's difficulty: then ``acc_per_group`` is the
    greedy accuracy of the targets of each label 0 .. max label (None for a
    label with no target), with ``per_loop`` also ``acc_per_group_per_loop``
    (every loop's head; [loop][label]).
    """
    context = context or Context(device=model.model.embed_tokens.weight.device)
    ids, targets = shard(batch, context.rank, context.world)
    labels = None
    if groups is not None:
        if groups.shape != batch[1].shape or groups.dtype != torch.int64 or bool((groups < 0).any()):
            raise ValueError(f"groups must be int64 labels >= 0 of the targets' shape {tuple(batch[1].shape)}, got "
                             f"{tuple(groups.shape)} {groups.dtype}")
        num_groups = int(groups.max()) + 1
        labels = shard((groups,), context.rank, context.world)[0]
    if prompt is not None and not 0 < prompt < ids.shape[1]:
        raise ValueError(f"prompt must leave a continuation: 0 < prompt < {ids.shape[1]}, got {prompt}")
    if prompt is not None:
        targets = targets.clone()
        targets[:, :prompt] = IGNORE
    was_training = model.training
    model.eval()
    loops = model.num_loops if per_loop else 0
    sums = torch.zeros(3 + loops, dtype=torch.float64)  # nll, hits, scored, each loop's nll
    # Per label: scored, hits, each loop's hits.
    group_sums = None if labels is None else torch.zeros(2 + loops, num_groups, dtype=torch.float64)
    step = rows_per_call or ids.shape[0]
    cache_bytes = None
    try:
        for start in range(0, ids.shape[0], step):
            rows = ids[start:start + step].to(context.device)
            want = targets[start:start + step].to(context.device)
            cache = model.new_cache(kind, *rows.shape)
            parts = [(rows, chunk_size)] if prompt is None else [(rows[:, :prompt], chunk_size), (rows[:, prompt:], 1)]
            runs = [model.prefill(part, cache, size, return_loops=True) for part, size in parts]
            logits = torch.cat([r[0] for r in runs], dim=1)
            logits = logits.to(compute_dtype(logits.dtype))
            scored = want != IGNORE
            values = [F.cross_entropy(logits[scored], want[scored], reduction="sum").item(),
                      (logits[scored].argmax(-1) == want[scored]).sum().item(), scored.sum().item()]
            if per_loop:
                hidden = torch.cat([r[1].hidden_states for r in runs], dim=2)[:, scored]  # (T, S, hidden)
                every = model.lm_head(hidden).to(logits.dtype)
                values += [F.cross_entropy(every[t], want[scored], reduction="sum").item() for t in range(loops)]
            sums += torch.tensor(values, dtype=torch.float64)
            if labels is not None:
                label = labels[start:start + step][scored.cpu()]
                hit = [logits[scored].argmax(-1) == want[scored]]
                if per_loop:
                    hit += [every[t].argmax(-1) == want[scored] for t in range(loops)]
                group_sums[0] += torch.bincount(label, minlength=num_groups).double()
                for row, h in enumerate(hit, 1):
                    group_sums[row] += torch.bincount(label, weights=h.cpu().double(), minlength=num_groups)
            cache_bytes = cache.nbytes // rows.shape[0]
    finally:
        model.train(was_training)
    total = context.all_reduce_sum(sums).tolist()
    nll, hits, scored = total[:3]
    loss = nll / scored
    result = {"loss": loss, "bits_per_token": loss / math.log(2), "acc": hits / scored, "tokens": int(scored),
              "cache_bytes": cache_bytes}
    if per_loop:
        result["bits_per_token_per_loop"] = [value / scored / math.log(2) for value in total[3:]]
    if group_sums is not None:
        counts, *hits = context.all_reduce_sum(group_sums).tolist()
        rates = [[h / n if n else None for h, n in zip(row, counts)] for row in hits]
        result["acc_per_group"] = rates[0]
        if per_loop:
            result["acc_per_group_per_loop"] = rates[1:]
    return result


@torch.no_grad()
def gate_retention(model: LoopedLM, batch: Batch, chunk_size: Optional[int] = None, *,
                   context: Optional[Context] = None) -> Optional[list[float]]:
    """How much of a token's slot the MELT gates keep, per loop: the mean retention (z of the latent gate, alpha
    of the kv gates) over ``batch``'s tokens, layers and gate units, for loops 2..T (the gate first acts at loop
    2), running ``batch`` in chunks of ``chunk_size`` on a MELT cache; None for a model without gates."""
    if model.num_loops == 1:
        return None
    sums = torch.zeros(2, model.num_loops - 1, dtype=torch.float64)  # retention sum, count; per loop
    layers = model.config.num_hidden_layers
    calls = [0]

    def record(retention: torch.Tensor) -> None:
        # Gate calls come chunk by chunk, loop by loop (loops 2..T), layer by layer.
        loop = (calls[0] // layers) % (model.num_loops - 1)
        calls[0] += 1
        sums[0, loop] += retention.double().sum().item()
        sums[1, loop] += retention.numel()

    def latent(module, args, out):
        x, h_prev = args
        record(torch.sigmoid((module.w_z(x) + module.u_z(h_prev)).float()))

    handles = [m.register_forward_hook(latent if isinstance(m, LatentGate) else lambda m_, a, out: record(out))
               for m in model.modules() if isinstance(m, (LatentGate, KVGate))]
    if not handles:
        return None
    try:
        evaluate(model, "melt", batch, chunk_size, context=context)
    finally:
        for h in handles:
            h.remove()
    context = context or Context()
    sums = context.all_reduce_sum(sums)
    return (sums[0] / sums[1]).tolist()
