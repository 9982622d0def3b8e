// CPU kernel of corp::ridge_solve, compiled once per instruction set.
//
// Include after <cmath>, <cstdint>, <limits>, "ridge_solve.h" and
// "ridge_solve_cpu.h", with
//   CORP_CPU_NS        the namespace of this build (cpu_base, cpu_avx2, ...)
//   CORP_VEC_BYTES     the vector width in bytes (16, 32, 64)
// defined, and, for a wider instruction set, inside `#pragma GCC target(...)`.
// No header is included here and no library template is instantiated (no
// std::vector, std::fill, std::max), so nothing that another build also emits
// is compiled for a wider instruction set.
//
// Per matrix: Cholesky A + λI = Uᵀ U (only the lower triangle of A is read),
// retry with λ ← max(growth·λ, floor) on a pivot that is not positive and
// finite, then the two triangular solves on the right-hand sides. Factor and
// solves run along contiguous rows, a block of columns at a time with the
// block's partial sums held in vector registers (one load and one FMA per
// element and step).

namespace corp {
namespace CORP_CPU_NS {
namespace {

inline int64_t padded_stride(int64_t n, int64_t v) { return (n + v - 1) / v * v; }

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < len; ++k) acc += a[k] * b[k];
  return acc;
}

template <typename T>
inline void sub_scaled(T* __restrict__ y, const T* __restrict__ x, T a, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) y[k] -= a * x[k];
}

// acc[0:W] = U[j][c0:c0+W] - Σ_{k<j} U[k][j] U[k][c0:c0+W], written back to U[j].
template <typename T, int W>
inline void factor_chunk(T* U, int64_t ld, int64_t j, int64_t c0) {
  T acc[W];
  T* uj = U + j * ld + c0;
#pragma omp simd
  for (int c = 0; c < W; ++c) acc[c] = uj[c];
  for (int64_t k = 0; k < j; ++k) {
    const T a = U[k * ld + j];
    const T* uk = U + k * ld + c0;
#pragma omp simd
    for (int c = 0; c < W; ++c) acc[c] -= a * uk[c];
  }
#pragma omp simd
  for (int c = 0; c < W; ++c) uj[c] = acc[c];
}

// Cholesky of A + λI = Uᵀ U with U upper triangular, row-major with row
// stride ld (a multiple of V elements, the padding and the strict lower part
// zero), and inv_diag = 1/diag(U). Reads the lower triangle of A only. Row j
// of U is computed from rows k < j along whole vectors: columns from j
// rounded down to V up to ld, in register blocks of 4, 2 and 1 vectors; the
// few columns left of j computed that way are reset to zero (the padding
// stays zero by itself: 0 - Σ U[k][j]·0). False at the
// first pivot that is not positive and finite (the factor is then incomplete
// and must not be used).
template <typename T, int V>
bool cholesky_upper(const T* A, T lam, int64_t n, int64_t ld, T* U, T* inv_diag) {
  for (int64_t j = 0; j < n; ++j) {
    T* uj = U + j * ld;
    for (int64_t c = 0; c < j; ++c) uj[c] = T(0);
    for (int64_t c = j; c < n; ++c) uj[c] = A[c * n + j];
    for (int64_t c = n; c < ld; ++c) uj[c] = T(0);
    uj[j] += lam;
  }
  for (int64_t j = 0; j < n; ++j) {
    T* uj = U + j * ld;
    int64_t c = j - j % V;
    for (; c + 8 * V <= ld; c += 8 * V) factor_chunk<T, 8 * V>(U, ld, j, c);
    for (; c + 4 * V <= ld; c += 4 * V) factor_chunk<T, 4 * V>(U, ld, j, c);
    for (; c + 2 * V <= ld; c += 2 * V) factor_chunk<T, 2 * V>(U, ld, j, c);
    for (; c < ld; c += V) factor_chunk<T, V>(U, ld, j, c);
    for (int64_t c2 = j - j % V; c2 < j; ++c2) uj[c2] = T(0);
    const T s = uj[j];
    if (!(s > T(0)) || !std::isfinite(s)) return false;
    const T inv = T(1) / std::sqrt(s);
    inv_diag[j] = inv;
#pragma omp simd
    for (int64_t c2 = j + 1; c2 < n; ++c2) uj[c2] *= inv;
  }
  return true;
}

// Columns [X0, X0 + W) of X (row stride m): Uᵀ y = b, then U x = y, with
// the W partial sums of a row in registers.
template <typename T, int W>
void solve_block(const T* U, int64_t ld, const T* inv, int64_t n, int64_t m, T* X0) {
  for (int64_t i = 0; i < n; ++i) {  // Uᵀ y = b: (Uᵀ)_ik = U_ki
    T acc[W];
    T* xi = X0 + i * m;
#pragma omp simd
    for (int c = 0; c < W; ++c) acc[c] = xi[c];
    for (int64_t k = 0; k < i; ++k) {
      const T a = U[k * ld + i];
      const T* xk = X0 + k * m;
#pragma omp simd
      for (int c = 0; c < W; ++c) acc[c] -= a * xk[c];
    }
    const T s = inv[i];
#pragma omp simd
    for (int c = 0; c < W; ++c) xi[c] = acc[c] * s;
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // U x = y
    T acc[W];
    T* xi = X0 + i * m;
    const T* ui = U + i * ld;
#pragma omp simd
    for (int c = 0; c < W; ++c) acc[c] = xi[c];
    for (int64_t k = i + 1; k < n; ++k) {
      const T a = ui[k];
      const T* xk = X0 + k * m;
#pragma omp simd
      for (int c = 0; c < W; ++c) acc[c] -= a * xk[c];
    }
    const T s = inv[i];
#pragma omp simd
    for (int c = 0; c < W; ++c) xi[c] = acc[c] * s;
  }
}

