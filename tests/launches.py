"""The Triton launches of a call, recorded instead of run: which kernel, with what grid and arguments, inside
which device guard.  With tensors on the meta device a launcher then runs for any size (B = 2048, S = 131072)
in microseconds and without memory, which is how the grids and plans the launchers build are tested on a CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest

KERNELS = {
    "melt_kernels.kernels.fwd": ("decode_kernel", "blend_kernel", "chunk_attention_kernel", "merge_kernel"),
    "melt_kernels.kernels.bwd": ("bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"),
}


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    guards: tuple  # the devices of the device guards entered around the launch, outermost first


class Recorder:
    """Replaces every kernel of the two launcher modules by a stand-in that records its launches, and wraps
    their ``device_guard`` so that each launch knows the guards it ran under."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import importlib

        self.launches: list[Launch] = []
        self._guards: list = []
        for module_name, names in KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                monkeypatch.setattr(module, name, _Kernel(name, self))
            if hasattr(module, "device_guard"):
                monkeypatch.setattr(module, "device_guard", self._guard(module.device_guard))

    def _guard(self, real):
        @contextlib.contextmanager
        def guard(device):
            with real(device):
                self._guards.append(device)
                try:
                    yield
                finally:
                    self._guards.pop()
        return guard

    def grids(self) -> dict:
        return {launch.kernel: launch.grid for launch in self.launches}

    def clear(self) -> None:
        self.launches.clear()


class _Kernel:
    def __init__(self, name: str, recorder: Recorder):
        self.name, self.recorder = name, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.recorder.launches.append(Launch(self.name, tuple(grid), args, kwargs, tuple(self.recorder._guards)))
        return launch
