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
// attention). cos/sin are computed in double, then cast to T, cached per shape (rope_tables) and
// saved for backward.
// CUDA (cuda/cbq/cuda/ops/rope.cuh): the tables are computed on the device (CUDA's double
// pow/cos/sin, within 2 ulp of glibc's), one thread per rotated pair.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <utility>
#include <vector>

#include "cbq/core/model_config.hpp"
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

// One head of one row: out = or += rotate(in) for pairs (a_i, b_i) = (xa[i·stride], xb[i·stride]).
// Branch-free inner loops, so that the compiler vectorizes them.
template <class T, bool Accumulate>
void rope_rotate_head(T* ya, T* yb, const T* xa, const T* xb, int64_t stride, const T* c,
                      const T* s, int64_t half, T sign) {
  for (int64_t i = 0; i < half; ++i) {
    const T sn = sign * s[i];
    const T va = xa[i * stride] * c[i] - xb[i * stride] * sn;
    const T vb = xa[i * stride] * sn + xb[i * stride] * c[i];
    if constexpr (Accumulate) {
      ya[i * stride] += va;
      yb[i * stride] += vb;
    } else {
      ya[i * stride] = va;
      yb[i * stride] = vb;
    }
  }
}

}  // namespace detail

template <class T>
struct CpuRope {
  // In double, then cast to T (ops::rope caches the tables per shape: detail::rope_tables).
  static void tables(T* cos_table, T* sin_table, int64_t seq_len, int64_t head_dim, double theta,
                     int64_t pos0) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
      const double freq = std::pow(theta, -2.0 * double(i) / double(head_dim));
      for (int64_t t = 0; t < seq_len; ++t) {
        const double angle = double(pos0 + t) * freq;
        cos_table[t * half + i] = static_cast<T>(std::cos(angle));
        sin_table[t * half + i] = static_cast<T>(std::sin(angle));
      }
    }
  }
  // Rotates every pair of every head by (cos, sin) tables of shape (T, hd/2); `sign` = −1 applies
  // the inverse rotation. out += rotate(in) when accumulate, else out = rotate(in).
  static void apply(T* out, const T* in, const T* cos_table, const T* sin_table, int64_t seq_len,
                    int64_t n_heads, int64_t head_dim, RopeLayout layout, T sign, bool accumulate) {
    const int64_t half = head_dim / 2, width = n_heads * head_dim;
    int64_t a0, b0;
    detail::rope_pair(layout, head_dim, 0, a0, b0);
    const int64_t stride = layout == RopeLayout::interleaved ? 2 : 1;  // of a pair's members
    parallel_for(seq_len, detail::row_grain(width), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const T* c = cos_table + t * half;
        const T* s = sin_table + t * half;
        for (int64_t h = 0; h < n_heads; ++h) {
          const T* xi = in + t * width + h * head_dim;
          T* yo = out + t * width + h * head_dim;
          if (accumulate)
            detail::rope_rotate_head<T, true>(yo + a0, yo + b0, xi + a0, xi + b0, stride, c, s,
                                              half, sign);
          else
            detail::rope_rotate_head<T, false>(yo + a0, yo + b0, xi + a0, xi + b0, stride, c, s,
                                               half, sign);
        }
      }
    });
  }
};

namespace detail {

// cos/sin tables (seq_len, hd/2) of φ(t, i) = (pos0 + t)·θ^(−2i/hd), computed in double and
// cached: the most recent kRopeCacheSize distinct (seq_len, hd, θ, pos0) keys are kept (a tensor
// handed out stays valid after its entry is evicted; it is shared, never written again).
inline constexpr std::size_t kRopeCacheSize = 16;

template <class T>
std::pair<Tensor<T>, Tensor<T>> rope_tables(int64_t seq_len, int64_t head_dim, double theta,
                                            int64_t pos0) {
  struct Entry {
    int64_t seq_len, head_dim, pos0;
    double theta;
    Tensor<T> cos, sin;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;  // most recently used last
  std::lock_guard<std::mutex> lock(mutex);
  for (std::size_t k = 0; k < cache.size(); ++k) {
    const Entry& e = cache[k];
    if (e.seq_len == seq_len && e.head_dim == head_dim && e.pos0 == pos0 && e.theta == theta) {
      if (k + 1 != cache.size())
        std::rotate(cache.begin() + static_cast<std::ptrdiff_t>(k),
                    cache.begin() + static_cast<std::ptrdiff_t>(k) + 1, cache.end());
      return {cache.back().cos, cache.back().sin};
    }
  }
  const int64_t half = head_dim / 2;
  Tensor<T> cos_table = Tensor<T>::empty(Shape{seq_len, half});
  Tensor<T> sin_table = Tensor<T>::empty(Shape{seq_len, half});
  CpuRope<T>::tables(cos_table.data(), sin_table.data(), seq_len, head_dim, theta, pos0);
  if (cache.size() >= kRopeCacheSize) cache.erase(cache.begin());
  cache.push_back(Entry{seq_len, head_dim, pos0, theta, cos_table, sin_table});
  return {cos_table, sin_table};
}

}  // namespace detail

template <class T>
class RopeNode;

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
  Tensor<T> Y = out.value();        // shares the output's storage
  check_same_device("rope", Y, X);  // the tape allocates on its own device
  // The tables depend only on (T, hd, θ, pos0): on the CPU computed once and shared (a training
  // step would otherwise spend thousands of double sin/cos calls per call); on CUDA by a kernel
  // into tape scratch.
  std::pair<Tensor<T>, Tensor<T>> tables;
  if (X.device() == Device::cpu) {
    tables = detail::rope_tables<T>(seq_len, head_dim, theta, pos0);
  } else {
    tables = {tape.scratch(Shape{seq_len, half}), tape.scratch(Shape{seq_len, half})};
    kernel_for(X.device(), &CpuRope<T>::tables, CudaRope<T>::tables, "rope")(
        tables.first.data(), tables.second.data(), seq_len, head_dim, theta, pos0);
  }
  kernel_for(X.device(), &CpuRope<T>::apply, CudaRope<T>::apply, "rope")(
      Y.data(), X.data(), tables.first.data(), tables.second.data(), seq_len, n_heads, head_dim,
      layout, T(1), false);
  if (rg)
    tape.template record<RopeNode<T>>(out, x, tables.first, tables.second, n_heads, head_dim,
                                      layout);
  return out;
}

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
    kernel_for(dy.device(), &CpuRope<T>::apply, CudaRope<T>::apply, "rope")(
        x_.grad().data(), dy.data(), cos_.data(), sin_.data(), dy.size(0), n_heads_, head_dim_,
        layout_, T(-1), true);
  }

 private:
  Var<T> x_;
  Tensor<T> cos_, sin_;  // (T, hd/2) each
  int64_t n_heads_, head_dim_;
  RopeLayout layout_;
};

}  // namespace cbq::ops
