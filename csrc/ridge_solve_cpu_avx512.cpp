// CPU kernel of corp::ridge_solve for AVX-512 (F, VL, DQ) with 512-bit
// vectors, chosen at run time when the CPU has them. See ridge_solve_cpu_impl.h.
#include <cmath>
#include <cstdint>
#include <limits>

#include "ridge_solve.h"
#include "ridge_solve_cpu.h"

#ifdef CORP_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
#define CORP_CPU_NS cpu_avx512
#define CORP_VEC_BYTES 64
#include "ridge_solve_cpu_impl.h"
#pragma GCC pop_options
#endif
