// CUDA kernels of corp::ridge_solve: (A_b + λ_b I) X_b = B_b by Cholesky, damping retries inside.
//
// Two kernels, chosen by n (larger n goes to cuSOLVER through ATen, in ridge_solve.cpp):
//
// * n <= kWarpMaxN (32): one warp per matrix (warp_solve_kernel). Lane i owns row i of the
//   factor in shared memory; the factor is right-looking, one __syncwarp per step and no block
//   barrier at all. The solves put one right-hand-side column on each lane: a lane runs its
//   column's forward and backward substitution alone (L is read by all lanes at the same
//   address: broadcasts), with no synchronisation.
// * n <= kCudaKernelMaxN (128): one thread block per matrix (blocked_solve_kernel), a blocked
//   factor in shared memory with panels of kPanel (32) columns: warp 0 factors the panel's
//   diagonal block warp-synchronously, all threads then solve the panel below (a row per thread)
//   and apply the rank-kPanel update to the trailing matrix. Three barriers per panel instead
//   of one per column (12 instead of 128 at n = 128). The solves are blocked the same way:
//   two barriers per panel and direction instead of two per row.
//
// Right-hand sides are split across warps / blocks when the batch alone cannot fill the GPU:
// each of the `splits` warps (blocks) of one matrix factors it (the same instructions on the
// same data: the same factor, bit for bit) and solves its own columns; only split 0 writes the
// damping used and the status. Every output element is computed by one thread in a fixed order,
// with no atomics: two runs give bit-identical results, whatever the split.
//
// Damping retries: when a pivot is not positive and finite, λ ← max(growth·λ, floor) and the
// factor restarts from A (at most max_retries times), with floor = max(mean|diag A|·1e-12, tiny)
// as in corp/reference.py. A matrix whose last retry fails gets ok = false and X = 0.
//
// This file includes only the CUDA runtime (no PyTorch headers) so that it compiles quickly;
// ridge_solve.cpp does the ATen side.
#ifndef CORP_WITH_CUDA
#define CORP_WITH_CUDA  // the launcher declaration in ridge_solve.h
#endif

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "ridge_solve.h"

