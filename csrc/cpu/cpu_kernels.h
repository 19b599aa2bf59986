// Interface between the CPU torch glue (cpu_launch.cpp) and the CPU kernels,
// which are compiled once per instruction set (kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp) and picked at run time. Plain structs
// and raw pointers only: the kernel translation units include the at::vec
// headers and nothing else from torch.
#pragma once

#include <cstdint>

#include "../interp_math.h"
#include "../ops.h"
#include "../stochastic_rounding.h"

namespace interp::cpu {

// The fixed reduction partition: every tensor is cut into chunks of kChunk
// elements (the last one shorter), each chunk produces one partial per dot
// product, and the partials are summed in chunk order. The boundaries depend on
// the tensors alone, never on the thread count, so the dots are bitwise
// reproducible for any torch.set_num_threads.
constexpr int64_t kChunk = 8192;

// Dot products are accumulated in register groups of this many.
constexpr int kDotGroup = 8;

// Ring slots / coefficients a single op accepts (local arrays are sized by it).
constexpr int kMaxSlots = 256;

struct Chunk {
  int64_t seg;
  int64_t begin;  // element offset inside the segment
  int64_t len;
};

// Each op's kernel arguments are its argument struct (ops.h), taken whole,
// plus what the launcher (cpu_launch.cpp) resolves on the host for this call:
// the chunks, the ring rows by age, the chunk partials of the dots. Ring rows
// are passed as the address of column 0 of the row holding a given age; the
// kernel adds (col + begin) elements. The op's pointers are host memory here
// (*lr, *count are plain loads).
struct CombineArgs : CombineOp {
  const Seg* segs;
  const Chunk* chunks;
  double grad_mul;      // 1 / grad_scale (GradScaler), else 1
  char* const* x_rows;  // [j], j = 1..k-1: x ring row of age j
  char* const* g_rows;  // [j], j = 1..k-1: g ring row of age j
  char* x_write;        // row that receives the old param (nullptr when k == 1)
  char* g_write;        // row that receives the effective gradient (nullptr when k == 1)
  double* partials;     // gram requested: partials[chunk * k + j] = <g0, g(age j)> of the chunk; else nullptr
  // Stochastic rounding of the 16-bit stores (sr_seed set; the new param,
  // the gradient slot; stochastic_rounding.h): the keys of this call, per stream.
  uint32_t key_param;
  uint32_t key_grad;
};

struct GramArgs : GramRowOp {
  const Seg* segs;
  const Chunk* chunks;
  double grad_mul;      // 1 / grad_scale (GradScaler), else 1
  char* const* g_rows;  // [j], j = 1..ndots()-1
  char* g_write;        // row that receives the effective gradient, or nullptr (read-only)
  double* partials;     // partials[chunk * ndots() + j]
};

struct RecordArgs : RecordOp {
  const Seg* segs;
  const Chunk* chunks;
  char* const* rows;  // [a], a = 1..S-1: window row of age a
  char* write;        // row of slot c mod S
  double* partials;   // partials[chunk * ndots() + j]
};

struct ExtrapArgs : ExtrapOp {
  const Seg* segs;
  const Chunk* chunks;
  char* const* rows;  // [a], a = 0..m-1
};

// One instruction set's kernels. Each processes the chunks [c0, c1).
struct KernelTable {
  const char* name;
  void (*combine)(const CombineArgs&, int64_t c0, int64_t c1);
  void (*gram_row)(const GramArgs&, int64_t c0, int64_t c1);
  void (*rna_record)(const RecordArgs&, int64_t c0, int64_t c1);
  void (*rna_extrapolate)(const ExtrapArgs&, int64_t c0, int64_t c1);
};

// nullptr when that variant was not compiled for this target.
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace interp::cpu
