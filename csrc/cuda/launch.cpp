// The CUDA launch layer (launch.h): block tables, partial-buffer sizes, and
// the launch sequence of each op. Host C++ only, torch-free.
#include "launch.h"

#include <algorithm>

#include "../stochastic_rounding.h"

namespace interp::cuda {
namespace {

LaunchStatus status(cudaError_t err, const char* kernel) { return {err, err == cudaSuccess ? "" : kernel}; }

// What every run_* checks first: a grid the hardware takes, and a partial
// buffer where the op has dots (a null one would be written from every block).
LaunchStatus check_inputs(const Table& table, int ndots, const double* partials) {
  if (table.nblocks < 0 || table.nblocks > kMaxBlocks) return status(cudaErrorInvalidValue, "the block table");
  if (ndots > 0 && table.nblocks > 0 && partials == nullptr) {
    return status(cudaErrorInvalidValue, "the partial buffer (nullptr for an op with dots)");
  }
  return {};
}

int64_t partials_for(int ndots, int64_t nblocks) {
  if (ndots <= 0) return 0;
  return std::max<int64_t>(1, dot_groups(ndots) * nblocks * kDotGroup);
}

// The gram_row kernel's launch struct, for gram_row itself and for a
// combine's dot pass.
GramRowLaunch gram_row_launch(const GramRowOp& op, const Table& table, double* partials) {
  GramRowLaunch d{};
  static_cast<GramRowOp&>(d) = op;
  d.param_dtype = seg_dtype(op);
  d.table = table;
  d.partials = partials;
  return d;
}

// A combine's Gram row as a read-only gram_row: ages 1..k-1 in the k - 1 ring
// slots, k dots, the same effective gradient (its scalars copied whole).
GramRowOp dot_pass(const CombineOp& op) {
  GramRowOp g{};
  g.dtype = op.dtype;
  g.param_dtype = op.param_dtype;
  g.g_ring = op.g_ring;
  g.slots = op.k - 1;
  g.row_elems = op.row_elems;
  g.count = op.count;
  g.grad_scale = op.grad_scale;
  g.found_inf = op.found_inf;
  g.out = op.gram;
  g.out_stride = op.gram_stride;
  g.master = op.master;
#define INTERP_COPY_SCALAR(type, name) g.name = op.name;
  INTERP_GRAD_SCALARS(INTERP_COPY_SCALAR)
#undef INTERP_COPY_SCALAR
  g.store = false;
  return g;
}

}  // namespace

int64_t count_blocks(const Seg* segs, size_t nsegs, DType dtype) {
  const int64_t chunk = chunk_elems(dtype);
  int64_t nblocks = 0;
  for (size_t i = 0; i < nsegs; ++i) nblocks += (segs[i].numel + chunk - 1) / chunk;
  return nblocks;
}

void fill_table(const Seg* segs, size_t nsegs, DType dtype, int64_t* records, DType seg_dtype) {
  const int64_t chunk = chunk_elems(dtype);
  const int64_t es = dtype_bytes(seg_dtype);
  int64_t* h = records;
  for (size_t i = 0; i < nsegs; ++i) {
    const Seg& s = segs[i];
    for (int64_t begin = 0; begin < s.numel; begin += chunk) {
      h[kA] = reinterpret_cast<int64_t>(static_cast<char*>(s.a) + begin * es);
      h[kB] = s.b ? reinterpret_cast<int64_t>(static_cast<const char*>(s.b) + begin * es) : 0;
      h[kLen] = std::min(chunk, s.numel - begin);
      h[kCol] = s.col + begin;
      h += kFields;
    }
  }
}

int64_t combine_partials(const CombineOp& op, int64_t nblocks) {
  return op.gram != nullptr ? partials_for(op.k, nblocks) : 0;
}

int64_t gram_row_partials(const GramRowOp& op, int64_t nblocks) { return partials_for(op.ndots(), nblocks); }

int64_t rna_record_partials(const RecordOp& op, int64_t nblocks) { return partials_for(op.ndots(), nblocks); }

LaunchStatus run_combine(const CombineOp& op, const Table& table, double* partials, cudaStream_t stream) {
  const bool gram = op.gram != nullptr;
  if (LaunchStatus s = check_inputs(table, gram ? op.k : 0, partials); !s.ok()) return s;
  // The Gram row rides along with the update when its dots fit one register
  // group; otherwise a read-only dot pass runs first (it must see the old
  // values that the update overwrites).
  const bool fused = gram && op.k <= kDotGroup;
  if (gram && !fused) {
    const cudaError_t err = launch_gram_row(gram_row_launch(dot_pass(op), table, partials), stream);
    if (err != cudaSuccess) return status(err, "the gram_row kernel (the combine's dot pass)");
  }
  CombineLaunch p{};
  static_cast<CombineOp&>(p) = op;
  p.param_dtype = seg_dtype(op);
  p.table = table;
  p.partials = fused ? partials : nullptr;
  // The seed's half of the keys on the host; the kernel adds the count it reads.
  if (op.sr_seed.set) {
    p.salt_param = sr_salt(op.sr_seed.value, kStreamParam);
    p.salt_grad = sr_salt(op.sr_seed.value, kStreamGrad);
  }
  if (const cudaError_t err = launch_combine(p, stream); err != cudaSuccess) return status(err, "the combine kernel");
  if (gram) {
    return status(launch_reduce(partials, table.nblocks, op.k, op.gram, op.gram_stride, stream),
                  "the reduction kernel");
  }
  return {};
}

LaunchStatus run_gram_row(const GramRowOp& op, const Table& table, double* partials, cudaStream_t stream) {
  const int ndots = op.ndots();
  if (LaunchStatus s = check_inputs(table, ndots, partials); !s.ok()) return s;
  if (const cudaError_t err = launch_gram_row(gram_row_launch(op, table, partials), stream); err != cudaSuccess) {
    return status(err, "the gram_row kernel");
  }
  return status(launch_reduce(partials, table.nblocks, ndots, op.out, op.out_stride, stream), "the reduction kernel");
}

LaunchStatus run_rna_record(const RecordOp& op, const Table& table, double* partials, cudaStream_t stream) {
  const int ndots = op.ndots();
  if (LaunchStatus s = check_inputs(table, ndots, partials); !s.ok()) return s;
  RecordLaunch p{};
  static_cast<RecordOp&>(p) = op;
  p.table = table;
  p.partials = ndots > 0 ? partials : nullptr;
  if (const cudaError_t err = launch_rna_record(p, stream); err != cudaSuccess) {
    return status(err, "the rna_record kernel");
  }
  if (ndots > 0) {
    return status(launch_reduce(partials, table.nblocks, ndots, op.out, op.out_stride, stream),
                  "the reduction kernel");
  }
  return {};
}

LaunchStatus run_rna_extrapolate(const ExtrapOp& op, const Table& table, cudaStream_t stream) {
  if (LaunchStatus s = check_inputs(table, 0, nullptr); !s.ok()) return s;
  ExtrapLaunch p{};
  static_cast<ExtrapOp&>(p) = op;
  p.table = table;
  return status(launch_rna_extrapolate(p, stream), "the rna_extrapolate kernel");
}

}  // namespace interp::cuda
