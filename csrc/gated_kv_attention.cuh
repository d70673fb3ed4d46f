// Fused gated KV-cache update + attention read (docs/op.md#the-cache-update, docs/op.md#the-attention-read),
// float16 and bfloat16, head_dim 64 and 128, tensor cores through mma.sync (m16n8k16).
//
// Query rows are packed as (active token i, query head g of one kv head):
// row = i * G + g, so one block serves every query head of its kv head and
// each K/V tile is loaded once for all of them (GQA/MQA).  A block owns
// kBlockM packed rows of one (batch row b, kv head h) and one split of the
// key tiles; the key tiles of row b are
//     settled tiles  [t*BN, min((t+1)*BN, L_b))            t < ceil(L_b / BN)
//     active tiles   [L_b + a*BN, L_b + min((a+1)*BN, M))   a = 0, 1, ...
// so that no tile mixes settled and active positions.
//
// Ownership of the active slots (the single-writer rule):
//  * Decode path (fused, M*G <= kBlockM: one row tile): there is exactly one
//    active tile, the last one of the row, and the split holding it is the one
//    block of the launch that touches positions L_b..L_b+M-1 of (b, h).  It
//    loads the old slots, blends them with the fresh k/v in float32 in
//    registers, stores the rounded values to the cache and to shared memory,
//    and attends to those stored values.  Every other split of (b, h) reads
//    only settled positions < L_b, which nobody writes.  Each slot therefore
//    has exactly one writer, and no block reads a slot another block writes.
//  * Chunk path (M*G > kBlockM): every row tile at or below an active key tile
//    reads it, so no single block can own it without serialising the chunk.
//    The blend then runs first as its own small launch on the same stream
//    (one thread per 16-byte chunk of a slot, one writer per slot), and the
//    attention launch only reads the cache.
//
// Lengths come from a device tensor; a bad value is clamped into [0, S - M]
// (settled_length), and every tile, load and store is masked to its bounds, so
// no access leaves the row's [0, S).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "gated_kv_attention.h"

#ifdef MELT_EMULATE
#include "emulate.h"
#define MELT_HD inline
#define MELT_DYNAMIC_SMEM(name) unsigned char* name = emulated_smem()
#else
#include <cuda_runtime.h>
#define MELT_HD __host__ __device__ __forceinline__
#define MELT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace melt {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
static_assert(kBlockM == 16 * kWarps, "each warp owns 16 packed query rows");
static_assert(kBlockM <= kBlockN, "fused (M*G <= kBlockM) must imply a single active tile (M <= kBlockN)");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------
// Global memory.  Every load and store of global memory in the kernels goes
// through these two (cp.async copies through cp_async_16): on the GPU they are
// the plain accesses, inlined; the emulator also records them per block, which
// is how it finds races between the blocks of a launch (emulate.h).

template <typename T>
MELT_HD T load_global(const T* p) {
#ifdef MELT_EMULATE
    record_access(p, sizeof(T), false);
#endif
    return *p;
}

template <typename T>
MELT_HD void store_global(T* p, const T& value) {
#ifdef MELT_EMULATE
    record_access(p, sizeof(T), true);
#endif
    *p = value;
}

MELT_HD int imin(int a, int b) { return a < b ? a : b; }
MELT_HD int imax(int a, int b) { return a > b ? a : b; }
MELT_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Work split, shared by the kernels and the host mirror (plan_fwd).

// L_b as the kernels use it: clamped so that positions L_b .. L_b+M-1 stay in [0, S).
MELT_HD int settled_length(int raw, int cache_len, int seqlen_q) {
    return imin(imax(raw, 0), cache_len - seqlen_q);
}

struct BlockCoord {
    int b, h, row_tile, split;
};

MELT_HD BlockCoord block_coord(int64_t idx, int num_splits, int n_row_tiles, int heads_kv) {
    BlockCoord c;
    c.split = static_cast<int>(idx % num_splits);
    idx /= num_splits;
    c.row_tile = static_cast<int>(idx % n_row_tiles);
    idx /= n_row_tiles;
    c.h = static_cast<int>(idx % heads_kv);
    c.b = static_cast<int>(idx / heads_kv);
    return c;
}

