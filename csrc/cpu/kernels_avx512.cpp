// The CPU kernels for AVX-512 (F, BW, VL, DQ) + FMA + F16C; the same scheme
// as kernels_avx2.cpp (target pragma plus the ISA macros the headers test).
#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
// GCC 12 warns inside its own avx512fintrin.h (a self-initialised dummy).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"

namespace interp::cpu {
INTERP_DEFINE_KERNEL_TABLE(kernels_avx512)
}  // namespace interp::cpu

#else

namespace interp::cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace interp::cpu

#endif
