// CPU kernel of corp::ridge_solve for the baseline instruction set (SSE2 on
// x86-64, the compiler's default elsewhere). See ridge_solve_cpu_impl.h.
#include <cmath>
#include <cstdint>
#include <limits>

#include "ridge_solve.h"
#include "ridge_solve_cpu.h"

#define CORP_CPU_NS cpu_base
#define CORP_VEC_BYTES 16
#include "ridge_solve_cpu_impl.h"
