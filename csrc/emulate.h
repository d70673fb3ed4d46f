// Host emulation of the CUDA built-ins and PTX wrappers the kernels use, so
// that the kernels' own source runs on the CPU (MELT_EMULATE, compiled by the
// host compiler): each GPU thread of a block is a std::thread; __syncthreads
// is a block barrier; ldmatrix, mma.sync and shuffles are warp collectives
// computed from every lane's operands exactly as the PTX ISA lays out the
// fragments; cp.async is a synchronous copy.  It checks indexing, fragment
// layouts, masking and the online softmax; it cannot show races, timing or
// anything the hardware itself does.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

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

}  // namespace emu

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

// Runs `kernel` over a grid of `blocks` blocks of `threads` threads, one block at a time.
template <typename K>
inline void launch_emulated(int64_t blocks, int threads, size_t smem_bytes, K&& kernel) {
    for (int64_t bid = 0; bid < blocks; ++bid) {
        emu::Block blk(threads, smem_bytes);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int tid = 0; tid < threads; ++tid) {
            pool.emplace_back([&, tid] {
                emu::block = &blk;
                threadIdx = make_uint3(tid, 0, 0);
                blockIdx = make_uint3(static_cast<unsigned>(bid), 0, 0);
                blockDim = dim3(threads, 1, 1);
                gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
                kernel();
            });
        }
        for (auto& t : pool) t.join();
    }
}

}  // namespace melt
