// The CPU kernels for AVX2 + FMA + F16C. setuptools compiles every source of
// an extension with the same flags, so the instruction set is enabled here by
// a target pragma instead of -mavx2. GCC's pragma does not define the ISA
// macros that sleef.h and the at::vec headers test, hence the explicit defines.
// Other compilers (or other architectures) get an empty table and the
// dispatcher keeps the baseline kernels.
#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"

namespace interp::cpu {
INTERP_DEFINE_KERNEL_TABLE(kernels_avx2)
}  // namespace interp::cpu

#else

namespace interp::cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace interp::cpu

#endif
