#pragma once
// Row-major GEMM through a CBLAS (OpenBLAS in our builds), for float and double.
// C (M, N) = alpha * op(A) (M, K) * op(B) (K, N) + beta * C.
//
// Threads: cbq's pool (parallel.hpp) owns the CPU. On first use OpenBLAS is set to one thread,
// and a GEMM large enough to share is split into one block of C per pool thread (along the
// larger of M and N), each block a single-threaded OpenBLAS call. OpenBLAS's own workers spin
// with sched_yield for a long while after every call; beside a second pool on a small machine
// they took a third of the CPU time of a CBQ step. Inside a parallel region (attention tiles,
// per-row kernels) every GEMM runs on the calling thread. Each element of C is computed by one
// single-threaded call whatever the split, so results do not depend on the thread count beyond
// OpenBLAS's own kernel choice for the block shape.
// With a CBLAS other than OpenBLAS (no openblas_set_num_threads) nothing is split: that library
// threads its own GEMMs.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "cbq/core/error.hpp"
#include "cbq/core/openblas_core.hpp"
#include "cbq/core/parallel.hpp"

// Weak, so that a CBLAS other than OpenBLAS still links.
extern "C" __attribute__((weak)) void openblas_set_num_threads(int);

namespace cbq {

namespace blas {

namespace detail {

// Multiply-adds (m·n·k) from which a GEMM is split over the pool: below it one call is faster
// than the hand-off (a 64³ GEMM takes a few microseconds).
inline constexpr double kParallelGemmWork = 64.0 * 64.0 * 64.0;
// Split points are multiples of this many rows or columns (whole SIMD registers and cache lines).
inline constexpr int64_t kSplitAlign = 16;

// True when OpenBLAS has been set to one thread, so that cbq may split GEMMs itself. The first
// call also warns (one line on stderr) when OpenBLAS runs generic kernels on a CPU with better
// ones (openblas_core.hpp; programs correct it with use_best_blas_kernels at start-up).
inline bool owns_blas_threads() {
  static const bool owned = [] {
    if (const std::string warning = generic_core_warning(); !warning.empty())
      std::fprintf(stderr, "%s\n", warning.c_str());
    if (!openblas_set_num_threads) return false;
    openblas_set_num_threads(1);
    return true;
  }();
  return owned;
}

template <class T>
void gemm_call(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
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

}  // namespace detail

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "cbq::blas::gemm supports float and double");
  if (m == 0 || n == 0) return;
  const bool owned = detail::owns_blas_threads();
  const int threads = cbq::detail::in_parallel_region ? 1 : num_threads();
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t parts = std::min<int64_t>(threads, extent / detail::kSplitAlign);
  if (!owned || parts < 2 ||
      static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) <
          detail::kParallelGemmWork) {
    detail::gemm_call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int64_t units = (extent + detail::kSplitAlign - 1) / detail::kSplitAlign;
  parallel_for(parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t begin = std::min(extent, units * p / parts * detail::kSplitAlign);
      const int64_t end = std::min(extent, units * (p + 1) / parts * detail::kSplitAlign);
      if (begin >= end) continue;
      if (split_rows)  // rows [begin, end) of op(A) and C
        detail::gemm_call(trans_a, trans_b, end - begin, n, k, alpha,
                          trans_a ? a + begin : a + begin * lda, lda, b, ldb, beta, c + begin * ldc,
                          ldc);
      else  // columns [begin, end) of op(B) and C
        detail::gemm_call(trans_a, trans_b, m, end - begin, k, alpha, a, lda,
                          trans_b ? b + begin * ldb : b + begin, ldb, beta, c + begin, ldc);
    }
  });
}

// One GEMM of a batch (the arguments of gemm above).
template <class T>
struct GemmArgs {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  T alpha = T(1);
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;
  int64_t ldb = 0;
  T beta = T(0);
  T* c = nullptr;
  int64_t ldc = 0;
};

// Most GEMMs one gemm_batch call takes.
inline constexpr int kMaxGemmBatch = 8;

