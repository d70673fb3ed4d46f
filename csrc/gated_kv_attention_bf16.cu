// bfloat16 instantiation (one file per dtype so that the build compiles them in parallel).
#include "gated_kv_attention.cuh"

namespace melt {
template void gated_kv_attention_fwd_dtype<__nv_bfloat16>(const FwdArgs&, cudaStream_t);
template void blend_host_dtype<__nv_bfloat16>(const FwdArgs&);
}  // namespace melt
