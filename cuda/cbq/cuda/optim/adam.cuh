#pragma once
// Adam (optim/adam.hpp), registered as optim::CudaAdam: one fused update per element,
//   m ← β1·m + (1 − β1)·g,  v ← β2·v + (1 − β2)·g·g,
//   p ← p − lr_scale · lr·(m/bc1) / (sqrt(v/bc2) + ε)
// with the parameter's own type for the values and moments (fp32 master values for float). The
// CPU's expressions in the CPU's order with _rn operations (no FMA contraction): the parameters
// and moments equal the CPU's bit for bit.
#include <cbq/optim/adam.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// param, m, v, grad, lr_scale (n); lr_scale may be null (1)
template <class T>
__global__ void adam_step_kernel(T* param, T* m, T* v, const T* grad, const T* lr_scale, int64_t n,
                                 T lr, T beta1, T beta2, T eps, T bias_correction1,
                                 T bias_correction2) {
  using namespace qmath;
  const T one_minus_beta1 = sub(T(1), beta1), one_minus_beta2 = sub(T(1), beta2);
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T g = grad[i];
    const T mi = add(mul(beta1, m[i]), mul(one_minus_beta1, g));
    const T vi = add(mul(beta2, v[i]), mul(mul(one_minus_beta2, g), g));
    m[i] = mi;
    v[i] = vi;
    const T update =
        div(mul(lr, div(mi, bias_correction1)), add(sqrt_rn(div(vi, bias_correction2)), eps));
    param[i] = sub(param[i], lr_scale ? mul(lr_scale[i], update) : update);
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void adam_step(T* param, T* m, T* v, const T* grad, const T* lr_scale, int64_t n, T lr, T beta1,
               T beta2, T eps, T bias_correction1, T bias_correction2) {
  if (n <= 0) return;
  adam_step_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      param, m, v, grad, lr_scale, n, lr, beta1, beta2, eps, bias_correction1, bias_correction2);
  CBQ_CUDA_CHECK_LAUNCH("adam_step_kernel");
}

namespace detail {
inline const bool adam_registered = [] {
  optim::CudaAdam<float>::step = &adam_step<float>;
  optim::CudaAdam<double>::step = &adam_step<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