namespace corp {
namespace {

// Warps per block of the warp-per-matrix kernel: 4 matrices per block keep the block's shared
// memory (2 · 32 · 33 doubles per warp, 67 KB in fp64) within what two blocks per SM can share.
constexpr int kWarpsPerBlock = 4;
// Panel width of the blocked factor and solves: one warp factors a kPanel × kPanel diagonal
// block (a lane per row), so kPanel is the warp size.
constexpr int kPanel = 32;
// Right-hand-side columns the blocked kernel holds in shared memory at a time: with n = 128 in
// fp64 the factor takes 129 KB and 64 columns 64 KB, within the 227 KB of an H100/H200 block.
// Fewer when shared memory is shorter (the launcher computes it).
constexpr int64_t kMaxChunk = 64;
// Smallest chunk the blocked kernel narrows to when a small batch leaves the GPU idle: every block
// refactors its matrix (n³/3 multiply-adds), which below ~16 columns (2n²·16 for the solves) would
// be most of a block's work.
constexpr int64_t kMinChunk = 16;
// Warps (blocks) wanted in flight before the right-hand sides are split: ~one wave of 132 SMs with
// 16 resident warps each (warp kernel) or 2 resident blocks each (blocked kernel).
constexpr int64_t kTargetWarpsPerSm = 16;
constexpr int64_t kTargetBlocksPerSm = 2;

__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
template <typename T>
__device__ __forceinline__ T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T tiny_();
template <>
__device__ __forceinline__ float tiny_<float>() { return 1.17549435082228750797e-38f; }
template <>
__device__ __forceinline__ double tiny_<double>() { return 2.2250738585072013831e-308; }
__device__ __forceinline__ bool bad_pivot(float p) { return !(p > 0.0f) || !isfinite(p); }
__device__ __forceinline__ bool bad_pivot(double p) { return !(p > 0.0) || !isfinite(p); }

// Damping floor of the retries, max(mean|diag A|·rel, tiny), computed by one warp (all lanes get it).
template <typename T>
__device__ T damping_floor(const T* A, int n, int lane, T floor_relative) {
  T s = 0;
  for (int i = lane; i < n; i += 32) s += abs_(A[static_cast<int64_t>(i) * n + i]);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return max_(s / T(n) * floor_relative, tiny_<T>());
}

// Warp-synchronous Cholesky of the diagonal block rows/cols [p0, p0 + pb) (pb <= 32) of the
// lower triangle in sL (leading dimension ld), in place: lane r owns row p0 + r. Columns before
// p0 must already have been applied to the block (the blocked kernel's trailing updates). The
// block's diagonal becomes L's, sInv[p0 + k] = 1 / l_kk. Returns false (on every lane) at the
// first pivot that is not positive and finite.
template <typename T>
__device__ bool factor_diagonal_block(T* sL, T* sInv, int ld, int p0, int pb, int lane) {
  T* row = sL + static_cast<int64_t>(p0 + lane) * ld + p0;  // this lane's row of the block
  for (int k = 0; k < pb; ++k) {
    const T piv = sL[static_cast<int64_t>(p0 + k) * ld + p0 + k];  // same address: a broadcast
    if (bad_pivot(piv)) return false;                               // the same value on every lane
    const T d = sqrt_(piv);
    const T inv = T(1) / d;
    T lik = 0;
    if (lane > k && lane < pb) {
      lik = row[k] * inv;
      row[k] = lik;
    }
    __syncwarp();
    if (lane == k) {
      row[k] = d;
      sInv[p0 + k] = inv;
    }
    if (lane > k && lane < pb) {
      for (int j = k + 1; j <= lane; ++j) row[j] -= lik * sL[static_cast<int64_t>(p0 + j) * ld + p0 + k];
    }
    __syncwarp();
  }
  return true;
}

// ------------------------------------------------------------------------ n <= 32: warp per matrix
//
// Shared memory per warp: the factor (n × (n+1)), the columns being solved (n × 33: one per lane,
// padded against bank conflicts) and 1/diag (n).
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
warp_solve_kernel(const T* __restrict__ matrix, const T* __restrict__ rhs, const T* __restrict__ damping,
                  T* __restrict__ solution, T* __restrict__ damping_out, bool* __restrict__ ok_out,
                  int64_t batch, int n, int m, int splits, int max_retries, T growth, T floor_relative) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int ld = n + 1;
  const int per_warp = n * ld + n * 33 + n;
  T* sL = reinterpret_cast<T*>(smem_raw) + static_cast<int64_t>(warp) * per_warp;
  T* sX = sL + n * ld;
  T* sInv = sX + n * 33;

  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  const int64_t b = w / splits;
  const int part = static_cast<int>(w - b * splits);
  if (b >= batch) return;  // a whole warp: no barrier below involves other warps
  const T* A = matrix + b * n * n;
  const T* B = rhs + b * n * static_cast<int64_t>(m);
  T* X = solution + b * n * static_cast<int64_t>(m);

