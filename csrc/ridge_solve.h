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

// Largest n the CUDA kernels take (the blocked one-block-per-matrix kernel, whose factor
// and 64 right-hand sides fill an H100/H200 block's shared memory at n = 128 in fp64);
// larger systems go to cuSOLVER through torch.linalg.
constexpr int64_t kCudaKernelMaxN = 128;
// Largest n of the warp-per-matrix CUDA kernel (a lane per row of the factor).
constexpr int64_t kWarpMaxN = 32;
// CUDA kernel choice (tests force each path): by n, the warp kernel, the blocked kernel.
constexpr int kCudaPathAuto = 0;
constexpr int kCudaPathWarp = 1;
constexpr int kCudaPathBlocked = 2;

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

// Launch the fused factor + solve kernel: a warp per matrix (n <= kWarpMaxN) or
// a block per matrix (n <= kCudaKernelMaxN), right-hand sides split across
// warps/blocks when the batch is small.
// matrix (b, n, n), rhs (b, n, m), damping (b,), solution (b, n, m),
// damping_out (b,), ok (b,) as bytes 0/1. All contiguous, on `device`'s
// current stream `stream` (a cudaStream_t passed as void*).
// is_double selects fp64 (else fp32). path: kCudaPathAuto/Warp/Blocked;
// force_splits > 0 fixes the number of warps/blocks sharing one matrix's
// right-hand sides (tests; 0: chosen from the GPU size). Returns a
// CudaLaunchStatus; a CUDA API error is returned through *cuda_error (0 when none).
CudaLaunchStatus ridge_solve_cuda_launch(
    bool is_double, const void* matrix, const void* rhs, const void* damping,
    void* solution, void* damping_out, bool* ok, int64_t batch, int64_t n,
    int64_t m, int64_t max_retries, double growth, int device, void* stream,
    int path, int force_splits, int* cuda_error);
#endif

}  // namespace corp
