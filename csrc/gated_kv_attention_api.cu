// Host entry points: argument checks, the device check, dtype dispatch, and
// the host mirrors used by the CPU tests.  The kernels are instantiated in the
// per-dtype files.
#include "gated_kv_attention.cuh"

#include <climits>

#ifndef MELT_CUDA_ARCHS
#define MELT_CUDA_ARCHS unknown
#endif
#define MELT_STR2(x) #x
#define MELT_STR(x) MELT_STR2(x)

namespace melt {

extern template void gated_kv_attention_fwd_dtype<__half>(const FwdArgs&, cudaStream_t);
extern template void gated_kv_attention_fwd_dtype<__nv_bfloat16>(const FwdArgs&, cudaStream_t);
extern template void blend_host_dtype<__half>(const FwdArgs&);
extern template void blend_host_dtype<__nv_bfloat16>(const FwdArgs&);

namespace {

void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("melt_kernels._cuda: " + what);
}

// A usable device, or a clear error (no driver, no GPU) before any pointer is touched.
void require_device() {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();  // clear the sticky error state of this runtime
        throw std::runtime_error(std::string("melt_kernels._cuda: no usable CUDA device here (") +
                                 (e != cudaSuccess ? cudaGetErrorString(e) : "no device found") +
                                 "); use backend='triton' or backend='reference'");
    }
}

void check_rows(const char* name, const Tensor4& t) {
    // 16-byte cp.async and vector accesses: aligned rows of 2-byte elements.
    require(reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0, std::string(name) + " must be 16-byte aligned");
    for (int d = 0; d < 3; ++d)
        require(t.stride[d] % 8 == 0, std::string(name) + " strides must be multiples of 8 elements");
}

void check_gate(const char* name, const Gate& g) {
    require(g.kind >= kGateNone && g.kind <= kGateF64, std::string(name) + ": unknown gate kind");
    require(g.kind <= kGateScalar || g.ptr != nullptr, std::string(name) + ": null gate pointer");
}

// What the cache update reads and writes: the fresh k/v, both caches and both gates.
void check_update_args(const FwdArgs& p) {
    check_rows("k", p.k);
    check_rows("v", p.v);
    check_rows("k_cache", p.k_cache);
    check_rows("v_cache", p.v_cache);
    check_gate("gate", p.gate_k);
    check_gate("gate_v", p.gate_v);
}

}  // namespace

void check_fwd_args(const FwdArgs& p) {
    require(p.batch >= 1 && p.seqlen_q >= 1 && p.heads_kv >= 1, "empty problem");
    require(p.heads_q % p.heads_kv == 0, "heads_q must be a multiple of heads_kv");
    require(p.head_dim == 64 || p.head_dim == 128, "head_dim must be 64 or 128");
    require(p.cache_len >= p.seqlen_q, "cache_len must be >= seqlen_q");
    require(p.seqlens != nullptr && p.lse != nullptr, "null seqlens/lse pointer");
    check_rows("q", p.q);
    check_rows("out", p.out);
    check_update_args(p);
    if (p.block_table.ptr != nullptr) {
        const BlockTable& t = p.block_table;
        require(t.page_size >= 16 && t.page_size <= 256 && t.page_size % 16 == 0,
                "page_size must be a multiple of 16 in [16, 256]");
        require(t.num_blocks >= 1 && p.cache_len % t.page_size == 0,
                "paged caches need num_blocks >= 1 and cache_len = max_blocks * page_size");
    }
    require(p.num_splits >= 1, "num_splits must be >= 1");
    require(p.num_splits == 1 || (p.o_part != nullptr && p.lse_part != nullptr),
            "num_splits > 1 needs the o_part/lse_part workspaces");
    check_launch_sizes(p);
}

FwdLaunch fwd_grids(const FwdArgs& args) { return fwd_launch(args); }