  const T floor_v = damping_floor(A, n, lane, floor_relative);
  T lam = damping[b];
  bool good = false;
  for (int attempt = 0;; ++attempt) {
    for (int idx = lane; idx < n * n; idx += 32) {
      const int i = idx / n, j = idx - i * n;
      if (j <= i) sL[i * ld + j] = A[idx] + (i == j ? lam : T(0));
    }
    __syncwarp();
    good = factor_diagonal_block(sL, sInv, ld, 0, n, lane);
    if (good || attempt >= max_retries) break;
    lam = max_(lam * growth, floor_v);
    __syncwarp();  // every lane has read the failed pivot before A is reloaded
  }
  if (part == 0 && lane == 0) {
    damping_out[b] = lam;
    ok_out[b] = good;
  }
  // columns part·32 + lane, (part + splits)·32 + lane, ...
  for (int c0 = part * 32; c0 < m; c0 += splits * 32) {
    const int c = c0 + lane;
    if (c >= m) break;  // lanes leave independently: no warp-wide operation follows
    T* x = sX + lane;
    if (!good) {  // never return a solution from a failed factor
      for (int i = 0; i < n; ++i) X[static_cast<int64_t>(i) * m + c] = T(0);
      continue;
    }
    for (int k = 0; k < n; ++k) {  // forward: L y = b
      T s = B[static_cast<int64_t>(k) * m + c];
      const T* lk = sL + k * ld;
      for (int j = 0; j < k; ++j) s -= lk[j] * x[j * 33];
      x[k * 33] = s * sInv[k];
    }
    for (int k = n - 1; k >= 0; --k) {  // backward: Lᵀ x = y
      T s = x[k * 33];
      for (int j = k + 1; j < n; ++j) s -= sL[j * ld + k] * x[j * 33];
      s *= sInv[k];
      x[k * 33] = s;
      X[static_cast<int64_t>(k) * m + c] = s;
    }
  }
}

// ---------------------------------------------------------------- n <= 128: blocked, block per matrix
//
// Shared memory: the factor (n × (n+1)), 1/diag (n), the right-hand-side chunk (n × mc).
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
blocked_solve_kernel(const T* __restrict__ matrix, const T* __restrict__ rhs, const T* __restrict__ damping,
                     T* __restrict__ solution, T* __restrict__ damping_out, bool* __restrict__ ok_out, int n,
                     int m, int mc, int max_retries, T growth, T floor_relative) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = n + 1;
  T* sL = reinterpret_cast<T*>(smem_raw);
  T* sInv = sL + n * ld;
  T* sX = sInv + n;
  __shared__ T s_floor;
  __shared__ int s_failed;

  const int64_t b = blockIdx.x;
  const int part = blockIdx.y, splits = gridDim.y;
  const T* A = matrix + b * n * n;
  const T* B = rhs + b * n * static_cast<int64_t>(m);
  T* X = solution + b * n * static_cast<int64_t>(m);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  if (warp == 0) {
    const T f = damping_floor(A, n, lane, floor_relative);
    if (lane == 0) s_floor = f;
  }
  __syncthreads();
  const T floor_v = s_floor;

  T lam = damping[b];
  bool good = false;
  for (int attempt = 0;; ++attempt) {
    for (int idx = tid; idx < n * n; idx += kThreads) {
      const int i = idx / n, j = idx - i * n;
      if (j <= i) sL[i * ld + j] = A[idx] + (i == j ? lam : T(0));
    }
    if (tid == 0) s_failed = 0;
    __syncthreads();
    for (int p0 = 0; p0 < n; p0 += kPanel) {
      const int pb = min(kPanel, n - p0);
      const int p1 = p0 + pb;
      // 1. the diagonal block, by warp 0
      if (warp == 0 && !factor_diagonal_block(sL, sInv, ld, p0, pb, lane) && lane == 0) s_failed = 1;
      __syncthreads();
      if (s_failed) break;  // uniform: every thread read the flag after the barrier
      if (p1 >= n) break;
      // 2. the panel below, L21 = A21 L11⁻ᵀ: one row per thread, left to right
      for (int i = p1 + tid; i < n; i += kThreads) {
        T* ri = sL + i * ld + p0;
        for (int j = 0; j < pb; ++j) {
          const T* rj = sL + (p0 + j) * ld + p0;
          T s = ri[j];
          for (int q = 0; q < j; ++q) s -= ri[q] * rj[q];
          ri[j] = s * sInv[p0 + j];
        }
      }
      __syncthreads();
      // 3. the trailing update A22 -= L21 L21ᵀ, one lower-triangle entry per thread at a time
      //    (entry idx = i(i+1)/2 + j, j <= i: no thread idles on the upper half)
      const int t = n - p1;
      for (int idx = tid; idx < t * (t + 1) / 2; idx += kThreads) {
        int i = static_cast<int>((sqrtf(8.0f * static_cast<float>(idx) + 1.0f) - 1.0f) * 0.5f);
        if (i * (i + 1) / 2 > idx) --i;  // exact fix-ups of the float guess
        if ((i + 1) * (i + 2) / 2 <= idx) ++i;
        const int j = idx - i * (i + 1) / 2;
        const T* ri = sL + (p1 + i) * ld + p0;
        const T* rj = sL + (p1 + j) * ld + p0;
        T s = 0;
        for (int q = 0; q < pb; ++q) s += ri[q] * rj[q];
        sL[(p1 + i) * ld + p1 + j] -= s;
      }
      __syncthreads();
    }
    good = !s_failed;
    if (good || attempt >= max_retries) break;
    lam = max_(lam * growth, floor_v);
    __syncthreads();  // every thread has read s_failed before it is reset
  }
  if (part == 0 && tid == 0) {
    damping_out[b] = lam;
    ok_out[b] = good;
  }
  if (!good) {  // never return a solution from a failed factor
    for (int c0 = part * mc; c0 < m; c0 += splits * mc) {
      const int w = min(mc, m - c0);
      for (int idx = tid; idx < n * w; idx += kThreads) {
        const int i = idx / w, c = idx - i * w;
        X[static_cast<int64_t>(i) * m + c0 + c] = T(0);
      }
    }
    return;
  }

