// CUDA kernel of corp::ridge_solve: one thread block per matrix.
//
// The block loads A + λI (lower triangle) into shared memory, factors it in
// place (right-looking Cholesky, one barrier per column), retries with a
// larger damping inside the kernel when a pivot is not positive and finite,
// then runs the forward and backward substitutions on chunks of the right-hand
// sides held in shared memory. Factor and both solves are one launch and the
// factor never leaves shared memory.
//
// This file includes only the CUDA runtime (no PyTorch headers) so that it
// compiles quickly; ridge_solve.cpp does the ATen side.
#ifndef CORP_WITH_CUDA
#define CORP_WITH_CUDA  // the launcher declaration in ridge_solve.h
#endif

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "ridge_solve.h"

namespace corp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Right-hand-side columns held in shared memory at a time (fewer when the
// GPU's shared memory per block is short). Each chunk costs 2n barriers; a
// smaller chunk leaves room for more blocks per SM. 64 covers the attention
// and test shapes (m <= 64) in one chunk. Not yet tuned on a GPU.
constexpr int64_t kMaxChunk = 64;

__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ bool finite_(float x) { return isfinite(x); }
__device__ __forceinline__ bool finite_(double x) { return isfinite(x); }
template <typename T>
__device__ __forceinline__ T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T tiny_();
template <>
__device__ __forceinline__ float tiny_<float>() { return 1.17549435082228750797e-38f; }
template <>
__device__ __forceinline__ double tiny_<double>() { return 2.2250738585072013831e-308; }

// Shared memory (dynamic): A (n × (n+1), padded so that a column is
// bank-conflict free), 1/diag(L) (n), right-hand-side chunk (n × mc).
template <typename T>
__global__ void __launch_bounds__(kThreads)
ridge_solve_kernel(const T* __restrict__ matrix, const T* __restrict__ rhs,
                   const T* __restrict__ damping, T* __restrict__ solution,
                   T* __restrict__ damping_out, bool* __restrict__ ok_out, int n,
                   int m, int mc, int max_retries, T growth, T floor_relative) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = n + 1;
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sInv = sA + n * ld;
  T* sX = sInv + n;
  __shared__ T s_floor;

  const int64_t b = blockIdx.x;
  const T* A = matrix + b * n * n;
  const T* B = rhs + b * n * static_cast<int64_t>(m);
  T* X = solution + b * n * static_cast<int64_t>(m);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // Damping floor of the retries: max(mean|diag A| · rel, tiny), as in solve.py.
  if (warp == 0) {
    T s = 0;
    for (int i = lane; i < n; i += 32) s += abs_(A[static_cast<int64_t>(i) * n + i]);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) s_floor = max_(s / T(n) * floor_relative, tiny_<T>());
  }
  __syncthreads();
  const T floor_v = s_floor;

  T lam = damping[b];
  bool good = false;
  for (int attempt = 0;; ++attempt) {
    for (int idx = tid; idx < n * n; idx += kThreads) {
      const int i = idx / n, j = idx - i * n;
      if (j <= i) sA[i * ld + j] = A[idx] + (i == j ? lam : T(0));
    }
    __syncthreads();
    bool failed = false;
    for (int k = 0; k < n; ++k) {
      // Every thread reads the same pivot after the barrier: the branch is uniform.
      const T piv = sA[k * ld + k];
      if (!(piv > T(0)) || !finite_(piv)) {
        failed = true;
        break;
      }
      const T inv_d = T(1) / sqrt_(piv);
      if (tid == 0) sInv[k] = inv_d;
      // Scale column k-1 (deferred one step: nobody reads it during step k).
      if (k > 0) {
        const T s = sInv[k - 1];
        for (int i = k + tid; i < n; i += kThreads) sA[i * ld + k - 1] *= s;
      }
      // Trailing update with the unscaled column k: a_ij -= l_ik l_jk.
      for (int i = k + 1 + warp; i < n; i += kWarps) {
        const T lik = sA[i * ld + k] * inv_d;
        for (int j = k + 1 + lane; j <= i; j += 32) sA[i * ld + j] -= lik * (sA[j * ld + k] * inv_d);
      }
      __syncthreads();
    }
    if (!failed) {
      good = true;
      break;
    }
    if (attempt >= max_retries) break;
    lam = max_(lam * growth, floor_v);
    __syncthreads();  // all threads have read the failed pivot before A is reloaded
  }
  if (tid == 0) {
    damping_out[b] = lam;
    ok_out[b] = good;
  }
  if (!good) {  // never return a solution from a failed factor
    for (int64_t idx = tid; idx < static_cast<int64_t>(n) * m; idx += kThreads) X[idx] = T(0);
    return;
  }

  for (int c0 = 0; c0 < m; c0 += mc) {
    const int w = min(mc, m - c0);
    for (int idx = tid; idx < n * w; idx += kThreads) {
      const int i = idx / w, c = idx - i * w;
      sX[i * mc + c] = B[static_cast<int64_t>(i) * m + c0 + c];
    }
    __syncthreads();
    // Forward: L y = b. Row k is final (up to its 1/l_kk) at step k; its
    // scaling is deferred to step k+1, when nobody reads it.
    for (int k = 0; k < n; ++k) {
      const T inv_k = sInv[k];
      if (k > 0) {
        const T s = sInv[k - 1];
        for (int c = tid; c < w; c += kThreads) sX[(k - 1) * mc + c] *= s;
      }
      const int rows = n - 1 - k;
      for (int idx = tid; idx < rows * w; idx += kThreads) {
        const int r = idx / w, c = idx - r * w;
        const int i = k + 1 + r;
        sX[i * mc + c] -= sA[i * ld + k] * (sX[k * mc + c] * inv_k);
      }
      __syncthreads();
    }
    for (int c = tid; c < w; c += kThreads) sX[(n - 1) * mc + c] *= sInv[n - 1];
    __syncthreads();
    // Backward: Lᵀ x = y, with (Lᵀ)_ik = L_ki read along row k.
    for (int k = n - 1; k >= 0; --k) {
      const T inv_k = sInv[k];
      if (k < n - 1) {
        const T s = sInv[k + 1];
        for (int c = tid; c < w; c += kThreads) sX[(k + 1) * mc + c] *= s;
      }
      for (int idx = tid; idx < k * w; idx += kThreads) {
        const int i = idx / w, c = idx - i * w;
        sX[i * mc + c] -= sA[k * ld + i] * (sX[k * mc + c] * inv_k);
      }
      __syncthreads();
    }
    for (int c = tid; c < w; c += kThreads) sX[c] *= sInv[0];
    __syncthreads();
    for (int idx = tid; idx < n * w; idx += kThreads) {
      const int i = idx / w, c = idx - i * w;
      X[static_cast<int64_t>(i) * m + c0 + c] = sX[i * mc + c];
    }
    __syncthreads();  // before the next chunk overwrites sX
  }
}

