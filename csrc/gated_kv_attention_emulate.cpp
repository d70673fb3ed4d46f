// The kernels of gated_kv_attention.cuh compiled for the host and run by the
// emulator of emulate.h: lets the CPU tests execute the kernels' own source.
#define MELT_EMULATE
#include "gated_kv_attention.cuh"

namespace melt {

void gated_kv_attention_fwd_emulated(const FwdArgs& args, int dtype) {
    check_fwd_args(args);
    switch (dtype) {
        case kFloat16: gated_kv_attention_fwd_emulated_dtype<__half>(args); break;
        case kBFloat16: gated_kv_attention_fwd_emulated_dtype<__nv_bfloat16>(args); break;
        default: throw std::invalid_argument("melt_kernels._cuda: dtype must be float16 or bfloat16");
    }
}

}  // namespace melt
