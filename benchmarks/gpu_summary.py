"""The GPU pass's last act: its files in OUT (at most 8), from whatever the steps left in the work folder.

* ``results.json``: ``device``, ``date`` (YYYY-MM-DD), ``commit``, ``torch``, ``triton``, ``copy_gbps``,
  ``dry_run``, ``budget_s``, ``steps`` ({name: {"rc", "seconds", "status", "limit_s"}}), ``decode``,
  ``chunk``, ``backward`` (rows of benchmarks/attention.py and attention_bwd.py: the shape, ``backend``,
  ``us``, ``gbps``/``pct_copy`` or ``tflops``, and the peers' ``*_us`` measured in the same run),
  ``correctness`` (counts and the failed checks), ``sanitizer`` ({tool: {"errors"}}, racecheck's also
  "hazards" and "warnings"), ``loop_depth`` (the loop-depth benchmark's records), ``serving`` (its --serve
  records: sequences held, tokens/s), ``tune`` (benchmarks/tournament.py's ``rows``, per-shape ``summary``
  and the ``auto_table`` of this GPU, when the step ran), ``pytest`` (its counts);
* ``summary.md``: one table, step, status, seconds, the key numbers; then, when the tune step ran, the
  tournament's winners: what ``backend="auto"`` runs at each headline shape and its ratios to the peers;
* ``auto_table.py``: the table the tune step wrote (this GPU's rows in the committed table): copied over
  melt_kernels/auto_table.py, it is what "auto" reads;
* ``logs.tar.gz``: every log, the ptxas report and the steps' own JSON;
* plots: ``loop_depth.png`` and ``decode.png`` (decode time against keys, the kernels beside SDPA).

    python benchmarks/gpu_summary.py --work WORK --out OUT --steps WORK/steps.tsv [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def versions(python_log: str) -> dict:
    found = re.search(r"torch (\S+) cuda (\S+) triton (\S+)", python_log)
    if found:
        return dict(torch=found.group(1), cuda=found.group(2), triton=found.group(3))
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version)


def commit(root: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def steps_table(path: str) -> dict:
    steps = {}
    for line in read(path).splitlines():
        name, rc, seconds, status, limit = line.split("\t")
        steps[name] = dict(rc=int(rc), seconds=float(seconds), status=status, limit_s=float(limit))
    return steps


def sanitizer_errors(log: str) -> dict:
    """{tool: {"errors": N}} from the summary after each tool's banner, N None when there is none (the tool was cut).

    memcheck and synccheck end with 'ERROR SUMMARY: N errors'; racecheck with 'RACECHECK SUMMARY: H hazards
    displayed (N errors, W warnings)', whose H and W are kept as "hazards" and "warnings" beside its N.
    """
    found = {}
    for tool, body in re.findall(r"--- compute-sanitizer --tool (\w+)\n(.*?)(?=--- compute-sanitizer|\Z)", log, re.S):
        race = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", body)
        if race:
            hazards, errors, warnings = map(int, race[-1])
            found[tool] = dict(errors=errors, hazards=hazards, warnings=warnings)
        else:
            summary = re.findall(r"ERROR SUMMARY: (\d+) error", body)
            found[tool] = dict(errors=int(summary[-1]) if summary else None)
    return found


def sanitizer_numbers(counts: dict) -> str:
    """'tool: N errors' per tool, racecheck's warnings when there are any, 'no summary' for a tool cut short."""
    return ", ".join(f"{tool}: no summary" if c["errors"] is None else
                     f"{tool}: {c['errors']} errors" + (f" ({c['warnings']} warnings)" if c.get("warnings") else "")
                     for tool, c in counts.items())


def pytest_counts(log: str) -> dict:
    last = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last[-1])} \
        if last else {}


def ptxas_spills(report: str) -> int:
    return sum(int(s) for s in re.findall(r"(\d+) bytes spill stores", report))


