// Host-side interface of the CUDA backend (plain C++: the pybind11 binding
// includes it without any CUDA header).  Python passes raw pointers, element
// strides and the current stream; nothing here depends on torch's C++ API.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace melt {

// Tile sizes of the attention kernel: kBlockM packed query rows (token, head)
// by kBlockN keys, 4 warps of 16 rows each.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

// The chunk's packed query rows (token, query head of one kv head) fit one
// row tile: then a single block per (row, kv head, split) reads the active
// slots, and it blends them itself (the decode path).  Otherwise the blend runs
// as its own launch before the attention (the chunk path).
inline bool fused_update(int seqlen_q, int heads_q, int heads_kv) {
    return seqlen_q * (heads_q / heads_kv) <= kBlockM;
}

enum GateKind : int { kGateNone = 0, kGateScalar = 1, kGateF16 = 2, kGateBF16 = 3, kGateF32 = 4, kGateF64 = 5 };

// A retention gate broadcast to (B, M, Hkv, D) by strides (stride 0 on the
// broadcast dimensions); a scalar gate carries alpha and 1 - alpha, both
// rounded to float32 from the full-precision Python float.
struct Gate {
    const void* ptr = nullptr;
    int64_t stride[4] = {0, 0, 0, 0};
    int kind = kGateNone;
    float alpha = 0.f;
    float one_minus_alpha = 1.f;
};

// A (B, N, H, D) tensor with a contiguous last dimension: strides in elements.
struct Tensor4 {
    void* ptr = nullptr;
    int64_t stride[3] = {0, 0, 0};  // batch, seq, head
};

// Paged caches (docs/op.md#paged-caches, FlashAttention's layout): k_cache/v_cache are pools (num_blocks,
// page_size, Hkv, D) and position p of row b is slot p % page_size of page ptr[b * stride + p / page_size]; the
// kernels clamp every entry into [0, num_blocks), so no table reaches outside the pools.  Null: contiguous caches.
struct BlockTable {
    const int32_t* ptr = nullptr;  // (B, max_blocks) int32 on the device
    int64_t stride = 0;            // row stride in elements
    int page_size = 0, num_blocks = 0;
};

struct FwdArgs {
    Tensor4 q, k, v, k_cache, v_cache, out;
    BlockTable block_table;  // cache_len is then max_blocks * page_size
    const int32_t* seqlens = nullptr;  // (B,) L_b on the device; clamped to [0, S - M] in the kernels
    float* lse = nullptr;              // (B, Hq, M) contiguous
    float* o_part = nullptr;           // (num_splits, B*Hq*M, D) float32, only when num_splits > 1
    float* lse_part = nullptr;         // (num_splits, B*Hq*M) float32, only when num_splits > 1
    int batch = 0, seqlen_q = 0, heads_q = 0, heads_kv = 0, head_dim = 0, cache_len = 0;
    Gate gate_k, gate_v;
    float softmax_scale = 1.f;
    bool causal = true;
    int num_splits = 1;
};

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Launches the fused op on `stream`; throws std::invalid_argument for bad
// arguments and std::runtime_error for CUDA errors (no device included).
void gated_kv_attention_fwd(const FwdArgs& args, int dtype, void* stream);

// Throws std::invalid_argument unless the kernels can take `args` (sizes, 16-byte rows, gates, workspaces,
// and every grid within CUDA's limits).
void check_fwd_args(const FwdArgs& args);

// The blocks of each launch of one forward call (all grids are 1-D); blend_* only on the chunk path,
// combine_blocks only with num_splits > 1.
struct FwdLaunch {
    int n_row_tiles;
    bool fused;
    int64_t blend_chunks, blend_blocks;
    int64_t attention_blocks;
    int64_t combine_blocks;
};

// The launches of gated_kv_attention_fwd for `args` (its sizes and num_splits), unchecked.
FwdLaunch fwd_grids(const FwdArgs& args);

// Throws std::invalid_argument when the rows of `args` (B * Hq * M) exceed 32 bits or a launch exceeds
// CUDA's grid limits (part of check_fwd_args).
void check_launch_sizes(const FwdArgs& args);

// The CUDA architectures this build holds machine code (sm_XY) or PTX (compute_XY) for.
std::vector<std::string> built_archs();

// ---------------------------------------------------------------------------
// Host mirrors for CPU tests: the very __host__ __device__ functions the
// kernels call, run over host memory.

// One attention block's work: the key tiles it reads and the slots it writes.
struct BlockPlan {
    int batch = 0, row_tile = 0, split = 0;
    std::vector<std::pair<int, int>> tiles;   // (first key position, number of keys)
    std::vector<std::pair<int, int>> writes;  // active slots this block blends and stores
    std::vector<std::vector<int>> visible;    // per packed row of the tile: the key positions it attends to
};

// The blocks of one launch for rows of lengths `seqlens` (raw values, clamped
// as the kernel clamps them).  With `fused` false the attention blocks write
// nothing (the blend ran as its own launch).
std::vector<BlockPlan> plan_fwd(const std::vector<int>& seqlens, int cache_len, int seqlen_q, int heads_q,
                                int heads_kv, bool causal, int num_splits);

// The cache update of the chunk path's blend kernel, over host memory.
void blend_host(const FwdArgs& args, int dtype);

// How the host emulator runs a call.  Blocks of a launch run one at a time,
// in `order` (kShuffle: a permutation drawn from `seed`, another per launch);
// with `record`, every global-memory access of every block is logged and each
// launch is checked for races: a byte that one block writes and another block
// of the same launch reads or writes.  `fault` plants a bug for the tests of
// that check (emulator builds only; the GPU code has no such switch).
enum BlockOrder : int { kOrderForward = 0, kOrderReverse = 1, kOrderShuffle = 2 };
enum EmulatedFault : int {
    kFaultNone = 0,
    kFaultNonOwnerReadsActive = 1,  // decode path: splits that do not own the active slots read them too
};

struct EmulateOptions {
    int order = kOrderForward;
    uint64_t seed = 0;
    bool record = false;
    int fault = kFaultNone;
};

// A byte of global memory that block `writer` wrote and block `other` of the
// same launch read (or wrote too, `other_writes`).
struct AccessConflict {
    uintptr_t address = 0;
    int64_t writer = 0, other = 0;
    bool other_writes = false;
};

// One launch as the emulator ran it, with `record`.
struct LaunchRecord {
    std::string kernel;
    int64_t blocks = 0;
    int64_t reads = 0, writes = 0;          // accesses (a thread's load or store, up to 16 bytes)
    int64_t conflict_bytes = 0;             // bytes in conflict (each counted once per other block)
    std::vector<AccessConflict> conflicts;  // the first kMaxReportedConflicts of them
};

constexpr int kMaxReportedConflicts = 16;

// The whole launch sequence of gated_kv_attention_fwd with the kernels' own
// source run by the host emulator (emulate.h) over host memory; with
// options.record, one record per launch.
std::vector<LaunchRecord> gated_kv_attention_fwd_emulated(const FwdArgs& args, int dtype,
                                                          const EmulateOptions& options);

}  // namespace melt
