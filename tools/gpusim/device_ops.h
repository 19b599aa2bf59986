// The harness's side of the project's torch-free launch layer
// (csrc/cuda/launch.h): an op's block table uploaded and its partial buffer
// allocated in device memory the harness owns, then the layer's run_* (the
// same launch sequence the torch glue uses).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/cuda/launch.h"

namespace interp::harness {

// Device memory of one op (table, partials); freed with it.
struct Workspace {
  std::vector<void*> owned;
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    for (void* p : owned) cudaFree(p);
  }
  void* alloc(size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes < 8 ? 8 : bytes) != cudaSuccess) return nullptr;
    owned.push_back(p);
    return p;
  }
};

// seg_dtype: the segments' dtype (16-bit params of a master-weights op), else dtype.
inline cuda::Table upload_table(const std::vector<Seg>& segs, DType dtype, Workspace& ws, DType seg_dtype) {
  const int64_t nblocks = cuda::count_blocks(segs.data(), segs.size(), dtype);
  std::vector<int64_t> records(static_cast<size_t>(nblocks > 0 ? nblocks * cuda::kFields : cuda::kFields), 0);
  cuda::fill_table(segs.data(), segs.size(), dtype, records.data(), seg_dtype);
  auto* d = static_cast<int64_t*>(ws.alloc(records.size() * sizeof(int64_t)));
  if (d) cudaMemcpy(d, records.data(), records.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
  return {d, nblocks};
}

inline double* partials(int64_t n, Workspace& ws) {
  return n > 0 ? static_cast<double*>(ws.alloc(static_cast<size_t>(n) * sizeof(double))) : nullptr;
}

inline cudaError_t report(const cuda::LaunchStatus& s) {
  if (!s.ok()) std::fprintf(stderr, "harness: %s: %s\n", s.kernel, cudaGetErrorString(s.error));
  return s.error;
}

inline cudaError_t combine(const CombineOp& op, const std::vector<Seg>& segs, Workspace& ws) {
  const cuda::Table t = upload_table(segs, op.dtype, ws, cuda::seg_dtype(op));
  return report(cuda::run_combine(op, t, partials(cuda::combine_partials(op, t.nblocks), ws), nullptr));
}

inline cudaError_t gram_row(const GramRowOp& op, const std::vector<Seg>& segs, Workspace& ws) {
  const cuda::Table t = upload_table(segs, op.dtype, ws, cuda::seg_dtype(op));
  return report(cuda::run_gram_row(op, t, partials(cuda::gram_row_partials(op, t.nblocks), ws), nullptr));
}

inline cudaError_t rna_record(const RecordOp& op, const std::vector<Seg>& segs, Workspace& ws) {
  const cuda::Table t = upload_table(segs, op.dtype, ws, op.dtype);
  return report(cuda::run_rna_record(op, t, partials(cuda::rna_record_partials(op, t.nblocks), ws), nullptr));
}

inline cudaError_t rna_extrapolate(const ExtrapOp& op, const std::vector<Seg>& segs, Workspace& ws) {
  const cuda::Table t = upload_table(segs, op.dtype, ws, op.dtype);
  return report(cuda::run_rna_extrapolate(op, t, nullptr));
}

}  // namespace interp::harness