  for (int c0 = part * mc; c0 < m; c0 += splits * mc) {
    const int w = min(mc, m - c0);
    for (int idx = tid; idx < n * w; idx += kThreads) {
      const int i = idx / w, c = idx - i * w;
      sX[i * mc + c] = B[static_cast<int64_t>(i) * m + c0 + c];
    }
    __syncthreads();
    // Forward, L y = b, by panels: the diagonal block (a column per thread), then the rows below.
    for (int p0 = 0; p0 < n; p0 += kPanel) {
      const int pb = min(kPanel, n - p0);
      const int p1 = p0 + pb;
      for (int c = tid; c < w; c += kThreads) {
        for (int i = p0; i < p1; ++i) {
          const T* ri = sL + i * ld;
          T s = sX[i * mc + c];
          for (int q = p0; q < i; ++q) s -= ri[q] * sX[q * mc + c];
          sX[i * mc + c] = s * sInv[i];
        }
      }
      __syncthreads();
      if (p1 >= n) break;
      for (int idx = tid; idx < (n - p1) * w; idx += kThreads) {
        const int r = idx / w, c = idx - r * w;
        const int i = p1 + r;
        const T* ri = sL + i * ld;
        T s = 0;
        for (int q = p0; q < p1; ++q) s += ri[q] * sX[q * mc + c];
        sX[i * mc + c] -= s;
      }
      __syncthreads();
    }
    // Backward, Lᵀ x = y, by panels from the last: the diagonal block, then the rows above.
    const int last = ((n - 1) / kPanel) * kPanel;
    for (int p0 = last; p0 >= 0; p0 -= kPanel) {
      const int pb = min(kPanel, n - p0);
      const int p1 = p0 + pb;
      for (int c = tid; c < w; c += kThreads) {
        for (int i = p1 - 1; i >= p0; --i) {
          T s = sX[i * mc + c];
          for (int q = i + 1; q < p1; ++q) s -= sL[q * ld + i] * sX[q * mc + c];
          sX[i * mc + c] = s * sInv[i];
        }
      }
      __syncthreads();
      if (p0 == 0) break;
      for (int idx = tid; idx < p0 * w; idx += kThreads) {
        const int i = idx / w, c = idx - i * w;
        T s = 0;
        for (int q = p0; q < p1; ++q) s += sL[q * ld + i] * sX[q * mc + c];
        sX[i * mc + c] -= s;
      }
      __syncthreads();
    }
    for (int idx = tid; idx < n * w; idx += kThreads) {
      const int i = idx / w, c = idx - i * w;
      X[static_cast<int64_t>(i) * m + c0 + c] = sX[i * mc + c];
    }
    __syncthreads();  // before the next chunk overwrites sX
  }
}

// ----------------------------------------------------------------------------------- launchers

struct LaunchEnv {
  int optin_smem = 0;  // bytes of shared memory a block may opt in to
  int sms = 1;
};

