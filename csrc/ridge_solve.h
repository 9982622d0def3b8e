// Batched Cholesky ridge solve: shared declarations.
//
// The CUDA translation unit (ridge_solve_cuda.cu) includes nothing from
// PyTorch, only the CUDA runtime: it compiles in seconds and exposes a plain
// launcher. All ATen work (checks, allocation, streams, dispatch) is in
// ridge_solve.cpp.
#pragma once

#include <cstdint>

namespace corp {

// Relative floor of the first retry's damping where the requested damping is
// zero: floor = max(mean(|diag A|) * kDampingFloorRelative, tiny). Mirrors
// corp/solve.py (reference path) so both report the same damping.
constexpr double kDampingFloorRelative = 1e-12;

// Largest n the one-block-per-matrix CUDA kernel takes; larger systems go to
// cuSOLVER through torch.linalg.
constexpr int64_t kCudaKernelMaxN = 128;

// Largest n the CPU kernel takes; larger systems go to LAPACK through
// torch.linalg (blocked, multithreaded BLAS is faster there: see benchmarks/).
// With fewer than two matrices per thread the kernel (one thread per matrix)
// stops earlier, at kCpuKernelFewMaxN.
constexpr int64_t kCpuKernelMaxN = 256;
constexpr int64_t kCpuKernelFewMaxN = 128;

#ifdef CORP_WITH_CUDA
// Result of a CUDA launch request.
enum class CudaLaunchStatus : int {
  kLaunched = 0,        // kernel launched (errors, if any, via cudaGetLastError)
  kUnsupported = 1,     // shape does not fit the kernel: caller falls back
  kNoKernelImage = 2,   // the extension was not built for this GPU's arch
};

// Launch the fused factor + solve kernel: one block per matrix.
// matrix (b, n, n), rhs (b, n, m), damping (b,), solution (b, n, m),
// damping_out (b,), ok (b,) as bytes 0/1. All contiguous, on `device`'s
// current stream `stream` (a cudaStream_t passed as void*).
// is_double selects fp64 (else fp32). Returns a CudaLaunchStatus; a CUDA API
// error is returned through *cuda_error (0 when none).
CudaLaunchStatus ridge_solve_cuda_launch(
    bool is_double, const void* matrix, const void* rhs, const void* damping,
    void* solution, void* damping_out, bool* ok, int64_t batch, int64_t n,
    int64_t m, int64_t max_retries, double growth, int device, void* stream,
    int* cuda_error);
#endif

}  // namespace corp
