"""Replicated MMA layouts in Triton's TTGIR: dots whose warps do the same tensor-core work twice.

Triton lays a dot's warps over its result tile by the layout ``#ttg.nvidia_mma<{versionMajor = V,
warpsPerCTA = [Wm, Wn], instrShape = [Im, In, ...]}>``: warp (i, j) computes the Im x In instruction tiles
of rows i*Im, (i + Wm)*Im, ... and columns j*In, (j + Wn)*In, ....  With V = 2 (mma.sync) Im x In is
16 x 8 per warp; with V = 3 (wgmma) four warps along M form a warpgroup of 64 rows, Im = 16 per warp, and In
is the wgmma's N.  When a tile has fewer 16-row groups along M than Wm (or fewer In-column groups along N
than Wn), several warps hold the same rows (columns): they issue the same MMA and repeat the math around it
(exp2, the masks), which costs tensor-core and ALU time for nothing (the review of issue 27: dK/dV's 64-row
S^T tile on 8 warps gave both warpgroups the same m64n16k16 wgmma).  A dot is *replicated* when
Wm * Im > M or Wn * In > N.

:func:`mma_dots` reads every ``tt.dot`` / ``ttng.warp_group_dot`` of a TTGIR module with its result tile and
MMA layout (dots on the FMA units, float32 in IEEE precision, have none and are not checked).
benchmarks/aot_compile.py runs it on every launch it compiles (one compile gives the PTX, the TTGIR and
ptxas' report) and fails on a replicated dot.

    python benchmarks/ttgir_check.py kernel.ttgir ...      # a dump (TRITON_KERNEL_DUMP, the cache's .ttgir)
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

# "#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 64, 16]}>"
_ALIAS = re.compile(r"^\s*(#[\w.$-]+)\s*=\s*(#ttg\.nvidia_mma<\{[^}]*\}>)", re.M)
_FIELDS = re.compile(r"versionMajor\s*=\s*(\d+).*?warpsPerCTA\s*=\s*\[([\d,\s]+)\].*?instrShape\s*=\s*\[([\d,\s]+)\]",
                     re.S)
# "%b_sT_288 = tt.dot %a, %b, %c : ... -> tensor<32x16xf32, #mma>" (also the wgmma, with a memdesc operand).
_DOT = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*(tt\.dot|ttng\.warp_group_dot|triton_nvidia_gpu\.warp_group_dot)\b"
                  r"[^\n]*->\s*tensor<([\dx]+)x[a-z]\w*,\s*(#[\w.$-]+(?:<\{[^}]*\}>)?)>", re.M)


@dataclass(frozen=True)
class MmaDot:
    """One dot of a TTGIR module: its SSA name, result tile and MMA layout."""

    name: str
    rows: int  # M of the result tile
    cols: int  # N
    version: int  # 2: mma.sync, 3: wgmma
    warps: tuple  # warpsPerCTA along (M, N)
    instr: tuple  # the instruction tile (M, N) of one warp (M) and one warp column (N)

    @property
    def replication(self) -> list[str]:
        """How the layout repeats work: empty when no two warps hold the same rows or columns."""
        out = []
        for axis, size, warps, step in (("M", self.rows, self.warps[0], self.instr[0]),
                                        ("N", self.cols, self.warps[1], self.instr[1])):
            if warps * step > size:
                out.append(f"{warps} warps along {axis} but {axis} = {size} has {max(1, size // step)} groups of "
                           f"{step}")
        return out

    @property
    def layout(self) -> str:
        """"v3 [8, 1] 16x64 on 128x64": the version, warps, instruction tile and result tile."""
        return (f"v{self.version} [{self.warps[0]}, {self.warps[1]}] {self.instr[0]}x{self.instr[1]} on "
                f"{self.rows}x{self.cols}")


def _parse_layout(text: str):
    match = _FIELDS.search(text)
    if match is None:
        return None
    version = int(match.group(1))
    warps = [int(w) for w in match.group(2).split(",")]
    instr = [int(i) for i in match.group(3).split(",")]
    return version, tuple(warps[-2:]), tuple(instr[:2])


def mma_dots(ttgir: str) -> list[MmaDot]:
    """Every dot of ``ttgir`` whose result has an ``nvidia_mma`` layout, in the order of the module."""
    layouts = {alias: _parse_layout(body) for alias, body in _ALIAS.findall(ttgir)}
    dots = []
    for name, _, shape, encoding in _DOT.findall(ttgir):
        layout = layouts.get(encoding) if encoding in layouts else (
            _parse_layout(encoding) if "nvidia_mma" in encoding else None)
        if layout is None:
            continue
        dims = [int(d) for d in shape.split("x")]
        version, warps, instr = layout
        dots.append(MmaDot(name, dims[-2], dims[-1], version, warps, instr))
    return dots


def replicated(ttgir: str) -> list[str]:
    """One line per replicated dot of ``ttgir`` (empty: none)."""
    return [f"{dot.name}: {dot.layout}: {'; '.join(dot.replication)}" for dot in mma_dots(ttgir) if dot.replication]


def layouts(ttgir: str) -> str:
    """The distinct MMA layouts of the module's dots, for a table ("" when it has none)."""
    return ", ".join(dict.fromkeys(dot.layout for dot in mma_dots(ttgir)))


def main(argv=None) -> int:
    bad = 0
    for path in (argv if argv is not None else sys.argv[1:]):
        with open(path) as f:
            text = f.read()
        found = replicated(text)
        print(f"{path}: {layouts(text) or 'no MMA dot'}")
        for line in found:
            print(f"  REPLICATED {line}")
        bad += bool(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
