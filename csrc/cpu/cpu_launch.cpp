// Torch glue of the CPU kernels: ring slots from `count`, the fixed chunk
// partition, the thread pool, and the fixed-order reduction of the chunk
// partials. count / lr / coefs are CPU tensors here, so reading them is a
// plain load.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <vector>

#include "../ops.h"
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

size_t elem_size(const at::Tensor& t) { return t.element_size(); }

// Address of column 0 of ring row `slot`.
char* row_ptr(const at::Tensor& ring, int64_t slot) {
  return static_cast<char*>(ring.data_ptr()) + slot * ring.size(1) * static_cast<int64_t>(elem_size(ring));
}

struct Plan {
  std::vector<cpu::Segment> segs;
  std::vector<cpu::Chunk> chunks;
  int64_t elements = 0;
};

Plan make_plan(const std::vector<Seg>& in) {
  Plan plan;
  plan.segs.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const Seg& s = in[i];
    plan.segs.push_back({s.a, s.b, s.numel, s.col});
    for (int64_t b = 0; b < s.numel; b += cpu::kChunk) {
      plan.chunks.push_back({static_cast<int64_t>(i), b, std::min(cpu::kChunk, s.numel - b)});
    }
    plan.elements += s.numel;
  }
  return plan;
}

template <typename F>
void run_chunks(const Plan& plan, const F& fn) {
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  if (n == 0) return;
  if (plan.elements < kSerialBelow) {
    fn(0, n);
    return;
  }
  // Each thread takes a contiguous range of chunks; which thread runs a chunk
  // never changes its partials, so the result does not depend on the count.
  at::parallel_for(0, n, 1, fn);
}

// Sums the chunk partials of each dot in chunk order (float64) into `out`.
void reduce_partials(const std::vector<double>& partials, int64_t nchunks, int ndots, const at::Tensor& out) {
  std::vector<double> sums(ndots, 0.0);
  for (int64_t c = 0; c < nchunks; ++c) {
    for (int d = 0; d < ndots; ++d) sums[d] += partials[c * ndots + d];
  }
  out.copy_(at::from_blob(sums.data(), {ndots}, at::TensorOptions().dtype(at::kDouble)));
}

// GradScaler's inputs are CPU tensors here: reading them is a plain load.
bool skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf && *found_inf->const_data_ptr<float>() != 0.0f;
}

double grad_mul(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale ? 1.0 / static_cast<double>(*grad_scale->const_data_ptr<float>()) : 1.0;
}

// Stochastic rounding applies to 16-bit data only (wider dtypes ignore the seed).
bool stochastic(const CombineCall& call) {
  return call.sr_seed.has_value() && (call.dtype == DType::kBFloat16 || call.dtype == DType::kFloat16);
}

