"""Paged KV caches for serving looped LMs: pools of fixed-size pages and a page allocator
(docs/serving.md#paged-caches-and-continuous-batching).

* :class:`PagePool`: the memory.  One (num_blocks, page_size, Hkv, D) pool
  per K and V of every layer (MELT: ``PagePool.melt``) or of every (loop,
  layer) (LoopLM: ``PagePool.looplm``), and a free list of page ids.  A page
  id names the same page in every pool, as in vLLM: a row's block table is
  shared by all its layers (and loops).  Pages are zero-filled once, at
  creation; a page handed out again keeps its old bits, which no token ever
  reads (attention reads positions < L_b + M of its own row only, and every
  first write of a slot, the first loop's, is write-through).
* :class:`PagedCache`: a batch of rows on a pool, the drop-in for
  ``MeltCache``/``LoopLMCache`` in :class:`~melt_kernels.LoopedLM`: per-row
  lengths (on the device and the host, as the contiguous caches) and a
  (B, max_blocks) int32 block table (device and host copies; entries past a
  row's pages are -1).  :meth:`PagedCache.reserve` (called by the model
  before each chunk) takes the pages the chunk's positions need from the
  free list; :meth:`PagedCache.drop` gives a finished row's pages back and
  removes the row; :meth:`PagedCache.extend` moves the rows of another
  batch on the same pool (e.g. a sequence just prefilled alone) into this
  one, pages and all, without copying a byte.  That is continuous batching:
  a decoding batch takes and drops sequences between steps.

Bytes: :attr:`PagePool.nbytes` is what the pool reserves on its device;
:attr:`PagePool.nbytes_in_use` what the pages now handed out hold.

The rows of one pool never share a page (each page has one owner), so
the op's rule that active slots do not alias (docs/op.md#paged-caches) holds by
construction.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from melt_kernels.cache import steps_per_row
from melt_kernels.checks import check_page_size


class PagePool:
    """K/V pools of ``num_pairs`` (layer, or (loop, layer)) pairs and the free list of their pages."""

    def __init__(self, num_layers: int, num_blocks: int, page_size: int, heads_kv: int, head_dim: int, *,
                 num_loops: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu"):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("heads_kv", heads_kv),
                            ("head_dim", head_dim), ("num_loops", 1 if num_loops is None else num_loops)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_page_size(page_size)
        self.num_layers, self.num_loops, self.page_size = num_layers, num_loops, page_size
        pairs = num_layers * (1 if num_loops is None else num_loops)
        shape = (num_blocks, page_size, heads_kv, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(pairs)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(pairs)]
        # Lowest ids first (a stack popped from the end): deterministic page assignment.
        self._free = list(range(num_blocks - 1, -1, -1))

    @classmethod
    def melt(cls, num_layers: int, num_blocks: int, page_size: int, heads_kv: int, head_dim: int,
             **kwargs) -> "PagePool":
        """One pool pair per layer, shared by every loop (MELT)."""
        return cls(num_layers, num_blocks, page_size, heads_kv, head_dim, **kwargs)

    @classmethod
    def looplm(cls, num_loops: int, num_layers: int, num_blocks: int, page_size: int, heads_kv: int,
               head_dim: int, **kwargs) -> "PagePool":
        """One pool pair per (loop, layer) (Ouro-style LoopLM)."""
        return cls(num_layers, num_blocks, page_size, heads_kv, head_dim, num_loops=num_loops, **kwargs)

    @property
    def shared(self) -> bool:
        """Whether the loops share one pair per layer (MELT)."""
        return self.num_loops is None

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def page_nbytes(self) -> int:
        """Bytes one page id holds across every pool (K and V of every pair)."""
        return sum(t[0].numel() * t.element_size() for t in self.keys + self.values)

    @property
    def nbytes(self) -> int:
        """Bytes the pools reserve on their device."""
        return self.num_blocks * self.page_nbytes

    @property
    def nbytes_in_use(self) -> int:
        """Bytes of the pages now handed out."""
        return self.pages_in_use * self.page_nbytes

    def pair(self, layer: int, loop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_pool, v_pool) of ``layer`` (MELT: every loop shares it) or of (``loop``, ``layer``) (LoopLM)."""
        if self.shared:
            return self.keys[layer], self.values[layer]
        if not 0 <= loop < self.num_loops:
            raise ValueError(f"loop must be in [0, {self.num_loops}), got {loop}")
        i = loop * self.num_layers + layer
        return self.keys[i], self.values[i]

    def alloc(self, count: int) -> list[int]:
        """``count`` free page ids; raises (taking none) when fewer are free."""
        if count > len(self._free):
            raise RuntimeError(f"the page pool is full: {count} pages wanted, {len(self._free)} of "
                               f"{self.num_blocks} free")
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        return taken[::-1]

    def release(self, pages: Sequence[int]) -> None:
        """Returns page ids to the free list."""
        self._free.extend(reversed(list(pages)))