// The largest active index a row of this row tile attends to.
MELT_HD int last_active_key(int row_tile, int n_rows, int group, int seqlen_q, bool causal) {
    return causal ? (imin((row_tile + 1) * kBlockM, n_rows) - 1) / group : seqlen_q - 1;
}

struct Schedule {
    int L;              // clamped settled length
    int n_pre;          // settled tiles
    int n_tiles;        // settled + active tiles seen by the row tile
    int begin, end;     // this split's tiles
    bool writes_active; // fused update: this block owns (blends and stores) the active slots
};

MELT_HD Schedule make_schedule(int raw_len, int cache_len, int seqlen_q, int last_key, int num_splits, int split,
                               bool fused) {
    Schedule s;
    s.L = settled_length(raw_len, cache_len, seqlen_q);
    s.n_pre = ceil_div(s.L, kBlockN);
    s.n_tiles = s.n_pre + last_key / kBlockN + 1;
    const int per_split = ceil_div(s.n_tiles, num_splits);
    s.begin = imin(split * per_split, s.n_tiles);
    s.end = imin(s.begin + per_split, s.n_tiles);
    // Fused means M <= kBlockN: one active tile, the last, so exactly one split holds it.
    s.writes_active = fused && s.begin < s.end && s.end == s.n_tiles;
    return s;
}

struct Tile {
    int start;   // first key position
    int len;     // keys in the tile (<= kBlockN)
    int offset;  // active index of the first key, or -1 for a settled tile
};

MELT_HD Tile tile_at(const Schedule& s, int t, int seqlen_q) {
    if (t < s.n_pre) return {t * kBlockN, imin(kBlockN, s.L - t * kBlockN), -1};
    const int a = (t - s.n_pre) * kBlockN;
    return {s.L + a, imin(kBlockN, seqlen_q - a), a};
}

MELT_HD bool blends_tile(const Schedule& s, const Tile& t) { return s.writes_active && t.offset == 0; }

// Key c of the tile is attended to by active token i (causal: bottom-right aligned).
MELT_HD bool key_visible(const Tile& t, int c, int i, bool causal) {
    return c < t.len && (t.offset < 0 || !causal || t.offset + c <= i);
}

// ---------------------------------------------------------------------------
// The blend, new = alpha*old + (1-alpha)*fresh in float32 in exactly that form
// (no contraction into an FMA), rounded once to the cache dtype.

MELT_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;  // host build uses -ffp-contract=off
#endif
}

MELT_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

MELT_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

MELT_HD float to_float(__half x) { return __half2float(x); }
MELT_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
MELT_HD T from_float(float x);
template <>
MELT_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
MELT_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The gate at (b, i, h, d), read in its own dtype (stride 0 on broadcast dimensions).
MELT_HD float gate_at(const Gate& g, int b, int i, int h, int d) {
    const int64_t o = b * g.stride[0] + i * g.stride[1] + h * g.stride[2] + d * g.stride[3];
    switch (g.kind) {
        case kGateF16: return __half2float(load_global(static_cast<const __half*>(g.ptr) + o));
        case kGateBF16: return __bfloat162float(load_global(static_cast<const __nv_bfloat16*>(g.ptr) + o));
        case kGateF32: return load_global(static_cast<const float*>(g.ptr) + o);
        case kGateF64: return static_cast<float>(load_global(static_cast<const double*>(g.ptr) + o));
        default: return g.alpha;
    }
}

// Blends 8 channels d0..d0+7 (one 16-byte chunk) of slot (b, i, h).
template <typename T>
MELT_HD uint4 blend_chunk(uint4 old, uint4 fresh, const Gate& g, int b, int i, int h, int d0) {
    T b_old[8], b_fresh[8], b_res[8];
    memcpy(static_cast<void*>(b_old), &old, 16);  // the chunk's 8 values, bit for bit
    memcpy(static_cast<void*>(b_fresh), &fresh, 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float alpha = g.kind == kGateScalar ? g.alpha : gate_at(g, b, i, h, d0 + e);
        const float keep = g.kind == kGateScalar ? g.one_minus_alpha : sub_rn(1.f, alpha);
        b_res[e] = from_float<T>(add_rn(mul_rn(alpha, to_float(b_old[e])), mul_rn(keep, to_float(b_fresh[e]))));
    }
    uint4 res;
    memcpy(&res, b_res, 16);
    return res;
}

