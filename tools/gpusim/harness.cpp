// A torch-free program that runs the project's own CUDA kernels (csrc/cuda/*.cu,
// compiled as they are) on raw device buffers, for a simulated GPU
// (GPGPU-Sim replaces libcudart, so libtorch cannot be loaded there).
//
//   harness run CASES OUT   every case of CASES (written by tests/gpusim/cases.py)
//                           through the launch layer, the buffers back into OUT
//   harness bench KERNEL N  one timed launch on N elements per stream (timing model)
//
// Each buffer is placed `misalign` bytes past a 256-byte boundary with 256
// guard bytes on each side; a guard that changed is reported as an
// out-of-bounds write.
#include <cuda_runtime_api.h>

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "device_ops.h"
#include "bench_kernels.h"

namespace {

constexpr int64_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xA5;

void die(const char* what) {
  std::fprintf(stderr, "harness: %s\n", what);
  std::exit(2);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "harness: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(3);
  }
}

struct Reader {
  FILE* f;
  int64_t i64() {
    int64_t v;
    if (std::fread(&v, sizeof v, 1, f) != 1) die("truncated case file");
    return v;
  }
  double f64() {
    double v;
    if (std::fread(&v, sizeof v, 1, f) != 1) die("truncated case file");
    return v;
  }
  void bytes(void* p, int64_t n) {
    if (n > 0 && std::fread(p, 1, static_cast<size_t>(n), f) != static_cast<size_t>(n)) die("truncated case file");
  }
};

// One device buffer with guards around it.
struct Buf {
  int64_t nbytes = 0;
  int64_t misalign = 0;
  char* base = nullptr;  // device allocation
  char* ptr() const { return base + kGuard + misalign; }
  int64_t total() const { return kGuard + misalign + nbytes + kGuard; }
};

