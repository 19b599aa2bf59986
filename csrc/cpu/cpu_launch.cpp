// Torch glue of the CPU kernels: ring rows from `count`, the fixed chunk
// partition, torch's thread pool, and the fixed-order reduction of the chunk
// partials. count / lr / coefs are host memory here, so reading them is a
// plain load.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../launchers.h"
#include "cpu_kernels.h"

namespace interp {
namespace {

// Below this many elements the whole op runs on the calling thread: waking the
// pool costs more than it saves.
constexpr int64_t kSerialBelow = 1 << 15;

// __builtin_cpu_supports takes string literals only, hence a macro.
#if defined(__x86_64__) && defined(__GNUC__)
#define INTERP_CPU_HAS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature))
#else
#define INTERP_CPU_HAS(feature) false
#endif

bool can_run_avx2() {
  return cpu::kernels_avx2() && INTERP_CPU_HAS("avx2") && INTERP_CPU_HAS("fma") && INTERP_CPU_HAS("f16c");
}

bool can_run_avx512() {
  return cpu::kernels_avx512() && can_run_avx2() && INTERP_CPU_HAS("avx512f") && INTERP_CPU_HAS("avx512bw") &&
         INTERP_CPU_HAS("avx512vl") && INTERP_CPU_HAS("avx512dq");
}

// AVX2 even where AVX-512 runs: the ops are bound by memory bandwidth, and
// measured on an AVX-512 machine (Zen) the 512-bit variant was ~10 % slower
// for float32 and ~15 % for bfloat16. AVX-512 stays selectable.
const cpu::KernelTable* best_kernels() {
  if (can_run_avx2()) return cpu::kernels_avx2();
  return cpu::kernels_default();
}

std::atomic<const cpu::KernelTable*>& active_kernels() {
  static std::atomic<const cpu::KernelTable*> active{best_kernels()};
  return active;
}

const cpu::KernelTable& kernels() { return *active_kernels().load(std::memory_order_relaxed); }

// A ring buffer of the bucket: the column-0 addresses of its rows by age.
struct Ring {
  void* data;
  int64_t slots;
  int64_t row_elems;
  DType dtype;

  // The row holding age `age` while the count is c.
  char* row(int64_t c, int64_t age) const {
    return static_cast<char*>(data) + ring_slot(c, age, slots) * row_elems * dtype_bytes(dtype);
  }
  // rows[a] = row(c, a) for a = first..n-1 (null below first).
  std::vector<char*> rows(int64_t c, int n, int first) const {
    std::vector<char*> out(n, nullptr);
    for (int a = first; a < n; ++a) out[a] = row(c, a);
    return out;
  }
};

// The fixed chunk partition of a bucket and the chunk partials of its `ndots`
// dot products: what every launcher sets up before its kernel runs.
struct Plan {
  Plan(const Segs& segs, int nd) : ndots(nd) {
    for (size_t i = 0; i < segs.size(); ++i) {
      const Seg& s = segs[i];
      for (int64_t b = 0; b < s.numel; b += cpu::kChunk) {
        chunks.push_back({static_cast<int64_t>(i), b, std::min(cpu::kChunk, s.numel - b)});
      }
      elements += s.numel;
    }
    partials.resize(ndots > 0 ? chunks.size() * ndots : 0);
  }

  // fn(c0, c1) over the chunks, on the pool unless the bucket is small. Each
  // thread takes a contiguous range of chunks; which thread runs a chunk never
  // changes its partials, so the result does not depend on the thread count.
  template <typename F>
  void run(const F& fn) const {
    const int64_t n = static_cast<int64_t>(chunks.size());
    if (n == 0) return;
    if (elements < kSerialBelow) {
      fn(0, n);
      return;
    }
    at::parallel_for(0, n, 1, fn);
  }

  // out[d * stride] = the chunk partials of dot d summed in chunk order (float64).
  void reduce(double* out, int64_t stride) const {
    std::vector<double> sums(ndots, 0.0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      for (int d = 0; d < ndots; ++d) sums[d] += partials[c * ndots + d];
    }
    for (int d = 0; d < ndots; ++d) out[d * stride] = sums[d];
  }

