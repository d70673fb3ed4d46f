"""benchmarks/aot_compile.py compiles one launch per compile class: launches that Triton specializes apart only
on incidental integers (cache lengths, batch strides) share one, while unaligned tensors, M = 1 and another
plan each get their own.  No compile: the classes are read off Triton's argument binder (in a subprocess, as
the AOT script drops TRITON_INTERPRET and installs a stand-in sm_90 driver)."""
import os
import subprocess
import sys

import pytest

_CLASSES = r"""
from dataclasses import replace

import torch
import aot_compile as ac
from aot_problems import Problem
from triton.runtime import driver

driver.set_active(ac.Sm90Driver())


def launches(p):
    return ac.problem_launches(p, torch.bfloat16, 128)


def classes(p):
    return [ac.compile_class(launch) for launch in launches(p)]


def keys(p):  # Triton's own specialization (its cache key material)
    return [str(launch.fn.device_caches[0][4](*launch.args, **launch.kwargs)[1]) for launch in launches(p)]


# Decode at B = 1, 16 heads, 8k and 16k keys: the same plan (17 splits), S and the batch strides one odd, one a
# multiple of 16.
base = Problem("decode", 1, 1, 16, 16, 8200, gate_k="head", gate_v="head", side_outputs=False, backward=False)
longer = replace(base, cache_len=16400)
print("incidental", keys(base) != keys(longer), classes(base) == classes(longer))
# The decode launch (the merge after it reads only the launcher's own workspace, aligned in either case).
def decode(p):
    return [key for key in classes(p) if key[0] == "decode_kernel"]


print("unaligned", decode(base) != decode(replace(base, unaligned=True)))
print("unit M", decode(base) != decode(replace(base, seqlen_q=2, cache_len=8201)))
print("plan", decode(base) != decode(replace(base, fwd_overrides=(("block_n", 128),))))
work, made = ac.collect(["bf16"], [128], match="headline decode B=1 8k")
print("collect", made, len(work), sum(row["launches"] for _, row in work) == made,
      all(row["headline_problems"] == ["headline decode B=1 8k"] for _, row in work if row["problem"] ==
          "headline decode B=1 8k"))
"""


def run_with_aot_compile(code: str) -> dict:
    """Runs ``code`` where benchmarks/aot_compile.py imports (a subprocess without TRITON_INTERPRET: the script
    drops it and installs a stand-in driver) and returns its printed lines as {first word: the rest}."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    here = os.path.dirname(__file__)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(here, "..", "benchmarks"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=here)
    assert done.returncode == 0, done.stderr[-4000:]
    return {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}


def test_compile_classes():
    rows = run_with_aot_compile(_CLASSES)
    assert rows["incidental"] == ["True", "True"]
    assert rows["unaligned"] == ["True"] and rows["unit"] == ["M", "True"] and rows["plan"] == ["True"]
    made, kept, counted, named = rows["collect"]
    # The headline decode and its tune alternatives: fewer classes than launches, every launch counted.
    assert int(kept) < int(made) and counted == "True" and named == "True"


_VERDICTS = r"""
import aot_compile as ac

row = dict(kernel="k", dtype="bf16", head_dim=128, problem="p", constants="", registers=200, shared_bytes=0,
           spill_bytes=100, replicated=["%x: v3 [8, 1] on 64x16"])
clean = dict(row, problem="q", spill_bytes=0, replicated=[])
known = ac.known_entries([row, clean], 64)
print("entries", list(known) == [ac.known_key(row)], known[ac.known_key(row)] == {"spill_bytes": 100, "replicated": True})
bad, tolerated = ac.verdicts([row, clean], 64, known)
print("tolerated", bad == [], len(tolerated) == 2)
bad, _ = ac.verdicts([dict(row, spill_bytes=104)], 64, known)
print("more", len(bad) == 1 and "104 bytes" in bad[0])
bad, _ = ac.verdicts([row], 64, {})
print("unknown", len(bad) == 2)
bad, _ = ac.verdicts([dict(row, error="boom")], 64, known)
print("error", len(bad) == 1 and "compile error" in bad[0])
only_spill = ac.known_entries([dict(row, replicated=[])], 64)
bad, _ = ac.verdicts([row], 64, only_spill)
print("replicated", len(bad) == 1 and "replicated" in bad[0])
"""


def test_known_launches_are_tolerated_up_to_what_they_did():
    """A launch in the known list passes with up to its recorded spill and, only if recorded, a replicated MMA
    layout; anything more, any other launch, and any compile error fails."""
    rows = run_with_aot_compile(_VERDICTS)
    assert rows == {name: ["True"] * n for name, n in
                    (("entries", 2), ("tolerated", 2), ("more", 1), ("unknown", 1), ("error", 1),
                     ("replicated", 1))}, rows
