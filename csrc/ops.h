// The validated form of the four bucket ops (interpolatron/backends/base.py),
// shared by the bindings (which validate) and the CPU / CUDA launchers (which
// run). Tensors here are already checked: same device, same dtype, ring
// buffers contiguous (S, N), every active tensor contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "interp_math.h"

namespace interp {

// One active tensor of the bucket.
struct Seg {
  void* a;        // param / source / out
  const void* b;  // grad, or nullptr
  int64_t numel;
  int64_t col;  // first ring column
};

struct CombineCall {
  DType dtype;
  std::vector<Seg> segs;
  int k;
  at::Tensor x_hist;  // (k - 1, N)
  at::Tensor g_hist;  // (k - 1, N)
  at::Tensor coefs;   // float64 (k,), contiguous
  at::Tensor lr;      // float64, one element
  at::Tensor count;   // int64, one element
  double weight_decay;
  bool maximize;
  std::optional<at::Tensor> gram;  // float64 (k,)
  // GradScaler's fused contract (float32, one element, on the device): the
  // gradient is divided by grad_scale; a nonzero found_inf skips the op (no
  // write at all, gram included).
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  // Stochastic rounding of the 16-bit writes (the new param, the gradient
  // slot) with this seed (stochastic_rounding.h); nullopt, or a 32/64-bit
  // dtype: round to nearest.
  std::optional<uint32_t> sr_seed;
};

// store: g_hist has S slots holding ages 0..S-1 (age 0, the effective
// gradient, is written to slot c mod S), out has S entries. !store (read-only):
// the S slots hold ages 1..S, nothing is written, out has S + 1 entries.
struct GramCall {
  DType dtype;
  std::vector<Seg> segs;
  at::Tensor g_hist;  // (S, N)
  at::Tensor count;
  double weight_decay;
  bool maximize;
  bool store;
  at::Tensor out;  // float64 (S,) when store, (S + 1,) otherwise
  std::optional<at::Tensor> grad_scale;  // as in CombineCall
  std::optional<at::Tensor> found_inf;
};

struct RecordCall {
  DType dtype;
  std::vector<Seg> segs;
  at::Tensor window;  // (S, N)
  at::Tensor count;
  std::optional<at::Tensor> out;  // float64 (S - 1,)
};

struct ExtrapCall {
  DType dtype;
  std::vector<Seg> segs;
  at::Tensor window;  // (S, N)
  at::Tensor count;
  at::Tensor coefs;  // float64 (m,), m <= S
};

// Device-side metadata of one op of one bucket (CUDA): the per-tensor table and
// the block -> tensor map, uploaded once and reused while the tensors' storages
// stay the same (so that a captured CUDA graph replays without any host work).
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

// CPU (always built).
void combine_cpu(const CombineCall& call);
void gram_row_cpu(const GramCall& call);
void rna_record_cpu(const RecordCall& call);
void rna_extrapolate_cpu(const ExtrapCall& call);
// Picks the instruction-set variant of the CPU kernels ("AVX512", "AVX2",
// "DEFAULT"; an unavailable one falls back to the next lower) and returns the
// name of the one now in use.
std::string select_cpu_kernels(const std::string& name);
std::string cpu_kernels_name();
std::vector<std::string> available_cpu_kernels();

#if defined(INTERPOLATRON_WITH_CUDA)
void combine_cuda(const CombineCall& call, TableCache& cache);
void gram_row_cuda(const GramCall& call, TableCache& cache);
void rna_record_cuda(const RecordCall& call, TableCache& cache);
void rna_extrapolate_cuda(const ExtrapCall& call, TableCache& cache);
#endif

}  // namespace interp
