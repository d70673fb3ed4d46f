// melt_kernels._cuda: a thin pybind11 binding.  Python passes data pointers,
// element strides, sizes and the CUDA stream as integers (no torch C++ API),
// so this file compiles with the host compiler alone.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "gated_kv_attention.h"

namespace py = pybind11;

namespace {

using TensorArg = std::tuple<uintptr_t, std::array<int64_t, 3>>;  // (data_ptr, (batch, seq, head) strides)
// (kind, data_ptr, (B, M, Hkv, D) strides, alpha, 1 - alpha)
using GateArg = std::tuple<int, uintptr_t, std::array<int64_t, 4>, double, double>;
using Sizes = std::array<int, 6>;  // (B, M, Hq, Hkv, D, S)
// (data_ptr, row stride, page_size, num_blocks); data_ptr 0: contiguous caches
using TableArg = std::tuple<uintptr_t, int64_t, int, int>;

melt::BlockTable block_table(const TableArg& t) {
    melt::BlockTable r;
    r.ptr = reinterpret_cast<const int32_t*>(std::get<0>(t));
    r.stride = std::get<1>(t);
    r.page_size = std::get<2>(t);
    r.num_blocks = std::get<3>(t);
    return r;
}

melt::Tensor4 tensor4(const TensorArg& t) {
    melt::Tensor4 r;
    r.ptr = reinterpret_cast<void*>(std::get<0>(t));
    for (int d = 0; d < 3; ++d) r.stride[d] = std::get<1>(t)[d];
    return r;
}

melt::Gate gate(const GateArg& g) {
    melt::Gate r;
    r.kind = std::get<0>(g);
    r.ptr = reinterpret_cast<const void*>(std::get<1>(g));
    for (int d = 0; d < 4; ++d) r.stride[d] = std::get<2>(g)[d];
    r.alpha = static_cast<float>(std::get<3>(g));
    r.one_minus_alpha = static_cast<float>(std::get<4>(g));
    return r;
}

void set_sizes(melt::FwdArgs& a, const Sizes& sizes) {
    a.batch = sizes[0];
    a.seqlen_q = sizes[1];
    a.heads_q = sizes[2];
    a.heads_kv = sizes[3];
    a.head_dim = sizes[4];
    a.cache_len = sizes[5];
}

melt::FwdArgs update_args(const TensorArg& k, const TensorArg& v, const TensorArg& k_cache, const TensorArg& v_cache,
                          uintptr_t seqlens, const Sizes& sizes, const GateArg& gate_k, const GateArg& gate_v) {
    melt::FwdArgs a;
    a.k = tensor4(k);
    a.v = tensor4(v);
    a.k_cache = tensor4(k_cache);
    a.v_cache = tensor4(v_cache);
    a.seqlens = reinterpret_cast<const int32_t*>(seqlens);
    set_sizes(a, sizes);
    a.gate_k = gate(gate_k);
    a.gate_v = gate(gate_v);
    return a;
}

melt::FwdArgs fwd_args(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& k_cache,
                       const TensorArg& v_cache, const TensorArg& out, uintptr_t seqlens, uintptr_t lse,
                       uintptr_t o_part, uintptr_t lse_part, const Sizes& sizes, const GateArg& gate_k,
                       const GateArg& gate_v, double softmax_scale, bool causal, int num_splits) {
    melt::FwdArgs a = update_args(k, v, k_cache, v_cache, seqlens, sizes, gate_k, gate_v);
    a.q = tensor4(q);
    a.out = tensor4(out);
    a.lse = reinterpret_cast<float*>(lse);
    a.o_part = reinterpret_cast<float*>(o_part);
    a.lse_part = reinterpret_cast<float*>(lse_part);
    a.softmax_scale = static_cast<float>(softmax_scale);
    a.causal = causal;
    a.num_splits = num_splits;
    return a;
}

void fwd(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& k_cache,
         const TensorArg& v_cache, const TensorArg& out, uintptr_t seqlens, uintptr_t lse, uintptr_t o_part,
         uintptr_t lse_part, const Sizes& sizes, const GateArg& gate_k, const GateArg& gate_v, double softmax_scale,
         bool causal, int num_splits, int dtype, uintptr_t stream, const TableArg& table) {
    melt::FwdArgs a = fwd_args(q, k, v, k_cache, v_cache, out, seqlens, lse, o_part, lse_part, sizes, gate_k, gate_v,
                               softmax_scale, causal, num_splits);
    a.block_table = block_table(table);
    melt::gated_kv_attention_fwd(a, dtype, reinterpret_cast<void*>(stream));
}

py::list fwd_emulated(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& k_cache,
                      const TensorArg& v_cache, const TensorArg& out, uintptr_t seqlens, uintptr_t lse,
                      uintptr_t o_part, uintptr_t lse_part, const Sizes& sizes, const GateArg& gate_k,
                      const GateArg& gate_v, double softmax_scale, bool causal, int num_splits, int dtype, int order,
                      uint64_t seed, bool record, int fault, const TableArg& table) {
    melt::FwdArgs a = fwd_args(q, k, v, k_cache, v_cache, out, seqlens, lse, o_part, lse_part, sizes, gate_k, gate_v,
                               softmax_scale, causal, num_splits);
    a.block_table = block_table(table);
    melt::EmulateOptions options;
    options.order = order;
    options.seed = seed;
    options.record = record;
    options.fault = fault;
    std::vector<melt::LaunchRecord> records;
    {
        py::gil_scoped_release release;  // the emulator's threads never touch Python
        records = melt::gated_kv_attention_fwd_emulated(a, dtype, options);
    }
    py::list launches;
    for (const auto& r : records) {
        py::dict d;
        d["kernel"] = r.kernel;
        d["blocks"] = r.blocks;
        d["reads"] = r.reads;
        d["writes"] = r.writes;
        d["conflict_bytes"] = r.conflict_bytes;
        py::list conflicts;
        for (const auto& c : r.conflicts) conflicts.append(py::make_tuple(c.address, c.writer, c.other, c.other_writes));
        d["conflicts"] = conflicts;
        launches.append(d);
    }
    return launches;
}

void blend_host(const TensorArg& k, const TensorArg& v, const TensorArg& k_cache, const TensorArg& v_cache,
                uintptr_t seqlens, const Sizes& sizes, const GateArg& gate_k, const GateArg& gate_v, int dtype) {
    melt::blend_host(update_args(k, v, k_cache, v_cache, seqlens, sizes, gate_k, gate_v), dtype);
}

// Only the sizes and the split count of a forward call: what its launches depend on.
melt::FwdArgs sized(const Sizes& sizes, int num_splits) {
    melt::FwdArgs a;
    set_sizes(a, sizes);
    a.num_splits = num_splits;
    return a;
}

py::dict grids(const Sizes& sizes, int num_splits) {
    const melt::FwdLaunch l = melt::fwd_grids(sized(sizes, num_splits));
    py::dict d;
    d["blend"] = l.blend_blocks;
    d["attention"] = l.attention_blocks;
    d["combine"] = l.combine_blocks;
    return d;
}

void check_launch_sizes(const Sizes& sizes, int num_splits) { melt::check_launch_sizes(sized(sizes, num_splits)); }

py::list plan(const std::vector<int>& seqlens, int cache_len, int seqlen_q, int heads_q, int heads_kv, bool causal,
              int num_splits) {
    py::list blocks;
    for (const auto& p : melt::plan_fwd(seqlens, cache_len, seqlen_q, heads_q, heads_kv, causal, num_splits)) {
        py::dict d;
        d["batch"] = p.batch;
        d["row_tile"] = p.row_tile;
        d["split"] = p.split;
        d["tiles"] = p.tiles;
        d["writes"] = p.writes;
        d["visible"] = p.visible;
        blocks.append(d);
    }
    return blocks;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "CUDA C++ kernels of melt_kernels (fused gated KV-cache update + attention).";
    m.attr("BLOCK_M") = melt::kBlockM;
    m.attr("BLOCK_N") = melt::kBlockN;
    m.attr("FLOAT16") = static_cast<int>(melt::kFloat16);
    m.attr("BFLOAT16") = static_cast<int>(melt::kBFloat16);
    m.attr("GATE_NONE") = static_cast<int>(melt::kGateNone);
    m.attr("GATE_SCALAR") = static_cast<int>(melt::kGateScalar);
    m.attr("GATE_FLOAT16") = static_cast<int>(melt::kGateF16);
    m.attr("GATE_BFLOAT16") = static_cast<int>(melt::kGateBF16);
    m.attr("GATE_FLOAT32") = static_cast<int>(melt::kGateF32);
    m.attr("GATE_FLOAT64") = static_cast<int>(melt::kGateF64);
    m.def("fwd", &fwd, "Fused gated update + attention on a CUDA stream (raw pointers; see cuda_backend.py).",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"),
          py::arg("seqlens"), py::arg("lse"), py::arg("o_part"), py::arg("lse_part"), py::arg("sizes"),
          py::arg("gate"), py::arg("gate_v"), py::arg("softmax_scale"), py::arg("causal"), py::arg("num_splits"),
          py::arg("dtype"), py::arg("stream"), py::arg("block_table") = TableArg{0, 0, 0, 0});
    m.attr("ORDER_FORWARD") = static_cast<int>(melt::kOrderForward);
    m.attr("ORDER_REVERSE") = static_cast<int>(melt::kOrderReverse);
    m.attr("ORDER_SHUFFLE") = static_cast<int>(melt::kOrderShuffle);
    m.attr("FAULT_NONE") = static_cast<int>(melt::kFaultNone);
    m.attr("FAULT_NON_OWNER_READS_ACTIVE") = static_cast<int>(melt::kFaultNonOwnerReadsActive);
    m.def("fwd_emulated", &fwd_emulated,
          "fwd's launches with the kernels' own source run by a host emulator over host memory (CPU tests): "
          "blocks in `order` (ORDER_*; ORDER_SHUFFLE draws from `seed`); with `record`, one dict per launch "
          "(kernel, blocks, reads, writes, conflict_bytes, conflicts: (address, writer block, other block, "
          "other writes)) listing the bytes one block writes and another block of the launch touches; "
          "`fault` (FAULT_*) plants a race for the tests.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"),
          py::arg("seqlens"), py::arg("lse"), py::arg("o_part"), py::arg("lse_part"), py::arg("sizes"),
          py::arg("gate"), py::arg("gate_v"), py::arg("softmax_scale"), py::arg("causal"), py::arg("num_splits"),
          py::arg("dtype"), py::arg("order") = static_cast<int>(melt::kOrderForward), py::arg("seed") = 0,
          py::arg("record") = false, py::arg("fault") = static_cast<int>(melt::kFaultNone),
          py::arg("block_table") = TableArg{0, 0, 0, 0});
    m.def("fused_update", &melt::fused_update, "Whether the attention blocks blend the active slots themselves.",
          py::arg("seqlen_q"), py::arg("heads_q"), py::arg("heads_kv"));
    m.def("grids", &grids, "Blocks of each 1-D launch of a forward call (blend, attention, combine; 0: not launched).",
          py::arg("sizes"), py::arg("num_splits"));
    m.def("check_launch_sizes", &check_launch_sizes,
          "Raises ValueError when a forward call's rows exceed 32 bits or a launch exceeds CUDA's grid limits.",
          py::arg("sizes"), py::arg("num_splits"));
    m.def("built_archs", &melt::built_archs, "The sm_XY / compute_XY targets this build holds.");
    m.def("plan", &plan, "Host mirror of one launch's work split: per block, tiles read, slots written, keys seen.",
          py::arg("seqlens"), py::arg("cache_len"), py::arg("seqlen_q"), py::arg("heads_q"), py::arg("heads_kv"),
          py::arg("causal"), py::arg("num_splits"));
    m.def("blend_host", &blend_host, "Host mirror of the chunk path's cache update, over host memory.",
          py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("sizes"),
          py::arg("gate"), py::arg("gate_v"), py::arg("dtype"));
}
