// corp::ridge_solve: batched Cholesky ridge solves as a PyTorch custom op.
//
//   ridge_solve(matrix (b,n,n), rhs (b,n,m), damping (b,), max_retries, growth)
//     -> (solution (b,n,m), damping_used (b,), ok (b,) bool)
//
// For every b: factor A_b + λ_b I = L Lᵀ (only the lower triangle of A_b is
// read), and return X_b = (A_b + λ_b I)⁻¹ B_b. A factorisation that meets a
// pivot that is not positive and finite is retried with
// λ ← max(growth·λ, floor) at most max_retries times, where
// floor = max(mean|diag A_b|·1e-12, tiny) (as corp/solve.py). Where the last
// retry fails too, ok is False and the solution is zero: a failed factor is
// never used. fp32 and fp64; inputs of any strides (copied to contiguous).
//
// CPU: one factor + two triangular solves per matrix, parallel over the batch
// (at::parallel_for), n <= kCpuKernelMaxN (kCpuKernelFewMaxN when the batch
// has fewer than two matrices per thread), in the widest of the SSE2 / AVX2 /
// AVX-512 builds of ridge_solve_cpu_impl.h that the CPU runs; larger n goes to LAPACK through
// at::linalg_cholesky_ex / at::cholesky_solve with the same retry rule.
// CUDA (when built with CORP_WITH_CUDA): a warp per matrix for n <= kWarpMaxN,
// a blocked factor with one thread block per matrix for n <= kCudaKernelMaxN
// (ridge_solve_cuda.cu; right-hand sides split across warps/blocks when the
// batch is small); larger n goes to cuSOLVER through the same ATen path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>  // pybind11 casters for at::Tensor

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <limits>
#include <tuple>
#include <vector>

#ifdef CORP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "ridge_solve.h"
#include "ridge_solve_cpu.h"

