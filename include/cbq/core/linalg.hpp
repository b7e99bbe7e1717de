#pragma once
// Dense symmetric positive-definite helpers in double on top of CBLAS: a blocked right-looking
// Cholesky factorisation (dtrsm + dsyrk), the inverse of a lower-triangular factor, the
// "upper Cholesky factor of the inverse" GPTQ needs, and the symmetric eigendecomposition
// (LAPACK's dsyevd, which OpenBLAS ships) behind the fitted R4's matrix square root. Matrices are
// row-major with a leading dimension; only the lower triangle of a symmetric input is read.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// LAPACK (Fortran calling convention), as exported by OpenBLAS.
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda,
                        double* w, double* work, const int* lwork, int* iwork, const int* liwork,
                        int* info);

namespace cbq::linalg {

// Where a Cholesky factorisation stopped: the column whose pivot (the diagonal entry after the
// updates of the previous columns) was not a positive finite number. column < 0 means success.
struct PivotFailure {
  int64_t column = -1;
  double pivot = 0;
  bool failed() const { return column >= 0; }
};

// Unblocked lower Cholesky of the n×n block at `a` (lower triangle read and written).
// `offset` is added to the reported column so blocked callers report global columns.
inline PivotFailure cholesky_lower_unblocked(double* a, int64_t n, int64_t lda,
                                             int64_t offset = 0) {
  for (int64_t j = 0; j < n; ++j) {
    double* aj = a + j * lda;
    double d = aj[j];
    for (int64_t k = 0; k < j; ++k) d -= aj[k] * aj[k];
    if (!(d > 0) || !std::isfinite(d)) return {offset + j, d};
    d = std::sqrt(d);
    aj[j] = d;
    for (int64_t i = j + 1; i < n; ++i) {
      double* ai = a + i * lda;
      double s = ai[j];
      for (int64_t k = 0; k < j; ++k) s -= ai[k] * aj[k];
      ai[j] = s / d;
    }
  }
  return {};
}

// In-place lower Cholesky A = L·Lᵀ of the n×n symmetric matrix at `a` (lower triangle read);
// on success the strict upper triangle is zeroed so `a` holds exactly L.
// Blocked right-looking: factor a diagonal block, solve the panel below it (dtrsm), update the
// trailing matrix (dsyrk). O(n³/3) flops, almost all of them in BLAS-3.
inline PivotFailure cholesky_lower(double* a, int64_t n, int64_t lda, int64_t block = 64) {
  for (int64_t k = 0; k < n; k += block) {
    const int64_t kb = std::min(block, n - k);
    double* akk = a + k * lda + k;
    PivotFailure f = cholesky_lower_unblocked(akk, kb, lda, k);
    if (f.failed()) return f;
    const int64_t m = n - k - kb;
    if (m == 0) break;
    double* panel = a + (k + kb) * lda + k;  // (m, kb)
    // panel := panel · L_kk⁻ᵀ
    cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit,
                static_cast<int>(m), static_cast<int>(kb), 1.0, akk, static_cast<int>(lda), panel,
                static_cast<int>(lda));
    // A22 -= panel · panelᵀ (lower triangle)
    cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, static_cast<int>(m), static_cast<int>(kb),
                -1.0, panel, static_cast<int>(lda), 1.0, a + (k + kb) * lda + (k + kb),
                static_cast<int>(lda));
  }
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * lda + i + 1, a + i * lda + n, 0.0);
  return {};
}

// X = L⁻¹ for a lower-triangular n×n L (row-major, leading dimension n); X is lower-triangular.
inline void invert_lower(const double* l, int64_t n, std::vector<double>& x) {
  x.assign(static_cast<std::size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) x[static_cast<std::size_t>(i * n + i)] = 1.0;
  if (n == 0) return;
  cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<int>(n),
              static_cast<int>(n), 1.0, l, static_cast<int>(n), x.data(), static_cast<int>(n));
}

// Result of inverse_cholesky_upper: stage 1 = factoring H failed, stage 2 = factoring H⁻¹
// failed (numerically; H is too ill-conditioned). stage 0 = success.
struct InverseCholeskyStatus {
  int stage = 0;
  PivotFailure failure;
};

// Given a symmetric positive-definite n×n H (row-major, lower triangle read; overwritten), writes
// into `u` the upper-triangular U with H⁻¹ = Uᵀ·U (row-major n×n, strict lower part zero) —
// torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).
inline InverseCholeskyStatus inverse_cholesky_upper(double* h, int64_t n, std::vector<double>& u) {
  PivotFailure f = cholesky_lower(h, n, n);
  if (f.failed()) return {1, f};
  std::vector<double> linv;
  invert_lower(h, n, linv);
  // H⁻¹ = L⁻ᵀ·L⁻¹ (lower triangle into h).
  cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, static_cast<int>(n), static_cast<int>(n), 1.0,
              linv.data(), static_cast<int>(n), 0.0, h, static_cast<int>(n));
  f = cholesky_lower(h, n, n);
  if (f.failed()) return {2, f};
  u.assign(static_cast<std::size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) u[static_cast<std::size_t>(j * n + i)] = h[i * n + j];
  return {};
}

// Eigendecomposition of a symmetric n×n A (row-major; only its lower triangle is read):
// A = V·diag(w)·Vᵀ, eigenvalues ascending, V row-major with eigenvector j
// in column j. Returns LAPACK's info (0: converged).
inline int symmetric_eigen(const double* a, int64_t n, std::vector<double>& w,
                           std::vector<double>& v) {
  w.assign(static_cast<std::size_t>(n), 0.0);
  v.assign(a, a + n * n);  // LAPACK's upper triangle in column-major order is our lower one
  if (n == 0) return 0;
  const int nn = static_cast<int>(n);
  int info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0;
  dsyevd_("V", "U", &nn, v.data(), &nn, w.data(), &work_query, &lwork, &iwork_query, &liwork,
          &info);
  if (info != 0) return info;
  lwork = static_cast<int>(work_query);
  liwork = iwork_query;
  std::vector<double> work(static_cast<std::size_t>(std::max(lwork, 1)));
  std::vector<int> iwork(static_cast<std::size_t>(std::max(liwork, 1)));
  dsyevd_("V", "U", &nn, v.data(), &nn, w.data(), work.data(), &lwork, iwork.data(), &liwork,
          &info);
  // LAPACK's column-major V: column j is eigenvector j, i.e. row j of the row-major array.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) std::swap(v[i * n + j], v[j * n + i]);
  return info;
}

}  // namespace cbq::linalg
