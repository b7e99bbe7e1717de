#pragma once
// add: out = a + b, elementwise (ops/add.hpp). The backward pass is two axpy calls
// (common.cuh), so only the forward kernel lives here.
#include <cbq/ops/add.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// out[i] = a[i] + b[i]; out, a, b (n)
template <class T>
__global__ void add_forward_kernel(T* out, const T* a, const T* b, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) out[i] = a[i] + b[i];
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void add_forward(T* out, const T* a, const T* b, int64_t n) {
  if (n <= 0) return;
  add_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      out, a, b, n);
  CBQ_CUDA_CHECK_LAUNCH("add_forward_kernel");
}

namespace detail {
inline const bool add_registered = [] {
  ops::CudaAdd<float>::forward = &add_forward<float>;
  ops::CudaAdd<double>::forward = &add_forward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
