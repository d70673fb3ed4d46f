// Host emulation of the CUDA built-ins and PTX wrappers the kernels use, so
// that the kernels' own source runs on the CPU (MELT_EMULATE, compiled by the
// host compiler): each GPU thread of a block is a std::thread; __syncthreads
// is a block barrier; ldmatrix, mma.sync and shuffles are warp collectives
// computed from every lane's operands exactly as the PTX ISA lays out the
// fragments; cp.async is a synchronous copy.  It checks indexing, fragment
// layouts, masking and the online softmax; it cannot show timing or anything
// the hardware itself does.  Races between the blocks of a launch it shows in
// two ways (EmulateOptions): blocks run in a chosen order (forward, reverse,
// shuffled), and with recording on, every global access of the kernels (made
// through record_access: load_global/store_global of the kernels' source and
// cp_async_16's source) is logged per block, and any byte that one block
// writes and another block of the same launch touches is reported.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

#include "gated_kv_attention.h"

#define __launch_bounds__(...)

namespace melt {

namespace emu {

// Operands one lane contributes to a warp collective.
struct Post {
    const void* ptr;
    uint32_t a[4];
    uint32_t b[2];
    float x;
};

struct Warp {
    explicit Warp(int lanes) : bar(lanes) {}
    std::barrier<> bar;
    Post post[32];
};

struct Block {
    Block(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes + 16) {
        for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(std::make_unique<Warp>(32));
    }
    std::barrier<> bar;
    std::vector<unsigned char> smem;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* block = nullptr;

// One global access of one thread.
struct Access {
    uintptr_t address;
    uint32_t bytes;
    bool write;
};

// The log of the running thread (null: not recording).
inline thread_local std::vector<Access>* access_log = nullptr;

// How the current call runs its launches (set by the emulated entry point for one call).
struct Run {
    EmulateOptions options;
    std::vector<LaunchRecord>* records = nullptr;  // null: not recording
    uint64_t launches = 0;                          // launches so far in this call
};

inline Run run;

// The bytes that a block of the launch writes and that another block reads or writes.
inline LaunchRecord find_conflicts(const char* kernel, const std::vector<std::vector<Access>>& logs) {
    LaunchRecord r;
    r.kernel = kernel;
    r.blocks = static_cast<int64_t>(logs.size());
    auto report = [&r](uintptr_t address, int64_t writer, int64_t other, bool other_writes) {
        ++r.conflict_bytes;
        if (r.conflicts.size() < kMaxReportedConflicts) r.conflicts.push_back({address, writer, other, other_writes});
    };
    std::unordered_map<uintptr_t, int64_t> writer;  // byte -> the first block that wrote it
    for (int64_t b = 0; b < r.blocks; ++b) {
        for (const Access& a : logs[b]) {
            if (!a.write) {
                ++r.reads;
                continue;
            }
            ++r.writes;
            for (uintptr_t byte = a.address; byte < a.address + a.bytes; ++byte) {
                const auto [it, first] = writer.emplace(byte, b);
                if (!first && it->second != b) report(byte, it->second, b, true);
            }
        }
    }
    for (int64_t b = 0; b < r.blocks; ++b) {
        for (const Access& a : logs[b]) {
            if (a.write) continue;
            for (uintptr_t byte = a.address; byte < a.address + a.bytes; ++byte) {
                const auto it = writer.find(byte);
                if (it != writer.end() && it->second != b) report(byte, it->second, b, false);
            }
        }
    }
    return r;
}

}  // namespace emu

// Logs one global access of the running thread when recording (the kernels' load_global/store_global).
inline void record_access(const void* p, size_t bytes, bool write) {
    if (emu::access_log) emu::access_log->push_back({reinterpret_cast<uintptr_t>(p), static_cast<uint32_t>(bytes), write});
}

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

inline unsigned char* emulated_smem() {
    auto addr = reinterpret_cast<uintptr_t>(emu::block->smem.data());
    return reinterpret_cast<unsigned char*>((addr + 15) & ~uintptr_t(15));
}

// Every lane posts its operands, then computes its result from all of them.
template <typename F>
inline auto warp_collective(const emu::Post& mine, F&& f) {
    emu::Warp& w = *emu::block->warps[threadIdx.x / 32];
    const int lane = threadIdx.x % 32;
    w.post[lane] = mine;
    w.bar.arrive_and_wait();
    auto result = f(w.post, lane);
    w.bar.arrive_and_wait();  // nobody overwrites a post before every lane has read it
    return result;
}

inline float __shfl_xor_sync(unsigned, float x, int mask) {
    emu::Post p{};
    p.x = x;
    return warp_collective(p, [mask](const emu::Post* posts, int lane) { return posts[lane ^ mask].x; });
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
    if (valid) {
        record_access(src, 16, false);
        std::memcpy(dst, src, 16);
    } else {
        std::memset(dst, 0, 16);
    }
}

inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

inline uint16_t u16_at(const void* row, int col) { return static_cast<const uint16_t*>(row)[col]; }

// ldmatrix .x4: lanes 8m..8m+7 give the row addresses of matrix m; lane l gets
// row l/4, columns 2(l%4), 2(l%4)+1 of each matrix (transposed: rows 2(l%4),
// 2(l%4)+1 of column l/4).
template <bool kTrans>
inline void ldmatrix_emulated(uint32_t (&r)[4], const void* p) {
    emu::Post mine{};
    mine.ptr = p;
    struct Regs { uint32_t v[4]; };
    const Regs regs = warp_collective(mine, [](const emu::Post* posts, int lane) {
        Regs out{};
        for (int m = 0; m < 4; ++m) {
            uint32_t lo, hi;
            if (kTrans) {
                lo = u16_at(posts[8 * m + 2 * (lane % 4)].ptr, lane / 4);
                hi = u16_at(posts[8 * m + 2 * (lane % 4) + 1].ptr, lane / 4);
            } else {
                lo = u16_at(posts[8 * m + lane / 4].ptr, 2 * (lane % 4));
                hi = u16_at(posts[8 * m + lane / 4].ptr, 2 * (lane % 4) + 1);
            }
            out.v[m] = lo | (hi << 16);
        }
        return out;
    });
    for (int m = 0; m < 4; ++m) r[m] = regs.v[m];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_emulated<false>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_emulated<true>(r, p); }

inline float from_bits(uint16_t bits, const __half*) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

inline float from_bits(uint16_t bits, const __nv_bfloat16*) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
}

// Element `which` (0: low half) of a register holding two 16-bit values of type T.
template <typename T>
inline float half_at(uint32_t reg, int which) {
    return from_bits(static_cast<uint16_t>(which ? reg >> 16 : reg & 0xffffu), static_cast<const T*>(nullptr));
}

// mma.m16n8k16 (row.col), float32 accumulate.  Lane l = 4g + t holds
// A rows g, g+8 x columns 2t, 2t+1 (+8 in a[2], a[3]); B rows 2t, 2t+1 (+8 in
// b[1]) x column g; C rows g, g+8 x columns 2t, 2t+1.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::Post mine{};
    for (int e = 0; e < 4; ++e) mine.a[e] = a[e];
    mine.b[0] = b0;
    mine.b[1] = b1;
    struct Acc { float v[4]; };
    const Acc sum = warp_collective(mine, [](const emu::Post* posts, int lane) {
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            for (int e = 0; e < 2; ++e) {
                A[g][2 * t + e] = half_at<T>(posts[l].a[0], e);
                A[g + 8][2 * t + e] = half_at<T>(posts[l].a[1], e);
                A[g][2 * t + 8 + e] = half_at<T>(posts[l].a[2], e);
                A[g + 8][2 * t + 8 + e] = half_at<T>(posts[l].a[3], e);
                B[2 * t + e][g] = half_at<T>(posts[l].b[0], e);
                B[2 * t + 8 + e][g] = half_at<T>(posts[l].b[1], e);
            }
        }
        Acc out{};
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 4; ++e) {
            const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
            float s = 0.f;
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            out.v[e] = s;
        }
        return out;
    });
    for (int e = 0; e < 4; ++e) d[e] += sum.v[e];
}

