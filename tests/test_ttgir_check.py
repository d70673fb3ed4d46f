"""benchmarks/ttgir_check.py finds dots whose MMA layout puts more warps along M (N) than the result tile has
16-row (instruction-column) groups: on TTGIR written here, and on kernels compiled for sm_90 (no GPU)."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from ttgir_check import layouts, mma_dots, replicated  # noqa: E402

MODULE = """#blocked = #ttg.blocked<{{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}}>
#mma = #ttg.nvidia_mma<{{versionMajor = {version}, versionMinor = 0, warpsPerCTA = {warps}, instrShape = {instr}}}>
module attributes {{"ttg.num-warps" = 8 : i32, ttg.target = "cuda:90"}} {{
  tt.func public @k() {{
    %acc = arith.constant dense<0.000000e+00> : tensor<{m}x{n}xf32, #mma>
    %s = {op} %a, %b, %acc {{inputPrecision = 0 : i32}} : tensor<{m}x64xbf16, #ttg.dot_op<{{opIdx = 0, parent = #mma, kWidth = 2}}>> * tensor<64x{n}xbf16, #ttg.dot_op<{{opIdx = 1, parent = #mma, kWidth = 2}}>> -> tensor<{m}x{n}xf32, #mma> loc(#loc1)
    %f = tt.dot %c, %d, %e : tensor<16x16xf32, #blocked> * tensor<16x16xf32, #blocked> -> tensor<16x16xf32, #blocked>
    tt.return
  }}
}}
"""


def _module(m, n, warps, version=3, instr="[16, 64, 16]", op="ttng.warp_group_dot"):
    return MODULE.format(m=m, n=n, warps=warps, version=version, instr=instr, op=op)


@pytest.mark.parametrize("m, n, warps, version, instr, op, bad", [
    # Two warpgroups on 128 rows (the chunk forward's tile): none replicated.
    (128, 64, "[8, 1]", 3, "[16, 64, 16]", "ttng.warp_group_dot", ""),
    # The review's dK/dV: 8 warps on a 64-row S^T tile, both warpgroups on the same rows.
    (64, 16, "[8, 1]", 3, "[16, 16, 16]", "ttng.warp_group_dot", "M"),
    # One warpgroup on 64 rows (decode's padded row tile).
    (64, 64, "[4, 1]", 3, "[16, 64, 16]", "ttng.warp_group_dot", ""),
    # Two warpgroups side by side along N, each its own 64 columns.
    (64, 128, "[4, 2]", 3, "[16, 64, 16]", "ttng.warp_group_dot", ""),
    (64, 64, "[4, 2]", 3, "[16, 64, 16]", "ttng.warp_group_dot", "N"),
    # mma.sync: 16-row tile with 8 warps along 64 keys (the old decode tile): fine.
    (16, 64, "[1, 8]", 2, "[16, 8]", "tt.dot", ""),
    # dK/dV at head_dim 256: S^T [32, 16] on 8 warps along N, which has 2 groups of 8.
    (32, 16, "[1, 8]", 2, "[16, 8]", "tt.dot", "N"),
    (16, 64, "[2, 4]", 2, "[16, 8]", "tt.dot", "M"),
])
def test_replication_along_m_and_n(m, n, warps, version, instr, op, bad):
    text = _module(m, n, warps, version, instr, op)
    dots = mma_dots(text)
    assert [(d.name, d.rows, d.cols, d.version) for d in dots] == [("%s", m, n, version)]  # the FMA dot has none
    found = replicated(text)
    if bad:
        assert len(found) == 1 and f"along {bad}" in found[0], found
    else:
        assert found == []


def test_layouts_named_inline_and_by_alias():
    text = _module(128, 64, "[8, 1]").replace(
        "-> tensor<128x64xf32, #mma> loc",
        "-> tensor<128x64xf32, #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], "
        "instrShape = [16, 64, 16]}>> loc")
    assert layouts(text) == "v3 [4, 1] 16x64 on 128x64"
    assert "along M" in replicated(text.replace("128x64xf32, #ttg.nvidia_mma", "32x64xf32, #ttg.nvidia_mma"))[0]


# Real compiles for sm_90 (no GPU; Triton's NVIDIA backend): the chunk forward's 16-bit tile at head_dim 128
# (128 x 64, 8 warps) is two warpgroups on distinct rows; dK/dV at head_dim 256 with 32-key x 16-row steps on 8
# warps lays S^T [32, 16] over 8 warps along its 16 columns.
_COMPILE = r"""
from sm90 import compile_sm90
from ttgir_check import layouts, replicated
from melt_kernels.kernels import bwd, chunk_fwd

chunk = compile_sm90(chunk_fwd.chunk_attention_kernel, "bf16", dict(
    G=1, D=128, CAUSAL=True, DIRECT=True, PAGED=False, WIDE=False, PRECISION=None, FIX_BF16=False, BLOCK_R=128,
    BLOCK_N=64, BLOCK_D=128), num_warps=8, num_stages=3, enable_fp_fusion=True)
dkdv = compile_sm90(bwd.bwd_dkdv_kernel, "bf16", dict(
    D=256, BM=16, BN=32, BD=256, IS_CAUSAL=True, PREFIX_DK=True, PREFIX_DV=True, DQ_ATOMIC=False, PAGED=False,
    UPCAST=False, WIDE=False, WIDE_Q=False), num_warps=8, num_stages=2)
for name, kernel in (("chunk", chunk), ("dkdv", dkdv)):
    print(name, "|", layouts(kernel.asm["ttgir"]), "|", len(replicated(kernel.asm["ttgir"])))
"""


def test_real_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "benchmarks"),
                                         env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in done.stdout.splitlines() if " | " in line}
    layout, count = rows["chunk"]
    assert "v3 [8, 1]" in layout and "on 128x64" in layout and count == "0"
    layout, count = rows["dkdv"]
    assert "on 32x16" in layout and int(count) > 0
