// The CPU kernels for the baseline instruction set (whatever the compiler
// targets by default: SSE2 on x86-64, NEON on aarch64). Always built; the
// fallback when no wider variant can run.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

namespace interp::cpu {
INTERP_DEFINE_KERNEL_TABLE(kernels_default)
}  // namespace interp::cpu
