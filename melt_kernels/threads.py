"""PyTorch's CPU intra-op threads for one run, restored afterwards.

The benchmarks and examples pin them (1 by default) so that CPU timings are steady and processes started side
by side (torchrun on a CPU) do not oversubscribe the cores.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch


@contextlib.contextmanager
def cpu_threads(count: Optional[int], device: Union[str, torch.device, None] = None) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(count)`` when ``count`` is set and ``device`` is the CPU
    (or None), and restores the previous count after it."""
    before = torch.get_num_threads()
    if count and (device is None or torch.device(device).type == "cpu"):
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