template <class T>
void gemm(const GemmArgs<T>& g) {
  gemm<T>(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta, g.c, g.ldc);
}

template <class T>
GemmArgs<T> gemm_args(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                      const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  return {trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc};
}

// Independent GEMMs (no C overlaps another's inputs or C) run side by side: their work is laid
// end to end and cut into one equal share per pool thread at multiples of kSplitAlign rows or
// columns, so a thread runs whole GEMMs where the shares allow (two equal GEMMs on two threads:
// one each, as one-thread calls) and a block of one otherwise. Small GEMMs side by side waste
// less than each split in two, where every block packs the shared operand again and waits for
// the other (docs/PERFORMANCE.md, change 6). Falls back to gemm() one by one when the pool is
// not cbq's to use (inside a parallel region, one thread, no OpenBLAS).
template <class T>
void gemm_batch(const GemmArgs<T>* gemms, int count) {
  auto one_by_one = [&] {
    for (int i = 0; i < count; ++i) gemm(gemms[i]);
  };
  const int threads = cbq::detail::in_parallel_region ? 1 : num_threads();
  if (count < 2 || threads < 2 || !detail::owns_blas_threads()) return one_by_one();
  CBQ_CHECK(count <= kMaxGemmBatch, "blas::gemm_batch: {} GEMMs, at most {}", count, kMaxGemmBatch);
  double start[kMaxGemmBatch + 1] = {0};
  int64_t units[kMaxGemmBatch];
  for (int i = 0; i < count; ++i) {
    const GemmArgs<T>& g = gemms[i];
    const double work =
        static_cast<double>(g.m) * static_cast<double>(g.n) * static_cast<double>(g.k);
    if (work <= 0) return one_by_one();  // empty C or k = 0 (C = beta·C): nothing to share
    units[i] = (std::max(g.m, g.n) + detail::kSplitAlign - 1) / detail::kSplitAlign;
    start[i + 1] = start[i] + work;
  }
  const double total = start[count];
  if (total < detail::kParallelGemmWork * count) return one_by_one();
  // Unit boundary of GEMM i at global work position x (the same arithmetic for both sides of
  // every cut, so the blocks tile each C exactly).
  auto unit_at = [&](int i, double x) {
    const double span = start[i + 1] - start[i];
    if (span <= 0 || x <= start[i]) return int64_t{0};
    if (x >= start[i + 1]) return units[i];
    return std::clamp<int64_t>(std::llround((x - start[i]) / span * static_cast<double>(units[i])),
                               0, units[i]);
  };
  parallel_for(threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const double lo = total * static_cast<double>(t) / threads;
      const double hi = total * static_cast<double>(t + 1) / threads;
      for (int i = 0; i < count; ++i) {
        const GemmArgs<T>& g = gemms[i];
        const bool split_rows = g.m >= g.n;
        const int64_t extent = split_rows ? g.m : g.n;
        const int64_t begin = std::min(extent, unit_at(i, lo) * detail::kSplitAlign);
        const int64_t end = std::min(extent, unit_at(i, hi) * detail::kSplitAlign);
        if (begin >= end) continue;
        if (split_rows)
          detail::gemm_call(g.trans_a, g.trans_b, end - begin, g.n, g.k, g.alpha,
                            g.trans_a ? g.a + begin : g.a + begin * g.lda, g.lda, g.b, g.ldb,
                            g.beta, g.c + begin * g.ldc, g.ldc);
        else
          detail::gemm_call(g.trans_a, g.trans_b, g.m, end - begin, g.k, g.alpha, g.a, g.lda,
                            g.trans_b ? g.b + begin * g.ldb : g.b + begin, g.ldb, g.beta,
                            g.c + begin, g.ldc);
      }
    }
  });
}

}  // namespace blas

// Sets the number of CPU threads cbq uses (its pool; OpenBLAS stays at one thread, see above).
inline void set_num_threads(int threads) {
  set_pool_threads(threads);
  if (blas::detail::owns_blas_threads()) openblas_set_num_threads(1);
}

}  // namespace cbq