// Element offset of position `pos` of row b in `cache` (head and channel left out): b and pos through the
// strides for a contiguous cache (the identity mapping), the block table's page for a pool, its entry clamped
// into [0, num_blocks) whatever the table holds (pos itself is in [0, cache_len): clamped lengths, masked
// tiles).
MELT_HD int64_t cache_row(const BlockTable& table, const Tensor4& cache, int b, int pos) {
    if (table.ptr == nullptr) return b * cache.stride[0] + static_cast<int64_t>(pos) * cache.stride[1];
    const int page = imin(imax(load_global(table.ptr + b * table.stride + pos / table.page_size), 0),
                          table.num_blocks - 1);
    return page * cache.stride[0] + static_cast<int64_t>(pos % table.page_size) * cache.stride[1];
}

// Writes the update of channels d0..d0+7 of active token i (row b, kv head h)
// into slot L + i of `cache` and returns the stored chunk.  With no gate the
// old slot is not read.
template <typename T>
MELT_HD uint4 update_slot(const Tensor4& fresh, const Tensor4& cache, const BlockTable& table, const Gate& gate,
                          int b, int i, int h, int d0, int L) {
    const T* p_fresh = static_cast<const T*>(fresh.ptr) + b * fresh.stride[0] + i * fresh.stride[1] +
                       h * fresh.stride[2] + d0;
    T* p_slot = static_cast<T*>(cache.ptr) + cache_row(table, cache, b, L + i) + h * cache.stride[2] + d0;
    uint4 b_new = load_global(reinterpret_cast<const uint4*>(p_fresh));
    if (gate.kind != kGateNone)
        b_new = blend_chunk<T>(load_global(reinterpret_cast<const uint4*>(p_slot)), b_new, gate, b, i, h, d0);
    store_global(reinterpret_cast<uint4*>(p_slot), b_new);
    return b_new;
}

// Chunk idx of the chunk path's blend: K chunks first, then V; channels fastest.
template <typename T>
MELT_HD void blend_at(const FwdArgs& p, int64_t idx) {
    const int chunks = p.head_dim / 8;
    const int64_t per_tensor = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_kv * chunks;
    const bool is_v = idx >= per_tensor;
    if (is_v) idx -= per_tensor;
    const int d0 = static_cast<int>(idx % chunks) * 8;
    idx /= chunks;
    const int h = static_cast<int>(idx % p.heads_kv);
    idx /= p.heads_kv;
    const int i = static_cast<int>(idx % p.seqlen_q);
    const int b = static_cast<int>(idx / p.seqlen_q);
    const int L = settled_length(load_global(p.seqlens + b), p.cache_len, p.seqlen_q);
    update_slot<T>(is_v ? p.v : p.k, is_v ? p.v_cache : p.k_cache, p.block_table, is_v ? p.gate_v : p.gate_k, b, i,
                   h, d0, L);
}

// Two floats rounded into one register, the lower index in the low half (mma operand order).
template <typename T>
MELT_HD uint32_t pack2(float lo, float hi);

template <>
MELT_HD uint32_t pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}

template <>
MELT_HD uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}

// ---------------------------------------------------------------------------
// PTX wrappers (emulate.h provides host versions).

#ifndef MELT_EMULATE

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// d += a (16x16, row) * b (16x8, col), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
    return y;
}

#endif  // MELT_EMULATE

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------
// Kernels.

template <typename T, int D>
struct FwdSmem {
    static constexpr int kStride = D + 8;  // 16 bytes of padding: ldmatrix rows fall in distinct banks
    static constexpr int kTile = kBlockN * kStride;
    static constexpr size_t kBytes = (kBlockM * kStride + 4 * kTile) * sizeof(T);  // Q, then K and V double-buffered
};

