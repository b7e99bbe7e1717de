#pragma once
// LoRA-Rounding (quant/lora_rounding.hpp), registered as quant::CudaLoraRounding:
//   soft weight  Ŵ = s·(clamp(floor(W/s) + h(V) + z) − z), h the rectified sigmoid (or [h ≥ ½])
//   regulariser  k·Σ (1 − |2h(V) − 1|^β) and its gradient (terms in T, summed in double)
//   AdaRound offset V0 = h⁻¹(W/s − floor(W/s))
// V = A1·A2 (+ V0) is an ops::matmul (cuBLASLt through the GEMM hook), and the soft weight's
// backward is the step quantizer's (fake_quant.cuh). W/s, floor, the clamp and the sums are the
// CPU's operations in the CPU's order (_rn, no FMA); h(V) depends on the device's exp, a few ulps
// away from glibc's.
#include <cbq/quant/lora_rounding.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

namespace lora_detail {

inline constexpr double kRectRange = quant::kRectZeta - quant::kRectGamma;

// quant::rect_sigmoid: h(v) = clamp(σ(v)·(ζ − γ) + γ, 0, 1).
template <class T>
__device__ inline T rect_sigmoid(T v) {
  using namespace qmath;
  const T u = add(mul(sigmoid(v), static_cast<T>(kRectRange)), static_cast<T>(quant::kRectGamma));
  return std_clamp(u, T(0), T(1));
}

// quant::rect_sigmoid_grad: h'(v), 0 where the rectification is flat.
template <class T>
__device__ inline T rect_sigmoid_grad(T v) {
  using namespace qmath;
  const T sg = sigmoid(v);
  const T u = add(mul(sg, static_cast<T>(kRectRange)), static_cast<T>(quant::kRectGamma));
  if (!(u > T(0) && u < T(1))) return T(0);
  return mul(mul(static_cast<T>(kRectRange), sg), sub(T(1), sg));
}

// quant::rect_sigmoid_inverse.
template <class T>
__device__ inline T rect_sigmoid_inverse(T h) {
  using namespace qmath;
  T p = div(sub(h, static_cast<T>(quant::kRectGamma)), static_cast<T>(kRectRange));
  p = std_clamp(p, static_cast<T>(1e-6), sub(T(1), static_cast<T>(1e-6)));
  return log_of(div(p, sub(T(1), p)));
}

// Blocks of the first stage of the regulariser's sum (the second stage is one block).
inline constexpr int64_t kRegBlocks = 256;

}  // namespace lora_detail

// ----------------------------------------------------------------------------
// kernels

// y, dvfac, coef (rows, cols) from w, v (rows, cols), scale, zero (params; zero may be null).
// dvfac and coef are written when dvfac is not null.
template <class T>
__global__ void lora_soft_forward_kernel(T* y, T* dvfac, T* coef, const T* w, const T* v,
                                         const T* scale, const T* zero, int64_t rows,
                                         qmath::GroupLayout layout, T qmin, T qmax, bool hard,
                                         bool v_grad) {
  using namespace qmath;
  const int64_t n = rows * layout.cols;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const int64_t p = layout.param(i / layout.cols, i % layout.cols);
    const T sp = scale[p], zp = zero ? zero[p] : T(0);
    const T x = div(w[i], sp);
    const T f = floor_of(x);
    T h = lora_detail::rect_sigmoid(v[i]);
    if (hard) h = h >= T(0.5) ? T(1) : T(0);
    const T q = add(add(f, h), zp);
    const T qc = std_clamp(q, qmin, qmax);
    y[i] = mul(sp, sub(qc, zp));
    if (dvfac) {
      const bool inside = q == qc;
      dvfac[i] = inside && v_grad ? mul(sp, lora_detail::rect_sigmoid_grad(v[i])) : T(0);
      coef[i] = inside ? sub(add(f, h), x) : sub(qc, zp);
    }
  }
}

// partial[block] = Σ over the block's grid-stride share of (1 − |2h(v) − 1|^β); v (n). Terms in
// T, sums in double (a float sum of a 7B layer's 45M terms would lose digits; see rounding_reg).
template <class T>
__global__ void lora_reg_partial_kernel(double* partial, const T* v, int64_t n, T beta) {
  using namespace qmath;
  double acc = 0;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T a = sub(mul(T(2), lora_detail::rect_sigmoid(v[i])), T(1));
    acc += static_cast<double>(sub(T(1), pow_of(abs_of(a), beta)));
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = T(k · Σ partial), the partials added in a fixed order (one block).
template <class T>
__global__ void lora_reg_finish_kernel(T* out, const double* partial, int64_t count, T k) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = qmath::block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<T>(static_cast<double>(k) * acc);
}