class PagedCache:
    """A batch of rows on a :class:`PagePool`: lengths and a block table (module docstring).

    ``max_seqlen`` bounds every row (rounded up to whole pages: the table has
    max_seqlen / page_size columns); ``batch`` rows start empty.
    """

    def __init__(self, pool: PagePool, batch: int, max_seqlen: int):
        for name, value in (("batch", batch), ("max_seqlen", max_seqlen)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "batch" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'batch' else 'positive'} int, "
                                 f"got {value!r}")
        self.pool = pool
        device = pool.keys[0].device
        max_blocks = -(-max_seqlen // pool.page_size)
        self._set_rows(torch.full((batch, max_blocks), -1, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32),
                       device)

    # ------------------------------------------------------------------ what the model reads

    @property
    def shared(self) -> bool:
        return self.pool.shared

    @property
    def num_layers(self) -> int:
        return self.pool.num_layers

    @property
    def num_loops(self) -> Optional[int]:
        return self.pool.num_loops

    @property
    def batch(self) -> int:
        return self.seqlens_host.shape[0]

    @property
    def max_seqlen(self) -> int:
        return self.table_host.shape[1] * self.pool.page_size

    def layer(self, layer: int, loop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k_pool, v_pool) that ``layer`` (at ``loop``) reads through :attr:`block_table`."""
        return self.pool.pair(layer, loop)

    def max_seqlen_k(self, num_tokens: int) -> int:
        """max_b(L_b) + num_tokens from the host lengths (no device sync)."""
        return int(self.seqlens_host.max()) + num_tokens if self.batch else num_tokens

    def room(self) -> int:
        """How many more tokens the fullest row can take within its table (pages permitting)."""
        return self.max_seqlen - (int(self.seqlens_host.max()) if self.batch else 0)

    def pages_per_row(self) -> torch.Tensor:
        """(B,) pages each row holds (host)."""
        return (self.table_host >= 0).sum(1)

    @property
    def pages(self) -> int:
        """Pages the rows hold."""
        return int(self.pages_per_row().sum())

    @property
    def nbytes_in_use(self) -> int:
        """Bytes of the pages the rows hold (across every pool)."""
        return self.pages * self.pool.page_nbytes

    # ------------------------------------------------------------------ growing, settling, dropping

    def reserve(self, num_tokens: int) -> None:
        """Gives every row the pages that positions L_b .. L_b+num_tokens-1 need (a chunk about to run).

        Raises before taking any page when a row would outgrow its table or the pool runs out."""
        if num_tokens > self.room():
            raise ValueError(f"{num_tokens} more tokens do not fit: the table has room for {self.room()}")
        page = self.pool.page_size
        held = self.pages_per_row()
        needed = (self.seqlens_host.long() + num_tokens + page - 1) // page - held
        total = int(needed.clamp(min=0).sum())
        if total == 0:
            return
        pages = iter(self.pool.alloc(total))
        for b in needed.clamp(min=0).nonzero()[:, 0].tolist():
            start = int(held[b])
            for j in range(start, start + int(needed[b])):
                self.table_host[b, j] = next(pages)
        self.block_table.copy_(self.table_host, non_blocking=True)

    def advance(self, num_tokens: Union[int, torch.Tensor]) -> None:
        """Settles ``num_tokens`` (an int, or a (B,) tensor per row) active tokens after the last loop."""
        step = steps_per_row(num_tokens, self.batch)
        new = self.seqlens_host + step
        held = self.pages_per_row() * self.pool.page_size
        if self.batch and (int(step.min()) < 0 or bool((new > held).any())):
            raise ValueError(f"advancing by {step.tolist()} takes lengths {self.seqlens_host.tolist()} past the "
                             f"rows' pages ({held.tolist()} positions): reserve() first")
        self.seqlens_host.copy_(new)
        self.seqlens.copy_(new, non_blocking=True)

    def drop(self, rows: Sequence[int]) -> None:
        """Frees the pages of ``rows`` (finished sequences) and removes them; the other rows keep their order."""
        rows = sorted({int(r) for r in rows})
        if any(not 0 <= r < self.batch for r in rows):
            raise ValueError(f"rows must be in [0, {self.batch}), got {rows}")
        for r in rows:
            self._release_row(r)
        keep = torch.ones(self.batch, dtype=torch.bool)
        keep[rows] = False
        self._set_rows(self.table_host[keep], self.seqlens_host[keep])

    def extend(self, other: "PagedCache") -> None:
        """Appends the rows of ``other`` (same pool), pages and lengths, and leaves ``other`` empty."""
        if other.pool is not self.pool:
            raise ValueError("extend takes rows of a cache on the same PagePool")
        if other.max_seqlen != self.max_seqlen:
            raise ValueError(f"the caches' tables differ: max_seqlen {other.max_seqlen} vs {self.max_seqlen}")
        self._set_rows(torch.cat([self.table_host, other.table_host]),
                       torch.cat([self.seqlens_host, other.seqlens_host]))
        other._set_rows(other.table_host[:0], other.seqlens_host[:0])

    def add_rows(self, count: int) -> None:
        """Appends ``count`` empty rows (new sequences, to be prefilled with the batch)."""
        self._set_rows(torch.cat([self.table_host, torch.full((count, self.table_host.shape[1]), -1,
                                                              dtype=torch.int32)]),
                       torch.cat([self.seqlens_host, torch.zeros(count, dtype=torch.int32)]))

    def _release_row(self, row: int) -> None:
        """Gives row ``row``'s pages back to the pool (its table entries stay as they are)."""
        self.pool.release(self.table_host[row][self.table_host[row] >= 0].tolist())

    def _set_rows(self, table: torch.Tensor, lengths: torch.Tensor, device=None) -> None:
        device = self.block_table.device if device is None else device
        self.table_host, self.seqlens_host = table.contiguous().clone(), lengths.clone()
        # Copies even on the CPU: the device tensors advance on their own (CapturedDecode).
        self.block_table = self.table_host.to(device, copy=True)
        self.seqlens = self.seqlens_host.to(device, copy=True)

    def reset(self) -> None:
        """Frees every row's pages and forgets the rows' tokens (the rows stay, empty)."""
        for r in range(self.batch):
            self._release_row(r)
        self.table_host.fill_(-1)
        self.block_table.fill_(-1)
        self.seqlens_host.zero_()
        self.seqlens.zero_()

    def detach_(self) -> None:
        """Cuts every pool from the autograd graph that wrote it (as ``MeltCache.detach_``)."""
        for t in self.pool.keys + self.pool.values:
            t.detach_()