template <typename T>
__global__ void __launch_bounds__(256) blend_kernel(const __grid_constant__ FwdArgs p, int64_t n_chunks) {
    for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n_chunks;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
        blend_at<T>(p, idx);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_kernel(const __grid_constant__ FwdArgs p, int n_row_tiles,
                                                             bool fused) {
    using Smem = FwdSmem<T, D>;
    constexpr int kStride = Smem::kStride;
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    MELT_DYNAMIC_SMEM(smem);
    T* s_q = reinterpret_cast<T*>(smem);   // [BM, D+8]
    T* s_k = s_q + kBlockM * kStride;      // [2, BN, D+8]
    T* s_v = s_k + 2 * Smem::kTile;        // [2, BN, D+8]

    const BlockCoord blk = block_coord(blockIdx.x, p.num_splits, n_row_tiles, p.heads_kv);
    const int group = p.heads_q / p.heads_kv;
    const int n_rows = p.seqlen_q * group;
    const int row0 = blk.row_tile * kBlockM;
    Schedule sch = make_schedule(load_global(p.seqlens + blk.b), p.cache_len, p.seqlen_q,
                                 last_active_key(blk.row_tile, n_rows, group, p.seqlen_q, p.causal), p.num_splits,
                                 blk.split, fused);
#ifdef MELT_EMULATE
    // Test-only fault (emulator builds): the splits that do not own the active slots read them too, before
    // or after the owner rewrites them, the race that the emulator's access recording must report.
    if (emu::run.options.fault == kFaultNonOwnerReadsActive && fused && !sch.writes_active && sch.begin < sch.end)
        sch.end = sch.n_tiles;
#endif
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const bool warp_active = row0 + warp * 16 < n_rows;
    // This thread's accumulator rows: lane/4 and lane/4 + 8 of the warp's 16.
    int i_tok[2];
    bool m_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + warp * 16 + lane / 4 + 8 * r;
        m_row[r] = row < n_rows;
        i_tok[r] = m_row[r] ? row / group : 0;
    }
    const T* p_kc = static_cast<const T*>(p.k_cache.ptr) + blk.h * p.k_cache.stride[2];
    const T* p_vc = static_cast<const T*>(p.v_cache.ptr) + blk.h * p.v_cache.stride[2];

    auto load_tile = [&](int t, int buf) {
        const Tile tile = tile_at(sch, t, p.seqlen_q);
        T* s_kb = s_k + buf * Smem::kTile;
        T* s_vb = s_v + buf * Smem::kTile;
        const bool blend = blends_tile(sch, tile);
        for (int c = tid; c < kBlockN * kChunks; c += kThreads) {
            const int j = c / kChunks, d0 = (c % kChunks) * 8;
            const bool ok = j < tile.len;
            if (blend) {
                // The owner split: active token j's slot, blended here and nowhere else.
                uint4 b_k = make_uint4(0, 0, 0, 0), b_v = make_uint4(0, 0, 0, 0);
                if (ok) {
                    b_k = update_slot<T>(p.k, p.k_cache, p.block_table, p.gate_k, blk.b, j, blk.h, d0, sch.L);
                    b_v = update_slot<T>(p.v, p.v_cache, p.block_table, p.gate_v, blk.b, j, blk.h, d0, sch.L);
                }
                *reinterpret_cast<uint4*>(s_kb + j * kStride + d0) = b_k;
                *reinterpret_cast<uint4*>(s_vb + j * kStride + d0) = b_v;
            } else {
                const int pos = tile.start + (ok ? j : 0);
                cp_async_16(s_kb + j * kStride + d0, p_kc + cache_row(p.block_table, p.k_cache, blk.b, pos) + d0, ok);
                cp_async_16(s_vb + j * kStride + d0, p_vc + cache_row(p.block_table, p.v_cache, blk.b, pos) + d0, ok);
            }
        }
    };

    float b_o[D / 8][4];  // [16, D] output accumulator of the warp's rows
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) b_o[dt][e] = 0.f;
    float b_m[2] = {-INFINITY, -INFINITY};  // running max, log2 units
    float b_l[2] = {0.f, 0.f};              // running sum (this thread's columns)
    const float scale_log2 = p.softmax_scale * kLog2e;

    if (sch.begin < sch.end) {
        for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
            const int rr = c / kChunks, d0 = (c % kChunks) * 8;
            const int row = row0 + rr;
            const bool ok = row < n_rows;
            const int i = ok ? row / group : 0, h_q = blk.h * group + (ok ? row % group : 0);
            const T* p_src = static_cast<const T*>(p.q.ptr) + blk.b * p.q.stride[0] + i * p.q.stride[1] +
                             h_q * p.q.stride[2] + d0;
            cp_async_16(s_q + rr * kStride + d0, p_src, ok);
        }
        load_tile(sch.begin, 0);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();

        uint32_t b_q[D / 16][4];  // [16, D] A fragments of the warp's queries
        if (warp_active) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(b_q[kk], s_q + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
        }

        for (int t = sch.begin; t < sch.end; ++t) {
            const int buf = (t - sch.begin) & 1;
            if (t > sch.begin) {
                // Tile t has landed, and every warp is done with tile t-1, whose buffer is refilled next.
                cp_async_wait_all();
                __syncthreads();
            }
            if (t + 1 < sch.end) {
                load_tile(t + 1, buf ^ 1);
                cp_async_commit();
            }
            if (!warp_active) continue;
            const Tile tile = tile_at(sch, t, p.seqlen_q);
            const T* s_kb = s_k + buf * Smem::kTile;
            const T* s_vb = s_v + buf * Smem::kTile;

            float b_s[kBlockN / 8][4];  // [16, BN] scores
#pragma unroll
            for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) b_s[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < kBlockN / 16; ++np) {
                    uint32_t b_k[4];  // B fragments of keys np*16 .. np*16+15, channels kk*16 .. kk*16+15
                    ldmatrix_x4(b_k, s_kb + (np * 16 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 +
                                         ((lane / 8) % 2) * 8);
                    mma_16816<T>(b_s[2 * np], b_q[kk], b_k[0], b_k[1]);
                    mma_16816<T>(b_s[2 * np + 1], b_q[kk], b_k[2], b_k[3]);
                }
            }

            const bool need_mask = tile.len < kBlockN || (tile.offset >= 0 && p.causal);
            float b_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float s = b_s[nt][e] * scale_log2;
                    if (need_mask && !key_visible(tile, nt * 8 + (lane % 4) * 2 + (e & 1), i_tok[e / 2], p.causal))
                        s = -INFINITY;
                    b_s[nt][e] = s;
                    b_max[e / 2] = fmaxf(b_max[e / 2], s);
                }
            }
            float b_base[2], b_corr[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_new = fmaxf(b_m[r], quad_max(b_max[r]));
                // A row with no visible key so far keeps m = -inf; subtract 0 so that exp2 gives 0, not NaN.
                b_base[r] = m_new == -INFINITY ? 0.f : m_new;
                b_corr[r] = fast_exp2(b_m[r] - b_base[r]);
                b_m[r] = m_new;
                b_l[r] *= b_corr[r];
            }
