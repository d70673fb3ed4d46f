"""What every Triton launch of this package shares: the device it runs on and the limits of its grid.

* Device: Triton launches on the *current* CUDA device and its current stream, not on the tensors' device;
  :func:`device_guard` makes the tensors' device current for the launch, as the CUDA backend does.
* Grids: CUDA caps gridDim.x at 2**31 - 1 and gridDim.y, gridDim.z at 65535, and Triton does not check.  Every
  launcher here uses 1-D grids (the program id decomposed in the kernel), computes all the grids of a call
  before its first launch and passes them through :func:`check_grids`, so that a call too large to launch
  raises before anything is written.
* Positions: the kernels index cache positions and the rows of a kv head in 32 bits (offsets in memory are
  64-bit along batch and head, and inside a (b, h) slice 32-bit unless :func:`needs_wide_offsets`):
  :func:`size_reason` says when a problem is beyond that.
* Arrival counters: :func:`arrival_counters` gives the self-clearing counters with which the last program
  of a group finds out that it is last (the decode kernel's folded merge).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_POSITIONS = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; 4 off CUDA (the interpreter: any small machine)."""
    if device.type == "cuda":
        return _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def check_grids(grids: dict) -> None:
    """Raises ValueError naming the kernel when a grid (a tuple of 1 to 3 sizes) exceeds CUDA's limits."""
    for kernel, grid in grids.items():
        if any(size > limit for size, limit in zip(grid, MAX_GRID)):
            raise ValueError(f"{kernel} would need a grid of {grid} programs; CUDA allows at most {MAX_GRID} "
                             f"(x, y, z): the problem is too large for one launch, split the batch")


def aligned(*tensors) -> bool:
    """Whether every tensor is 16-byte aligned with batch/sequence/head strides in multiples of 16 elements,
    as Triton's argument specialization needs to vectorise its loads.  A layout that is not (a view one
    element in, heads padded to an odd width) compiles to narrower loads that hold more registers, so the
    planners give it smaller tiles."""
    return all(t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1])
               for t in tensors if t is not None)


def device_guard(device: torch.device):
    """Makes ``device`` the current CUDA device (and its stream the current stream) inside the block."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def size_reason(cache_len: int, seqlen_q: int, groups: int):
    """Why the kernels cannot index a problem's positions and rows in 32 bits (None when they can)."""
    if cache_len > MAX_POSITIONS:
        return f"the Triton kernels index cache positions in 32 bits; S = {cache_len} positions is beyond that"
    if seqlen_q * groups > MAX_POSITIONS:
        return (f"the Triton kernels index the rows of a kv head in 32 bits; M * Hq / Hkv = {seqlen_q * groups} "
                f"rows is beyond that")
    return None


def needs_wide_offsets(tensors, block: int, pools=()) -> bool:
    """Whether an offset inside some (b, h) slice of one of ``tensors`` (B, rows, H, D), up to a block of rows
    past its end, or anywhere in one of the ``pools`` (paged caches, addressed through a table), can reach
    2**31 elements.  Batch and head offsets are 64-bit in every kernel; what stays 32-bit without WIDE is the
    offset inside a slice, as 64-bit offsets per element cost registers enough to spill."""
    slices = max(((t.shape[1] + block) * t.stride(1) + t.shape[2] * t.stride(2) for t in tensors if t is not None),
                 default=0)
    pooled = max((t.shape[0] * t.stride(0) for t in pools if t is not None), default=0)
    return max(slices, pooled) >= 2**31


_COUNTERS: dict = {}  # (device, stream) -> int32 counters, all zero between launches


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` int32 counters, zero, for one launch on ``device``'s current stream.  The kernel that takes
    them leaves them zero again (the last program of each group resets its counter), so they are made once
    per stream and reused by every launch on it, CUDA-graph replays included: launches on one stream never
    overlap, while two streams each get their own."""
    stream: Optional[int] = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = _COUNTERS[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return counters
