// The CUDA launch layer: which kernels an op runs, in what order, on which
// block table and partial buffer. Torch-free (only <cuda_runtime_api.h> and the
// project's torch-free headers), so the torch glue (cuda_launch.cpp) and a
// standalone program (a simulator harness, a C++ test) share one launch path.
//
// An op over a bucket of tensors, from a program without torch:
//
//   #include "cuda/launch.h"        // compile with -I csrc; link launch.cpp and cuda/*.cu
//   using namespace interp;
//   std::vector<Seg> segs = {{param_dev, grad_dev, numel, /*ring column*/ 0}, ...};
//   // 1. The block table: one 32-byte record per block, built on the host, copied once.
//   const int64_t nblocks = cuda::count_blocks(segs.data(), segs.size(), DType::kFloat32);
//   std::vector<int64_t> records(nblocks * cuda::kFields);
//   cuda::fill_table(segs.data(), segs.size(), DType::kFloat32, records.data(), DType::kFloat32);
//   int64_t* table_dev;  // cudaMalloc + cudaMemcpy of `records`
//   const cuda::Table table{table_dev, nblocks};
//   // 2. The op in device pointers (ops.h); scalars live on the device too.
//   CombineOp op{};  // dtype, k, x_ring, g_ring, row_elems, coefs, lr, count, ..., gram
//   // 3. The partial buffer of the dot products, if the op has any.
//   double* partials = nullptr;  // cudaMalloc of cuda::combine_partials(op, nblocks) doubles when > 0
//   // 4. The launches, asynchronous on `stream`.
//   const cuda::LaunchStatus s = cuda::run_combine(op, table, partials, stream);
//   if (!s.ok()) fprintf(stderr, "%s: %s\n", s.kernel, cudaGetErrorString(s.error));
//
// The table may be reused by every later op of the same tensors (the same
// pointers, sizes and columns; dtype included); the partial buffer by any
// later op on the same stream. Nothing here reads device memory on the host or
// synchronises: the scalars a step changes are read by the kernels, so the
// launches can be captured in a CUDA graph and replayed with new values (the
// table and partial buffer must then stay where they were).
//
// Every dot product is deterministic, float64 throughout, its summation order
// fixed by the table alone: within a block, thread t sums the products of its
// fragments t, t + kThreads, ... in that order, each fragment's elements in
// order (fma chains); the 32 lanes of a warp by a fixed butterfly; the warps
// in order (common.cuh block_partials); then the block partials in a fixed
// order (reduce.cu). The products are exact (fp32 and 16-bit data) so a
// different cut of the elements (another chunk size, another sharding) moves
// a dot only by float64 rounding.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../ops.h"
#include "kernels.h"

namespace interp::cuda {

// ---------------------------------------------------------------------------
// The block table (the multi-tensor apply): each segment is cut into chunks of
// chunk_elems(dtype) elements (8 KiB, 16-bit data 4 KiB; the last one
// shorter), one thread block per chunk, blocks in bucket order (the resident
// blocks sweep each stream together: kernels.h); record b holds kFields int64
// (kernels.h Field): the segment's a and b pointers at the chunk's first
// element (b: 0 if none), its length and its ring column. Empty segments own
// no block.

// One launch takes at most this many blocks (the grid's x dimension).
constexpr int64_t kMaxBlocks = 2147483647;

int64_t count_blocks(const Seg* segs, size_t nsegs, DType dtype);

// Writes the count_blocks(segs, nsegs, dtype) records, kFields int64 each,
// to `records` (host memory). The chunks are `dtype`'s (the rings'); the
// segments' pointers advance by `seg_dtype` elements (16-bit params and
// gradients of a master-weights combine: table_dtype(op)).
void fill_table(const Seg* segs, size_t nsegs, DType dtype, int64_t* records, DType seg_dtype);
// The segments' dtype of an op (16-bit with master weights, else the rings').
inline DType seg_dtype(const CombineOp& op) { return op.master != nullptr ? op.param_dtype : op.dtype; }
inline DType seg_dtype(const GramRowOp& op) { return op.master != nullptr ? op.param_dtype : op.dtype; }

// ---------------------------------------------------------------------------
// Partial buffers: the float64 elements of device memory an op needs for the
// block partials of its dot products over `nblocks` blocks: 0 when the op has
// no dots (pass nullptr), else at least 1. Contents need no initialisation.

int64_t combine_partials(const CombineOp& op, int64_t nblocks);   // op.gram given
int64_t gram_row_partials(const GramRowOp& op, int64_t nblocks);  // always
int64_t rna_record_partials(const RecordOp& op, int64_t nblocks);  // op.out given and slots > 1

// ---------------------------------------------------------------------------
// The ops, enqueued on `stream`. `table` is the uploaded block table of the
// op's segments (its nblocks included); `partials` holds *_partials(op,
// table.nblocks) doubles. Outputs (the params, ring slots, gram / out entries)
// are written by the kernels in stream order.

struct LaunchStatus {
  cudaError_t error = cudaSuccess;
  const char* kernel = "";  // which launch failed ("the combine kernel", ...); "" when ok
  bool ok() const { return error == cudaSuccess; }
};

// combine: with op.gram and k > kDotGroup, a read-only gram_row pass first
// (its dots must see the ring before the update overwrites it), then the
// combine kernel (which carries the Gram row itself when k <= kDotGroup),
// then the reduction of the partials into op.gram.
LaunchStatus run_combine(const CombineOp& op, const Table& table, double* partials, cudaStream_t stream);

// gram_row: the gram_row kernel (op.store: also g0 into its slot), then the
// reduction into op.out.
LaunchStatus run_gram_row(const GramRowOp& op, const Table& table, double* partials, cudaStream_t stream);

// rna_record: the copy into the window (with op.out: and the residual dots'
// partials), then (with dots) the reduction into op.out.
LaunchStatus run_rna_record(const RecordOp& op, const Table& table, double* partials, cudaStream_t stream);

// rna_extrapolate: one kernel; the segments' `a` pointers are the outputs.
LaunchStatus run_rna_extrapolate(const ExtrapOp& op, const Table& table, cudaStream_t stream);

}  // namespace interp::cuda
