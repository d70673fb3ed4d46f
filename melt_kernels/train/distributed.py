"""torch.distributed for the trainer: one process per device under ``torchrun`` (gloo on CPU, NCCL on CUDA).

Started by ``torchrun`` (or ``python -m torch.distributed.run``) the
environment holds RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a
single process and nothing here touches torch.distributed.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this context spans several processes (a single-process context inside a torchrun group, such
        as a default one, reduces nothing)."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes (a copy; ``tensor`` itself when there is one process)."""
        if not self.distributed:
            return tensor
        # gloo reduces CPU tensors, NCCL device tensors.
        out = tensor.detach().clone().to(self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(out)
        return out.to(tensor.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init(device: Optional[str] = None) -> Context:
    """Joins the process group ``torchrun`` set up (once per process), or returns the single-process context.

    ``device``: "cpu" or "cuda" (default: CUDA when available); under
    ``torchrun`` on CUDA each process takes GPU LOCAL_RANK.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=torch.device(kind))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    where = torch.device(kind, local) if kind == "cuda" else torch.device("cpu")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=world,
                                **({"device_id": where} if where.type == "cuda" else {}))
    return Context(rank, world, where)


def wrap(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes (gradients averaged over them),
    else itself.  Every trainable parameter must get a gradient at every step (the trainer freezes the rest)."""
    if not context.distributed:
        return model
    ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shutdown(drain: bool = True) -> None:
    """Leaves the process group; ``drain``: first wait until every process is past its last collective (not
    after an error, when the others may never get there).

    A gloo worker thread frees a finished collective's tensors after the
    caller has moved on, and takes the GIL for those Python has already
    dropped.  The group outlives ``destroy_process_group`` once
    DistributedDataParallel has used it, so when the interpreter finalises
    first that thread aborts the process ("terminate called without an active
    exception": 8 runs in 20 of the 2-process CPU training, torch 2.13).  The
    barrier and the pause, in which this thread holds no GIL, let the worker
    threads finish first (0 in 40).
    """
    if dist.is_available() and dist.is_initialized():
        if drain:
            dist.barrier()
            time.sleep(0.1)
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: Optional[str] = None) -> Iterator[Context]:
    """``init(device)`` for the body of a ``with``; leaves the group after it (draining only when it succeeded)."""
    context = init(device)
    try:
        yield context
    except BaseException:
        shutdown(drain=False)
        raise
    shutdown()