namespace corp {
namespace {

using at::Tensor;
using Result = std::tuple<Tensor, Tensor, Tensor>;

// Numbers in error messages are formatted with snprintf, never streamed: on a
// GPU machine whose compiler (/opt/gcc) differs from the one torch was built
// with, streaming an integer or a double into TORCH_CHECK's message from this
// library crashed the process (SIGSEGV, H200 run 2026-11-26) while messages
// streaming only strings and c10 types raised cleanly.
std::string fmt_int(int64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  return buf;
}

std::string fmt_double(double v) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string fmt_sizes(const Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + fmt_int(t.size(i));
  return out + "]";
}

void check_inputs(const Tensor& matrix, const Tensor& rhs, const Tensor& damping, int64_t max_retries,
                  double growth) {
  TORCH_CHECK(matrix.dim() == 3 && matrix.size(1) == matrix.size(2),
              "corp::ridge_solve: matrix must be (b, n, n), got ", fmt_sizes(matrix));
  const int64_t b = matrix.size(0), n = matrix.size(1);
  TORCH_CHECK(rhs.dim() == 3 && rhs.size(0) == b && rhs.size(1) == n, "corp::ridge_solve: rhs must be (",
              fmt_int(b), ", ", fmt_int(n), ", m), got ", fmt_sizes(rhs));
  TORCH_CHECK(damping.dim() == 1 && damping.size(0) == b, "corp::ridge_solve: damping must be (", fmt_int(b),
              ",), got ", fmt_sizes(damping));
  TORCH_CHECK(matrix.scalar_type() == at::kFloat || matrix.scalar_type() == at::kDouble,
              "corp::ridge_solve: matrix must be float32 or float64, got ", matrix.scalar_type());
  TORCH_CHECK(rhs.scalar_type() == matrix.scalar_type() && damping.scalar_type() == matrix.scalar_type(),
              "corp::ridge_solve: matrix, rhs and damping must have the same dtype, got ", matrix.scalar_type(),
              ", ", rhs.scalar_type(), ", ", damping.scalar_type());
  TORCH_CHECK(rhs.device() == matrix.device() && damping.device() == matrix.device(),
              "corp::ridge_solve: matrix, rhs and damping must be on the same device, got ", matrix.device(), ", ",
              rhs.device(), ", ", damping.device());
  TORCH_CHECK(max_retries >= 0, "corp::ridge_solve: max_retries must be >= 0, got ", fmt_int(max_retries));
  TORCH_CHECK(std::isfinite(growth) && growth > 1.0, "corp::ridge_solve: growth must be finite and > 1, got ",
              fmt_double(growth));
}

// The ATen path (LAPACK on CPU, cuSOLVER/cuBLAS on CUDA), same rule as the
// kernels and as corp/solve.py: used for large n, and on CUDA as the fallback.
// The two triangular solves are done from the right on Bᵀ
// (Xᵀ = Bᵀ L⁻ᵀ L⁻¹), which leaves X row-major with no transposing copy
// (cholesky_solve returns it column-major).
Result ridge_solve_aten(const Tensor& matrix, const Tensor& rhs, const Tensor& damping, int64_t max_retries,
                        double growth) {
  const int64_t b = matrix.size(0);
  Tensor lam = damping.clone(at::MemoryFormat::Contiguous);
  Tensor ok = at::zeros({b}, matrix.options().dtype(at::kBool));
  if (b == 0) return {at::zeros(rhs.sizes(), rhs.options()), lam, ok};
  const double tiny = matrix.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                          : static_cast<double>(std::numeric_limits<float>::min());
  // NaN on the diagonal: floor tiny, as in the kernels (the damping stays a number).
  const Tensor floor =
      matrix.diagonal(0, -2, -1).abs().mean(-1).mul(kDampingFloorRelative).clamp_min(tiny).nan_to_num(tiny);
  Tensor solution;  // allocated once a part of the batch is known to need it
  Tensor todo = at::arange(b, matrix.options().dtype(at::kLong));
  for (int64_t attempt = 0;; ++attempt) {
    const bool all = todo.size(0) == b;
    Tensor shifted = all ? matrix.clone(at::MemoryFormat::Contiguous) : matrix.index_select(0, todo);
    shifted.diagonal(0, -2, -1).add_((all ? lam : lam.index_select(0, todo)).unsqueeze(-1));
    auto [factor, info] = at::linalg_cholesky_ex(shifted, /*upper=*/false, /*check_errors=*/false);
    // cuSOLVER's potrf reports info 0 for a matrix holding NaN (H200, torch 2.11): a factor
    // with a non-finite entry failed too.
    const Tensor good = info.eq(0).logical_and(at::isfinite(factor).flatten(1).all(1));
    const Tensor good_pos = good.nonzero().squeeze(1);
    if (good_pos.numel() > 0) {
      const bool all_good = good_pos.size(0) == todo.size(0);
      const Tensor idx = all_good ? todo : todo.index_select(0, good_pos);
      const Tensor f = all_good ? factor : factor.index_select(0, good_pos);
      const bool whole = all && all_good;
      const Tensor bt = (whole ? rhs : rhs.index_select(0, idx)).mT();
      const Tensor z = at::linalg_solve_triangular(f.mT(), bt, /*upper=*/true, /*left=*/false);
      const Tensor x = at::linalg_solve_triangular(f, z, /*upper=*/false, /*left=*/false).mT();
      if (whole) {
        solution = x.contiguous();
      } else {
        if (!solution.defined()) solution = at::zeros(rhs.sizes(), rhs.options());
        solution.index_copy_(0, idx, x);
      }
      ok.index_fill_(0, idx, true);
    }
    todo = todo.index_select(0, good.logical_not().nonzero().squeeze(1));
    if (todo.numel() == 0 || attempt >= max_retries) break;
    lam.index_copy_(0, todo, at::maximum(lam.index_select(0, todo) * growth, floor.index_select(0, todo)));
  }
  if (!solution.defined()) solution = at::zeros(rhs.sizes(), rhs.options());
  return {solution, lam, ok};
}

// ---------------------------------------------------------------- CPU kernel

enum class CpuIsa { kBase, kAvx2, kAvx512 };

CpuIsa detect_isa() {
  // CORP_CPU_ISA=base|avx2|avx512 caps the choice (benchmarks, tests).
  const char* cap = std::getenv("CORP_CPU_ISA");
  const std::string limit = cap ? cap : "";
#ifdef CORP_CPU_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (avx512 && (limit.empty() || limit == "avx512")) return CpuIsa::kAvx512;
  if (avx2 && limit != "base") return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBase;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

template <typename T>
void solve_cpu(const CpuBatch<T>& batch, int64_t b) {
  const int64_t n = batch.n, m = batch.m;
  // Work per matrix, in flops: a task should carry at least ~100k of them.
  const double cost = static_cast<double>(n) * n * (n / 3.0 + 2.0 * m + 1.0) + 1.0;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(1e5 / cost));
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    const int64_t elem = static_cast<int64_t>(sizeof(T));
    std::vector<T> workspace;
    switch (isa) {
#ifdef CORP_CPU_X86
      case CpuIsa::kAvx512:
        workspace.resize(static_cast<size_t>(cpu_avx512::workspace_size(n, elem)));
        cpu_avx512::solve_range(batch, begin, end, workspace.data());
        break;
      case CpuIsa::kAvx2:
        workspace.resize(static_cast<size_t>(cpu_avx2::workspace_size(n, elem)));
        cpu_avx2::solve_range(batch, begin, end, workspace.data());
        break;
#endif
      default:
        workspace.resize(static_cast<size_t>(cpu_base::workspace_size(n, elem)));
        cpu_base::solve_range(batch, begin, end, workspace.data());
    }
  });
}

