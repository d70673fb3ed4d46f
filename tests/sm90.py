"""Compiling the Triton kernels for sm_90 without a GPU (``triton.compile`` of an ``ASTSource`` for
``GPUTarget("cuda", 90, 32)``), for the tests that check what the compiler makes of them.  Used in a
subprocess without TRITON_INTERPRET (under the interpreter ``triton.jit`` gives functions that cannot be
compiled): ``sys.path`` must hold this folder."""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Argument names of the forward (upper case) and backward kernels, by the type a launch passes.
DTYPE_POINTERS = {"Q", "K", "V", "KC", "VC", "O", "KN", "VN", "KO", "VO", "q", "k_cache", "v_cache", "k_new",
                  "v_new", "dout", "out", "dk_cache", "dv_cache", "BUF_K", "BUF_V", "DK", "DV"}
FP32_POINTERS = {"GK", "GV", "LSE", "O_PART", "LSE_PART", "lse", "delta", "dlse", "dq", "dq_acc", "dk_new", "dv_new",
                 "DK_ATTN", "DV_ATTN", "DGK", "DGV"}
INT32_POINTERS = {"SEQLENS", "COUNTERS", "cache_seqlens", "BT", "block_table"}
FP32_SCALARS = {"gk_alpha", "gk_beta", "gv_alpha", "gv_beta", "qk_scale", "softmax_scale"}


def compile_sm90(fn, dtype: str, consts: dict, **options):
    """``fn`` compiled for sm_90 with pointers to ``dtype`` ("bf16", "fp16", "fp32"), int32 scalars."""
    def kind(name):
        if name in consts:
            return "constexpr"
        if name in DTYPE_POINTERS:
            return "*" + dtype
        if name in FP32_POINTERS:
            return "*fp32"
        if name in INT32_POINTERS:
            return "*i32"
        return "fp32" if name in FP32_SCALARS else "i32"
    kernel = triton.compile(ASTSource(fn, {n: kind(n) for n in fn.arg_names}, consts),
                            target=GPUTarget("cuda", 90, 32), options=options)
    assert ".entry" in kernel.asm["ptx"]
    return kernel