cudaError_t query_env(int device, LaunchEnv* env) {
  cudaError_t err = cudaDeviceGetAttribute(&env->optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&env->sms, cudaDevAttrMultiProcessorCount, device);
}

// Returns kNoKernelImage when the extension has no code for this GPU, else kLaunched with
// *cuda_error set from the attribute calls (0 when fine).
template <typename Kernel>
CudaLaunchStatus prepare(Kernel kernel, size_t bytes, int* cuda_error) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
    cudaGetLastError();  // clear: the caller falls back to cuSOLVER
    return CudaLaunchStatus::kNoKernelImage;
  }
  if (err == cudaSuccess && bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
  *cuda_error = static_cast<int>(err);
  return CudaLaunchStatus::kLaunched;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
CudaLaunchStatus launch_warp(const T* matrix, const T* rhs, const T* damping, T* solution, T* damping_out,
                             bool* ok, int64_t batch, int n, int m, int max_retries, T growth,
                             const LaunchEnv& env, int force_splits, cudaStream_t stream, int* cuda_error) {
  const size_t per_warp = static_cast<size_t>(n * (n + 1) + n * 33 + n) * sizeof(T);
  const size_t bytes = per_warp * kWarpsPerBlock;
  if (bytes > static_cast<size_t>(env.optin_smem)) return CudaLaunchStatus::kUnsupported;
  auto kernel = warp_solve_kernel<T>;
  const CudaLaunchStatus st = prepare(kernel, bytes, cuda_error);
  if (st != CudaLaunchStatus::kLaunched || *cuda_error != 0) return st;
  const int64_t col_groups = ceil_div(m < 1 ? 1 : m, 32);
  int64_t splits = ceil_div(kTargetWarpsPerSm * env.sms, batch);
  if (force_splits > 0) splits = force_splits;
  splits = splits < 1 ? 1 : (splits > col_groups ? col_groups : splits);
  const int64_t blocks = ceil_div(batch * splits, kWarpsPerBlock);
  if (blocks > INT_MAX) return CudaLaunchStatus::kUnsupported;
  kernel<<<static_cast<unsigned int>(blocks), kWarpsPerBlock * 32, bytes, stream>>>(
      matrix, rhs, damping, solution, damping_out, ok, batch, n, m, static_cast<int>(splits), max_retries, growth,
      static_cast<T>(kDampingFloorRelative));
  *cuda_error = static_cast<int>(cudaGetLastError());
  return CudaLaunchStatus::kLaunched;
}

template <typename T, int kThreads>
CudaLaunchStatus launch_blocked(const T* matrix, const T* rhs, const T* damping, T* solution, T* damping_out,
                                bool* ok, int64_t batch, int n, int m, int max_retries, T growth,
                                const LaunchEnv& env, int force_splits, cudaStream_t stream, int* cuda_error) {
  auto kernel = blocked_solve_kernel<T, kThreads>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
    cudaGetLastError();
    return CudaLaunchStatus::kNoKernelImage;
  }
  if (err != cudaSuccess) {
    *cuda_error = static_cast<int>(err);
    return CudaLaunchStatus::kLaunched;
  }
  const int64_t elt = static_cast<int64_t>(sizeof(T));
  const int64_t fixed = (static_cast<int64_t>(n) * (n + 1) + n) * elt;
  const int64_t avail = static_cast<int64_t>(env.optin_smem) - static_cast<int64_t>(attr.sharedSizeBytes) - fixed;
  if (avail < n * elt) return CudaLaunchStatus::kUnsupported;
  int64_t mc = m < kMaxChunk ? (m < 1 ? 1 : m) : kMaxChunk;
  if (mc * n * elt > avail) mc = avail / (n * elt);
  const int64_t target = kTargetBlocksPerSm * env.sms;
  // A small batch: narrower chunks, so that more blocks share the right-hand sides.
  while (force_splits == 0 && mc > kMinChunk && batch * ceil_div(m, mc) < target) mc = (mc + 1) / 2;
  const size_t bytes = static_cast<size_t>(fixed + mc * n * elt);
  const CudaLaunchStatus st = prepare(kernel, bytes, cuda_error);
  if (st != CudaLaunchStatus::kLaunched || *cuda_error != 0) return st;
  const int64_t chunks = ceil_div(m < 1 ? 1 : m, mc);
  int64_t splits = ceil_div(target, batch);
  if (force_splits > 0) splits = force_splits;
  splits = splits < 1 ? 1 : (splits > chunks ? chunks : splits);
  if (batch > INT_MAX || splits > 65535) return CudaLaunchStatus::kUnsupported;
  const dim3 grid(static_cast<unsigned int>(batch), static_cast<unsigned int>(splits));
  kernel<<<grid, kThreads, bytes, stream>>>(matrix, rhs, damping, solution, damping_out, ok, n, m,
                                           static_cast<int>(mc), max_retries, growth,
                                           static_cast<T>(kDampingFloorRelative));
  *cuda_error = static_cast<int>(cudaGetLastError());
  return CudaLaunchStatus::kLaunched;
}

