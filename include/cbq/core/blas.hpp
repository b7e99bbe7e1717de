#pragma once
// Row-major GEMM through a CBLAS (OpenBLAS in our builds), for float and double.
// C (M, N) = alpha * op(A) (M, K) * op(B) (K, N) + beta * C.
#include <cblas.h>

#include <cstdint>
#include <type_traits>

#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"

// Weak, so that a CBLAS other than OpenBLAS still links; then only our pool is resized.
extern "C" __attribute__((weak)) void openblas_set_num_threads(int);

namespace cbq {

namespace blas {

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "cbq::blas::gemm supports float and double");
  if (m == 0 || n == 0) return;
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb),
                beta, c, static_cast<int>(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb),
                beta, c, static_cast<int>(ldc));
  }
}

}  // namespace blas

// Sets the number of CPU threads for both cbq's pool and OpenBLAS.
inline void set_num_threads(int threads) {
  set_pool_threads(threads);
  if (openblas_set_num_threads) openblas_set_num_threads(threads);
}

}  // namespace cbq
