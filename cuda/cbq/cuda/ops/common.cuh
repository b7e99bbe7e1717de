#pragma once
// axpy, the gradient accumulation every backward uses (ops::accumulate → CudaCommon<T>::axpy).
#include <cbq/ops/common.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// y[i] += alpha * x[i]; y, x (n)
template <class T>
__global__ void axpy_kernel(T* y, const T* x, T alpha, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) y[i] += alpha * x[i];
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void axpy(T* y, const T* x, T alpha, int64_t n) {
  if (n <= 0) return;
  axpy_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(y, x,
                                                                                         alpha, n);
  CBQ_CUDA_CHECK_LAUNCH("axpy_kernel");
}

namespace detail {
inline const bool common_registered = [] {
  ops::CudaCommon<float>::axpy = &axpy<float>;
  ops::CudaCommon<double>::axpy = &axpy<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
