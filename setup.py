"""Build script.

The Triton sources live in the top-level ``kernels/`` folder and are installed
as ``melt_kernels.kernels``: no top-level ``kernels`` reaches site-packages,
and the folder has no ``__init__.py``, so that from a checkout it never
shadows Hugging Face's ``kernels`` package (``melt_kernels/__init__.py`` maps
it where an editable install does not).  The CUDA extension ``melt_kernels._cuda`` is compiled only
when ``MELT_BUILD_CUDA=1``; ``MELT_CUDA_ARCHS`` picks the architectures.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}


# --- CUDA extension (MELT_BUILD_CUDA=1) --------------------------------------
# csrc/*.cu are compiled by nvcc through a generated ninja file (in parallel,
# incrementally), the pybind11 binding and the host emulator of the kernels by
# the host compiler, and everything is linked with the static CUDA runtime, so
# that the module imports without the CUDA driver (a call then raises).  No
# torch C++ header is used: Python passes pointers, strides and the stream.
#   MELT_CUDA_ARCHS   e.g. "80;90a" (the default) or "8.0 9.0a": machine code
#                     for each, plus PTX of the lowest plain one for newer GPUs
#   MELT_NVCC         nvcc to use (default: bin/nvcc of $CUDA_HOME, of the nvcc on
#                     PATH, or of /usr/local/cuda)
#   MELT_PTXAS_REPORT file to copy the ptxas resource report (-Xptxas -v) to

CSRC = "csrc"
CUDA_SOURCES = ["gated_kv_attention_api.cu", "gated_kv_attention_fp16.cu", "gated_kv_attention_bf16.cu"]
HOST_SOURCES = ["bindings.cpp", "gated_kv_attention_emulate.cpp"]
HEADERS = ["gated_kv_attention.h", "gated_kv_attention.cuh", "emulate.h"]


def _find_cuda() -> tuple[str, str]:
    """(nvcc, CUDA toolkit root); the root is where include/cuda_runtime.h lies (nvcc may be a wrapper script)."""
    on_path = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             on_path and os.path.dirname(os.path.dirname(os.path.realpath(on_path))), "/usr/local/cuda"]
    root = next((r for r in roots if r and os.path.isfile(os.path.join(r, "include", "cuda_runtime.h"))), None)
    if root is None:
        raise SystemExit("MELT_BUILD_CUDA=1: no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    nvcc = os.environ.get("MELT_NVCC") or os.path.join(root, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        raise SystemExit(f"MELT_BUILD_CUDA=1: {nvcc} is not an executable nvcc (set MELT_NVCC)")
    return nvcc, root


def _find_static_cudart(cuda_home: str) -> str:
    for pattern in ("lib64/libcudart_static.a", "lib/libcudart_static.a", "targets/*/lib/libcudart_static.a"):
        found = sorted(glob.glob(os.path.join(cuda_home, pattern)))
        if found:
            return found[0]
    raise SystemExit(f"MELT_BUILD_CUDA=1: libcudart_static.a not found under {cuda_home}")


def _parse_archs(spec: str) -> tuple[list[str], str]:
    """(nvcc -gencode flags, the targets joined by '+') for e.g. "80;90a" (nvcc splits -D values at commas)."""
    archs = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        arch = token.lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(f"MELT_CUDA_ARCHS: cannot read {token!r} (expected e.g. 80, 8.0, sm_90a)")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit("MELT_CUDA_ARCHS is empty")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    targets = [f"sm_{a}" for a in archs]
    plain = sorted((a for a in archs if a.isdigit()), key=int)
    if plain:  # PTX that the driver can compile for GPUs newer than every listed one
        flags.append(f"-gencode=arch=compute_{plain[0]},code=compute_{plain[0]}")
        targets.append(f"compute_{plain[0]}")
    return flags, "+".join(targets)


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _compile_cuda(nvcc: str, build_dir: str, gencode: list, targets: str) -> list:
    """Compiles CUDA_SOURCES with ninja; returns the objects, writes the ptxas report."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "ninja")  # a venv's ninja, off PATH
    ninja = beside_python if os.access(beside_python, os.X_OK) else shutil.which("ninja")
    if ninja is None:
        raise SystemExit("MELT_BUILD_CUDA=1 needs ninja: pip install ninja, then build with --no-build-isolation")
    csrc = os.path.abspath(CSRC)
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v", "-Xcompiler=-fPIC,-ffp-contract=off,-fno-strict-aliasing",
             f"-DMELT_CUDA_ARCHS={targets}", f"-I{csrc}", *gencode]
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(nvcc)}",
        f"flags = {' '.join(shlex.quote(f) for f in flags)}",
        "rule nvcc",
        # nvcc's output (the ptxas report) goes to $out.log; shown only on failure.
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out > $out.log 2>&1 || { cat $out.log; exit 1; }",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
    ]
    objects = []
    for src in CUDA_SOURCES:
        obj = os.path.join(os.path.abspath(build_dir), src.replace(".cu", ".o"))
        objects.append(obj)
        lines.append(f"build {_ninja_escape(obj)}: nvcc {_ninja_escape(os.path.join(csrc, src))}")
    with open(os.path.join(build_dir, "build.ninja"), "w") as f:
        f.write("\n".join(lines) + "\n")
    subprocess.run([ninja, "-C", build_dir], check=True)

    report = ""
    for obj in objects:
        with open(obj + ".log") as f:
            report += f"== {os.path.basename(obj)}\n" + f.read()
    report_path = os.path.join(build_dir, "ptxas.txt")
    with open(report_path, "w") as f:
        f.write(report)
    spills = [m for m in re.finditer(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
              if m.group(1) != "0" or m.group(2) != "0"]
    print(f"melt_kernels._cuda: ptxas report in {report_path}" +
          (f"; WARNING: {len(spills)} kernel(s) spill registers" if spills else "; no register spills"))
    if os.environ.get("MELT_PTXAS_REPORT"):
        shutil.copyfile(report_path, os.environ["MELT_PTXAS_REPORT"])
    return objects


def _cuda_extension():
    from pybind11.setup_helpers import Pybind11Extension
    from setuptools.command.build_ext import build_ext

    nvcc, cuda_home = _find_cuda()
    gencode, targets = _parse_archs(os.environ.get("MELT_CUDA_ARCHS", "80;90a"))

    class BuildCuda(build_ext):
        def build_extension(self, ext):
            ext.extra_objects = _compile_cuda(nvcc, os.path.join(self.build_temp, "melt_cuda"), gencode, targets)
            super().build_extension(ext)

    ext = Pybind11Extension(
        "melt_kernels._cuda",
        [os.path.join(CSRC, s) for s in HOST_SOURCES],
        include_dirs=[CSRC, os.path.join(cuda_home, "include")],
        cxx_std=20,  # std::barrier in the emulator
        # CUDA-style type punning in the kernels' source: no strict-aliasing assumptions on the host.
        extra_compile_args=["-ffp-contract=off", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
        # Static runtime, its symbols kept private: no libcudart.so needed, and
        # no clash with the one a CUDA build of torch loads.
        extra_link_args=[_find_static_cudart(cuda_home), "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,ALL"],
        depends=[os.path.join(CSRC, s) for s in CUDA_SOURCES + HEADERS],
    )
    return [ext], {"build_ext": BuildCuda}


if os.environ.get("MELT_BUILD_CUDA", "0") == "1":
    ext_modules, cmdclass = _cuda_extension()

setup(
    # Every package under melt_kernels/ (a subpackage left off this list would be missing from wheels, while an
    # editable install hides it), and the kernels folder under its installed name.
    packages=[*find_packages(include=["melt_kernels", "melt_kernels.*"]), "melt_kernels.kernels"],
    package_dir={"melt_kernels": "melt_kernels", "melt_kernels.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