std::vector<double> to_vector(const at::Tensor& t) {
  const double* p = t.data_ptr<double>();
  return std::vector<double>(p, p + t.numel());
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

void combine_cpu(const CombineCall& call) {
  if (skipped(call.found_inf)) return;
  const int k = call.k;
  const int64_t c = *call.count.const_data_ptr<int64_t>();
  const int64_t slots = k - 1;
  std::vector<char*> x_rows(k, nullptr), g_rows(k, nullptr);
  for (int j = 1; j < k; ++j) {
    x_rows[j] = row_ptr(call.x_hist, ring_slot(c, j, slots));
    g_rows[j] = row_ptr(call.g_hist, ring_slot(c, j, slots));
  }
  const std::vector<double> coefs = to_vector(call.coefs);

  const Plan plan = make_plan(call.segs);
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<double> partials(call.gram ? nchunks * k : 0);

  cpu::CombineArgs args{};
  args.dtype = call.dtype;
  args.segs = plan.segs.data();
  args.chunks = plan.chunks.data();
  args.k = k;
  args.coefs = coefs.data();
  args.lr = *call.lr.const_data_ptr<double>();
  args.weight_decay = call.weight_decay;
  args.maximize = call.maximize;
  args.grad_mul = grad_mul(call.grad_scale);
  args.x_rows = x_rows.data();
  args.g_rows = g_rows.data();
  args.x_write = k > 1 ? row_ptr(call.x_hist, ring_slot(c, 0, slots)) : nullptr;
  args.g_write = k > 1 ? row_ptr(call.g_hist, ring_slot(c, 0, slots)) : nullptr;
  args.partials = call.gram ? partials.data() : nullptr;
  args.stochastic = stochastic(call);
  if (args.stochastic) {
    args.key_param = sr_key(sr_salt(*call.sr_seed, kStreamParam), c);
    args.key_grad = sr_key(sr_salt(*call.sr_seed, kStreamGrad), c);
  }

  const cpu::KernelTable& kt = kernels();
  run_chunks(plan, [&](int64_t c0, int64_t c1) { kt.combine(args, c0, c1); });
  if (call.gram) reduce_partials(partials, nchunks, k, *call.gram);
}

void gram_row_cpu(const GramCall& call) {
  if (skipped(call.found_inf)) return;
  const int slots = static_cast<int>(call.g_hist.size(0));
  const int k = call.store ? slots : slots + 1;  // dots of ages 0..k-1; the ring holds ages 1..k-1
  const int64_t c = *call.count.const_data_ptr<int64_t>();
  std::vector<char*> g_rows(k, nullptr);
  for (int j = 1; j < k; ++j) g_rows[j] = row_ptr(call.g_hist, ring_slot(c, j, slots));

  const Plan plan = make_plan(call.segs);
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<double> partials(nchunks * k);

  cpu::GramArgs args{};
  args.dtype = call.dtype;
  args.segs = plan.segs.data();
  args.chunks = plan.chunks.data();
  args.ndots = k;
  args.weight_decay = call.weight_decay;
  args.maximize = call.maximize;
  args.grad_mul = grad_mul(call.grad_scale);
  args.g_rows = g_rows.data();
  args.g_write = call.store ? row_ptr(call.g_hist, ring_slot(c, 0, slots)) : nullptr;
  args.partials = partials.data();

  const cpu::KernelTable& kt = kernels();
  run_chunks(plan, [&](int64_t c0, int64_t c1) { kt.gram_row(args, c0, c1); });
  reduce_partials(partials, nchunks, k, call.out);
}

void rna_record_cpu(const RecordCall& call) {
  const int64_t slots = call.window.size(0);
  const int64_t c = *call.count.const_data_ptr<int64_t>();
  const int ndots = call.out ? static_cast<int>(slots - 1) : 0;
  std::vector<char*> rows(slots, nullptr);
  for (int64_t a = 1; a < slots; ++a) rows[a] = row_ptr(call.window, ring_slot(c, a, slots));

  const Plan plan = make_plan(call.segs);
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<double> partials(nchunks * ndots);

  cpu::RecordArgs args{};
  args.dtype = call.dtype;
  args.segs = plan.segs.data();
  args.chunks = plan.chunks.data();
  args.ndots = ndots;
  args.rows = rows.data();
  args.write = row_ptr(call.window, ring_slot(c, 0, slots));
  args.partials = partials.data();

  const cpu::KernelTable& kt = kernels();
  run_chunks(plan, [&](int64_t c0, int64_t c1) { kt.rna_record(args, c0, c1); });
  if (call.out && ndots > 0) reduce_partials(partials, nchunks, ndots, *call.out);
}

void rna_extrapolate_cpu(const ExtrapCall& call) {
  const int64_t slots = call.window.size(0);
  const int m = static_cast<int>(call.coefs.numel());
  const int64_t c = *call.count.const_data_ptr<int64_t>();
  std::vector<char*> rows(m, nullptr);
  for (int a = 0; a < m; ++a) rows[a] = row_ptr(call.window, ring_slot(c - 1, a, slots));
  const std::vector<double> coefs = to_vector(call.coefs);

  const Plan plan = make_plan(call.segs);
  cpu::ExtrapArgs args{};
  args.dtype = call.dtype;
  args.segs = plan.segs.data();
  args.chunks = plan.chunks.data();
  args.m = m;
  args.coefs = coefs.data();
  args.rows = rows.data();

  const cpu::KernelTable& kt = kernels();
  run_chunks(plan, [&](int64_t c0, int64_t c1) { kt.rna_extrapolate(args, c0, c1); });
}

}  // namespace interp
