// The kernels of gated_kv_attention.cuh compiled for the host and run by the
// emulator of emulate.h: lets the CPU tests execute the kernels' own source.
#define MELT_EMULATE
#include "gated_kv_attention.cuh"

#include <mutex>

namespace melt {

std::vector<LaunchRecord> gated_kv_attention_fwd_emulated(const FwdArgs& args, int dtype,
                                                          const EmulateOptions& options) {
    check_fwd_args(args);
    if (options.order < kOrderForward || options.order > kOrderShuffle)
        throw std::invalid_argument("melt_kernels._cuda: order must be forward (0), reverse (1) or shuffle (2)");
    // One call at a time: the emulator's run state (order, recording, fault) is process-wide.
    static std::mutex one_call;
    const std::lock_guard<std::mutex> lock(one_call);
    std::vector<LaunchRecord> records;
    emu::run = emu::Run{options, options.record ? &records : nullptr, 0};
    struct Reset {
        ~Reset() { emu::run = emu::Run{}; }
    } reset;
    switch (dtype) {
        case kFloat16: gated_kv_attention_fwd_emulated_dtype<__half>(args); break;
        case kBFloat16: gated_kv_attention_fwd_emulated_dtype<__nv_bfloat16>(args); break;
        default: throw std::invalid_argument("melt_kernels._cuda: dtype must be float16 or bfloat16");
    }
    return records;
}

}  // namespace melt
