#pragma once
// rope: rotary position embedding of x (T, H·hd), heads side by side in each row, positions
// pos0 .. pos0+T−1. Pair i of every head (i < hd/2) is rotated by the angle
//   φ(t, i) = (pos0 + t) · θ^(−2i/hd)
// The pairs are (2i, 2i+1) for RopeLayout::interleaved (llama2.c, Meta) and (i, i + hd/2) for
// RopeLayout::rotate_half (Hugging Face):
//   y_a = x_a·cos φ − x_b·sin φ,   y_b = x_a·sin φ + x_b·cos φ
// Derivative: the Jacobian is a rotation, so dx is the inverse rotation of dy:
//   dx_a += dy_a·cos φ + dy_b·sin φ,   dx_b += −dy_a·sin φ + dy_b·cos φ
// q and k are rotated by separate calls (their head counts differ under grouped-query
// attention). cos/sin are computed in double, then cast to T, and saved for backward.
// CUDA (cuda/cbq/cuda/rope.cuh): the tables are computed on the device (CUDA's double pow/cos/sin,
// within 2 ulp of glibc's), one thread per rotated pair.
#include <cmath>

#include "cbq/model/config.hpp"
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaRope {
  // cos_table, sin_table (seq_len, hd/2): cos/sin of φ(t, i) = (pos0 + t) · θ^(−2i/hd)
  static inline void (*tables)(T* cos_table, T* sin_table, int64_t seq_len, int64_t head_dim,
                               double theta, int64_t pos0) = nullptr;
  // out (seq_len, H·hd) = or += every pair of `in` rotated by (cos φ, sign · sin φ)
  static inline void (*apply)(T* out, const T* in, const T* cos_table, const T* sin_table,
                              int64_t seq_len, int64_t n_heads, int64_t head_dim, RopeLayout layout,
                              T sign, bool accumulate) = nullptr;
};

namespace detail {

// Index of the two members of pair i inside one head.
inline void rope_pair(RopeLayout layout, int64_t head_dim, int64_t i, int64_t& a, int64_t& b) {
  if (layout == RopeLayout::interleaved) {
    a = 2 * i;
    b = 2 * i + 1;
  } else {
    a = i;
    b = i + head_dim / 2;
  }
}

// Rotates every pair of every head by (cos, sin) tables of shape (T, hd/2); `sign` = −1 applies
// the inverse rotation. out += rotate(in) when accumulate, else out = rotate(in).
template <class T>
void rope_apply(T* out, const T* in, const T* cos_table, const T* sin_table, int64_t seq_len,
                int64_t n_heads, int64_t head_dim, RopeLayout layout, T sign, bool accumulate) {
  const int64_t half = head_dim / 2, width = n_heads * head_dim;
  parallel_for(seq_len, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(width, 1)),
               [&](int64_t t0, int64_t t1) {
                 for (int64_t t = t0; t < t1; ++t) {
                   const T* c = cos_table + t * half;
                   const T* s = sin_table + t * half;
                   for (int64_t h = 0; h < n_heads; ++h) {
                     const T* xi = in + t * width + h * head_dim;
                     T* yo = out + t * width + h * head_dim;
                     for (int64_t i = 0; i < half; ++i) {
                       int64_t a, b;
                       rope_pair(layout, head_dim, i, a, b);
                       const T sn = sign * s[i];
                       const T ya = xi[a] * c[i] - xi[b] * sn;
                       const T yb = xi[a] * sn + xi[b] * c[i];
                       if (accumulate) {
                         yo[a] += ya;
                         yo[b] += yb;
                       } else {
                         yo[a] = ya;
                         yo[b] = yb;
                       }
                     }
                   }
                 }
               });
}

}  // namespace detail