template <typename T>
CudaLaunchStatus launch(const void* matrix, const void* rhs, const void* damping, void* solution,
                        void* damping_out, bool* ok, int64_t batch, int64_t n, int64_t m,
                        int64_t max_retries, double growth, int device, void* stream,
                        int* cuda_error) {
  *cuda_error = 0;
  if (n < 1 || n > kCudaKernelMaxN || m > INT_MAX / 2 || batch > INT_MAX || max_retries > INT_MAX) {
    return CudaLaunchStatus::kUnsupported;
  }
  auto kernel = ridge_solve_kernel<T>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
    cudaGetLastError();  // clear: the caller falls back to cuSOLVER
    return CudaLaunchStatus::kNoKernelImage;
  }
  if (err != cudaSuccess) {
    *cuda_error = static_cast<int>(err);
    return CudaLaunchStatus::kLaunched;
  }
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    *cuda_error = static_cast<int>(err);
    return CudaLaunchStatus::kLaunched;
  }
  const int64_t elt = static_cast<int64_t>(sizeof(T));
  const int64_t fixed = (n * (n + 1) + n) * elt;
  const int64_t avail = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes) - fixed;
  int64_t mc = m < kMaxChunk ? (m < 1 ? 1 : m) : kMaxChunk;
  if (avail < n * elt) return CudaLaunchStatus::kUnsupported;
  if (mc * n * elt > avail) mc = avail / (n * elt);
  const size_t bytes = static_cast<size_t>(fixed + mc * n * elt);
  if (bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) {
      *cuda_error = static_cast<int>(err);
      return CudaLaunchStatus::kLaunched;
    }
  }
  if (batch == 0) return CudaLaunchStatus::kLaunched;
  kernel<<<static_cast<unsigned int>(batch), kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(matrix), static_cast<const T*>(rhs), static_cast<const T*>(damping),
      static_cast<T*>(solution), static_cast<T*>(damping_out), ok, static_cast<int>(n),
      static_cast<int>(m), static_cast<int>(mc), static_cast<int>(max_retries), static_cast<T>(growth),
      static_cast<T>(kDampingFloorRelative));
  *cuda_error = static_cast<int>(cudaGetLastError());
  return CudaLaunchStatus::kLaunched;
}

}  // namespace

CudaLaunchStatus ridge_solve_cuda_launch(bool is_double, const void* matrix, const void* rhs,
                                         const void* damping, void* solution, void* damping_out, bool* ok,
                                         int64_t batch, int64_t n, int64_t m, int64_t max_retries,
                                         double growth, int device, void* stream, int* cuda_error) {
  if (is_double) {
    return launch<double>(matrix, rhs, damping, solution, damping_out, ok, batch, n, m, max_retries, growth,
                          device, stream, cuda_error);
  }
  return launch<float>(matrix, rhs, damping, solution, damping_out, ok, batch, n, m, max_retries, growth, device,
                       stream, cuda_error);
}

}  // namespace corp
