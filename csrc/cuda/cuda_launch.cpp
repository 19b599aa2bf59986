// Torch glue of the CUDA kernels: the device guard and current stream, the
// cached device table (uploaded once per storage layout, with the CUDA-graph
// checks), the partial buffer from torch's allocator; the launches themselves
// are the launch layer's (launch.h), the path a harness without torch takes
// too. Nothing here reads a device value on the host: count, lr and coefs
// reach the kernels as device pointers, so the ops can be captured in a CUDA
// graph (after one uncaptured call has built the tables).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../launchers.h"
#include "launch.h"

namespace interp {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "interpolatron: launching ", what, " failed: ", cudaGetErrorString(err));
}

void check(const cuda::LaunchStatus& s) { check(s.error, s.kernel); }

// The device table of this op for these tensors (launch.h), rebuilt (one
// pinned host buffer, one asynchronous copy) only when a pointer, size or
// column changed since the last call. Vector accesses are decided per block
// in the kernel, from the actual addresses (ring rows included), so an odd
// ring width never turns them off for a whole bucket.
cuda::Table device_table(TableCache& cache, const Segs& segs, DType dtype, const at::Device& device,
                         cudaStream_t stream, DType seg_dtype) {
  std::vector<int64_t> key;
  key.reserve(segs.size() * 4 + 2);
  key.push_back(cuda::chunk_elems(dtype));
  key.push_back(dtype_bytes(seg_dtype));
  for (const Seg& s : segs) {
    key.insert(key.end(), {reinterpret_cast<int64_t>(s.a), reinterpret_cast<int64_t>(s.b), s.numel, s.col});
  }
  const int64_t nblocks = cuda::count_blocks(segs.data(), segs.size(), dtype);
  TORCH_CHECK(nblocks <= cuda::kMaxBlocks, "interpolatron: bucket too large for one launch (", nblocks, " blocks)");

  std::lock_guard<std::mutex> lock(cache.mutex);
  if (!cache.table.defined() || cache.table.device() != device || cache.key != key) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "interpolatron: the bucket's tensors are new or changed storage while a CUDA graph is being "
                "captured; run the step once outside the capture (warm-up) so that its device tables exist, "
                "and keep the gradients' storages fixed (zero_grad(set_to_none=False)) while replaying");
    const int64_t n = std::max<int64_t>(1, nblocks * cuda::kFields);
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    cuda::fill_table(segs.data(), segs.size(), dtype, host.data_ptr<int64_t>(), seg_dtype);
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

// What every launcher needs first: the device, its current stream and the op's table.
struct Prologue {
  Prologue(const Segs& segs, DType dtype, const at::Device& dev, TableCache& cache)
      : Prologue(segs, dtype, dev, cache, dtype) {}
  Prologue(const Segs& segs, DType dtype, const at::Device& dev, TableCache& cache, DType seg_dtype)
      : guard(dev),
        stream(c10::cuda::getCurrentCUDAStream()),
        table(device_table(cache, segs, dtype, dev, stream, seg_dtype)),
        device(dev) {}

  // `n` float64 elements from torch's caching allocator (stream-ordered reuse:
  // the launches on this stream finish with it before anything reuses it).
  double* partials(int64_t n) {
    if (n == 0) return nullptr;
    buffer = at::empty({n}, at::TensorOptions().dtype(at::kDouble).device(device));
    return buffer.data_ptr<double>();
  }

  const c10::cuda::CUDAGuard guard;
  const cudaStream_t stream;
  const cuda::Table table;
  const at::Device device;
  at::Tensor buffer;
};

}  // namespace

void combine_cuda(const CombineOp& op, const Segs& segs, const at::Device& device, TableCache& cache) {
  Prologue pro(segs, op.dtype, device, cache, cuda::seg_dtype(op));
  double* partials = pro.partials(cuda::combine_partials(op, pro.table.nblocks));
  check(cuda::run_combine(op, pro.table, partials, pro.stream));
}

void gram_row_cuda(const GramRowOp& op, const Segs& segs, const at::Device& device, TableCache& cache) {
  Prologue pro(segs, op.dtype, device, cache, cuda::seg_dtype(op));
  double* partials = pro.partials(cuda::gram_row_partials(op, pro.table.nblocks));
  check(cuda::run_gram_row(op, pro.table, partials, pro.stream));
}

void rna_record_cuda(const RecordOp& op, const Segs& segs, const at::Device& device, TableCache& cache) {
  Prologue pro(segs, op.dtype, device, cache);
  double* partials = pro.partials(cuda::rna_record_partials(op, pro.table.nblocks));
  check(cuda::run_rna_record(op, pro.table, partials, pro.stream));
}

void rna_extrapolate_cuda(const ExtrapOp& op, const Segs& segs, const at::Device& device, TableCache& cache) {
  const Prologue pro(segs, op.dtype, device, cache);
  check(cuda::run_rna_extrapolate(op, pro.table, pro.stream));
}

}  // namespace interp
