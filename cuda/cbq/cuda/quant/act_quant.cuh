#pragma once
// The dynamic per-token activation quantizer (quant/act_quant.hpp, fake_quant_act_per_token),
// registered as quant::CudaActQuant. The static per-tensor quantizer runs on the step-quantizer
// kernels of fake_quant.cuh.
//
// One warp per token row. The forward finds the row's extremes with the CPU's rule (the first
// element strictly above 0 / below 0 that sets the max / min), evaluates the token grid
// (detail::token_grid) with the _rn operations of quant_math.cuh, and quantizes: steps,
// zero-points and codes equal the CPU's bit for bit. The backward sums each row's A and Z in a
// fixed warp order and the clip-logit gradient over rows in one block: deterministic.
#include <cbq/quant/act_quant.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

namespace act_detail {

// The larger of two (value, index) candidates for an argmax; equal values keep the smaller index
// (the first occurrence). Index −1 goes with value 0 only (the 0 floor), so it never ties with a
// real element.
template <class T>
__device__ inline void take_max(T& value, int64_t& index, T other_value, int64_t other_index) {
  if (other_value > value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}
template <class T>
__device__ inline void take_min(T& value, int64_t& index, T other_value, int64_t other_index) {
  if (other_value < value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}

template <class T>
__device__ inline void warp_argmax(T& value, int64_t& index) {
  for (int offset = qmath::kWarpSize / 2; offset > 0; offset /= 2) {
    const T v = __shfl_xor_sync(qmath::kFullMask, value, offset);
    const int64_t i = __shfl_xor_sync(qmath::kFullMask, index, offset);
    take_max(value, index, v, i);
  }
}
template <class T>
__device__ inline void warp_argmin(T& value, int64_t& index) {
  for (int offset = qmath::kWarpSize / 2; offset > 0; offset /= 2) {
    const T v = __shfl_xor_sync(qmath::kFullMask, value, offset);
    const int64_t i = __shfl_xor_sync(qmath::kFullMask, index, offset);
    take_min(value, index, v, i);
  }
}

}  // namespace act_detail

// ----------------------------------------------------------------------------
// kernels

// y, pass, coef (rows, d), rowsave (rows, kTokenSaved) from x (rows, d); one warp per row.
// pass, coef and rowsave are written when pass is not null. alpha = σ(c), computed on the host.
template <class T>
__global__ void act_per_token_forward_kernel(T* y, T* pass, T* coef, T* rowsave, const T* x,
                                             int64_t rows, int64_t d, T alpha, T qmin, T qmax,
                                             bool symmetric) {
  using namespace qmath;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = global_warp(); r < rows; r += warp_stride()) {
    const T* xr = x + r * d;
    // The token grid, as detail::token_grid.
    T s = T(0), z = T(0), ds_dc = T(0), ds_dhi = T(0), ds_dlo = T(0), dz_dhi = T(0), dz_dlo = T(0);
    int64_t ihi = -1, ilo = -1;
    const T dalpha = mul(alpha, sub(T(1), alpha));
    if (symmetric) {
      T m = T(0);
      for (int64_t c = lane; c < d; c += kWarpSize)
        if (abs_of(xr[c]) > m) {
          m = abs_of(xr[c]);
          ihi = c;
        }
      act_detail::warp_argmax(m, ihi);
      s = div(mul(m, alpha), qmax);
      if (!(s > min_step<T>())) {
        s = min_step<T>();
        ihi = -1;
      } else {
        ds_dc = mul(div(m, qmax), dalpha);
        ds_dhi = div(mul(xr[ihi] >= T(0) ? T(1) : T(-1), alpha), qmax);
      }
    } else {
      T lo = T(0), hi = T(0);
      for (int64_t c = lane; c < d; c += kWarpSize) {
        if (xr[c] > hi) {
          hi = xr[c];
          ihi = c;
        }
        if (xr[c] < lo) {
          lo = xr[c];
          ilo = c;
        }
      }
      act_detail::warp_argmax(hi, ihi);
      act_detail::warp_argmin(lo, ilo);
      const T range = sub(hi, lo);
      s = div(mul(range, alpha), qmax);
      if (!(s > min_step<T>())) {  // a (nearly) constant row: fixed minimum step
        s = min_step<T>();
        z = std_clamp(round_even(div(-lo, s)), T(0), qmax);
        ihi = ilo = -1;
      } else {
        z = std_clamp(round_even(div(mul(-lo, qmax), range)), T(0), qmax);
        ds_dc = mul(div(range, qmax), dalpha);
        ds_dhi = div(alpha, qmax);
        ds_dlo = div(-alpha, qmax);
        const T range2 = mul(range, range);
        dz_dhi = div(mul(lo, qmax), range2);
        dz_dlo = div(mul(-hi, qmax), range2);
      }
    }
    T* yr = y + r * d;
    for (int64_t c = lane; c < d; c += kWarpSize) {
      const T v = div(xr[c], s);
      const T rv = round_even(v);
      const T q = add(rv, z);
      const T qc = std_clamp(q, qmin, qmax);
      yr[c] = mul(s, sub(qc, z));
      if (pass) {
        const bool inside = q == qc;
        pass[r * d + c] = inside ? T(1) : T(0);
        coef[r * d + c] = inside ? sub(rv, v) : sub(qc, z);
      }
    }
    if (pass && lane == 0) {
      T* sv = rowsave + r * quant::detail::kTokenSaved;
      sv[0] = ds_dc;
      sv[1] = ds_dhi;
      sv[2] = ds_dlo;
      sv[3] = dz_dhi;
      sv[4] = dz_dlo;
      sv[5] = s;
      sv[6] = static_cast<T>(ihi);
      sv[7] = static_cast<T>(ilo);
    }
  }
}

// Per row r (one warp): A = Σ g·coef, Z = −s·Σ_{outside} g; partial[r] = A·∂s/∂c; and when dx is
// not null dx += g ⊙ pass plus the extremes' terms (PerTokenNode::backward).
template <class T>
__global__ void act_per_token_backward_kernel(T* dx, T* partial, const T* g, const T* pass,
                                              const T* coef, const T* rowsave, int64_t rows,
                                              int64_t d, bool symmetric) {
  using namespace qmath;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = global_warp(); r < rows; r += warp_stride()) {
    const T* gr = g + r * d;
    const T* ps = pass + r * d;
    const T* cf = coef + r * d;
    const T* sv = rowsave + r * quant::detail::kTokenSaved;
    T A = T(0), Z = T(0);
    for (int64_t c = lane; c < d; c += kWarpSize) {
      A = add(A, mul(gr[c], cf[c]));
      Z = add(Z, mul(gr[c], sub(T(1), ps[c])));
    }
    A = warp_sum(A);
    Z = mul(warp_sum(Z), -sv[5]);
    if (lane == 0) partial[r] = mul(A, sv[0]);
    if (!dx) continue;
    const auto ihi = static_cast<int64_t>(sv[6]), ilo = static_cast<int64_t>(sv[7]);
    T* o = dx + r * d;
    for (int64_t c = lane; c < d; c += kWarpSize) {
      T value = add(o[c], mul(gr[c], ps[c]));
      if (c == ihi) value = add(value, add(mul(A, sv[1]), symmetric ? T(0) : mul(Z, sv[3])));
      if (c == ilo) value = add(value, add(mul(A, sv[2]), mul(Z, sv[4])));
      o[c] = value;
    }
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void act_per_token_forward(T* y, T* pass, T* coef, T* rowsave, const T* x, int64_t rows, int64_t d,
                           T alpha, const quant::GridSpec& spec) {
  if (rows <= 0 || d <= 0) return;
  act_per_token_forward_kernel<<<qmath::warp_grid_size(rows), detail::kBlockSize, 0,
                                 detail::current_stream()>>>(
      y, pass, coef, rowsave, x, rows, d, alpha, static_cast<T>(spec.qmin()),
      static_cast<T>(spec.qmax()), spec.symmetric);
  CBQ_CUDA_CHECK_LAUNCH("act_per_token_forward_kernel");
}

template <class T>
void act_per_token_backward(T* dx, T* dc, T* partial, const T* g, const T* pass, const T* coef,
                            const T* rowsave, int64_t rows, int64_t d, bool symmetric) {
  if (rows <= 0 || d <= 0) return;
  act_per_token_backward_kernel<<<qmath::warp_grid_size(rows), detail::kBlockSize, 0,
                                  detail::current_stream()>>>(dx, partial, g, pass, coef, rowsave,
                                                              rows, d, symmetric);
  CBQ_CUDA_CHECK_LAUNCH("act_per_token_backward_kernel");
  if (dc) qmath::deterministic_sum(dc, partial, rows, T(1), true);
}

namespace detail {
inline const bool act_quant_registered = [] {
  quant::CudaActQuant<float>::per_token_forward = &act_per_token_forward<float>;
  quant::CudaActQuant<float>::per_token_backward = &act_per_token_backward<float>;
  quant::CudaActQuant<double>::per_token_forward = &act_per_token_forward<double>;
  quant::CudaActQuant<double>::per_token_backward = &act_per_token_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
