"""The table "auto" chooses by (melt_kernels/auto_table.py): its rows, the lookup of a call's row, and the file's
reading, writing and checking (benchmarks/tournament.py writes it, melt_kernels/backends.py reads it).

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
import inspect
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


def _keyword_only(fn) -> set:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def plan_keys(backend: str) -> tuple[set, set]:
    """The keyword overrides a row may give ``backend``'s forward and backward launchers (imports the kernels)."""
    from melt_kernels.kernels.bwd import plan_bwd
    bwd = {"deterministic"} | _keyword_only(plan_bwd)
    if backend == "composition":
        return {"kernel"}, set()
    if backend == "cuda":
        return {"splits"}, bwd
    from melt_kernels.kernels.chunk_fwd import plan_chunk
    from melt_kernels.kernels.decode import plan_decode
    # "aligned" is the launcher's own reading of the tensors, not a plan.
    return ({"path"} | _keyword_only(plan_decode) | _keyword_only(plan_chunk)) - {"aligned"}, bwd


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def table_problems(table) -> list[str]:
    """What is wrong with a table (an empty list when nothing is): its structure, and every plan's keys against
    the launchers it names (which this imports)."""
    from melt_kernels.composition_backend import KERNELS

    if not isinstance(table, dict):
        return [f"TABLE must be a dict of GPU name -> entry, got {type(table).__name__}"]
    problems = []
    for gpu, entry in table.items():
        if not isinstance(gpu, str) or not isinstance(entry, dict) or set(entry) != {"measured", "rows"} or \
                not isinstance(entry["measured"], dict) or not isinstance(entry["rows"], list):
            problems.append(f"{gpu!r}: an entry is {{'measured': dict, 'rows': list}}")
            continue
        for i, r in enumerate(entry["rows"]):
            where = f"{gpu!r} row {i}"
            if not isinstance(r, dict) or tuple(r) != ROW_FIELDS:
                problems.append(f"{where}: fields must be {ROW_FIELDS}, got {tuple(r) if isinstance(r, dict) else r}")
                continue
            if r["regime"] not in REGIMES or r["dtype"] not in DTYPES or r["timing"] not in TIMINGS:
                problems.append(f"{where}: regime in {REGIMES}, dtype in {DTYPES}, timing in {TIMINGS}")
            if not all(isinstance(r[f], int) and r[f] >= 1 for f in ("head_dim", "groups", "batch", "keys")):
                problems.append(f"{where}: head_dim, groups, batch and keys must be positive ints")
            if not isinstance(r["ranking"], list) or not r["ranking"]:
                problems.append(f"{where}: the ranking must be a non-empty list")
                continue
            for j, c in enumerate(r["ranking"]):
                problems += _choice_problems(f"{where} choice {j}", c, KERNELS)
    return problems


def _choice_problems(where: str, c, kernels: tuple) -> list[str]:
    if not isinstance(c, dict) or tuple(c) != CHOICE_FIELDS:
        return [f"{where}: fields must be {CHOICE_FIELDS}, got {c!r}"]
    if c["backend"] not in IMPLEMENTATIONS:
        return [f"{where}: backend must be one of {IMPLEMENTATIONS}, got {c['backend']!r}"]
    problems = []
    if not (c["us"] is None or isinstance(c["us"], (int, float))):
        problems.append(f"{where}: us must be a number or None")
    for name, plan, allowed in zip(("fwd", "bwd"), (c["fwd"], c["bwd"]), plan_keys(c["backend"])):
        if not isinstance(plan, dict) or not all(isinstance(k, str) and _plain(v) for k, v in plan.items()):
            problems.append(f"{where}: {name} must be a dict of plain values")
        elif set(plan) - allowed:
            problems.append(f"{where}: backend {c['backend']!r} takes no {name} override "
                            f"{sorted(set(plan) - allowed)} (it takes {sorted(allowed)})")
    if c["backend"] == "composition" and isinstance(c["fwd"], dict) and c["fwd"].get("kernel", "flash") not in kernels:
        problems.append(f"{where}: the composition's kernel must be one of {kernels}, got {c['fwd']['kernel']!r}")
    return problems