Result ridge_solve_cpu(const Tensor& matrix, const Tensor& rhs, const Tensor& damping, int64_t max_retries,
                       double growth) {
  check_inputs(matrix, rhs, damping, max_retries, growth);
  TORCH_CHECK(matrix.device().is_cpu(), "corp::ridge_solve (CPU kernel) got a tensor on ", matrix.device());
  TORCH_CHECK(at::isfinite(damping).all().item<bool>() && (damping >= 0).all().item<bool>(),
              "corp::ridge_solve: damping must be finite and non-negative");
  const int64_t b = matrix.size(0), n = matrix.size(1), m = rhs.size(2);
  // A few large systems: LAPACK's blocked factor runs on all threads, the
  // kernel on one thread per matrix (benchmarks/solve_table.py).
  const bool few = b < 2 * static_cast<int64_t>(at::get_num_threads());
  if (n > kCpuKernelMaxN || (few && n > kCpuKernelFewMaxN)) {
    return ridge_solve_aten(matrix, rhs, damping, max_retries, growth);
  }
  const Tensor A = matrix.contiguous();
  const Tensor lam = damping.contiguous();
  Tensor X = rhs.clone(at::MemoryFormat::Contiguous);  // solved in place
  Tensor lam_out = at::empty({b}, damping.options());
  Tensor ok = at::empty({b}, matrix.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "corp_ridge_solve_cpu", [&] {
    const CpuBatch<scalar_t> batch{A.const_data_ptr<scalar_t>(), lam.const_data_ptr<scalar_t>(),
                                   X.mutable_data_ptr<scalar_t>(), lam_out.mutable_data_ptr<scalar_t>(),
                                   ok.mutable_data_ptr<bool>(), n, m, max_retries, static_cast<scalar_t>(growth)};
    solve_cpu<scalar_t>(batch, b);
  });
  return {X, lam_out, ok};
}

// --------------------------------------------------------------- CUDA entry

