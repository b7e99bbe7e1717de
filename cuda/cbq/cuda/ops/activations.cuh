#pragma once
// silu, relu, gelu (ops/activations.hpp) and swiglu (ops/swiglu.hpp): elementwise grid-stride
// kernels. The device functors evaluate the CPU's formulas in the same order and type (float
// math for float: expf, erff), so results agree to a few ulp.
#include <cbq/ops/activations.hpp>
#include <cbq/ops/swiglu.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {

template <class T>
__device__ inline T sigmoid(T x) {
  return T(1) / (T(1) + device_exp(-x));
}

struct SiluDevice {
  template <class T>
  __device__ static T value(T x) {
    return x * sigmoid(x);
  }
  template <class T>
  __device__ static T derivative(T x) {
    const T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
};

struct ReluDevice {
  template <class T>
  __device__ static T value(T x) {
    return x > T(0) ? x : T(0);
  }
  template <class T>
  __device__ static T derivative(T x) {
    return x > T(0) ? T(1) : T(0);
  }
};

struct GeluDevice {  // exact erf form
  static constexpr double kInvSqrt2 = ops::detail::Gelu::kInvSqrt2;
  static constexpr double kInvSqrt2Pi = ops::detail::Gelu::kInvSqrt2Pi;
  template <class T>
  __device__ static T value(T x) {
    return T(0.5) * x * (T(1) + device_erf(x * T(kInvSqrt2)));
  }
  template <class T>
  __device__ static T derivative(T x) {
    const T cdf = T(0.5) * (T(1) + device_erf(x * T(kInvSqrt2)));
    const T pdf = device_exp(T(-0.5) * x * x) * T(kInvSqrt2Pi);
    return cdf + x * pdf;
  }
};

}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// y[i] = F(x[i]); y, x (n)
template <class T, class F>
__global__ void activation_forward_kernel(T* y, const T* x, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) y[i] = F::value(x[i]);
}

// dx[i] += dy[i] · F'(x[i]); dx, dy, x (n)
template <class T, class F>
__global__ void activation_backward_kernel(T* dx, const T* dy, const T* x, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride())
    dx[i] += dy[i] * F::derivative(x[i]);
}

// y[i] = g[i] · σ(g[i]) · u[i]; y, g, u (n)
template <class T>
__global__ void swiglu_forward_kernel(T* y, const T* g, const T* u, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride())
    y[i] = g[i] * detail::sigmoid(g[i]) * u[i];
}

// With s = σ(g): dg[i] += dy·u·s·(1 + g·(1 − s)), du[i] += dy·g·s; dg or du may be null
template <class T>
__global__ void swiglu_backward_kernel(T* dg, T* du, const T* dy, const T* g, const T* u,
                                       int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T s = detail::sigmoid(g[i]);
    if (dg) dg[i] += dy[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
    if (du) du[i] += dy[i] * g[i] * s;
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T, class F>
void activation_forward(T* y, const T* x, int64_t n) {
  if (n <= 0) return;
  activation_forward_kernel<T, F>
      <<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(y, x, n);
  CBQ_CUDA_CHECK_LAUNCH("activation_forward_kernel");
}

template <class T, class F>
void activation_backward(T* dx, const T* dy, const T* x, int64_t n) {
  if (n <= 0) return;
  activation_backward_kernel<T, F>
      <<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(dx, dy, x, n);
  CBQ_CUDA_CHECK_LAUNCH("activation_backward_kernel");
}

template <class T>
void swiglu_forward(T* y, const T* g, const T* u, int64_t n) {
  if (n <= 0) return;
  swiglu_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      y, g, u, n);
  CBQ_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

template <class T>
void swiglu_backward(T* dg, T* du, const T* dy, const T* g, const T* u, int64_t n) {
  if (n <= 0 || (!dg && !du)) return;
  swiglu_backward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      dg, du, dy, g, u, n);
  CBQ_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

namespace detail {

template <class T, class HostF, class DeviceF>
void register_activation() {
  ops::CudaActivation<T, HostF>::forward = &activation_forward<T, DeviceF>;
  ops::CudaActivation<T, HostF>::backward = &activation_backward<T, DeviceF>;
}

inline const bool activations_registered = [] {
  register_activation<float, ops::detail::Silu, SiluDevice>();
  register_activation<double, ops::detail::Silu, SiluDevice>();
  register_activation<float, ops::detail::Relu, ReluDevice>();
  register_activation<double, ops::detail::Relu, ReluDevice>();
  register_activation<float, ops::detail::Gelu, GeluDevice>();
  register_activation<double, ops::detail::Gelu, GeluDevice>();
  ops::CudaSwiglu<float>::forward = &swiglu_forward<float>;
  ops::CudaSwiglu<float>::backward = &swiglu_backward<float>;
  ops::CudaSwiglu<double>::forward = &swiglu_forward<double>;
  ops::CudaSwiglu<double>::backward = &swiglu_backward<double>;
  return true;
}();

}  // namespace detail

}  // namespace cbq::cuda
