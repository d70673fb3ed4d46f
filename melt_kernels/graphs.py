"""A decode step of the looped model as one CUDA graph (docs/serving.md#cuda-graphs).

:class:`CapturedDecode` captures one decode step of a :class:`~melt_kernels.LoopedLM`, all T loops of all
layers, on a fixed batch of a cache (contiguous or paged), and replays it per token.  The captured step reads
and writes device state only (``LoopedLM.forward(..., capturable=True)``): the tokens from a static input
buffer, the lengths and the block table from the cache's device tensors, which it advances in place
(``seqlens += 1``), and the kernels plan by the caches' capacity, not by a host hint, so one graph serves every
length.  Between replays the host does what cannot be captured: it takes a page from the pool when a row
crosses into a new one (:meth:`~melt_kernels.PagedCache.reserve` writes the table in place, no sync) and
advances its copy of the lengths.

The batch is fixed at capture: ``PagedCache.drop``/``extend``/``add_rows`` replace the cache's tensors and make
a captured step stale (capture again, or keep finished rows and ignore their tokens, as serving engines pad a
graph's batch).  Without CUDA (or with ``capture=False``) :meth:`step` runs the same step eagerly.
"""
from __future__ import annotations

from typing import Optional

import torch

from melt_kernels.model import Cache, LoopedLM


class CapturedDecode:
    """``step(tokens) -> logits``: one decode step of ``model`` on ``cache`` (``batch`` = cache.batch rows),
    replayed from a CUDA graph when the model is on a GPU.

    ``warmup`` eager runs (on a side stream, undone) compile the kernels before the capture.
    """

    def __init__(self, model: LoopedLM, cache: Cache, *, capture: Optional[bool] = None, warmup: int = 2):
        self.model, self.cache = model, cache
        device = cache.seqlens.device
        self.captured = device.type == "cuda" if capture is None else capture
        if self.captured and device.type != "cuda":
            raise ValueError(f"capturing a CUDA graph needs the model and cache on a CUDA device, got {device}")
        self.tokens = torch.zeros((cache.batch, 1), dtype=torch.long, device=device)
        self.logits: Optional[torch.Tensor] = None
        self.graph = None
        if self.captured:
            self._capture(warmup)

    def _body(self) -> torch.Tensor:
        """The captured work: one token through every loop and layer; device lengths advanced in place."""
        with torch.no_grad():
            return self.model(self.tokens, self.cache, last_only=True, capturable=True)[:, -1]

    def _capture(self, warmup: int) -> None:
        cache = self.cache
        # The warm-up runs write position L_b of every row (which the first real step rewrites: its first loop
        # writes through) and advance the lengths, undone after each.
        self._host_checks(cache.batch)
        stream = torch.cuda.Stream(device=self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream(self.tokens.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._body()
                cache.seqlens.sub_(1)
        torch.cuda.current_stream(self.tokens.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        # Capturing records the work without running it: the lengths have not moved.

    def _host_checks(self, batch: int) -> None:
        """What the captured step does not check: the batch, room for one more token, its page reserved."""
        if batch != self.cache.batch:
            raise ValueError(f"tokens has {batch} rows, the captured batch {self.cache.batch}")
        self.model.model.check_cache(self.cache, batch, 1)
        self.cache.reserve(1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds ``tokens`` (B,) or (B, 1) and returns the next-token logits (B, vocab), a fresh tensor."""
        tokens = tokens.reshape(-1, 1)
        self._host_checks(tokens.shape[0])
        self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._body()
        self.cache.seqlens_host += 1
        return logits.clone()
