#pragma once
// The fake quantizers with a learnable step (quant/fake_quant.hpp: fake_quant_weight, and
// fake_quant_act_static, which runs the same op per tensor), registered as quant::CudaStepQuant.
//   forward:  v = x/s_p, r = round(v), q = r + z_p, x̂ = s_p·(clamp(q) − z_p); saves pass, coef
//   backward: dx += G ⊙ pass;  ds_p += g_p · Σ_{i ∈ p} G_i·coef_i
// The forward uses the _rn operations of quant_math.cuh, so x̂, pass and coef equal the CPU's bit
// for bit. The step gradient is reduced per (row, group) by one warp, then (per-tensor) over the
// rows by one block: a fixed order, no atomics.
#include <cbq/quant/fake_quant.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// y, pass, coef (rows, cols) from x (rows, cols) and scale, zero (params; zero may be null).
// pass and coef are written when pass is not null.
template <class T>
__global__ void fake_quant_forward_kernel(T* y, T* pass, T* coef, const T* x, const T* scale,
                                          const T* zero, int64_t rows, qmath::GroupLayout layout,
                                          T qmin, T qmax) {
  using namespace qmath;
  const int64_t n = rows * layout.cols;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const int64_t p = layout.param(i / layout.cols, i % layout.cols);
    const T sp = scale[p], zp = zero ? zero[p] : T(0);
    const T v = div(x[i], sp);
    const T rv = round_even(v);
    const T q = add(rv, zp);
    const T qc = std_clamp(q, qmin, qmax);
    y[i] = mul(sp, sub(qc, zp));
    if (pass) {
      const bool inside = q == qc;
      pass[i] = inside ? T(1) : T(0);
      coef[i] = inside ? sub(rv, v) : sub(qc, zp);
    }
  }
}

// dx[i] += g[i] · pass[i]; dx, g, pass (n)
template <class T>
__global__ void fake_quant_backward_input_kernel(T* dx, const T* g, const T* pass, int64_t n) {
  using namespace qmath;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride())
    dx[i] = add(dx[i], mul(g[i], pass[i]));
}

// partial (rows, groups_per_row) = Σ_{c ∈ group} g[r, c] · coef[r, c]; one warp per group.
template <class T>
__global__ void fake_quant_group_sum_kernel(T* partial, const T* g, const T* coef, int64_t rows,
                                            qmath::GroupLayout layout) {
  const int lane = threadIdx.x % qmath::kWarpSize;
  const int64_t groups = rows * layout.groups_per_row;
  for (int64_t item = qmath::global_warp(); item < groups; item += qmath::warp_stride()) {
    const int64_t r = item / layout.groups_per_row, k = item % layout.groups_per_row;
    const int64_t c0 = k * layout.group_cols, c1 = c0 + layout.group_elements(k);
    const T* gr = g + r * layout.cols;
    const T* cr = coef + r * layout.cols;
    T acc = T(0);
    for (int64_t c = c0 + lane; c < c1; c += qmath::kWarpSize) acc += gr[c] * cr[c];
    acc = qmath::warp_sum(acc);
    if (lane == 0) partial[item] = acc;
  }
}

// ds[p] += lsq_p · partial[p] for per-channel / per-group parameters p < rows·groups_per_row.
// lsq_p = 1/sqrt(N_p·qmax) (N_p = lsq_n when > 0, else the elements of group p), or 1.
template <class T>
__global__ void fake_quant_scale_grad_kernel(T* ds, const T* partial, int64_t rows,
                                             qmath::GroupLayout layout, T qmax, bool lsq,
                                             int64_t lsq_n) {
  using namespace qmath;
  const int64_t params = rows * layout.groups_per_row;
  for (int64_t p = detail::global_index(); p < params; p += detail::grid_stride()) {
    T factor = T(1);
    if (lsq) {
      const int64_t count = lsq_n > 0 ? lsq_n : layout.group_elements(p % layout.groups_per_row);
      factor = div(T(1), sqrt_rn(mul(static_cast<T>(count), qmax)));
    }
    ds[p] = add(ds[p], mul(factor, partial[p]));
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void fake_quant_forward(T* y, T* pass, T* coef, const T* x, const T* scale, const T* zero,
                        int64_t rows, int64_t cols, const quant::GridSpec& spec) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  fake_quant_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                              detail::current_stream()>>>(
      y, pass, coef, x, scale, zero, rows, qmath::group_layout(spec, cols),
      static_cast<T>(spec.qmin()), static_cast<T>(spec.qmax()));
  CBQ_CUDA_CHECK_LAUNCH("fake_quant_forward_kernel");
}

template <class T>
void fake_quant_backward_input(T* dx, const T* g, const T* pass, int64_t n) {
  if (n <= 0) return;
  fake_quant_backward_input_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                                     detail::current_stream()>>>(dx, g, pass, n);
  CBQ_CUDA_CHECK_LAUNCH("fake_quant_backward_input_kernel");
}

template <class T>
void fake_quant_backward_scale(T* ds, T* partial, const T* g, const T* coef, int64_t rows,
                               int64_t cols, const quant::GridSpec& spec, bool lsq, int64_t lsq_n) {
  if (rows <= 0 || cols <= 0) return;
  const qmath::GroupLayout layout = qmath::group_layout(spec, cols);
  const int64_t groups = rows * layout.groups_per_row;
  cudaStream_t stream = detail::current_stream();
  fake_quant_group_sum_kernel<<<qmath::warp_grid_size(groups), detail::kBlockSize, 0, stream>>>(
      partial, g, coef, rows, layout);
  CBQ_CUDA_CHECK_LAUNCH("fake_quant_group_sum_kernel");
  if (layout.per_tensor) {  // one step for everything: Σ over the row sums, in a fixed order
    const int64_t count = lsq_n > 0 ? lsq_n : rows * cols;
    qmath::deterministic_sum(ds, partial, rows, quant::detail::lsq_scale<T>(lsq, count, spec),
                             true);
    return;
  }
  fake_quant_scale_grad_kernel<<<detail::grid_size(groups), detail::kBlockSize, 0, stream>>>(
      ds, partial, rows, layout, static_cast<T>(spec.qmax()), lsq, lsq_n);
  CBQ_CUDA_CHECK_LAUNCH("fake_quant_scale_grad_kernel");
}

namespace detail {
inline const bool fake_quant_registered = [] {
  quant::CudaStepQuant<float>::forward = &fake_quant_forward<float>;
  quant::CudaStepQuant<float>::backward_input = &fake_quant_backward_input<float>;
  quant::CudaStepQuant<float>::backward_scale = &fake_quant_backward_scale<float>;
  quant::CudaStepQuant<double>::forward = &fake_quant_forward<double>;
  quant::CudaStepQuant<double>::backward_input = &fake_quant_backward_input<double>;
  quant::CudaStepQuant<double>::backward_scale = &fake_quant_backward_scale<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