template <class T>
class RopeNode final : public Node<T> {
 public:
  RopeNode(Var<T> x, Tensor<T> cos_table, Tensor<T> sin_table, int64_t n_heads, int64_t head_dim,
           RopeLayout layout)
      : x_(x),
        cos_(std::move(cos_table)),
        sin_(std::move(sin_table)),
        n_heads_(n_heads),
        head_dim_(head_dim),
        layout_(layout) {}
  const char* name() const override { return "rope"; }
  void backward(Tape<T>& tape) override {
    if (!x_.requires_grad()) return;
    const Tensor<T>& dy = tape.grad(this->output);  // (T, H·hd)
    // dx += R(φ)ᵀ dy = R(−φ) dy
    if (dy.device() == Device::cuda) {
      CBQ_CHECK(CudaRope<T>::apply, "rope: CUDA kernel not registered");
      CudaRope<T>::apply(x_.grad().data(), dy.data(), cos_.data(), sin_.data(), dy.size(0),
                         n_heads_, head_dim_, layout_, T(-1), true);
      return;
    }
    detail::rope_apply(x_.grad().data(), dy.data(), cos_.data(), sin_.data(), dy.size(0), n_heads_,
                       head_dim_, layout_, T(-1), true);
  }

 private:
  Var<T> x_;
  Tensor<T> cos_, sin_;  // (T, hd/2) each
  int64_t n_heads_, head_dim_;
  RopeLayout layout_;
};

template <class T>
Var<T> rope(Var<T> x, int64_t n_heads, int64_t head_dim, RopeLayout layout, double theta,
            int64_t pos0 = 0) {
  const Tensor<T> X = x.value();
  CBQ_CHECK(n_heads > 0 && head_dim > 0 && head_dim % 2 == 0,
            "rope: need n_heads > 0 and an even head_dim > 0, got n_heads {} and head_dim {}",
            n_heads, head_dim);
  CBQ_CHECK(X.ndim() == 2 && X.size(1) == n_heads * head_dim,
            "rope: input {} does not match {} heads of dimension {} (expected (T, {}))", X.shape(),
            n_heads, head_dim, n_heads * head_dim);
  CBQ_CHECK(theta > 0, "rope: theta must be positive, got {}", theta);
  CBQ_CHECK(pos0 >= 0, "rope: the first position must be non-negative, got {}", pos0);
  check_contiguous("rope", "input", X);
  const int64_t seq_len = X.size(0), half = head_dim / 2;
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x});
  Var<T> out = tape.output(X.shape(), rg);
  Tensor<T> cos_table = tape.scratch(Shape{seq_len, half});  // (T, hd/2)
  Tensor<T> sin_table = tape.scratch(Shape{seq_len, half});  // (T, hd/2)
  Tensor<T> Y = out.value();                                 // shares the output's storage
  check_same_device("rope", Y, X);                           // the tape allocates on its own device
  if (X.device() == Device::cuda) {
    require_cuda("rope");
    CBQ_CHECK(CudaRope<T>::tables && CudaRope<T>::apply, "rope: CUDA kernel not registered");
    CudaRope<T>::tables(cos_table.data(), sin_table.data(), seq_len, head_dim, theta, pos0);
    CudaRope<T>::apply(Y.data(), X.data(), cos_table.data(), sin_table.data(), seq_len, n_heads,
                       head_dim, layout, T(1), false);
    if (rg)
      tape.template record<RopeNode<T>>(out, x, cos_table, sin_table, n_heads, head_dim, layout);
    return out;
  }
  for (int64_t i = 0; i < half; ++i) {
    const double freq = std::pow(theta, -2.0 * double(i) / double(head_dim));
    for (int64_t t = 0; t < seq_len; ++t) {
      const double angle = double(pos0 + t) * freq;
      cos_table[t * half + i] = static_cast<T>(std::cos(angle));
      sin_table[t * half + i] = static_cast<T>(std::sin(angle));
    }
  }
  detail::rope_apply(Y.data(), X.data(), cos_table.data(), sin_table.data(), seq_len, n_heads,
                     head_dim, layout, T(1), false);
  if (rg)
    tape.template record<RopeNode<T>>(out, x, cos_table, sin_table, n_heads, head_dim, layout);
  return out;
}

}  // namespace cbq::ops
