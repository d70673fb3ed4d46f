"""A race check for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

On a GPU the programs of a launch run in any order and at once; the interpreter runs them one after the
other, so a program that reads what another program of the same launch writes gives a plausible result
there and a race on the GPU.  :func:`record_launches` instruments the interpreter to see it: every masked-on
lane of every load and store is logged with its program, the programs run in a chosen order (forward,
reverse or a seeded shuffle: ``set_grid_idx`` is remapped, so every program still runs exactly once), and
each launch is checked for bytes that one program writes and another program reads or writes.

It patches internals of ``triton.runtime.interpreter`` (Triton 3.9): ``GridExecutor.__call__`` and the
builder's ``set_grid_dim``, ``set_grid_idx``, ``create_masked_load`` and ``create_masked_store`` (plain
loads and stores go through the masked ones).  :func:`unavailable` says why the check cannot run when a
Triton changes them, checked on a canary kernel, so the tests skip with that reason instead of passing
without looking.  Atomics, tensor descriptors and block pointers are not logged (the kernels use none).
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

MAX_REPORTED = 16


@dataclass
class Launch:
    kernel: str
    programs: int = 0
    reads: int = 0  # lanes read
    writes: int = 0  # lanes written
    conflict_bytes: int = 0
    # (address, writer program, other program, "write" or "read"): the first MAX_REPORTED conflicting bytes
    conflicts: list = field(default_factory=list)
    _log: list = field(default_factory=list, repr=False)  # (program, addresses, element bytes, is_write)

    def check(self) -> None:
        """Finds the conflicts from the log (then dropped)."""
        reads, writes = [], []
        for program, addresses, size, is_write in self._log:
            byte = (addresses[:, None] + np.arange(size, dtype=np.uint64)[None, :]).reshape(-1)
            (writes if is_write else reads).append(np.stack([byte, np.full_like(byte, program)], axis=1))
        self._log = []
        empty = np.zeros((0, 2), dtype=np.uint64)
        written = np.unique(np.concatenate(writes or [empty]), axis=0)  # (byte, program), sorted by byte
        read = np.unique(np.concatenate(reads or [empty]), axis=0)
        found = []
        # Write/write: a byte with two writing programs (rows sorted by byte, then program).
        same = written[1:, 0] == written[:-1, 0]
        found += [(b, w, o, "write") for b, w, o in zip(written[1:, 0][same], written[:-1, 1][same],
                                                         written[1:, 1][same])]
        # Read/write: a byte read by a program other than one that wrote it.
        if len(written) and len(read):
            at = np.searchsorted(written[:, 0], read[:, 0], side="left")
            hit = at < len(written)
            at = np.minimum(at, len(written) - 1)
            first, last = at, np.searchsorted(written[:, 0], read[:, 0], side="right") - 1
            # Each read byte against its first and last writer (two writers are already reported above).
            for idx in (first, last):
                bad = hit & (written[idx, 0] == read[:, 0]) & (written[idx, 1] != read[:, 1])
                found += [(b, w, o, "read") for b, w, o in zip(read[bad, 0], written[idx[bad], 1], read[bad, 1])]
        found = sorted(set((int(b), int(w), int(o), k) for b, w, o, k in found))
        self.conflict_bytes = len(found)
        self.conflicts = found[:MAX_REPORTED]


def _permutation(order: Union[str, int], count: int, launch_index: int) -> np.ndarray:
    if order == "forward":
        return np.arange(count)
    if order == "reverse":
        return np.arange(count)[::-1]
    return np.random.default_rng([order, launch_index]).permutation(count)


def _problem() -> Optional[str]:
    """Why the interpreter cannot be instrumented as this module expects (None: it can)."""
    try:
        from triton.runtime import interpreter
    except ImportError as e:
        return f"no Triton interpreter ({e})"
    builder = getattr(interpreter, "interpreter_builder", None)
    executor = getattr(interpreter, "GridExecutor", None)
    expected = {"set_grid_dim": ["nx", "ny", "nz"], "set_grid_idx": ["x", "y", "z"],
                "create_masked_load": ["ptrs", "mask", "other", "cache_policy", "is_volatile"],
                "create_masked_store": ["ptrs", "value", "mask", "cache_policy"]}
    if builder is None or executor is None or not callable(getattr(executor, "__call__", None)):
        return "triton.runtime.interpreter has no interpreter_builder/GridExecutor any more"
    for name, params in expected.items():
        method = getattr(builder, name, None)
        if method is None or list(inspect.signature(method).parameters) != params:
            return f"triton.runtime.interpreter.InterpreterBuilder.{name} is not ({', '.join(params)}) any more"
    return None


@contextmanager
def _instrumented(order: Union[str, int], launches: list):
    from triton.runtime import interpreter

    builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
    saved = {name: builder.__dict__.get(name) for name in ("set_grid_dim", "set_grid_idx", "create_masked_load",
                                                             "create_masked_store")}
    cls = type(builder)
    run_grid = executor.__call__
    state = dict(launch=None, perm=None, next=0, program=None)

    def set_grid_dim(nx, ny, nz):
        cls.set_grid_dim(builder, nx, ny, nz)
        state["perm"] = _permutation(order, nx * ny * nz, len(launches))
        state["next"] = 0
        if state["launch"] is not None:
            state["launch"].programs = nx * ny * nz

    def set_grid_idx(x, y, z):
        # The executor walks the grid in order; run the program the permutation puts at this step instead.
        nx, ny, nz = builder.grid_dim
        linear = int(state["perm"][state["next"]])
        state["next"] += 1
        state["program"] = linear
        cls.set_grid_idx(builder, linear // (ny * nz), linear // nz % ny, linear % nz)

    def log(ptrs, mask, is_write):
        launch = state["launch"]
        if launch is None:
            return
        addresses = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        on = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
        addresses = addresses[on]
        if addresses.size:
            launch._log.append((state["program"], addresses, ptrs.get_element_ty().primitive_bitwidth // 8,
                                is_write))
            if is_write:
                launch.writes += addresses.size
            else:
                launch.reads += addresses.size

    def create_masked_load(ptrs, mask, other, cache_policy, is_volatile):
        log(ptrs, mask, False)
        return cls.create_masked_load(builder, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(ptrs, value, mask, cache_policy):
        log(ptrs, mask, True)
        return cls.create_masked_store(builder, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        state["launch"] = Launch(getattr(self.fn, "__name__", "?"))
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            launch, state["launch"] = state["launch"], None
            launch.check()
            launches.append(launch)

    for name, fn in (("set_grid_dim", set_grid_dim), ("set_grid_idx", set_grid_idx),
                     ("create_masked_load", create_masked_load), ("create_masked_store", create_masked_store)):
        setattr(builder, name, fn)
    executor.__call__ = call
    try:
        yield
    finally:
        executor.__call__ = run_grid
        for name, fn in saved.items():
            if fn is None:
                delattr(builder, name)
            else:
                setattr(builder, name, fn)


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """Why :func:`record_launches` cannot run here (None: it can), checked on a canary kernel: a Triton whose
    internals differ must make the race tests skip, not pass without looking."""
    problem = _problem()
    if problem is not None:
        return f"the race check patches Triton interpreter internals: {problem}"
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def canary(x, y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y + tl.program_id(0) * N + o, tl.load(x + o) + 1)

    x, y = torch.arange(4, dtype=torch.float32), torch.zeros(8)
    launches = []
    with _instrumented("reverse", launches):
        canary[(2,)](x, y, N=4)
    ok = (len(launches) == 1 and launches[0].programs == 2 and launches[0].reads == 8 and launches[0].writes == 8
          and not launches[0].conflicts and torch.equal(y, torch.arange(1, 5).float().repeat(2)))
    return None if ok else f"the instrumented Triton interpreter did not log the canary kernel's accesses: {launches}"


@contextmanager
def record_launches(order: Union[str, int] = "forward"):
    """Runs every Triton launch of the block under the interpreter with its programs in ``order`` ("forward",
    "reverse", or an int: the seed of a shuffle, another permutation per launch) and logs their memory
    accesses; yields a list that receives one :class:`Launch` per launch, with its conflicts."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    launches = []
    with _instrumented(order, launches):
        yield launches


def describe(launches: list, names: dict) -> str:
    """The conflicts of ``launches`` with each address named after the tensor in ``names`` that holds it."""
    def tensor_at(address):
        for name, t in names.items():
            lo = t.data_ptr()
            span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
            if lo <= address < lo + span * t.element_size():
                return name
        return "?"
    return "; ".join(f"{launch.kernel}: {launch.conflict_bytes} bytes, e.g. "
                     + ", ".join(f"{tensor_at(a)} written by program {w} and {kind} by program {o}"
                                 for a, w, o, kind in launch.conflicts[:3])
                     for launch in launches if launch.conflicts)
