// Torch glue of the CUDA kernels: device guard and current stream, the cached
// device tables (multi-tensor apply), the partial buffers and the launches.
// Nothing here reads a device value on the host: count, lr and coefs are
// passed to the kernels as device pointers, so the ops can be captured in a
// CUDA graph (after one uncaptured call has built the tables).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

#include "../ops.h"
#include "kernels.h"

namespace interp {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "interpolatron: launching ", what, " failed: ", cudaGetErrorString(err));
}

// The device table of this op for these tensors: one 32-byte record per block
// (pointers at the block's first element, length, ring column), rebuilt (one
// pinned host buffer, one asynchronous copy) only when a pointer, size or
// column changed since the last call. Vector accesses are decided per block
// in the kernel, from the actual addresses (ring rows included), so an odd
// ring width never turns them off for a whole bucket.
cuda::Table device_table(TableCache& cache, const std::vector<Seg>& segs, DType dtype, const at::Device& device) {
  const int64_t chunk = cuda::chunk_elems(dtype);
  const int64_t es = cuda::elem_size(dtype);
  std::vector<int64_t> key;
  key.reserve(segs.size() * 4 + 1);
  key.push_back(chunk);
  int64_t nblocks = 0;
  for (const Seg& s : segs) {
    key.insert(key.end(), {reinterpret_cast<int64_t>(s.a), reinterpret_cast<int64_t>(s.b), s.numel, s.col});
    nblocks += (s.numel + chunk - 1) / chunk;
  }
  TORCH_CHECK(nblocks <= INT32_MAX, "interpolatron: bucket too large for one launch (", nblocks, " blocks)");

  std::lock_guard<std::mutex> lock(cache.mutex);
  if (!cache.table.defined() || cache.table.device() != device || cache.key != key) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture), "cudaStreamIsCapturing");
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "interpolatron: the bucket's tensors are new or changed storage while a CUDA graph is being "
                "captured; run the step once outside the capture (warm-up) so that its device tables exist, "
                "and keep the gradients' storages fixed (zero_grad(set_to_none=False)) while replaying");
    const int64_t n = std::max<int64_t>(1, nblocks * cuda::kFields);
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.data_ptr<int64_t>();
    for (const Seg& s : segs) {
      for (int64_t begin = 0; begin < s.numel; begin += chunk) {
        h[cuda::kA] = reinterpret_cast<int64_t>(static_cast<char*>(s.a) + begin * es);
        h[cuda::kB] = s.b ? reinterpret_cast<int64_t>(static_cast<const char*>(s.b) + begin * es) : 0;
        h[cuda::kLen] = std::min(chunk, s.numel - begin);
        h[cuda::kCol] = s.col + begin;
        h += cuda::kFields;
      }
    }
    // A CUDA graph captured with the old table keeps its address: the old
    // table stays alive (the newest kRetiredTables of them) instead of going
    // back to the allocator, where a replay would read whatever reused it.
    if (cache.table.defined()) {
      cache.retired.push_back(cache.table);
      if (cache.retired.size() > TableCache::kRetiredTables) cache.retired.erase(cache.retired.begin());
    }
    // The pinned buffer stays valid until the copy ran: the caching host
    // allocator records the copy's stream before reusing it.
    cache.table = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device)).copy_(host, true);
    cache.key = std::move(key);
    cache.nblocks = nblocks;
    ++cache.uploads;
  }
  return {cache.table.data_ptr<int64_t>(), cache.nblocks};
}

// GradScaler's optional float32 device scalars as kernel pointers.
const float* opt_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

at::Tensor partial_buffer(int64_t nblocks, int ndots, const at::Device& device) {
  const int64_t n = std::max<int64_t>(1, cuda::dot_groups(ndots) * nblocks * cuda::kDotGroup);
  return at::empty({n}, at::TensorOptions().dtype(at::kDouble).device(device));
}

}  // namespace

