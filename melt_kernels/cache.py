"""KV caches for looped LMs, allocated up front for a maximum length.

* :class:`MeltCache`: one K/V pair per layer, shared by all loops (MELT):
  memory N_layers x max_seqlen, independent of the loop depth T.
* :class:`LoopLMCache`: one K/V pair per (loop, layer) (Ouro-style LoopLM):
  memory N_layers x T x max_seqlen.

Both keep per-row lengths L_b (the settled tokens) twice: on the caches'
device, for the kernels, and on the host, so bounds are checked and the
kernels' work is planned (:meth:`max_seqlen_k`) without a device sync.  The active tokens of a step occupy L_b .. L_b+M-1 during all T
loops; :meth:`advance` settles them after the last loop.  Nothing grows by
concatenation.
"""
from __future__ import annotations

from typing import Union

import torch


def steps_per_row(num_tokens: Union[int, torch.Tensor], batch: int) -> torch.Tensor:
    """``num_tokens`` settled per row (an int for all rows, or a (B,) tensor) as a (B,) int32 host tensor."""
    step = torch.as_tensor(num_tokens, dtype=torch.int32).expand(batch) if isinstance(num_tokens, int) \
        else num_tokens.to(device="cpu", dtype=torch.int32)
    if tuple(step.shape) != (batch,):
        raise ValueError(f"num_tokens must be an int or have shape ({batch},), got {tuple(step.shape)}")
    return step


class _KVCache:
    # Contiguous caches: no block table (melt_kernels.paged_cache.PagedCache has one).
    block_table = None

    def __init__(self, num_pairs: int, batch: int, max_seqlen: int, heads_kv: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        for name, value in (("num_pairs", num_pairs), ("batch", batch), ("max_seqlen", max_seqlen),
                            ("heads_kv", heads_kv), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, max_seqlen, heads_kv, head_dim)
        # Zero-filled so that no uninitialised (possibly NaN) bits are ever attended to by a masked kernel.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_pairs)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_pairs)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.seqlens_host = torch.zeros(batch, dtype=torch.int32)

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    @property
    def max_seqlen(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held on the caches' device: every K/V tensor plus the device lengths."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values) + \
            self.seqlens.numel() * self.seqlens.element_size()

    def max_seqlen_k(self, num_tokens: int) -> int:
        """max_b(L_b) + num_tokens from the host lengths (no device sync): the ``max_seqlen_k`` hint of a step
        of ``num_tokens`` active tokens, which sizes the kernels' split-KV work by the lengths, not the
        capacity."""
        return int(self.seqlens_host.max()) + num_tokens

    def room(self) -> int:
        """How many more tokens the fullest row can take."""
        return self.max_seqlen - int(self.seqlens_host.max())

    def reserve(self, num_tokens: int) -> None:
        """Makes room for a chunk of ``num_tokens``: allocated up front, a contiguous cache only checks it."""
        if num_tokens > self.room():
            raise ValueError(f"{num_tokens} more tokens do not fit: the cache has room for {self.room()}")

    def advance(self, num_tokens: Union[int, torch.Tensor]) -> None:
        """Settles ``num_tokens`` (an int, or a (B,) tensor per row) active tokens after the last loop."""
        step = steps_per_row(num_tokens, self.batch)
        new = self.seqlens_host + step
        if int(step.min()) < 0 or int(new.max()) > self.max_seqlen:
            raise ValueError(f"advancing by {step.tolist()} takes lengths {self.seqlens_host.tolist()} outside "
                             f"[0, max_seqlen={self.max_seqlen}]")
        self.seqlens_host.copy_(new)
        self.seqlens.copy_(new, non_blocking=True)

    def detach_(self) -> None:
        """Cuts every K/V tensor from the autograd graph that wrote it (truncated backpropagation across chunks:
        later chunks read the settled values as constants).  The values and the lengths are kept."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t.detach_()

    def reset(self) -> None:
        """Forgets every token (the memory is kept and reused)."""
        self.seqlens_host.zero_()
        self.seqlens.zero_()


class MeltCache(_KVCache):
    """One K/V pair per layer, shared by every loop (MELT)."""

    def __init__(self, num_layers: int, batch: int, max_seqlen: int, heads_kv: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        super().__init__(num_layers, batch, max_seqlen, heads_kv, head_dim, dtype, device)
        self.num_layers = num_layers

    def layer(self, layer: int, loop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of ``layer``; every loop shares it (``loop`` is accepted for symmetry)."""
        return self.keys[layer], self.values[layer]


class LoopLMCache(_KVCache):
    """One K/V pair per (loop, layer) (Ouro-style LoopLM baseline)."""

    def __init__(self, num_loops: int, num_layers: int, batch: int, max_seqlen: int, heads_kv: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        if not isinstance(num_loops, int) or num_loops < 1:
            raise ValueError(f"num_loops must be a positive int, got {num_loops!r}")
        super().__init__(num_loops * num_layers, batch, max_seqlen, heads_kv, head_dim, dtype, device)
        self.num_loops, self.num_layers = num_loops, num_layers

    def layer(self, layer: int, loop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of ``layer`` at loop iteration ``loop`` (0-based)."""
        if not 0 <= loop < self.num_loops:
            raise ValueError(f"loop must be in [0, {self.num_loops}), got {loop}")
        i = loop * self.num_layers + layer
        return self.keys[i], self.values[i]
