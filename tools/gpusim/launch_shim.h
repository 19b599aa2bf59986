// Torch-free launches of the four bucket ops on raw device pointers, as
// csrc/cuda/cuda_launch.cpp performs them (block table, partials, the fused or
// separate Gram pass, the reduction). Stand-in until the project's own
// torch-free launch layer exists; the harness calls only this.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../csrc/cuda/kernels.h"

namespace interp::launch {

struct Segment {
  void* a = nullptr;        // param / source / out
  const void* b = nullptr;  // grad, or nullptr
  int64_t numel = 0;
  int64_t col = 0;
};

// Device memory the launches allocate (table, partials); freed with it.
struct Workspace {
  std::vector<void*> owned;
  ~Workspace() {
    for (void* p : owned) cudaFree(p);
  }
  void* alloc(size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(bytes, 8)) != cudaSuccess) return nullptr;
    owned.push_back(p);
    return p;
  }
};

struct CombineArgs {
  DType dtype;
  const Segment* segs;
  int64_t nsegs;
  int k;
  void* x_ring;
  void* g_ring;
  int64_t row_elems;
  const double* coefs;
  const double* lr;
  const int64_t* count;
  double weight_decay;
  bool maximize;
  double* gram;  // k entries, or nullptr
  int64_t gram_stride;
  const float* grad_scale;
  const float* found_inf;
  bool stochastic;
  uint32_t sr_seed;
};

struct GramArgs {
  DType dtype;
  const Segment* segs;
  int64_t nsegs;
  void* g_ring;
  int slots;
  int64_t row_elems;
  const int64_t* count;
  double weight_decay;
  bool maximize;
  bool store;
  double* out;
  int64_t out_stride;
  const float* grad_scale;
  const float* found_inf;
};

struct RecordArgs {
  DType dtype;
  const Segment* segs;
  int64_t nsegs;
  void* window;
  int slots;
  int64_t row_elems;
  const int64_t* count;
  double* out;  // slots - 1 entries, or nullptr
  int64_t out_stride;
};

struct ExtrapArgs {
  DType dtype;
  const Segment* segs;
  int64_t nsegs;
  void* window;
  int slots;
  int64_t row_elems;
  const int64_t* count;
  const double* coefs;
  int m;
};