inline float fast_exp2(float x) { return std::exp2(x); }

// Runs `kernel` over a grid of `blocks` blocks of `threads` threads, one block at a time, in the order
// of emu::run; when recording, logs each block's global accesses and checks the launch for races.
template <typename K>
inline void launch_emulated(const char* name, int64_t blocks, int threads, size_t smem_bytes, K&& kernel) {
    emu::Run& run = emu::run;
    std::vector<int64_t> order(blocks);
    std::iota(order.begin(), order.end(), int64_t{0});
    if (run.options.order == kOrderReverse) {
        std::reverse(order.begin(), order.end());
    } else if (run.options.order == kOrderShuffle) {
        std::mt19937_64 rng(run.options.seed * 0x9E3779B97F4A7C15ull + run.launches);
        std::shuffle(order.begin(), order.end(), rng);
    }
    ++run.launches;
    const bool record = run.records != nullptr;
    std::vector<std::vector<emu::Access>> block_logs(record ? blocks : 0);
    for (const int64_t bid : order) {
        emu::Block blk(threads, smem_bytes);
        std::vector<std::vector<emu::Access>> thread_logs(record ? threads : 0);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int tid = 0; tid < threads; ++tid) {
            pool.emplace_back([&, tid] {
                emu::block = &blk;
                emu::access_log = record ? &thread_logs[tid] : nullptr;
                threadIdx = make_uint3(tid, 0, 0);
                blockIdx = make_uint3(static_cast<unsigned>(bid), 0, 0);
                blockDim = dim3(threads, 1, 1);
                gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
                kernel();
                emu::access_log = nullptr;
            });
        }
        for (auto& t : pool) t.join();
        for (auto& log : thread_logs) block_logs[bid].insert(block_logs[bid].end(), log.begin(), log.end());
    }
    if (record) run.records->push_back(emu::find_conflicts(name, block_logs));
}

}  // namespace melt
