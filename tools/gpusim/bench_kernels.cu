// Timing-model benchmarks: the yardsticks (a plain 128-bit copy and a
// textbook one-pass fused Adam, the stand-in for the fused optimizers a user
// compares against) and the project's kernels through the same launch layer
// the torch glue uses, each alone on n elements per stream, inputs uploaded
// before the timed launch. The simulator prints each kernel's cycles and DRAM
// statistics; tests/gpusim/timing.py reads them.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "device_ops.h"
#include "bench_kernels.h"

namespace interp_bench {
namespace {

// One 16-byte fragment per thread: the simplest full-bandwidth copy.
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n4) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n4) dst[i] = src[i];
}

// Textbook fused Adam (AdamW form), one float4 of each of p, g, m, v per
// thread: 4 reads and 3 writes of 16 bytes, 28 bytes per element like the
// combine at k = 2. The step's scalars arrive ready (bias corrections folded
// into lr and eps by the host, as fused implementations do per step).
__global__ void adam_kernel(float4* __restrict__ p, const float4* __restrict__ g, float4* __restrict__ m,
                            float4* __restrict__ v, int64_t n4, float lr, float beta1, float beta2, float eps,
                            float wd, float bc1, float bc2_sqrt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  float4 pp = p[i], gg = g[i], mm = m[i], vv = v[i];
  float* pe = &pp.x;
  float* ge = &gg.x;
  float* me = &mm.x;
  float* ve = &vv.x;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    pe[e] -= lr * wd * pe[e];
    me[e] = beta1 * me[e] + (1.0f - beta1) * ge[e];
    ve[e] = beta2 * ve[e] + (1.0f - beta2) * ge[e] * ge[e];
    const float denom = sqrtf(ve[e]) / bc2_sqrt + eps;
    pe[e] -= (lr / bc1) * me[e] / denom;
  }
  p[i] = pp;
  m[i] = mm;
  v[i] = vv;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "bench: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(3);
  }
}

// A device buffer of n values of `bytes` each, filled with small finite values.
void* filled(int64_t n, int bytes, unsigned seed) {
  std::vector<unsigned char> host(static_cast<size_t>(n * bytes));
  unsigned s = seed * 2654435761u + 1u;
  if (bytes == 4) {
    float* f = reinterpret_cast<float*>(host.data());
    for (int64_t i = 0; i < n; ++i) {
      s = s * 1664525u + 1013904223u;
      f[i] = static_cast<float>((s >> 8) & 0xFFFF) / 65536.0f + 0.25f;
    }
  } else if (bytes == 2) {
    uint16_t* h = reinterpret_cast<uint16_t*>(host.data());
    for (int64_t i = 0; i < n; ++i) {
      s = s * 1664525u + 1013904223u;
      h[i] = static_cast<uint16_t>(0x3E80 + ((s >> 8) & 0xFF));  // bf16 in [0.25, 0.5)
    }
  } else {
    std::memset(host.data(), 0, host.size());
  }
  void* d = nullptr;
  check(cudaMalloc(&d, host.size()), "cudaMalloc");
  check(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
  return d;
}

template <typename T>
T* scalar(T v) {
  T* d = nullptr;
  check(cudaMalloc(&d, sizeof(T)), "cudaMalloc");
  check(cudaMemcpy(d, &v, sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}

}  // namespace

int run(const char* kernel_name, int64_t n) {
  using namespace interp;
  const std::string k = kernel_name;
  const int64_t n4 = (n + 3) / 4;
  const unsigned grid4 = static_cast<unsigned>((n4 + 255) / 256);
  cudaError_t err = cudaSuccess;
  std::printf("BENCH_BEGIN %s %lld\n", kernel_name, static_cast<long long>(n));
  std::fflush(stdout);
  if (k == "copy") {
    auto* src = static_cast<uint4*>(filled(n, 4, 1));
    auto* dst = static_cast<uint4*>(filled(n, 4, 2));
    copy_kernel<<<grid4, 256>>>(src, dst, n4);
    err = cudaGetLastError();
  } else if (k == "adam") {
    auto* p = static_cast<float4*>(filled(n, 4, 1));
    auto* g = static_cast<float4*>(filled(n, 4, 2));
    auto* m = static_cast<float4*>(filled(n, 4, 3));
    auto* v = static_cast<float4*>(filled(n, 4, 4));
    adam_kernel<<<grid4, 256>>>(p, g, m, v, n4, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.1f, 0.0316f);
    err = cudaGetLastError();
  } else if (k == "combine2_f32" || k == "combine2_bf16") {
    const bool bf = k == "combine2_bf16";
    const int es = bf ? 2 : 4;
    Seg seg{};
    seg.a = filled(n, es, 1);
    seg.b = filled(n, es, 2);
    seg.numel = n;
    seg.col = 0;
    CombineOp a{};
    a.dtype = bf ? DType::kBFloat16 : DType::kFloat32;
    a.k = 2;
    a.x_ring = filled(n, es, 3);
    a.g_ring = filled(n, es, 4);
    a.row_elems = n;
    const double coefs[2] = {0.75, 0.25};
    double* dc = nullptr;
    check(cudaMalloc(&dc, sizeof coefs), "cudaMalloc");
    check(cudaMemcpy(dc, coefs, sizeof coefs, cudaMemcpyHostToDevice), "upload");
    a.coefs = dc;
    a.lr = scalar(1e-3);
    a.count = scalar<int64_t>(5);
    a.weight_decay = 0.0;
    harness::Workspace ws;
    err = harness::combine(a, {seg}, ws);
  } else if (k == "gram2_f32") {
    // RNA's gradient record form: 2 slots, age 1 read, age 0 stored; <g0, g0>, <g0, g1>.
    Seg seg{};
    seg.a = filled(n, 4, 1);
    seg.b = filled(n, 4, 2);
    seg.numel = n;
    GramRowOp a{};
    a.dtype = DType::kFloat32;
    a.g_ring = filled(2 * n, 4, 3);
    a.slots = 2;
    a.row_elems = n;
    a.count = scalar<int64_t>(5);
    a.store = true;
    a.out = static_cast<double*>(filled(2, 8, 0));
    a.out_stride = 1;
    harness::Workspace ws;
    err = harness::gram_row(a, {seg}, ws);
  } else if (k == "record_f32") {
    // RNA record with window 2 (3 slots): the copy and the residual dots <r0, r0>, <r0, r1>.
    Seg seg{};
    seg.a = filled(n, 4, 1);
    seg.numel = n;
    RecordOp a{};
    a.dtype = DType::kFloat32;
    a.window = filled(3 * n, 4, 2);
    a.slots = 3;
    a.row_elems = n;
    a.count = scalar<int64_t>(5);
    a.out = static_cast<double*>(filled(2, 8, 0));
    a.out_stride = 1;
    harness::Workspace ws;
    err = harness::rna_record(a, {seg}, ws);
  } else {
    std::fprintf(stderr, "bench: unknown kernel %s\n", kernel_name);
    return 2;
  }
  check(err, "launch");
  check(cudaDeviceSynchronize(), "kernel");
  std::printf("BENCH_END %s\n", kernel_name);
  return 0;
}

}  // namespace interp_bench