template <typename T>
CudaLaunchStatus launch(const void* matrix, const void* rhs, const void* damping, void* solution,
                        void* damping_out, bool* ok, int64_t batch, int64_t n, int64_t m,
                        int64_t max_retries, double growth, int device, void* stream_ptr, int path,
                        int force_splits, int* cuda_error) {
  *cuda_error = 0;
  if (n < 1 || n > kCudaKernelMaxN || m > INT_MAX / 2 || batch > INT_MAX || max_retries > INT_MAX) {
    return CudaLaunchStatus::kUnsupported;
  }
  LaunchEnv env;
  cudaError_t err = query_env(device, &env);
  if (err != cudaSuccess) {
    *cuda_error = static_cast<int>(err);
    return CudaLaunchStatus::kLaunched;
  }
  if (batch == 0) return CudaLaunchStatus::kLaunched;
  const auto* A = static_cast<const T*>(matrix);
  const auto* B = static_cast<const T*>(rhs);
  const auto* L = static_cast<const T*>(damping);
  auto* X = static_cast<T*>(solution);
  auto* lam_out = static_cast<T*>(damping_out);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int ni = static_cast<int>(n), mi = static_cast<int>(m), ri = static_cast<int>(max_retries);
  const T g = static_cast<T>(growth);
  const bool warp = path == kCudaPathWarp || (path == kCudaPathAuto && n <= kWarpMaxN);
  if (warp) {
    if (n > kWarpMaxN) return CudaLaunchStatus::kUnsupported;
    return launch_warp<T>(A, B, L, X, lam_out, ok, batch, ni, mi, ri, g, env, force_splits, stream, cuda_error);
  }
  // 128 threads while the trailing matrix has at most 64² entries after the first panel (n <= 96);
  // 256 beyond, where the trailing updates have the work for them.
  if (n <= 96) {
    return launch_blocked<T, 128>(A, B, L, X, lam_out, ok, batch, ni, mi, ri, g, env, force_splits, stream,
                                  cuda_error);
  }
  return launch_blocked<T, 256>(A, B, L, X, lam_out, ok, batch, ni, mi, ri, g, env, force_splits, stream,
                                cuda_error);
}

}  // namespace

CudaLaunchStatus ridge_solve_cuda_launch(bool is_double, const void* matrix, const void* rhs,
                                         const void* damping, void* solution, void* damping_out, bool* ok,
                                         int64_t batch, int64_t n, int64_t m, int64_t max_retries,
                                         double growth, int device, void* stream, int path, int force_splits,
                                         int* cuda_error) {
  if (is_double) {
    return launch<double>(matrix, rhs, damping, solution, damping_out, ok, batch, n, m, max_retries, growth,
                          device, stream, path, force_splits, cuda_error);
  }
  return launch<float>(matrix, rhs, damping, solution, damping_out, ok, batch, n, m, max_retries, growth, device,
                       stream, path, force_splits, cuda_error);
}

}  // namespace corp
