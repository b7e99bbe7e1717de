#pragma once
// softmax and log_softmax over the last dimension (ops/softmax.hpp). One block per row
// (kRowBlockSize threads, rows beyond the grid loop): the row maximum (exact in T), then
// shift = log Σ_j exp(x_j − max) accumulated in double, then y_j from (x_j − max) − shift in
// double, exactly the CPU's formula; the backward row sums are in double as well. Sums use the
// fixed-order block reduction, so results are deterministic.
#include <cbq/ops/softmax.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// y (rows, n) = softmax(x) or log_softmax(x) per row; x (rows, n)
template <class T>
__global__ void softmax_forward_kernel(T* y, const T* x, int64_t rows, int64_t n, bool log) {
  __shared__ T max_scratch[32];
  __shared__ double sum_scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    T m = detail::device_lowest<T>();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = detail::device_max(m, xr[j]);
    const double row_max = static_cast<double>(detail::block_max(m, max_scratch));
    double s = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      s += detail::device_exp(static_cast<double>(xr[j]) - row_max);
    const double shift = detail::device_log(detail::block_sum(s, sum_scratch));
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const double log_p = (static_cast<double>(xr[j]) - row_max) - shift;
      yr[j] = static_cast<T>(log ? log_p : detail::device_exp(log_p));
    }
  }
}

// dx (rows, n) += softmax: y ⊙ (g − Σ g y);  log_softmax: g − exp(y) · Σ g.
// y (the forward output), g (rows, n)
template <class T>
__global__ void softmax_backward_kernel(T* dx, const T* y, const T* g, int64_t rows, int64_t n,
                                        bool log) {
  __shared__ double sum_scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* yr = y + row * n;
    const T* gr = g + row * n;
    T* dr = dx + row * n;
    double acc = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      acc += log ? static_cast<double>(gr[j]) : static_cast<double>(gr[j]) * yr[j];
    acc = detail::block_sum(acc, sum_scratch);
    if (log) {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        dr[j] += gr[j] - static_cast<T>(detail::device_exp(static_cast<double>(yr[j])) * acc);
    } else {
      const T dot = static_cast<T>(acc);
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dr[j] += yr[j] * (gr[j] - dot);
    }
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void softmax_forward(T* y, const T* x, int64_t rows, int64_t n, bool log) {
  if (rows <= 0 || n <= 0) return;
  softmax_forward_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                           detail::current_stream()>>>(y, x, rows, n, log);
  CBQ_CUDA_CHECK_LAUNCH("softmax_forward_kernel");
}

template <class T>
void softmax_backward(T* dx, const T* y, const T* g, int64_t rows, int64_t n, bool log) {
  if (rows <= 0 || n <= 0) return;
  softmax_backward_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                            detail::current_stream()>>>(dx, y, g, rows, n, log);
  CBQ_CUDA_CHECK_LAUNCH("softmax_backward_kernel");
}

namespace detail {
inline const bool softmax_registered = [] {
  ops::CudaSoftmax<float>::forward = &softmax_forward<float>;
  ops::CudaSoftmax<float>::backward = &softmax_backward<float>;
  ops::CudaSoftmax<double>::forward = &softmax_forward<double>;
  ops::CudaSoftmax<double>::backward = &softmax_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