inline cuda::Table table(const Segment* segs, int64_t nsegs, DType dtype, Workspace& ws) {
  const int64_t chunk = cuda::chunk_elems(dtype);
  const int64_t es = cuda::elem_size(dtype);
  std::vector<int64_t> h;
  for (int64_t s = 0; s < nsegs; ++s) {
    const Segment& g = segs[s];
    for (int64_t begin = 0; begin < g.numel; begin += chunk) {
      h.push_back(reinterpret_cast<int64_t>(static_cast<char*>(g.a) + begin * es));
      h.push_back(g.b ? reinterpret_cast<int64_t>(static_cast<const char*>(g.b) + begin * es) : 0);
      h.push_back(std::min(chunk, g.numel - begin));
      h.push_back(g.col + begin);
    }
  }
  const int64_t nblocks = static_cast<int64_t>(h.size()) / cuda::kFields;
  if (h.empty()) h.resize(cuda::kFields, 0);
  auto* d = static_cast<int64_t*>(ws.alloc(h.size() * sizeof(int64_t)));
  if (d) cudaMemcpy(d, h.data(), h.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
  return {d, nblocks};
}

inline double* partials(int64_t nblocks, int ndots, Workspace& ws) {
  const int64_t n = std::max<int64_t>(1, cuda::dot_groups(ndots) * nblocks * cuda::kDotGroup);
  return static_cast<double*>(ws.alloc(static_cast<size_t>(n) * sizeof(double)));
}

inline cudaError_t combine(const CombineArgs& a, Workspace& ws, cudaStream_t stream) {
  const cuda::Table t = table(a.segs, a.nsegs, a.dtype, ws);
  const bool fused = a.gram != nullptr && a.k <= cuda::kDotGroup;
  double* part = a.gram ? partials(t.nblocks, a.k, ws) : nullptr;
  cudaError_t err = cudaSuccess;
  if (a.gram && !fused) {
    cuda::GradDotsLaunch d{};
    d.dtype = a.dtype;
    d.table = t;
    d.g_ring = a.g_ring;
    d.row_elems = a.row_elems;
    d.slots = a.k - 1;
    d.ndots = a.k;
    d.store = false;
    d.count = a.count;
    d.weight_decay = a.weight_decay;
    d.maximize = a.maximize;
    d.grad_scale = a.grad_scale;
    d.found_inf = a.found_inf;
    d.partials = part;
    if ((err = cuda::launch_grad_dots(d, stream)) != cudaSuccess) return err;
  }
  cuda::CombineLaunch p{};
  p.dtype = a.dtype;
  p.table = t;
  p.x_ring = a.x_ring;
  p.g_ring = a.g_ring;
  p.row_elems = a.row_elems;
  p.k = a.k;
  p.coefs = a.coefs;
  p.lr = a.lr;
  p.count = a.count;
  p.weight_decay = a.weight_decay;
  p.maximize = a.maximize;
  p.grad_scale = a.grad_scale;
  p.found_inf = a.found_inf;
  p.partials = fused ? part : nullptr;
  p.stochastic = a.stochastic;
  if (p.stochastic) {
    p.salt_param = sr_salt(a.sr_seed, kStreamParam);
    p.salt_grad = sr_salt(a.sr_seed, kStreamGrad);
  }
  if ((err = cuda::launch_combine(p, stream)) != cudaSuccess) return err;
  if (a.gram) return cuda::launch_reduce(part, t.nblocks, a.k, a.gram, a.gram_stride, stream);
  return cudaSuccess;
}

inline cudaError_t gram_row(const GramArgs& a, Workspace& ws, cudaStream_t stream) {
  const cuda::Table t = table(a.segs, a.nsegs, a.dtype, ws);
  const int k = a.store ? a.slots : a.slots + 1;
  double* part = partials(t.nblocks, k, ws);
  cuda::GradDotsLaunch d{};
  d.dtype = a.dtype;
  d.table = t;
  d.g_ring = a.g_ring;
  d.row_elems = a.row_elems;
  d.slots = a.slots;
  d.ndots = k;
  d.store = a.store;
  d.count = a.count;
  d.weight_decay = a.weight_decay;
  d.maximize = a.maximize;
  d.grad_scale = a.grad_scale;
  d.found_inf = a.found_inf;
  d.partials = part;
  cudaError_t err = cuda::launch_grad_dots(d, stream);
  if (err != cudaSuccess) return err;
  return cuda::launch_reduce(part, t.nblocks, k, a.out, a.out_stride, stream);
}

inline cudaError_t rna_record(const RecordArgs& a, Workspace& ws, cudaStream_t stream) {
  const cuda::Table t = table(a.segs, a.nsegs, a.dtype, ws);
  const int ndots = a.out ? a.slots - 1 : 0;
  double* part = ndots > 0 ? partials(t.nblocks, ndots, ws) : nullptr;
  cuda::RecordLaunch p{};
  p.dtype = a.dtype;
  p.table = t;
  p.window = a.window;
  p.row_elems = a.row_elems;
  p.slots = a.slots;
  p.ndots = ndots;
  p.count = a.count;
  p.partials = part;
  cudaError_t err = cuda::launch_rna_record(p, stream);
  if (err != cudaSuccess || ndots == 0) return err;
  return cuda::launch_reduce(part, t.nblocks, ndots, a.out, a.out_stride, stream);
}

inline cudaError_t rna_extrapolate(const ExtrapArgs& a, Workspace& ws, cudaStream_t stream) {
  const cuda::Table t = table(a.segs, a.nsegs, a.dtype, ws);
  cuda::ExtrapLaunch p{};
  p.dtype = a.dtype;
  p.table = t;
  p.window = a.window;
  p.row_elems = a.row_elems;
  p.slots = a.slots;
  p.m = a.m;
  p.coefs = a.coefs;
  p.count = a.count;
  return cuda::launch_rna_extrapolate(p, stream);
}

}  // namespace interp::launch
