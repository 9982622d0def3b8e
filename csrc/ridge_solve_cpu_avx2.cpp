// CPU kernel of corp::ridge_solve for AVX2 + FMA, chosen at run time when the
// CPU has them. See ridge_solve_cpu_impl.h.
#include <cmath>
#include <cstdint>
#include <limits>

#include "ridge_solve.h"
#include "ridge_solve_cpu.h"

#ifdef CORP_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CORP_CPU_NS cpu_avx2
#define CORP_VEC_BYTES 32
#include "ridge_solve_cpu_impl.h"
#pragma GCC pop_options
#endif
