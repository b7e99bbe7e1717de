#pragma once
// softmax and log_softmax over the last dimension; all leading dimensions are rows.
// Both subtract the row maximum first, so huge logits neither overflow nor produce NaN.
//   softmax:     y_j = exp(x_j − m) / Σ_k exp(x_k − m)
//     derivative: d x_j += y_j · (g_j − Σ_k g_k y_k)
//   log_softmax: y_j = x_j − lse(x),  lse(x) = m + log Σ_k exp(x_k − m)
//     derivative: d x_j += g_j − exp(y_j) · Σ_k g_k
// Row sums accumulate in double. The row kernels in `detail` are shared with the losses.
// CUDA (cuda/cbq/cuda/ops/softmax.cuh): one block per row, the same double accumulation.
#include <algorithm>
#include <cmath>

#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaSoftmax {
  // y (rows, n) = softmax(x) or log_softmax(x) per row, x (rows, n)
  static inline void (*forward)(T* y, const T* x, int64_t rows, int64_t n, bool log) = nullptr;
  // dx (rows, n) += the derivative above from the saved output y and g = dy, both (rows, n)
  static inline void (*backward)(T* dx, const T* y, const T* g, int64_t rows, int64_t n,
                                 bool log) = nullptr;
};

namespace detail {

// Row maximum and shift = log Σ_j exp((x_j − max) · scale) over a row of n > 0 elements, so that
// log softmax(scale · x)_j = (x_j − max) · scale − shift (scale > 0). Keeping the large max out
// of the sum keeps full precision for logits in the thousands: x_j − max is exact and the shift
// lies in [0, log n].
struct RowShift {
  double max = 0;
  double shift = 0;
  double log_prob(double x, double scale = 1.0) const { return (x - max) * scale - shift; }
};

template <class T>
RowShift row_shift(const T* x, int64_t n, double scale = 1.0) {
  RowShift rs;
  rs.max = static_cast<double>(*std::max_element(x, x + n));
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp((static_cast<double>(x[j]) - rs.max) * scale);
  rs.shift = std::log(s);
  return rs;
}

template <class T>
void check_rows_input(const char* op, const Tensor<T>& x) {
  CBQ_CHECK(x.ndim() >= 1, "{}: input must have at least one dimension, got {}", op, x.shape());
  check_contiguous(op, "input", x);
}

}  // namespace detail

template <class T>
struct CpuSoftmax {
  static void forward(T* y, const T* x, int64_t rows, int64_t n, bool log) {
    if (n <= 0) return;
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        const detail::RowShift rs = detail::row_shift(xr, n);
        for (int64_t j = 0; j < n; ++j) {
          const double logp = rs.log_prob(static_cast<double>(xr[j]));
          yr[j] = static_cast<T>(log ? logp : std::exp(logp));
        }
      }
    });
  }
  static void backward(T* dx, const T* y, const T* g, int64_t rows, int64_t n, bool log) {
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* yr = y + r * n;
        const T* gr = g + r * n;
        T* dr = dx + r * n;
        double acc = 0;
        if (log) {
          for (int64_t j = 0; j < n; ++j) acc += gr[j];  // Σ_k g_k
          for (int64_t j = 0; j < n; ++j)
            dr[j] += gr[j] - static_cast<T>(std::exp(static_cast<double>(yr[j])) * acc);
        } else {
          for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(gr[j]) * yr[j];  // Σ g_k y_k
          for (int64_t j = 0; j < n; ++j) dr[j] += yr[j] * (gr[j] - static_cast<T>(acc));
        }
      }
    });
  }
};

template <class T>
class SoftmaxNode;

namespace detail {
template <class T>
Var<T> softmax_impl(Var<T> x, bool log) {
  const char* op = log ? "log_softmax" : "softmax";
  const Tensor<T>& vx = x.value();
  check_rows_input(op, vx);
  const int64_t n = vx.shape().cols(), rows = vx.shape().rows();
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x});
  Var<T> out = tape.output(vx.shape(), rg);
  Tensor<T> out_value = out.value();     // shares the output's storage
  check_same_device(op, out_value, vx);  // the tape allocates on its own device
  kernel_for(vx.device(), &CpuSoftmax<T>::forward, CudaSoftmax<T>::forward, op)(
      out_value.data(), vx.data(), rows, n, log);
  if (rg) tape.template record<SoftmaxNode<T>>(out, x, log);
  return out;
}
}  // namespace detail

template <class T>
class SoftmaxNode final : public Node<T> {
 public:
  SoftmaxNode(Var<T> x, bool log) : x_(x), log_(log) {}
  const char* name() const override { return log_ ? "log_softmax" : "softmax"; }
  void backward(Tape<T>& tape) override {
    if (!x_.requires_grad()) return;
    const Tensor<T>& y = tape.value(this->output);  // (R, n), the saved forward output
    const int64_t n = y.shape().cols(), rows = y.shape().rows();
    kernel_for(y.device(), &CpuSoftmax<T>::backward, CudaSoftmax<T>::backward, name())(
        x_.grad().data(), y.data(), tape.grad(this->output).data(), rows, n, log_);
  }

 private:
  Var<T> x_;
  bool log_;
};

template <class T>
Var<T> softmax(Var<T> x) {
  return detail::softmax_impl(x, false);
}

template <class T>
Var<T> log_softmax(Var<T> x) {
  return detail::softmax_impl(x, true);
}

}  // namespace cbq::ops