def key_numbers(name: str, results: dict) -> str:
    if name == "build":
        return f"archs {results.get('cuda_archs')}; ptxas spill stores {results.get('ptxas_spill_bytes')} bytes"
    if name == "correctness":
        c = results.get("correctness") or {}
        s = c.get("summary", {})
        failed = "; ".join(c.get("failures", [])[:3])
        # The graph checks' time per decode token: replayed CUDA graph against the eager step.
        graphs = [f"{r['name'].split('/')[1]} token {r['graph_ms_per_token']:.2f} ms graph, "
                  f"{r['eager_ms_per_token']:.2f} ms eager" for r in c.get("checks", [])
                  if r.get("graph_ms_per_token") is not None]
        return f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('error', 0)} errors, " \
               f"{s.get('not_run', 0)} not run" + (f" ({failed})" if failed else "") + \
               "".join(f"; {g}" for g in graphs)
    if name == "bench":
        parts = []
        for r in results.get("decode", []):
            if r["batch"] == 1 and r["seqlen_k"] in (8192, 32768) and r.get("us"):
                flash = r.get("sdpa_flash_us")
                parts.append(f"decode {r['seqlen_k'] // 1024}k {r['backend']} {r['us']:.0f} us "
                             f"{r['pct_copy']:.0f}% copy" + (f" (flash {flash:.0f} us)" if flash else ""))
        for r in results.get("chunk", [])[-2:]:
            if r.get("tflops"):
                parts.append(f"{r['label']} {r['backend']} {r['tflops']:.0f} TFLOP/s")
        return "; ".join(parts)
    if name == "sanitizer":
        return sanitizer_numbers(results.get("sanitizer") or {})
    if name == "loop-depth":
        recs = results.get("loop_depth") or []
        return f"{len(recs)} records"
    if name == "serving":
        held = {(r["method"], r["loops"]): r.get("seqs_held") for r in results.get("serving") or []}
        return ", ".join(f"T={t}: {held[('melt', t)]} vs {held[('looplm', t)]} sequences"
                         for _, t in sorted(k for k in held if k[0] == "melt") if ("looplm", t) in held)
    if name == "tune":
        shapes = (results.get("tune") or {}).get("summary") or []
        if not shapes:
            return "no shape finished"
        wins = {}
        for m in shapes:
            winner = (m["winner"] or "none passed").split(" (")[0]
            wins[winner] = wins.get(winner, 0) + 1
        failed = [f"{m['label']}: {name}" for m in shapes for name in m["failed"]]
        return f"{len(shapes)} shapes; auto runs " + ", ".join(f"{b} at {n}" for b, n in wins.items()) + \
            f"; failed checks: {'; '.join(failed) or 'none'} (the winners below)"
    if name == "pytest":
        return ", ".join(f"{v} {k}" for k, v in (results.get("pytest") or {}).items())
    return ""