#pragma unroll
            for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    b_s[nt][e] = fast_exp2(b_s[nt][e] - b_base[e / 2]);
                    b_l[e / 2] += b_s[nt][e];
                }
            }
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) b_o[dt][e] *= b_corr[e / 2];

#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                // The accumulators of score tiles 2kk, 2kk+1 are the A fragment of P for keys kk*16 .. kk*16+15.
                const uint32_t b_p[4] = {pack2<T>(b_s[2 * kk][0], b_s[2 * kk][1]),
                                         pack2<T>(b_s[2 * kk][2], b_s[2 * kk][3]),
                                         pack2<T>(b_s[2 * kk + 1][0], b_s[2 * kk + 1][1]),
                                         pack2<T>(b_s[2 * kk + 1][2], b_s[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t b_v[4];  // B fragments of keys kk*16 .. +15, channels dp*16 .. +15
                    ldmatrix_x4_trans(b_v, s_vb + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride + dp * 16 +
                                               (lane / 16) * 8);
                    mma_16816<T>(b_o[2 * dp], b_p, b_v[0], b_v[1]);
                    mma_16816<T>(b_o[2 * dp + 1], b_p, b_v[2], b_v[3]);
                }
            }
        }
    }

    float b_inv[2], b_lse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(b_l[r]);
        b_inv[r] = l > 0.f ? 1.f / l : 0.f;
        b_lse[r] = l > 0.f ? (b_m[r] + log2f(l)) * kLn2 : -INFINITY;
    }

    if (p.num_splits == 1) {
        // Stage the warp's rows in s_q (each warp only ever read its own rows there), then 16-byte stores.
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                *reinterpret_cast<uint32_t*>(s_q + (warp * 16 + lane / 4 + 8 * r) * kStride + dt * 8 +
                                             (lane % 4) * 2) =
                    pack2<T>(b_o[dt][2 * r] * b_inv[r], b_o[dt][2 * r + 1] * b_inv[r]);
        __syncthreads();
        for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
            const int rr = c / kChunks, d0 = (c % kChunks) * 8;
            const int row = row0 + rr;
            if (row >= n_rows) continue;
            const int i = row / group, h_q = blk.h * group + row % group;
            T* p_dst = static_cast<T*>(p.out.ptr) + blk.b * p.out.stride[0] + i * p.out.stride[1] +
                       h_q * p.out.stride[2] + d0;
            store_global(reinterpret_cast<uint4*>(p_dst), *reinterpret_cast<const uint4*>(s_q + rr * kStride + d0));
        }
        if (lane % 4 == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (!m_row[r]) continue;
                const int row = row0 + warp * 16 + lane / 4 + 8 * r;
                const int h_q = blk.h * group + row % group;
                store_global(p.lse + (static_cast<int64_t>(blk.b) * p.heads_q + h_q) * p.seqlen_q + i_tok[r], b_lse[r]);
            }
        }
    } else {
        // Partial results of this split, rows numbered (b, h, packed row) as the combine kernel reads them.
        const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_kv * n_rows;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (!m_row[r]) continue;
            const int row = row0 + warp * 16 + lane / 4 + 8 * r;
            const int64_t o_row = blk.split * total_rows + (static_cast<int64_t>(blk.b) * p.heads_kv + blk.h) * n_rows + row;
            float* p_o = p.o_part + o_row * D + (lane % 4) * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                store_global(reinterpret_cast<float2*>(p_o + dt * 8),
                             make_float2(b_o[dt][2 * r] * b_inv[r], b_o[dt][2 * r + 1] * b_inv[r]));
            if (lane % 4 == 0) store_global(p.lse_part + o_row, b_lse[r]);
        }
    }
}