void combine_cuda(const CombineCall& call, TableCache& cache) {
  const at::Device device = call.x_hist.device();
  const c10::cuda::CUDAGuard guard(device);
  const cuda::Table table = device_table(cache, call.segs, call.dtype, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int k = call.k;
  // The Gram row rides along with the update when its dots fit one register
  // group; otherwise a read-only dot pass runs first (it must see the old
  // values that the update overwrites).
  const bool fused = call.gram.has_value() && k <= cuda::kDotGroup;
  at::Tensor partials;
  if (call.gram) {
    partials = partial_buffer(table.nblocks, k, device);
    if (!fused) {
      cuda::GradDotsLaunch d{};
      d.dtype = call.dtype;
      d.table = table;
      d.g_ring = call.g_hist.data_ptr();
      d.row_elems = call.g_hist.size(1);
      d.slots = k - 1;
      d.ndots = k;
      d.store = false;
      d.count = call.count.data_ptr<int64_t>();
      d.weight_decay = call.weight_decay;
      d.maximize = call.maximize;
      d.grad_scale = opt_ptr(call.grad_scale);
      d.found_inf = opt_ptr(call.found_inf);
      d.partials = partials.data_ptr<double>();
      check(cuda::launch_grad_dots(d, stream), "the Gram dot kernel");
    }
  }
  cuda::CombineLaunch p{};
  p.dtype = call.dtype;
  p.table = table;
  p.x_ring = call.x_hist.data_ptr();
  p.g_ring = call.g_hist.data_ptr();
  p.row_elems = call.x_hist.size(1);
  p.k = k;
  p.coefs = call.coefs.data_ptr<double>();
  p.lr = call.lr.data_ptr<double>();
  p.count = call.count.data_ptr<int64_t>();
  p.weight_decay = call.weight_decay;
  p.maximize = call.maximize;
  p.grad_scale = opt_ptr(call.grad_scale);
  p.found_inf = opt_ptr(call.found_inf);
  p.partials = fused ? partials.data_ptr<double>() : nullptr;
  // The seed's half of the keys on the host; the kernel adds the count it reads.
  p.stochastic = call.sr_seed.has_value();
  if (p.stochastic) {
    p.salt_param = sr_salt(*call.sr_seed, kStreamParam);
    p.salt_grad = sr_salt(*call.sr_seed, kStreamGrad);
  }
  check(cuda::launch_combine(p, stream), "the combine kernel");
  if (call.gram) {
    check(cuda::launch_reduce(partials.data_ptr<double>(), table.nblocks, k, call.gram->data_ptr<double>(),
                              call.gram->stride(0), stream),
          "the reduction kernel");
  }
}

void gram_row_cuda(const GramCall& call, TableCache& cache) {
  const at::Device device = call.g_hist.device();
  const c10::cuda::CUDAGuard guard(device);
  const cuda::Table table = device_table(cache, call.segs, call.dtype, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int slots = static_cast<int>(call.g_hist.size(0));
  const int k = call.store ? slots : slots + 1;  // dots of ages 0..k-1; the ring holds ages 1..k-1
  at::Tensor partials = partial_buffer(table.nblocks, k, device);
  cuda::GradDotsLaunch d{};
  d.dtype = call.dtype;
  d.table = table;
  d.g_ring = call.g_hist.data_ptr();
  d.row_elems = call.g_hist.size(1);
  d.slots = slots;
  d.ndots = k;
  d.store = call.store;
  d.count = call.count.data_ptr<int64_t>();
  d.weight_decay = call.weight_decay;
  d.maximize = call.maximize;
  d.grad_scale = opt_ptr(call.grad_scale);
  d.found_inf = opt_ptr(call.found_inf);
  d.partials = partials.data_ptr<double>();
  check(cuda::launch_grad_dots(d, stream), "the gram_row kernel");
  check(cuda::launch_reduce(partials.data_ptr<double>(), table.nblocks, k, call.out.data_ptr<double>(),
                            call.out.stride(0), stream),
        "the reduction kernel");
}

void rna_record_cuda(const RecordCall& call, TableCache& cache) {
  const at::Device device = call.window.device();
  const c10::cuda::CUDAGuard guard(device);
  const cuda::Table table = device_table(cache, call.segs, call.dtype, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int slots = static_cast<int>(call.window.size(0));
  const int ndots = call.out ? slots - 1 : 0;
  at::Tensor partials;
  if (ndots > 0) partials = partial_buffer(table.nblocks, ndots, device);
  cuda::RecordLaunch p{};
  p.dtype = call.dtype;
  p.table = table;
  p.window = call.window.data_ptr();
  p.row_elems = call.window.size(1);
  p.slots = slots;
  p.ndots = ndots;
  p.count = call.count.data_ptr<int64_t>();
  p.partials = ndots > 0 ? partials.data_ptr<double>() : nullptr;
  check(cuda::launch_rna_record(p, stream), "the rna_record kernel");
  if (ndots > 0) {
    check(cuda::launch_reduce(partials.data_ptr<double>(), table.nblocks, ndots, call.out->data_ptr<double>(),
                              call.out->stride(0), stream),
          "the reduction kernel");
  }
}

void rna_extrapolate_cuda(const ExtrapCall& call, TableCache& cache) {
  const at::Device device = call.window.device();
  const c10::cuda::CUDAGuard guard(device);
  const cuda::Table table = device_table(cache, call.segs, call.dtype, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::ExtrapLaunch p{};
  p.dtype = call.dtype;
  p.table = table;
  p.window = call.window.data_ptr();
  p.row_elems = call.window.size(1);
  p.slots = static_cast<int>(call.window.size(0));
  p.m = static_cast<int>(call.coefs.numel());
  p.coefs = call.coefs.data_ptr<double>();
  p.count = call.count.data_ptr<int64_t>();
  check(cuda::launch_rna_extrapolate(p, stream), "the rna_extrapolate kernel");
}

}  // namespace interp