#ifdef CORP_WITH_CUDA
// path (kCudaPathAuto/Warp/Blocked) and splits (> 0: warps/blocks per matrix) are for tests and
// benchmarks; the registered op uses the defaults. A forced path that does not take the shape
// raises instead of falling back, so that a test cannot pass on the wrong path.
Result ridge_solve_cuda(const Tensor& matrix, const Tensor& rhs, const Tensor& damping, int64_t max_retries,
                        double growth, int64_t path, int64_t splits) {
  check_inputs(matrix, rhs, damping, max_retries, growth);
  TORCH_CHECK(matrix.device().is_cuda(), "corp::ridge_solve (CUDA kernel) got a tensor on ", matrix.device());
  TORCH_CHECK(path >= kCudaPathAuto && path <= kCudaPathBlocked, "corp::ridge_solve: path must be 0, 1 or 2, got ",
              fmt_int(path));
  TORCH_CHECK(splits >= 0 && splits <= 65535, "corp::ridge_solve: splits must be in [0, 65535], got ", fmt_int(splits));
  const c10::cuda::CUDAGuard guard(matrix.device());
  const int64_t b = matrix.size(0), n = matrix.size(1), m = rhs.size(2);
  const int64_t path_max_n = path == kCudaPathWarp ? kWarpMaxN : kCudaKernelMaxN;
  TORCH_CHECK(path == kCudaPathAuto || n <= path_max_n, "corp::ridge_solve: the forced CUDA path ", fmt_int(path),
              " takes n <= ", fmt_int(path_max_n), ", got n = ", fmt_int(n));
  if (b == 0 || n == 0 || n > kCudaKernelMaxN) return ridge_solve_aten(matrix, rhs, damping, max_retries, growth);
  const Tensor A = matrix.contiguous();
  const Tensor B = rhs.contiguous();
  const Tensor lam = damping.contiguous();
  Tensor X = at::empty(B.sizes(), B.options());
  Tensor lam_out = at::empty({b}, damping.options());
  Tensor ok = at::empty({b}, matrix.options().dtype(at::kBool));
  int cuda_error = 0;
  const auto status = ridge_solve_cuda_launch(
      A.scalar_type() == at::kDouble, A.const_data_ptr(), B.const_data_ptr(), lam.const_data_ptr(),
      X.mutable_data_ptr(), lam_out.mutable_data_ptr(), ok.mutable_data_ptr<bool>(), b, n, m, max_retries, growth,
      matrix.device().index(), c10::cuda::getCurrentCUDAStream().stream(), static_cast<int>(path),
      static_cast<int>(splits), &cuda_error);
  if (status == CudaLaunchStatus::kNoKernelImage) {
    TORCH_WARN_ONCE("corp::ridge_solve: the extension has no CUDA kernel for this GPU's architecture; using "
                    "torch.linalg (cuSOLVER). Rebuild with TORCH_CUDA_ARCH_LIST set for this GPU.");
    return ridge_solve_aten(matrix, rhs, damping, max_retries, growth);
  }
  if (status == CudaLaunchStatus::kUnsupported) {
    TORCH_CHECK(path == kCudaPathAuto, "corp::ridge_solve: the forced CUDA path ", fmt_int(path),
                " does not fit this shape on this GPU (shared memory)");
    return ridge_solve_aten(matrix, rhs, damping, max_retries, growth);
  }
  TORCH_CHECK(cuda_error == 0, "corp::ridge_solve: CUDA error: ",
              cudaGetErrorString(static_cast<cudaError_t>(cuda_error)));
  return {X, lam_out, ok};
}
#endif

}  // namespace
}  // namespace corp

// The op corp::ridge_solve (schema, fake, dispatch) is registered in Python by corp/ops.py;
// this extension only exposes its kernels.

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "corp compiled solver: CPU and CUDA kernels of corp::ridge_solve (registered by corp/ops.py)";
  mod.def("ridge_solve_cpu", &corp::ridge_solve_cpu, "batched damped Cholesky solve on CPU tensors",
          pybind11::arg("matrix"), pybind11::arg("rhs"), pybind11::arg("damping"), pybind11::arg("max_retries") = 8,
          pybind11::arg("growth") = 10.0);
#ifdef CORP_WITH_CUDA
  mod.attr("with_cuda") = true;
  mod.def("ridge_solve_cuda", &corp::ridge_solve_cuda,
          "batched damped Cholesky solve on CUDA tensors (path: 0 by n, 1 warp per matrix, 2 blocked; splits: "
          "warps/blocks sharing one matrix's right-hand sides, 0 = chosen from the GPU size)",
          pybind11::arg("matrix"), pybind11::arg("rhs"), pybind11::arg("damping"), pybind11::arg("max_retries") = 8,
          pybind11::arg("growth") = 10.0, pybind11::arg("path") = corp::kCudaPathAuto, pybind11::arg("splits") = 0);
#else
  mod.attr("with_cuda") = false;
#endif
  mod.attr("cpu_kernel_max_n") = corp::kCpuKernelMaxN;
  mod.def("cpu_isa", &corp::cpu_isa_name, "instruction set of the CPU kernel chosen at run time (base, avx2, avx512)");
  mod.attr("cuda_kernel_max_n") = corp::kCudaKernelMaxN;
  mod.attr("cuda_warp_max_n") = corp::kWarpMaxN;
}
