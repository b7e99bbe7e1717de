#pragma once
// rope (ops/rope.hpp), both layouts: the cos/sin tables are computed on the device (double
// pow/cos/sin, each within 2 ulp of the CPU's glibc results, then cast to T), and one thread
// rotates one pair (t, head, i). The backward pass is the same kernel with sign = −1,
// accumulating into dx.
#include <cbq/ops/rope.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// cos_table, sin_table (seq_len, half): φ(t, i) = (pos0 + t) · θ^(−2i/hd)
template <class T>
__global__ void rope_tables_kernel(T* cos_table, T* sin_table, int64_t seq_len, int64_t half,
                                   int64_t head_dim, double theta, int64_t pos0) {
  const int64_t n = seq_len * half;
  for (int64_t idx = detail::global_index(); idx < n; idx += detail::grid_stride()) {
    const int64_t i = idx % half, t = idx / half;
    const double freq = pow(theta, -2.0 * double(i) / double(head_dim));
    const double angle = double(pos0 + t) * freq;
    cos_table[idx] = static_cast<T>(cos(angle));
    sin_table[idx] = static_cast<T>(sin(angle));
  }
}

// out, in (seq_len, n_heads · head_dim); pair i of head h at row t is (a, b) = (2i, 2i + 1)
// (interleaved) or (i, i + half) (rotate_half) inside the head:
//   out_a (+)= in_a·c − in_b·s,  out_b (+)= in_a·s + in_b·c,  c = cos φ, s = sign · sin φ
template <class T>
__global__ void rope_apply_kernel(T* out, const T* in, const T* cos_table, const T* sin_table,
                                  int64_t seq_len, int64_t n_heads, int64_t head_dim,
                                  bool interleaved, T sign, bool accumulate) {
  const int64_t half = head_dim / 2, width = n_heads * head_dim;
  const int64_t pairs = seq_len * n_heads * half;
  for (int64_t p = detail::global_index(); p < pairs; p += detail::grid_stride()) {
    const int64_t i = p % half;
    const int64_t head_row = p / half;  // t · n_heads + h
    const int64_t h = head_row % n_heads, t = head_row / n_heads;
    const int64_t base = t * width + h * head_dim;
    const int64_t a = base + (interleaved ? 2 * i : i);
    const int64_t b = base + (interleaved ? 2 * i + 1 : i + half);
    const T c = cos_table[t * half + i];
    const T sn = sign * sin_table[t * half + i];
    const T xa = in[a], xb = in[b];
    const T ya = xa * c - xb * sn;
    const T yb = xa * sn + xb * c;
    if (accumulate) {
      out[a] += ya;
      out[b] += yb;
    } else {
      out[a] = ya;
      out[b] = yb;
    }
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void rope_tables(T* cos_table, T* sin_table, int64_t seq_len, int64_t head_dim, double theta,
                 int64_t pos0) {
  const int64_t half = head_dim / 2, n = seq_len * half;
  if (n <= 0) return;
  rope_tables_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      cos_table, sin_table, seq_len, half, head_dim, theta, pos0);
  CBQ_CUDA_CHECK_LAUNCH("rope_tables_kernel");
}

template <class T>
void rope_apply(T* out, const T* in, const T* cos_table, const T* sin_table, int64_t seq_len,
                int64_t n_heads, int64_t head_dim, RopeLayout layout, T sign, bool accumulate) {
  const int64_t pairs = seq_len * n_heads * (head_dim / 2);
  if (pairs <= 0) return;
  rope_apply_kernel<<<detail::grid_size(pairs), detail::kBlockSize, 0, detail::current_stream()>>>(
      out, in, cos_table, sin_table, seq_len, n_heads, head_dim, layout == RopeLayout::interleaved,
      sign, accumulate);
  CBQ_CUDA_CHECK_LAUNCH("rope_apply_kernel");
}

namespace detail {
inline const bool rope_registered = [] {
  ops::CudaRope<float>::tables = &rope_tables<float>;
  ops::CudaRope<float>::apply = &rope_apply<float>;
  ops::CudaRope<double>::tables = &rope_tables<double>;
  ops::CudaRope<double>::apply = &rope_apply<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