def tournament_table(summaries: list[dict]) -> list[str]:
    """The tournament's winners as markdown lines: per shape what "auto" runs, its time (by the regime's
    ranking), its ratios to the peers in both timings, and the Triton default plan's time."""
    lines = ["| regime | shape | auto runs | us | graph x flash | graph x cuDNN | graph x composition | "
             "eager x flash | eager x composition | Triton default us | failed checks |", "|" + "---|" * 11]
    for m in summaries:
        w = m["winner_ratios"]
        cells = [m["regime"], m["label"], m["winner"] or "none passed", _fmt(m["winner_us"], ".1f")]
        cells += [_fmt(w[k], ".2f") for k in ("graph_x_flash", "graph_x_cudnn", "graph_x_composition",
                                              "eager_x_flash", "eager_x_composition")]
        cells += [_fmt(m["triton_default_us"], ".1f"), ", ".join(m["failed"]) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


GRAPH_TIMES = ("graph_ms_per_token", "eager_capturable_ms_per_token", "eager_ms_per_token")


def decode_plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = {}
    for r in rows:
        if r.get("us") is None:
            continue
        for name, us in [(r["backend"], r["us"]), ("sdpa_flash", r.get("sdpa_flash_us")),
                         ("sdpa_cudnn", r.get("sdpa_cudnn_us")), ("unfused", r.get("unfused_us"))]:
            if us is not None:
                series.setdefault((name, r["batch"]), {})[r["seqlen_k"]] = us
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, batch), points in sorted(series.items()):
        keys = sorted(points)
        ax.plot(keys, [points[k] for k in keys], marker="o", label=f"{name}, batch {batch}")
    ax.set(xscale="log", yscale="log", xlabel="keys per row", ylabel="time per call (us)",
           title="decode: fused op beside SDPA (same cache)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _tournament(found) -> dict | None:
    """The tune step's tournament (benchmarks/tournament.py's JSON) as results.json keeps it."""
    if not found:
        return None
    return dict(rows=found["rows"], summary=found["summary"], auto_table=found["auto_table"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--budget", type=float, default=510)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    work, out = args.work, args.out
    logs = os.path.join(work, "logs")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build_log = read(os.path.join(logs, "build.log"))

    attention = load(os.path.join(work, "attention.json")) or {}
    attention_bwd = load(os.path.join(work, "attention_bwd.json")) or {}
    correctness = load(os.path.join(work, "correctness.json"))
    rows = attention.get("rows", [])
    archs = re.search(r"built \[(.*?)\]", build_log)
    results = dict(
        device=(attention.get("meta") or {}).get("device") or (correctness or {}).get("meta", {}).get("device")
        or ("cpu (dry run)" if args.dry_run else "unknown"),
        date=datetime.date.today().isoformat(), commit=commit(root), **versions(build_log),
        copy_gbps=(attention.get("meta") or {}).get("copy_gbps"), dry_run=args.dry_run, quick=args.quick,
        budget_s=args.budget, steps=steps_table(args.steps),
        decode=[r for r in rows if r.get("kind") == "decode"], chunk=[r for r in rows if r.get("kind") == "chunk"],
        backward=attention_bwd.get("rows", []),
        cuda_archs=archs.group(1) if archs else None,
        ptxas_spill_bytes=ptxas_spills(read(os.path.join(logs, "ptxas.txt"))),
        sanitizer=sanitizer_errors(read(os.path.join(logs, "sanitizer.log"))),
        loop_depth=load(os.path.join(work, "loop_depth.json")),
        serving=load(os.path.join(work, "serving.json")),
        tune=_tournament(load(os.path.join(work, "tournament.json"))),
        pytest=pytest_counts(read(os.path.join(logs, "pytest.log"))))
    if correctness is not None:
        results["correctness"] = dict(
            summary=correctness["summary"], meta=correctness["meta"],
            failures=[f"{c['name']}: {'; '.join(c['problems'])}" for c in correctness["checks"]
                      if c["status"] != "passed"],
            checks=[{k: c.get(k) for k in ("name", "status", "seconds", "out_err", "out_allowed", *GRAPH_TIMES)
                     if k in c or k not in GRAPH_TIMES} for c in correctness["checks"]])

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    title = "GPU pass (dry run on the CPU: no GPU timings)" if args.dry_run else "GPU pass"
    lines = [f"# {title}: {results['device']}, {results['date']}, commit {results['commit'][:12]}", "",
             f"torch {results['torch']}, Triton {results['triton']}; budget {args.budget:.0f} s; copy bandwidth "
             f"{results['copy_gbps'] or 0:.0f} GB/s.", "",
             "| step | status | seconds | limit | key numbers |", "|---|---|---|---|---|"]
    for name, s in results["steps"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']:.0f} | "
                     f"{key_numbers(name, results)} |")
    total = sum(s["seconds"] for s in results["steps"].values())
    lines += ["", f"Total {total:.0f} s of {args.budget:.0f}."]
    if results["tune"]:
        lines += ["", "## Tournament: what backend=\"auto\" runs (auto_table.py)", "",
                  f"Ranked by graph time (decode, chunk) or eager time (training, whose graph time is the backward "
                  f"alone); 'x flash': the time over SDPA-flash's in the same timing.", "",
                  *tournament_table(results["tune"]["summary"])]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(logs, "*")) + glob.glob(os.path.join(work, "*.json")) +
                           glob.glob(os.path.join(work, "*.md"))):
            tar.add(path, arcname=os.path.relpath(path, work))
    for name in ("loop_depth.png", "auto_table.py"):
        if os.path.exists(os.path.join(work, name)):
            shutil.copyfile(os.path.join(work, name), os.path.join(out, name))
    decode_plot(results["decode"], os.path.join(out, "decode.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
