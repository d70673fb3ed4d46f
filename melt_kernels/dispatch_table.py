"""The table "auto" chooses by (melt_kernels/auto_table.py): its rows, the lookup of a call's row, and the file's
reading and writing (benchmarks/tournament.py writes it, melt_kernels/backends.py reads it; checking a table
against the implementations it names: melt_kernels/table_check.py).

The file assigns TABLE, a dict from a GPU name (``torch.cuda.get_device_name``) to ``{"measured": {date, commit,
torch, triton}, "rows": [...]}``.  A row is one shape the GPU pass's tournament measured on that GPU, with the
fields ROW_FIELDS: ``regime`` ("decode": the rows of a kv head fit one program, M * Hq / Hkv <= 64; "chunk":
more rows; "training": a call that records gradients, timed forward + backward), ``dtype``, ``head_dim``,
``groups`` (query heads per kv head), ``batch``, ``keys`` (L + M), ``timing`` (what ranked it: "graph", CUDA-graph
replays, or "eager", back-to-back calls) and ``ranking``: the implementations that passed the tournament's
checks there, fastest first, each ``{"backend", "fwd", "bwd", "us"}`` (the keyword overrides of its forward and
backward launchers, and its time in microseconds).

A call takes the row of its GPU, regime, dtype, head_dim and groups measured nearest to it: the smallest sum of
the distances of log2(batch) and log2(keys), both rounded down to whole powers of two (ties go to the row listed
first).
"""
from __future__ import annotations

import ast
import pprint
from dataclasses import dataclass
from typing import Optional

REGIMES = ("decode", "chunk", "training")
# The implementations a row may rank (the reference is the definition the others are checked against).
IMPLEMENTATIONS = ("triton", "cuda", "composition")
TIMINGS = ("graph", "eager")
DTYPES = ("float16", "bfloat16", "float32")
ROW_FIELDS = ("regime", "dtype", "head_dim", "groups", "batch", "keys", "timing", "ranking")
CHOICE_FIELDS = ("backend", "fwd", "bwd", "us")

HEADER = '''"""What ``backend="auto"`` runs on each GPU: the implementations that won the GPU pass's tournament there.

Written by benchmarks/tournament.py; do not edit by hand.  Regenerated on a GPU by
``bash benchmarks/gpu_check.sh OUT --steps build,tune`` then ``cp OUT/auto_table.py melt_kernels/`` (that GPU's
rows replaced, the other GPUs' kept).  The format, and how a call finds its row: melt_kernels/dispatch_table.py.
"""
'''


def plan_items(plan: Optional[dict]) -> tuple:
    """A plan (keyword overrides of a launcher) as sorted (key, value) pairs: hashable, one spelling."""
    return tuple(sorted((plan or {}).items()))


def plan_text(fwd: tuple, bwd: tuple) -> str:
    parts = [f"{name} " + ", ".join(f"{k}={v!r}" for k, v in plan) for name, plan in (("fwd", fwd), ("bwd", bwd))
             if plan]
    return f" ({'; '.join(parts)})" if parts else " (default plan)"


@dataclass(frozen=True)
class Choice:
    backend: str
    fwd: tuple  # plan_items of the forward launcher's overrides
    bwd: tuple
    us: Optional[float]

    def __str__(self) -> str:
        return self.backend + plan_text(self.fwd, self.bwd)


@dataclass(frozen=True)
class Row:
    gpu: str
    regime: str
    dtype: str
    head_dim: int
    groups: int
    batch: int
    keys: int
    timing: str
    ranking: tuple  # of Choice, fastest first

    def __str__(self) -> str:
        return (f"{self.gpu}, {self.regime} {self.dtype} head_dim {self.head_dim} with {self.groups} query "
                f"head(s) per kv head, measured at batch {self.batch} and {self.keys} keys")


def _bucket(n: int) -> int:
    return max(int(n), 1).bit_length()


class AutoTable:
    """The rows of a table, indexed for the lookup a call makes (built once; the lookups are cached)."""

    def __init__(self, table: dict):
        self._rows: dict = {}
        for gpu, entry in table.items():
            for r in entry["rows"]:
                ranking = tuple(Choice(c["backend"], plan_items(c["fwd"]), plan_items(c["bwd"]), c["us"])
                                for c in r["ranking"])
                row = Row(gpu, r["regime"], r["dtype"], r["head_dim"], r["groups"], r["batch"], r["keys"],
                          r["timing"], ranking)
                self._rows.setdefault((gpu, row.regime, row.dtype, row.head_dim, row.groups), []).append(row)
        self._gpus = frozenset(table)
        self._nearest: dict = {}

    def has(self, gpu: Optional[str]) -> bool:
        return gpu in self._gpus

    def row(self, gpu: str, regime: str, dtype: str, head_dim: int, groups: int, batch: int,
            keys: int) -> Optional[Row]:
        """The row measured nearest to a call (module docstring), or None when none has its kind."""
        kind = (gpu, regime, dtype, head_dim, groups)
        key = (kind, _bucket(batch), _bucket(keys))
        if key not in self._nearest:
            rows = self._rows.get(kind, ())
            self._nearest[key] = min(rows, default=None, key=lambda r: abs(_bucket(r.batch) - key[1]) +
                                     abs(_bucket(r.keys) - key[2]))
        return self._nearest[key]


def read_table(path: str) -> dict:
    """TABLE of a table file (melt_kernels/auto_table.py or a tournament's output), read without running it."""
    with open(path) as f:
        module = ast.parse(f.read(), path)
    for node in module.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TABLE"]:
            return ast.literal_eval(node.value)
    raise ValueError(f"{path} assigns no TABLE")


def format_table(table: dict) -> str:
    """The text of a table file holding ``table``."""
    return HEADER + "\nTABLE = " + pprint.pformat(table, width=118, sort_dicts=False) + "\n"
