"""Checking a table of "auto" (melt_kernels/auto_table.py, format in melt_kernels/dispatch_table.py) against the
implementations it names: every row's fields, and every plan's keys against the launchers of its backend (which
this imports: the kernels' planners, the composition's attention kernels).  The tournament checks what it
writes; the tests check the committed table.  Dispatch never runs this."""
from __future__ import annotations

import inspect

from melt_kernels.composition_backend import KERNELS
from melt_kernels.dispatch_table import CHOICE_FIELDS, DTYPES, IMPLEMENTATIONS, REGIMES, ROW_FIELDS, TIMINGS


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
