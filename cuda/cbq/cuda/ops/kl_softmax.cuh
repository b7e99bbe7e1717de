#pragma once
// kl_softmax (ops/kl_softmax.hpp): KL(softmax(a/τ) ‖ softmax(b/τ)) over the last (hidden)
// dimension, mean over rows. One block per row: the row maxima (exact in T), the shifts
// log Σ exp((x − max)/τ) and KL_r in double, as the CPU; the mean over rows is the
// deterministic two-pass sum_all of the saved KL_r (rounded to T, as the CPU sums them).
#include <cbq/ops/kl_softmax.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// term(r) = saved[3r + 2] (KL_r) in double
template <class T>
struct KlRowTerm {
  const T* saved;
  __device__ double operator()(int64_t r) const { return static_cast<double>(saved[3 * r + 2]); }
};

// Block-wide maxima of two rows (every thread gets both).
template <class T>
__device__ inline void block_row_maxima(const T* ar, const T* br, int64_t n, T* scratch,
                                        double& max_a, double& max_b) {
  T ma = device_lowest<T>(), mb = device_lowest<T>();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    ma = device_max(ma, ar[j]);
    mb = device_max(mb, br[j]);
  }
  max_a = static_cast<double>(block_max(ma, scratch));
  max_b = static_cast<double>(block_max(mb, scratch));
}
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// saved (rows, 3) = shift_a, shift_b, KL_r; a, b (rows, n)
template <class T>
__global__ void kl_softmax_forward_kernel(T* saved, const T* a, const T* b, int64_t rows, int64_t n,
                                          double inv_tau) {
  __shared__ T max_scratch[32];
  __shared__ double sum_scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* ar = a + row * n;
    const T* br = b + row * n;
    double max_a, max_b;
    detail::block_row_maxima(ar, br, n, max_scratch, max_a, max_b);
    double sa = 0, sb = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      sa += detail::device_exp((static_cast<double>(ar[j]) - max_a) * inv_tau);
      sb += detail::device_exp((static_cast<double>(br[j]) - max_b) * inv_tau);
    }
    const double shift_a = detail::device_log(detail::block_sum(sa, sum_scratch));
    const double shift_b = detail::device_log(detail::block_sum(sb, sum_scratch));
    double kl = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const double log_p = (static_cast<double>(ar[j]) - max_a) * inv_tau - shift_a;
      const double log_q = (static_cast<double>(br[j]) - max_b) * inv_tau - shift_b;
      kl += detail::device_exp(log_p) * (log_p - log_q);
    }
    kl = detail::block_sum(kl, sum_scratch);
    if (threadIdx.x == 0) {
      saved[3 * row] = static_cast<T>(shift_a);
      saved[3 * row + 1] = static_cast<T>(shift_b);
      saved[3 * row + 2] = static_cast<T>(kl);
    }
  }
}

// With c = g[0] / (rows · τ), d_j = log p_j − log q_j (from the saved shifts):
//   da (rows, n) += c · p_j (d_j − KL_r),  db (rows, n) += c · (q_j − p_j);  da or db may be null
template <class T>
__global__ void kl_softmax_backward_kernel(T* da, T* db, const T* g, const T* a, const T* b,
                                           const T* saved, int64_t rows, int64_t n,
                                           double inv_tau) {
  __shared__ T max_scratch[32];
  const double coef = static_cast<double>(g[0]) * inv_tau / static_cast<double>(rows);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* ar = a + row * n;
    const T* br = b + row * n;
    double max_a, max_b;
    detail::block_row_maxima(ar, br, n, max_scratch, max_a, max_b);
    const double shift_a = static_cast<double>(saved[3 * row]);
    const double shift_b = static_cast<double>(saved[3 * row + 1]);
    const double kl = static_cast<double>(saved[3 * row + 2]);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const double log_p = (static_cast<double>(ar[j]) - max_a) * inv_tau - shift_a;
      const double log_q = (static_cast<double>(br[j]) - max_b) * inv_tau - shift_b;
      const double p = detail::device_exp(log_p);
      if (da) da[row * n + j] += static_cast<T>(coef * p * (log_p - log_q - kl));
      if (db) db[row * n + j] += static_cast<T>(coef * (detail::device_exp(log_q) - p));
    }
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void kl_softmax_forward(T* out, T* saved, const T* a, const T* b, int64_t rows, int64_t n,
                        double inv_tau) {
  if (rows <= 0) return;
  kl_softmax_forward_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                              detail::current_stream()>>>(saved, a, b, rows, n, inv_tau);
  CBQ_CUDA_CHECK_LAUNCH("kl_softmax_forward_kernel");
  detail::sum_all(out, detail::KlRowTerm<T>{saved}, rows, static_cast<double>(rows));
}

template <class T>
void kl_softmax_backward(T* da, T* db, const T* g, const T* a, const T* b, const T* saved,
                         int64_t rows, int64_t n, double inv_tau) {
  if (rows <= 0 || n <= 0 || (!da && !db)) return;
  kl_softmax_backward_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                               detail::current_stream()>>>(da, db, g, a, b, saved, rows, n,
                                                           inv_tau);
  CBQ_CUDA_CHECK_LAUNCH("kl_softmax_backward_kernel");
}

namespace detail {
inline const bool kl_div_registered = [] {
  ops::CudaKlSoftmax<float>::forward = &kl_softmax_forward<float>;
  ops::CudaKlSoftmax<float>::backward = &kl_softmax_backward<float>;
  ops::CudaKlSoftmax<double>::forward = &kl_softmax_forward<double>;
  ops::CudaKlSoftmax<double>::backward = &kl_softmax_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