Buf upload(Reader& r) {
  Buf b;
  b.nbytes = r.i64();
  b.misalign = r.i64();
  std::vector<char> host(static_cast<size_t>(b.total()), static_cast<char>(kGuardByte));
  r.bytes(host.data() + kGuard + b.misalign, b.nbytes);
  check(cudaMalloc(reinterpret_cast<void**>(&b.base), static_cast<size_t>(b.total())), "cudaMalloc");
  check(cudaMemcpy(b.base, host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
  return b;
}

// Downloads b into out; false when a guard byte changed.
bool download(const Buf& b, FILE* out) {
  std::vector<char> host(static_cast<size_t>(b.total()));
  check(cudaMemcpy(host.data(), b.base, host.size(), cudaMemcpyDeviceToHost), "download");
  bool ok = true;
  for (int64_t i = 0; i < kGuard + b.misalign; ++i) ok = ok && static_cast<unsigned char>(host[i]) == kGuardByte;
  for (int64_t i = kGuard + b.misalign + b.nbytes; i < b.total(); ++i)
    ok = ok && static_cast<unsigned char>(host[i]) == kGuardByte;
  if (b.nbytes > 0) std::fwrite(host.data() + kGuard + b.misalign, 1, static_cast<size_t>(b.nbytes), out);
  check(cudaFree(b.base), "cudaFree");
  return ok;
}

enum Op : int64_t { kCombine = 0, kGramRow = 1, kRnaRecord = 2, kRnaExtrapolate = 3 };
// Which optional tensors a case carries (the scalars come by name).
enum Flag : int64_t {
  kHasOut = 2,  // gram (combine), out (gram_row, rna_record)
  kHasGradScale = 8,
  kHasFoundInf = 16,
  kMaster = 64,  // combine, gram_row: float32 rings (dtype) and masters, 16-bit segments (m: their dtype)
};

// The op's scalars (csrc/ops.h field lists) from the case's "name=value"
// lines, as tests/gpusim/_cases.py writes them from the op's Python argument
// object: a float in hex (or inf / nan), a bool 0 or 1, a seed "none" or a
// decimal int (taken mod 2^32, negative ones included, as the bindings do).
using Scalars = std::map<std::string, std::string>;

Scalars parse_scalars(const std::string& text) {
  Scalars out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    const size_t eq = line.find('=');
    if (eq == std::string::npos) die("a scalar line without '='");
    out[line.substr(0, eq)] = line.substr(eq + 1);
    pos = end + 1;
  }
  return out;
}

void parse(const std::string& v, double& out) {
  char* end = nullptr;
  out = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0') die("a float scalar that does not parse");
}

void parse(const std::string& v, bool& out) {
  if (v != "0" && v != "1") die("a bool scalar that is not 0 or 1");
  out = v == "1";
}

void parse(const std::string& v, interp::Seed& out) {
  if (v == "none") {
    out = interp::Seed{};
    return;
  }
  const bool negative = !v.empty() && v[0] == '-';
  uint32_t mod = 0;  // |v| mod 2^32, digit by digit (any length)
  for (size_t i = negative ? 1 : 0; i < v.size(); ++i) {
    if (v[i] < '0' || v[i] > '9') die("a seed scalar that is not an int");
    mod = static_cast<uint32_t>(mod * 10u + static_cast<uint32_t>(v[i] - '0'));
  }
  out = interp::Seed{true, negative ? 0u - mod : mod};
}

// Fills every scalar of `op` from `scalars`; each one must be there, and nothing else.
template <typename OpT>
void fill_scalars(OpT& op, const Scalars& scalars) {
  size_t used = 0;
  interp::for_each_scalar(op, [&](const char* name, auto& field) {
    const auto it = scalars.find(name);
    if (it == scalars.end()) {
      std::fprintf(stderr, "harness: the case has no scalar %s\n", name);
      std::exit(2);
    }
    parse(it->second, field);
    ++used;
  });
  if (used != scalars.size()) die("the case has scalars the op does not take");
}

// Case layout (int64 unless said): op, dtype, nseg, row_elems, slots (k for
// combine, S otherwise), flags, m (extrapolate; the 16-bit dtype with master
// weights), the scalars (byte count, then "name=value" lines), numel[nseg],
// col[nseg], nbuf, then the buffers (nbytes, misalign, bytes) in the op's
// order (tests/gpusim/_cases.py).
int run_case(Reader& r, FILE* out, int index) {
  using namespace interp;
  const int64_t op = r.i64();
  const auto dtype = static_cast<DType>(r.i64());
  const int64_t nseg = r.i64();
  const int64_t row_elems = r.i64();
  const int64_t slots = r.i64();
  const int64_t flags = r.i64();
  const int64_t m = r.i64();
  std::string text(static_cast<size_t>(r.i64()), '\0');
  r.bytes(text.data(), static_cast<int64_t>(text.size()));
  const Scalars scalars = parse_scalars(text);
  std::vector<int64_t> numel(static_cast<size_t>(nseg)), col(static_cast<size_t>(nseg));
  for (auto& v : numel) v = r.i64();
  for (auto& v : col) v = r.i64();
  const int64_t nbuf = r.i64();
  std::vector<Buf> bufs;
  for (int64_t i = 0; i < nbuf; ++i) bufs.push_back(upload(r));

  size_t next = 0;
  auto take = [&]() -> Buf& {
    if (next >= bufs.size()) die("case has too few buffers");
    return bufs[next++];
  };
  std::vector<Seg> segs(static_cast<size_t>(nseg), Seg{});
  const bool two = op == kCombine || op == kGramRow;
  for (int64_t s = 0; s < nseg; ++s) segs[s].a = take().ptr();
  if (two) {
    for (int64_t s = 0; s < nseg; ++s) segs[s].b = take().ptr();
  }
  for (int64_t s = 0; s < nseg; ++s) {
    segs[s].numel = numel[s];
    segs[s].col = col[s];
  }
  const auto opt = [&](int64_t flag) -> char* { return (flags & flag) ? take().ptr() : nullptr; };

  harness::Workspace ws;
  cudaError_t err = cudaSuccess;
  switch (op) {
    case kCombine: {
      CombineOp a{};
      fill_scalars(a, scalars);
      a.dtype = dtype;
      a.k = static_cast<int>(slots);
      a.x_ring = take().ptr();
      a.g_ring = take().ptr();
      a.row_elems = row_elems;
      a.coefs = reinterpret_cast<const double*>(take().ptr());
      a.lr = reinterpret_cast<const double*>(take().ptr());
      a.count = reinterpret_cast<const int64_t*>(take().ptr());
      a.master = reinterpret_cast<float*>(opt(kMaster));
      a.param_dtype = (flags & kMaster) ? static_cast<DType>(m) : dtype;
      a.gram = reinterpret_cast<double*>(opt(kHasOut));
      a.gram_stride = 1;
      a.grad_scale = reinterpret_cast<const float*>(opt(kHasGradScale));
      a.found_inf = reinterpret_cast<const float*>(opt(kHasFoundInf));
      err = harness::combine(a, segs, ws);
      break;
    }
    case kGramRow: {
      GramRowOp a{};
      fill_scalars(a, scalars);
      a.dtype = dtype;
      a.g_ring = take().ptr();
      a.slots = static_cast<int>(slots);
      a.row_elems = row_elems;
      a.count = reinterpret_cast<const int64_t*>(take().ptr());
      a.out = reinterpret_cast<double*>(take().ptr());
      a.out_stride = 1;
      a.master = reinterpret_cast<const float*>(opt(kMaster));
      a.param_dtype = (flags & kMaster) ? static_cast<DType>(m) : dtype;
      a.grad_scale = reinterpret_cast<const float*>(opt(kHasGradScale));
      a.found_inf = reinterpret_cast<const float*>(opt(kHasFoundInf));
      err = harness::gram_row(a, segs, ws);
      break;
    }
    case kRnaRecord: {
      RecordOp a{};
      fill_scalars(a, scalars);
      a.dtype = dtype;
      a.window = take().ptr();
      a.slots = static_cast<int>(slots);
      a.row_elems = row_elems;
      a.count = reinterpret_cast<const int64_t*>(take().ptr());
      a.out = reinterpret_cast<double*>(opt(kHasOut));
      a.out_stride = 1;
      err = harness::rna_record(a, segs, ws);
      break;
    }
    case kRnaExtrapolate: {
      ExtrapOp a{};
      fill_scalars(a, scalars);
      a.dtype = dtype;
      a.window = take().ptr();
      a.slots = static_cast<int>(slots);
      a.row_elems = row_elems;
      a.count = reinterpret_cast<const int64_t*>(take().ptr());
      a.coefs = reinterpret_cast<const double*>(take().ptr());
      a.m = static_cast<int>(m);
      err = harness::rna_extrapolate(a, segs, ws);
      break;
    }
    default:
      die("unknown op");
  }
  check(err, "launch");
  check(cudaDeviceSynchronize(), "kernel");
  if (next != bufs.size()) die("case has too many buffers");
  bool guards = true;
  for (const Buf& b : bufs) guards = download(b, out) && guards;
  if (!guards) std::fprintf(stderr, "harness: case %d wrote outside its buffers\n", index);
  std::fflush(out);
  return guards ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "run") {
    FILE* in = std::fopen(argv[2], "rb");
    FILE* out = std::fopen(argv[3], "wb");
    if (!in || !out) die("cannot open the case or output file");
    Reader r{in};
    const int64_t ncases = r.i64();
    int bad = 0;
    for (int64_t c = 0; c < ncases; ++c) {
      bad += run_case(r, out, static_cast<int>(c));
      std::fprintf(stderr, "harness: case %" PRId64 " done\n", c);
    }
    std::fclose(out);
    std::printf("HARNESS_DONE %" PRId64 " cases, %d with out-of-bounds writes\n", ncases, bad);
    return bad ? 1 : 0;
  }
  if (argc == 4 && std::string(argv[1]) == "bench") {
    return interp_bench::run(argv[2], std::strtoll(argv[3], nullptr, 10));
  }
  std::fprintf(stderr, "usage: harness run CASES OUT | harness bench KERNEL N\n");
  return 2;
}