// Fewer columns left than the smallest block: row updates in place.
template <typename T>
void solve_narrow(const T* U, int64_t ld, const T* inv, int64_t n, int64_t m, int64_t w, T* X0) {
  for (int64_t i = 0; i < n; ++i) {
    T* xi = X0 + i * m;
    for (int64_t k = 0; k < i; ++k) sub_scaled(xi, X0 + k * m, U[k * ld + i], w);
    for (int64_t c = 0; c < w; ++c) xi[c] *= inv[i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    T* xi = X0 + i * m;
    const T* ui = U + i * ld;
    for (int64_t k = i + 1; k < n; ++k) sub_scaled(xi, X0 + k * m, ui[k], w);
    for (int64_t c = 0; c < w; ++c) xi[c] *= inv[i];
  }
}

template <typename T, int V>
void cholesky_solve_inplace(const T* U, int64_t ld, const T* inv, int64_t n, int64_t m, T* X) {
  if (m == 1) {  // one column: contiguous rows of U
    for (int64_t k = 0; k < n; ++k) {  // Uᵀ y = b, column by column
      X[k] *= inv[k];
      sub_scaled(X + k + 1, U + k * ld + k + 1, X[k], n - k - 1);
    }
    for (int64_t i = n - 1; i >= 0; --i) X[i] = (X[i] - dot(U + i * ld + i + 1, X + i + 1, n - i - 1)) * inv[i];
    return;
  }
  int64_t c0 = 0;  // blocks of 8, 4, 2, 1, 1/2, 1/4 vectors of partial sums, then the rest
  for (; c0 + 8 * V <= m; c0 += 8 * V) solve_block<T, 8 * V>(U, ld, inv, n, m, X + c0);
  if (c0 + 4 * V <= m) {
    solve_block<T, 4 * V>(U, ld, inv, n, m, X + c0);
    c0 += 4 * V;
  }
  if (c0 + 2 * V <= m) {
    solve_block<T, 2 * V>(U, ld, inv, n, m, X + c0);
    c0 += 2 * V;
  }
  if (c0 + V <= m) {
    solve_block<T, V>(U, ld, inv, n, m, X + c0);
    c0 += V;
  }
  if constexpr (V >= 4) {  // half and quarter vectors (AVX-512VL, AVX)
    if (c0 + V / 2 <= m) {
      solve_block<T, V / 2>(U, ld, inv, n, m, X + c0);
      c0 += V / 2;
    }
  }
  if constexpr (V >= 8) {
    if (c0 + V / 4 <= m) {
      solve_block<T, V / 4>(U, ld, inv, n, m, X + c0);
      c0 += V / 4;
    }
  }
  if (c0 < m) solve_narrow(U, ld, inv, n, m, m - c0, X + c0);
}

// Elements of T in one vector register.
template <typename T>
constexpr int vector_lanes() {
  return CORP_VEC_BYTES / static_cast<int>(sizeof(T));
}

template <typename T>
void solve_range_impl(const CpuBatch<T>& p, int64_t begin, int64_t end, T* workspace) {
  constexpr int V = vector_lanes<T>();
  const int64_t n = p.n, m = p.m, ld = padded_stride(n, V);
  T* U = workspace;
  T* inv = workspace + n * ld;
  for (int64_t e = begin; e < end; ++e) {
    const T* A = p.matrix + e * n * n;
    T* X = p.solution + e * n * m;
    T diag = 0;
    for (int64_t i = 0; i < n; ++i) diag += A[i * n + i] < T(0) ? -A[i * n + i] : A[i * n + i];
    // Floor of the retries where the requested damping is 0 (as corp/solve.py).
    constexpr T tiny = std::numeric_limits<T>::min();
    const T rel = n > 0 ? diag / static_cast<T>(n) * static_cast<T>(kDampingFloorRelative) : T(0);
    const T floor = rel > tiny ? rel : tiny;
    T lam = p.damping[e];
    bool good = false;
    for (int64_t attempt = 0;; ++attempt) {
      if (cholesky_upper<T, V>(A, lam, n, ld, U, inv)) {
        good = true;
        break;
      }
      if (attempt >= p.max_retries) break;
      const T grown = lam * p.growth;
      lam = grown > floor ? grown : floor;
    }
    p.damping_out[e] = lam;
    p.ok[e] = good;
    if (good) {
      cholesky_solve_inplace<T, V>(U, ld, inv, n, m, X);
    } else {  // never return a solution from a failed factor
      for (int64_t k = 0; k < n * m; ++k) X[k] = T(0);
    }
  }
}

}  // namespace

int64_t workspace_size(int64_t n, int64_t elem_bytes) {
  const int64_t v = CORP_VEC_BYTES / elem_bytes;
  return n * padded_stride(n, v) + n;
}

void solve_range(const CpuBatch<float>& batch, int64_t begin, int64_t end, float* workspace) {
  solve_range_impl(batch, begin, end, workspace);
}
void solve_range(const CpuBatch<double>& batch, int64_t begin, int64_t end, double* workspace) {
  solve_range_impl(batch, begin, end, workspace);
}

}  // namespace CORP_CPU_NS
}  // namespace corp
