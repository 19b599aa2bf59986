// Interface between the torch glue (cuda_launch.cpp) and the CUDA kernels
// (*.cu). No torch types: raw pointers, a cudaStream_t and plain structs, so
// that every .cu compiles with nvcc alone (csrc/check_cuda_compile.sh).
//
// Work decomposition (the multi-tensor apply): the active tensors of a bucket
// are described by a device table of int64 entries, kFields per tensor, and
// every tensor is cut into chunks of kChunk elements; one thread block takes
// one chunk, and the block -> tensor map tells it which tensor. One launch
// therefore covers the whole bucket whatever its number of tensors, and the
// block partials of a dot product are always cut at the same places (the
// reduction is deterministic).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../interp_math.h"

namespace interp::cuda {

constexpr int kThreads = 256;
// Resident blocks per SM the kernels are compiled for (__launch_bounds__): caps
// registers at 65536 / (2 * 256) = 128 per thread. Without it ptxas may pick a
// tighter cap and spill the 16-byte fragments of the 16-bit dtypes.
constexpr int kMinBlocksPerSM = 2;
constexpr int64_t kChunk = 4096;  // elements per block
constexpr int kDotGroup = 8;      // dot products accumulated in registers per block (grid.y splits more)

// Per-tensor entry of the device table.
enum Field : int {
  kA = 0,       // param / source / out pointer
  kB = 1,       // grad pointer (0 if none)
  kNumel = 2,
  kCol = 3,     // first ring column
  kFirstBlock = 4,
  kFlags = 5,
  kFields = 6,
};
// Every pointer this tensor's elements are read from or written to is
// 16-byte aligned at the tensor's start (ring rows included): the blocks of
// this tensor may use 16-byte vector accesses.
constexpr int64_t kFlagVector = 1;

struct Table {
  const int64_t* tensors;   // kFields per tensor
  const int64_t* block_of;  // tensor index of each block
  int64_t nblocks;
};

// Ring rows are addressed as row_elems * slot + col + i (elements).
struct CombineLaunch {
  DType dtype;
  Table table;
  void* x_ring;  // (k - 1, row_elems)
  void* g_ring;  // (k - 1, row_elems)
  int64_t row_elems;
  int k;
  const double* coefs;  // k, device
  const double* lr;     // 1, device
  const int64_t* count;  // 1, device
  double weight_decay;
  bool maximize;
  double* partials;  // fused gram (k <= kDotGroup): nblocks * kDotGroup, else nullptr
};

// <g0, g(age j)>, j = 0..ndots-1, with g0 the effective gradient and the ring
// of `slots` slots holding ages 1..ndots-1; with `store` also stores g0 into
// slot count mod slots (then ndots == slots; read-only: ndots == slots + 1).
// grid.y = ceil(ndots / kDotGroup).
struct GradDotsLaunch {
  DType dtype;
  Table table;
  void* g_ring;
  int64_t row_elems;
  int slots;
  int ndots;
  bool store;
  const int64_t* count;
  double weight_decay;
  bool maximize;
  double* partials;  // groups * nblocks * kDotGroup
};

// Copies the sources into slot count mod slots; with ndots = slots - 1 > 0 also
// the residual dots <r_0, r_j>.
struct RecordLaunch {
  DType dtype;
  Table table;
  void* window;
  int64_t row_elems;
  int slots;
  int ndots;
  const int64_t* count;
  double* partials;
};

struct ExtrapLaunch {
  DType dtype;
  Table table;
  void* window;
  int64_t row_elems;
  int slots;
  int m;
  const double* coefs;
  const int64_t* count;
};

// Number of grid.y groups for `ndots` dots (at least one).
inline int dot_groups(int ndots) { return ndots <= kDotGroup ? 1 : (ndots + kDotGroup - 1) / kDotGroup; }

cudaError_t launch_combine(const CombineLaunch& p, cudaStream_t stream);
cudaError_t launch_grad_dots(const GradDotsLaunch& p, cudaStream_t stream);
cudaError_t launch_rna_record(const RecordLaunch& p, cudaStream_t stream);
cudaError_t launch_rna_extrapolate(const ExtrapLaunch& p, cudaStream_t stream);
// out[d * out_stride] = sum over blocks of partials, in float64 and a fixed
// order, for d = 0..ndots-1 (partials laid out as the launches above write them).
cudaError_t launch_reduce(const double* partials, int64_t nblocks, int ndots, double* out, int64_t out_stride,
                          cudaStream_t stream);

}  // namespace interp::cuda
