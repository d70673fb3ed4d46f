"""Build script.

The Triton sources live in the top-level ``kernels/`` folder and are installed
as ``melt_kernels.kernels`` (no top-level ``kernels`` package reaches
site-packages).  The CUDA extension ``melt_kernels._cuda`` is compiled only
when ``MELT_BUILD_CUDA=1``; ``MELT_CUDA_ARCHS`` picks the architectures.
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("MELT_BUILD_CUDA", "0") == "1":
    raise SystemExit("MELT_BUILD_CUDA=1: the CUDA extension is not part of this release yet")

setup(
    packages=["melt_kernels", "melt_kernels.kernels"],
    package_dir={"melt_kernels": "melt_kernels", "melt_kernels.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