// Merges the splits' partial (out, lse) of one packed row per warp, in split order (deterministic).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ FwdArgs p) {
    constexpr int kVec = D / 32;  // channels per lane
    const int group = p.heads_q / p.heads_kv;
    const int n_rows = p.seqlen_q * group;
    const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_kv * n_rows;
    const int64_t i_row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (i_row >= total_rows) return;

    float b_max = -INFINITY;
    for (int s = lane; s < p.num_splits; s += 32) b_max = fmaxf(b_max, load_global(p.lse_part + s * total_rows + i_row));
#pragma unroll
    for (int o = 16; o > 0; o /= 2) b_max = fmaxf(b_max, __shfl_xor_sync(0xffffffffu, b_max, o));
    float b_sum = 0.f;
    if (b_max != -INFINITY)
        for (int s = lane; s < p.num_splits; s += 32)
            b_sum += expf(load_global(p.lse_part + s * total_rows + i_row) - b_max);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) b_sum += __shfl_xor_sync(0xffffffffu, b_sum, o);
    const float lse = b_max == -INFINITY ? -INFINITY : logf(b_sum) + b_max;

    float b_acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) b_acc[e] = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
        const float w = lse == -INFINITY ? 0.f : expf(load_global(p.lse_part + s * total_rows + i_row) - lse);
        const float* p_o = p.o_part + (s * total_rows + i_row) * D + lane * kVec;
        float b_part[kVec];
        if constexpr (kVec == 4) {
            *reinterpret_cast<float4*>(b_part) = load_global(reinterpret_cast<const float4*>(p_o));
        } else {
            *reinterpret_cast<float2*>(b_part) = load_global(reinterpret_cast<const float2*>(p_o));
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) b_acc[e] += w * b_part[e];
    }

    const int row = static_cast<int>(i_row % n_rows);
    const int64_t bh = i_row / n_rows;
    const int h = static_cast<int>(bh % p.heads_kv), b = static_cast<int>(bh / p.heads_kv);
    const int i = row / group, h_q = h * group + row % group;
    uint32_t b_out[kVec / 2];
#pragma unroll
    for (int e = 0; e < kVec / 2; ++e) b_out[e] = pack2<T>(b_acc[2 * e], b_acc[2 * e + 1]);
    T* p_dst = static_cast<T*>(p.out.ptr) + b * p.out.stride[0] + i * p.out.stride[1] + h_q * p.out.stride[2] +
               lane * kVec;
    if constexpr (kVec == 4) {
        store_global(reinterpret_cast<uint2*>(p_dst), make_uint2(b_out[0], b_out[1]));
    } else {
        store_global(reinterpret_cast<uint32_t*>(p_dst), b_out[0]);
    }
    if (lane == 0) store_global(p.lse + (static_cast<int64_t>(b) * p.heads_q + h_q) * p.seqlen_q + i, lse);
}

