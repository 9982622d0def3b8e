// CPU kernel of corp::ridge_solve: declarations of the per-instruction-set
// builds of csrc/ridge_solve_cpu_impl.h (no PyTorch headers).
//
// The same source is compiled three times (ridge_solve_cpu_{base,avx2,avx512}.cpp),
// each into its own namespace so that no inline function is shared between
// them; ridge_solve.cpp picks one at run time from the CPU's features.
//
// solve_range(batch, begin, end, workspace) solves matrices [begin, end);
// workspace holds workspace_size(n, sizeof(T)) elements (n*ld + n, with the
// row stride ld of the factor padded to the build's vector width).
#pragma once

#include <cstdint>

namespace corp {

template <typename T>
struct CpuBatch {
  const T* matrix;    // (b, n, n) contiguous; lower triangle read
  const T* damping;   // (b,)
  T* solution;        // (b, n, m) contiguous; holds the rhs on entry
  T* damping_out;     // (b,)
  bool* ok;           // (b,)
  int64_t n;
  int64_t m;
  int64_t max_retries;
  T growth;
};

#define CORP_DECLARE_CPU_RANGE(ns)                                                  \
  namespace ns {                                                                    \
  int64_t workspace_size(int64_t n, int64_t elem_bytes);                           \
  void solve_range(const CpuBatch<float>& batch, int64_t begin, int64_t end, float* workspace);    \
  void solve_range(const CpuBatch<double>& batch, int64_t begin, int64_t end, double* workspace);  \
  }

CORP_DECLARE_CPU_RANGE(cpu_base)
#if defined(__x86_64__) && defined(__GNUC__)
#define CORP_CPU_X86 1
CORP_DECLARE_CPU_RANGE(cpu_avx2)
CORP_DECLARE_CPU_RANGE(cpu_avx512)
#endif

#undef CORP_DECLARE_CPU_RANGE

}  // namespace corp
