// Interface between the launch layer (launch.h / launch.cpp) and the CUDA
// kernels (*.cu): one launch struct and one launcher per kernel. No torch
// types: raw pointers, a cudaStream_t and plain structs, so that every .cu
// compiles with nvcc alone (csrc/check_cuda_compile.sh).
//
// Work decomposition (the multi-tensor apply): the active tensors of a bucket
// are cut into chunks of chunk_elems(dtype) elements, one thread
// block per chunk, and a device table holds one record per block (kFields
// int64: pointers, length, ring column). One launch therefore covers the whole
// bucket whatever its number of tensors, and the block partials of a dot
// product are always cut at the same places (the reduction is deterministic).
//
// Chunks are short (one or two fragments per thread) and blocks are numbered in
// bucket order, so the resident blocks, which the GPU starts in index order,
// cover one contiguous stretch of each stream and sweep it as a grid-stride
// kernel does; each block asks for its whole chunk at once where registers
// allow (for_each_frag's U). Long chunks made every resident block hold its
// own window of each stream open: in the simulator's timing model (RTX 3070,
// bench/results/gpusim/) that cost DRAM row-buffer locality (0.40 against a
// fused Adam's 0.64) and a third of the bandwidth.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../interp_math.h"
#include "../ops.h"
#include "../stochastic_rounding.h"

namespace interp::cuda {

constexpr int kThreads = 256;
// Resident blocks per SM the kernels are compiled for (__launch_bounds__): caps
// registers at 65536 / (4 * 256) = 64 per thread, so four blocks (1024 threads,
// 16 x 16-byte loads in flight per thread group at k = 2) share an SM. The
// SASS test (tests/test_cuda_sass.py) checks that nothing spills at this cap.
constexpr int kMinBlocksPerSM = 4;
// Kernels that hold more fragments at once take fewer blocks, never spills:
// the 16-bit combine at k >= 3 and the run-time sized kernels (8 ring rows of
// a dot group in flight) take 2 blocks (128 registers).
template <int ElemBytes, int K>
constexpr int min_blocks() {
  return (K == 0 || (ElemBytes == 2 && K >= 3)) ? 2 : kMinBlocksPerSM;
}
constexpr int kDotGroup = 8;  // dot products accumulated in registers at once (a block loops over groups)

// Fragments (16 bytes) of each stream one thread covers in its block: two for
// 32- and 64-bit data, one for 16-bit data, whose unpacked fragments (8 floats
// each) leave no registers under the 64-register cap for a second one in
// flight (the kernels ask for a chunk at once where they can: for_each_frag).
// A chunk is then 8 KiB of each stream for 32- and 64-bit data, 4 KiB for
// 16-bit: 2048 elements (fp32, bf16, fp16) or 1024 (fp64).
template <int64_t ElemBytes>
constexpr int kChunkFrags = ElemBytes == 2 ? 1 : 2;

inline int64_t chunk_elems(DType d) {
  const int64_t es = dtype_bytes(d);
  return static_cast<int64_t>(kThreads) * (es == 2 ? kChunkFrags<2> : kChunkFrags<4>) * (16 / es);
}

// Per-block entry of the device table (multi-tensor apply): everything a block
// needs in one 32-byte record, so that its first loads do not depend on each
// other (block -> entry -> data, two levels).
enum Field : int {
  kA = 0,    // param / source / out pointer at the block's first element
  kB = 1,    // grad pointer at the block's first element (0 if none)
  kLen = 2,  // elements of this block (<= chunk_elems)
  kCol = 3,  // ring column of the block's first element
  kFields = 4,
};

struct Table {
  const int64_t* blocks;  // kFields per block
  int64_t nblocks;
};

// One launch struct per kernel: the op's argument struct (ops.h) taken whole,
// plus what the launch layer resolves for this launch (the block table, the
// partial buffer, the host halves of the rounding keys). Passed by value as
// the kernel's parameter. Ring rows are addressed as row_elems * slot + col +
// i (elements).

// param_dtype is the table's param and gradient dtype: 16-bit with master
// weights (`dtype` float32: rings, master at master + ring column), else
// dtype.
struct CombineLaunch : CombineOp {
  Table table;
  // Stochastic rounding of the 16-bit stores (sr_seed set;
  // stochastic_rounding.h): the host halves of the keys, h(seed ^ stream);
  // the kernel adds the count it reads on the device. Ignored unless the
  // dtype is 16-bit.
  uint32_t salt_param;
  uint32_t salt_grad;
  double* partials;  // fused gram (k <= kDotGroup): nblocks * kDotGroup, else nullptr
};

// <g0, g(age j)>, j = 0..ndots()-1, with g0 the effective gradient and the
// ring of `slots` slots holding ages 1..ndots()-1; with `store` also stores g0
// into slot count mod slots (then ndots() == slots; read-only: slots + 1).
// A block covers every dot group of its chunk (the re-reads of the gradient
// for groups after the first hit L2, not DRAM). Master weights (read-only
// form): 16-bit gradients (param_dtype), and the weight decay reads the
// float32 masters at master + ring column.
struct GramRowLaunch : GramRowOp {
  Table table;
  double* partials;  // groups * nblocks * kDotGroup
};

// Copies the sources into slot count mod slots; with ndots() = slots - 1 > 0
// also the residual dots <r_0, r_j>.
struct RecordLaunch : RecordOp {
  Table table;
  double* partials;  // with dots
};

struct ExtrapLaunch : ExtrapOp {
  Table table;
};

// Number of dot groups of kDotGroup for `ndots` dots (at least one).
inline int dot_groups(int ndots) { return ndots <= kDotGroup ? 1 : (ndots + kDotGroup - 1) / kDotGroup; }

cudaError_t launch_combine(const CombineLaunch& p, cudaStream_t stream);
cudaError_t launch_gram_row(const GramRowLaunch& p, cudaStream_t stream);
cudaError_t launch_rna_record(const RecordLaunch& p, cudaStream_t stream);
cudaError_t launch_rna_extrapolate(const ExtrapLaunch& p, cudaStream_t stream);
// out[d * out_stride] = sum over blocks of partials, in float64 and a fixed
// order, for d = 0..ndots-1 (partials laid out as the launches above write them).
cudaError_t launch_reduce(const double* partials, int64_t nblocks, int ndots, double* out, int64_t out_stride,
                          cudaStream_t stream);

}  // namespace interp::cuda
