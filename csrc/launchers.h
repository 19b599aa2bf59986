// The CPU and CUDA launchers of the four bucket ops, as the bindings call them
// (torch glue: cpu/cpu_launch.cpp, cuda/cuda_launch.cpp), and the per-bucket
// device-table cache the Python backend owns.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "ops.h"

namespace interp {

// Device-side metadata of one op of one bucket (CUDA): the block table
// (cuda/launch.h), uploaded once and reused while the tensors' storages stay
// the same (so that a captured CUDA graph replays without any host work).
// Owned by the Python backend's per-bucket cache dict.
struct TableCache {
  std::mutex mutex;
  std::vector<int64_t> key;  // the per-tensor entries the device table was built from
  at::Tensor table;          // int64 on the device: one record per block
  // Tables replaced by a rebuild, kept alive for CUDA graphs captured with them.
  static constexpr size_t kRetiredTables = 4;
  std::vector<at::Tensor> retired;
  int64_t nblocks = 0;
  int64_t uploads = 0;  // how many times the table was (re)built, for tests
};

using Segs = std::vector<Seg>;

// CPU (always built). The op's pointers are host memory.
void combine_cpu(const CombineOp& op, const Segs& segs);
void gram_row_cpu(const GramRowOp& op, const Segs& segs);
void rna_record_cpu(const RecordOp& op, const Segs& segs);
void rna_extrapolate_cpu(const ExtrapOp& op, const Segs& segs);
// Picks the instruction-set variant of the CPU kernels ("AVX512", "AVX2",
// "DEFAULT"; an unavailable one falls back to the next lower) and returns the
// name of the one now in use.
std::string select_cpu_kernels(const std::string& name);
std::string cpu_kernels_name();
std::vector<std::string> available_cpu_kernels();

// CUDA (built with INTERPOLATRON_WITH_CUDA): the op's pointers are memory of
// `device`; the launches go to its current stream.
#if defined(INTERPOLATRON_WITH_CUDA)
void combine_cuda(const CombineOp& op, const Segs& segs, const at::Device& device, TableCache& cache);
void gram_row_cuda(const GramRowOp& op, const Segs& segs, const at::Device& device, TableCache& cache);
void rna_record_cuda(const RecordOp& op, const Segs& segs, const at::Device& device, TableCache& cache);
void rna_extrapolate_cuda(const ExtrapOp& op, const Segs& segs, const at::Device& device, TableCache& cache);
#endif

}  // namespace interp