  int ndots;
  std::vector<cpu::Chunk> chunks;
  int64_t elements = 0;
  std::vector<double> partials;
};

// GradScaler's inputs are host memory here: reading them is a plain load.
bool skipped(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

double grad_mul(const float* grad_scale) {
  return grad_scale != nullptr ? 1.0 / static_cast<double>(*grad_scale) : 1.0;
}

}  // namespace

std::string cpu_kernels_name() { return kernels().name; }

std::vector<std::string> available_cpu_kernels() {
  std::vector<std::string> names{"DEFAULT"};
  if (can_run_avx2()) names.emplace_back("AVX2");
  if (can_run_avx512()) names.emplace_back("AVX512");
  return names;
}

std::string select_cpu_kernels(const std::string& name) {
  const cpu::KernelTable* t = cpu::kernels_default();
  if (name == "AVX512" && can_run_avx512()) {
    t = cpu::kernels_avx512();
  } else if ((name == "AVX512" || name == "AVX2") && can_run_avx2()) {
    t = cpu::kernels_avx2();
  }
  active_kernels().store(t, std::memory_order_relaxed);
  return t->name;
}

// Each launcher takes the op's struct whole into its kernel arguments (which
// derive from it) and adds what this call resolves on the host.

void combine_cpu(const CombineOp& op, const Segs& segs) {
  if (skipped(op.found_inf)) return;
  const int k = op.k;
  const int64_t c = *op.count;
  const Ring x{op.x_ring, k - 1, op.row_elems, op.dtype};
  const Ring g{op.g_ring, k - 1, op.row_elems, op.dtype};
  const std::vector<char*> x_rows = x.rows(c, k, 1);
  const std::vector<char*> g_rows = g.rows(c, k, 1);
  Plan plan(segs, op.gram ? k : 0);

  cpu::CombineArgs args{};
  static_cast<CombineOp&>(args) = op;
  args.segs = segs.data();
  args.chunks = plan.chunks.data();
  args.grad_mul = grad_mul(op.grad_scale);
  args.x_rows = x_rows.data();
  args.g_rows = g_rows.data();
  args.x_write = k > 1 ? x.row(c, 0) : nullptr;
  args.g_write = k > 1 ? g.row(c, 0) : nullptr;
  args.partials = op.gram ? plan.partials.data() : nullptr;
  // The kernels round stochastically 16-bit params only (wider dtypes ignore the seed).
  if (op.sr_seed.set) {
    args.key_param = sr_key(sr_salt(op.sr_seed.value, kStreamParam), c);
    args.key_grad = sr_key(sr_salt(op.sr_seed.value, kStreamGrad), c);
  }

  const cpu::KernelTable& kt = kernels();
  plan.run([&](int64_t c0, int64_t c1) { kt.combine(args, c0, c1); });
  if (op.gram) plan.reduce(op.gram, op.gram_stride);
}

void gram_row_cpu(const GramRowOp& op, const Segs& segs) {
  if (skipped(op.found_inf)) return;
  const int k = op.ndots();  // dots of ages 0..k-1; the ring holds ages 1..k-1 (and 0 once stored)
  const int64_t c = *op.count;
  const Ring g{op.g_ring, op.slots, op.row_elems, op.dtype};
  const std::vector<char*> g_rows = g.rows(c, k, 1);
  Plan plan(segs, k);

  cpu::GramArgs args{};
  static_cast<GramRowOp&>(args) = op;
  args.segs = segs.data();
  args.chunks = plan.chunks.data();
  args.grad_mul = grad_mul(op.grad_scale);
  args.g_rows = g_rows.data();
  args.g_write = op.store ? g.row(c, 0) : nullptr;
  args.partials = plan.partials.data();

  const cpu::KernelTable& kt = kernels();
  plan.run([&](int64_t c0, int64_t c1) { kt.gram_row(args, c0, c1); });
  plan.reduce(op.out, op.out_stride);
}

void rna_record_cpu(const RecordOp& op, const Segs& segs) {
  const int64_t c = *op.count;
  const int ndots = op.ndots();
  const Ring window{op.window, op.slots, op.row_elems, op.dtype};
  const std::vector<char*> rows = window.rows(c, op.slots, 1);
  Plan plan(segs, ndots);

  cpu::RecordArgs args{};
  static_cast<RecordOp&>(args) = op;
  args.segs = segs.data();
  args.chunks = plan.chunks.data();
  args.rows = rows.data();
  args.write = window.row(c, 0);
  args.partials = plan.partials.data();

  const cpu::KernelTable& kt = kernels();
  plan.run([&](int64_t c0, int64_t c1) { kt.rna_record(args, c0, c1); });
  if (ndots > 0) plan.reduce(op.out, op.out_stride);
}

void rna_extrapolate_cpu(const ExtrapOp& op, const Segs& segs) {
  const int64_t c = *op.count;
  // Age a of the snapshots is slot (count - 1 - a) mod slots: the newest is age 0.
  const Ring window{op.window, op.slots, op.row_elems, op.dtype};
  const std::vector<char*> rows = window.rows(c - 1, op.m, 0);
  const Plan plan(segs, 0);

  cpu::ExtrapArgs args{};
  static_cast<ExtrapOp&>(args) = op;
  args.segs = segs.data();
  args.chunks = plan.chunks.data();
  args.rows = rows.data();

  const cpu::KernelTable& kt = kernels();
  plan.run([&](int64_t c0, int64_t c1) { kt.rna_extrapolate(args, c0, c1); });
}

}  // namespace interp
