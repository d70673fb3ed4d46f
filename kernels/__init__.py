"""Triton kernels of melt_kernels (installed as ``melt_kernels.kernels``)."""