void check_launch_sizes(const FwdArgs& p) {
    // Rows are indexed in 32 bits (and this bounds M * G, which the launch sizes multiply in int).
    require(static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q <= INT_MAX, "too many query rows");
    // Every launch is 1-D: gridDim.x < 2**31 (y and z, capped at 65535, are never used).
    const FwdLaunch l = fwd_launch(p);
    const std::pair<const char*, int64_t> grids[] = {
        {"blend", l.blend_blocks}, {"attention", l.attention_blocks}, {"combine", l.combine_blocks}};
    for (const auto& [name, blocks] : grids)
        require(blocks <= INT_MAX, std::string("the ") + name + " launch would need " + std::to_string(blocks) +
                                       " blocks, more than CUDA's 2**31 - 1: the problem is too large for one launch");
}

void gated_kv_attention_fwd(const FwdArgs& args, int dtype, void* stream) {
    require_device();
    check_fwd_args(args);
    const auto s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case kFloat16: gated_kv_attention_fwd_dtype<__half>(args, s); break;
        case kBFloat16: gated_kv_attention_fwd_dtype<__nv_bfloat16>(args, s); break;
        default: require(false, "dtype must be float16 or bfloat16");
    }
}

std::vector<std::string> built_archs() {
    const std::string list = MELT_STR(MELT_CUDA_ARCHS);  // e.g. "sm_80+sm_90a+compute_80", set by setup.py
    std::vector<std::string> archs;
    size_t start = 0;
    for (size_t end; (end = list.find('+', start)) != std::string::npos; start = end + 1)
        archs.push_back(list.substr(start, end - start));
    archs.push_back(list.substr(start));
    return archs;
}

std::vector<BlockPlan> plan_fwd(const std::vector<int>& seqlens, int cache_len, int seqlen_q, int heads_q,
                                int heads_kv, bool causal, int num_splits) {
    require(heads_kv >= 1 && heads_q % heads_kv == 0 && cache_len >= seqlen_q && num_splits >= 1 && seqlen_q >= 1,
            "bad plan arguments");
    const int group = heads_q / heads_kv;
    const int n_rows = seqlen_q * group;
    const int n_row_tiles = ceil_div(n_rows, kBlockM);
    const bool fused = fused_update(seqlen_q, heads_q, heads_kv);
    const int64_t n_blocks = static_cast<int64_t>(seqlens.size()) * heads_kv * n_row_tiles * num_splits;
    std::vector<BlockPlan> plans;
    for (int64_t idx = 0; idx < n_blocks; ++idx) {
        const BlockCoord blk = block_coord(idx, num_splits, n_row_tiles, heads_kv);
        if (blk.h != 0) continue;  // every kv head has the same schedule
        const Schedule sch = make_schedule(seqlens[blk.b], cache_len, seqlen_q,
                                           last_active_key(blk.row_tile, n_rows, group, seqlen_q, causal),
                                           num_splits, blk.split, fused);
        BlockPlan plan;
        plan.batch = blk.b;
        plan.row_tile = blk.row_tile;
        plan.split = blk.split;
        const int row0 = blk.row_tile * kBlockM;
        plan.visible.resize(imin(kBlockM, n_rows - row0));
        for (int t = sch.begin; t < sch.end; ++t) {
            const Tile tile = tile_at(sch, t, seqlen_q);
            plan.tiles.emplace_back(tile.start, tile.len);
            if (blends_tile(sch, tile)) plan.writes.emplace_back(tile.start, tile.len);
            for (size_t rr = 0; rr < plan.visible.size(); ++rr)
                for (int c = 0; c < kBlockN; ++c)
                    if (key_visible(tile, c, (row0 + static_cast<int>(rr)) / group, causal))
                        plan.visible[rr].push_back(tile.start + c);
        }
        plans.push_back(std::move(plan));
    }
    return plans;
}

void blend_host(const FwdArgs& args, int dtype) {
    require(args.head_dim % 8 == 0 && args.cache_len >= args.seqlen_q, "bad blend arguments");
    check_update_args(args);
    switch (dtype) {
        case kFloat16: blend_host_dtype<__half>(args); break;
        case kBFloat16: blend_host_dtype<__nv_bfloat16>(args); break;
        default: require(false, "dtype must be float16 or bfloat16");
    }
}

}  // namespace melt
