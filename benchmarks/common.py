"""What the kernel benchmarks (attention.py, attention_bwd.py) share: the command line, the choice of device,
the timing harness, the run's metadata and the writing of its results.  The scripts import it as ``common``
(their folder is on sys.path when they are run as ``python benchmarks/<script>.py``)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

import melt_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Setup:
    args: argparse.Namespace
    device: torch.device
    device_name: str
    dtype: torch.dtype
    backends: list[str]  # the reference is what the kernels are checked against, not a kernel to time

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup(doc: str, name: str, argv=None) -> Setup | None:
    """The command line and where to run: CUDA unless the Triton interpreter is on, which runs only the --quick
    smoke test, on the CPU.  None, after saying why, when there is nothing to run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the script)")
    parser.add_argument("--out", help="JSON path (a .md table is written beside it); default "
                        f"benchmarks/results/{name}-<device>-<date>.json")
    args = parser.parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if torch.cuda.is_available() and not interpreted:
        device = torch.device("cuda")
        device_name, dtype = torch.cuda.get_device_name(device), torch.bfloat16
    elif args.quick and interpreted:
        device, device_name, dtype = torch.device("cpu"), "cpu-interpreter", torch.float32
    else:
        print(f"benchmarks/{name}.py times GPU kernels and no CUDA device is available: nothing to do. "
              "(TRITON_INTERPRET=1 ... --quick runs the script on tiny CPU shapes as a smoke test.)")
        return None
    backends = [b for b in melt_kernels.available_backends() if b != "reference"]
    return Setup(args, device, device_name, dtype, backends)


def median_ms(fn, cuda: bool, bench: Callable[[Callable], float]) -> float:
    """``bench(fn)`` in ms once ``fn`` has compiled; off CUDA a single run, which checks the path but times
    nothing meaningful."""
    if not cuda:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    fn()  # compile and warm up outside the timed runs (and outside any CUDA graph they capture)
    torch.cuda.synchronize()
    return bench(fn)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_meta(device_name: str, **fields) -> dict:
    """Where and from what the results came, then the script's own ``fields``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(device=device_name, date=now.isoformat(timespec="seconds"), commit=git_commit(),
                torch=torch.__version__, **fields)


def write_results(out: str | None, name: str, meta: dict, rows: list[dict], table: str) -> None:
    """``{"meta", "rows"}`` as JSON to ``out`` (by default benchmarks/results/<name>-<device>-<date>.json) and the
    markdown ``table`` beside it, which is also printed."""
    day = datetime.datetime.fromisoformat(meta["date"])
    out = out or os.path.join(HERE, "results", f"{name}-{meta['device'].replace(' ', '_')}-{day:%Y%m%d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {out} and {md}")