// ---------------------------------------------------------------------------
// Launchers.

// The launches of one call (FwdLaunch, gated_kv_attention.h), shared by the CUDA launcher and the host
// emulation.
inline FwdLaunch fwd_launch(const FwdArgs& p) {
    FwdLaunch l;
    l.n_row_tiles = ceil_div(p.seqlen_q * (p.heads_q / p.heads_kv), kBlockM);
    l.fused = fused_update(p.seqlen_q, p.heads_q, p.heads_kv);
    l.blend_chunks = l.fused ? 0 : 2LL * p.batch * p.seqlen_q * p.heads_kv * (p.head_dim / 8);
    l.blend_blocks = (l.blend_chunks + 255) / 256;
    if (l.blend_blocks > 8192) l.blend_blocks = 8192;  // grid-stride beyond
    l.attention_blocks = static_cast<int64_t>(p.batch) * p.heads_kv * l.n_row_tiles * p.num_splits;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    l.combine_blocks = p.num_splits > 1 ? (rows + kWarps - 1) / kWarps : 0;
    return l;
}

template <typename T>
void blend_host_dtype(const FwdArgs& p) {
    const int64_t n_chunks = 2LL * p.batch * p.seqlen_q * p.heads_kv * (p.head_dim / 8);
    for (int64_t idx = 0; idx < n_chunks; ++idx) blend_at<T>(p, idx);
}

#ifndef MELT_EMULATE

inline void check_cuda(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
        throw std::runtime_error(std::string("melt_kernels._cuda: ") + what + ": " + cudaGetErrorString(e));
}

template <typename T, int D>
void gated_kv_attention_fwd_launch(const FwdArgs& p, cudaStream_t stream) {
    const FwdLaunch l = fwd_launch(p);
    if (l.blend_chunks > 0) {
        blend_kernel<T><<<static_cast<unsigned>(l.blend_blocks), 256, 0, stream>>>(p, l.blend_chunks);
        check_cuda(cudaGetLastError(), "blend launch");
    }
    constexpr size_t smem = FwdSmem<T, D>::kBytes;
    check_cuda(cudaFuncSetAttribute(attention_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "shared memory attribute");
    attention_kernel<T, D><<<static_cast<unsigned>(l.attention_blocks), kThreads, smem, stream>>>(p, l.n_row_tiles,
                                                                                                   l.fused);
    check_cuda(cudaGetLastError(), "attention launch");
    if (l.combine_blocks > 0) {
        combine_kernel<T, D><<<static_cast<unsigned>(l.combine_blocks), kThreads, 0, stream>>>(p);
        check_cuda(cudaGetLastError(), "combine launch");
    }
}

template <typename T>
void gated_kv_attention_fwd_dtype(const FwdArgs& p, cudaStream_t stream) {
    if (p.head_dim == 64) {
        gated_kv_attention_fwd_launch<T, 64>(p, stream);
    } else {
        gated_kv_attention_fwd_launch<T, 128>(p, stream);
    }
}

#else

// The same launches run by the emulator on host memory, block after block (in the order of emu::run).
template <typename T, int D>
void gated_kv_attention_fwd_emulated_launch(const FwdArgs& p) {
    const FwdLaunch l = fwd_launch(p);
    if (l.blend_chunks > 0)
        launch_emulated("blend", l.blend_blocks, 256, 0, [&] { blend_kernel<T>(p, l.blend_chunks); });
    launch_emulated("attention", l.attention_blocks, kThreads, FwdSmem<T, D>::kBytes,
                    [&] { attention_kernel<T, D>(p, l.n_row_tiles, l.fused); });
    if (l.combine_blocks > 0)
        launch_emulated("combine", l.combine_blocks, kThreads, 0, [&] { combine_kernel<T, D>(p); });
}

template <typename T>
void gated_kv_attention_fwd_emulated_dtype(const FwdArgs& p) {
    if (p.head_dim == 64) {
        gated_kv_attention_fwd_emulated_launch<T, 64>(p);
    } else {
        gated_kv_attention_fwd_emulated_launch<T, 128>(p);
    }
}

#endif  // MELT_EMULATE

}  // namespace melt