// dv[i] += −2kβ·g[0]·|2h − 1|^(β−1)·sign(2h − 1)·h'(v[i]); dv, v (n), g the output gradient (1)
template <class T>
__global__ void lora_reg_backward_kernel(T* dv, const T* g, const T* v, int64_t n, T beta, T k) {
  using namespace qmath;
  const T kk = mul(mul(mul(T(-2), k), beta), g[0]);
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T hp = lora_detail::rect_sigmoid_grad(v[i]);
    if (hp == T(0)) continue;
    const T a = sub(mul(T(2), lora_detail::rect_sigmoid(v[i])), T(1));
    const T sgn = a > T(0) ? T(1) : (a < T(0) ? T(-1) : T(0));
    dv[i] = add(dv[i], mul(mul(mul(kk, pow_of(abs_of(a), sub(beta, T(1)))), sgn), hp));
  }
}

// v0 (rows, cols) = h⁻¹(W/s − floor(W/s)); w (rows, cols), scale (params)
template <class T>
__global__ void lora_adaround_offset_kernel(T* v0, const T* w, const T* scale, int64_t rows,
                                            qmath::GroupLayout layout) {
  using namespace qmath;
  const int64_t n = rows * layout.cols;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T x = div(w[i], scale[layout.param(i / layout.cols, i % layout.cols)]);
    v0[i] = lora_detail::rect_sigmoid_inverse(sub(x, floor_of(x)));
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void lora_soft_forward(T* y, T* dvfac, T* coef, const T* w, const T* v, const T* scale,
                       const T* zero, int64_t rows, int64_t cols, const quant::GridSpec& spec,
                       bool hard, bool v_grad) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  lora_soft_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                             detail::current_stream()>>>(
      y, dvfac, coef, w, v, scale, zero, rows, qmath::group_layout(spec, cols),
      static_cast<T>(spec.qmin()), static_cast<T>(spec.qmax()), hard, v_grad);
  CBQ_CUDA_CHECK_LAUNCH("lora_soft_forward_kernel");
}

// Two stages with a grid that depends only on n: the same bits on every run.
template <class T>
void lora_reg_forward(T* out, const T* v, int64_t n, T beta, T k) {
  if (n <= 0) return;
  const int64_t blocks =
      std::min<int64_t>(lora_detail::kRegBlocks, (n + detail::kBlockSize - 1) / detail::kBlockSize);
  qmath::DeviceBuffer<double> partial(blocks);
  lora_reg_partial_kernel<<<static_cast<unsigned>(blocks), detail::kBlockSize, 0,
                            detail::current_stream()>>>(partial.get(), v, n, beta);
  CBQ_CUDA_CHECK_LAUNCH("lora_reg_partial_kernel");
  lora_reg_finish_kernel<<<1, detail::kBlockSize, 0, detail::current_stream()>>>(out, partial.get(),
                                                                                 blocks, k);
  CBQ_CUDA_CHECK_LAUNCH("lora_reg_finish_kernel");
}

template <class T>
void lora_reg_backward(T* dv, const T* g, const T* v, int64_t n, T beta, T k) {
  if (n <= 0) return;
  lora_reg_backward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                             detail::current_stream()>>>(dv, g, v, n, beta, k);
  CBQ_CUDA_CHECK_LAUNCH("lora_reg_backward_kernel");
}

template <class T>
void lora_adaround_offset(T* v0, const T* w, const T* scale, int64_t rows, int64_t cols,
                          const quant::GridSpec& spec) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  lora_adaround_offset_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                                detail::current_stream()>>>(v0, w, scale, rows,
                                                            qmath::group_layout(spec, cols));
  CBQ_CUDA_CHECK_LAUNCH("lora_adaround_offset_kernel");
}

namespace detail {
inline const bool lora_rounding_registered = [] {
  quant::CudaLoraRounding<float>::soft_forward = &lora_soft_forward<float>;
  quant::CudaLoraRounding<float>::reg_forward = &lora_reg_forward<float>;
  quant::CudaLoraRounding<float>::reg_backward = &lora_reg_backward<float>;
  quant::CudaLoraRounding<float>::adaround_offset = &lora_adaround_offset<float>;
  quant::CudaLoraRounding<double>::soft_forward = &lora_soft_forward<double>;
  quant::CudaLoraRounding<double>::reg_forward = &lora_reg_forward<double>;
  quant::CudaLoraRounding<double>::reg_backward = &lora_reg_backward<double>;
  quant::CudaLoraRounding<double>::adaround_offset = &lora_adaround_offset<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
