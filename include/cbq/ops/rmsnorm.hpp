#pragma once
// rmsnorm (LLaMA): y = x / sqrt(mean(x²) + eps) ⊙ w, per row; x (..., d), w (d,), y (..., d).
// With r = 1 / sqrt(mean(x²) + eps) per row and g = dy ⊙ w:
//   dx_j += r·g_j − r³·x_j·(Σ_k g_k·x_k)/d
//   dw_j += Σ_rows dy_j·x_j·r
// Forward saves r per row; backward reads x from its variable. Row reductions accumulate in
// double so that float results do not depend on the feature count's rounding drift.
// CUDA (cuda/cbq/cuda/ops/rmsnorm.cuh): one block per row; dw by a deterministic column sum in
// double.
#include <algorithm>
#include <cmath>

#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaRmsNorm {
  // y (rows, d) = x · r ⊙ w with r = inv_rms (rows,), written too; x (rows, d), w (d,)
  static inline void (*forward)(T* y, T* inv_rms, const T* x, const T* w, int64_t rows, int64_t d,
                                double eps) = nullptr;
  // dx (rows, d) += r·g − r³·x·(Σ g·x)/d with g = dy ⊙ w
  static inline void (*backward_x)(T* dx, const T* dy, const T* x, const T* w, const T* inv_rms,
                                   int64_t rows, int64_t d) = nullptr;
  // dw (d,) += Σ_rows dy ⊙ x · r
  static inline void (*backward_w)(T* dw, const T* dy, const T* x, const T* inv_rms, int64_t rows,
                                   int64_t d) = nullptr;
};

template <class T>
struct CpuRmsNorm {
  // inv_rms is written when not null (the inference path, model/inference.hpp, passes null); y
  // may alias x.
  static void forward(T* y, T* inv_rms, const T* x, const T* w, int64_t rows, int64_t d,
                      double eps) {
    parallel_for(rows, detail::row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const T* xr = x + row * d;
        double ss = 0;
        for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * xr[j];
        const T inv = static_cast<T>(1.0 / std::sqrt(ss / double(std::max<int64_t>(d, 1)) + eps));
        if (inv_rms) inv_rms[row] = inv;
        T* yr = y + row * d;
        for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * inv * w[j];
      }
    });
  }
  static void backward_x(T* dx, const T* dy, const T* x, const T* w, const T* inv_rms, int64_t rows,
                         int64_t d) {
    parallel_for(rows, detail::row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        double gx = 0;  // Σ_k g_k·x_k with g = dy ⊙ w
        for (int64_t j = 0; j < d; ++j) gx += double(gr[j]) * w[j] * xr[j];
        const double inv = inv_rms[row];
        const T a = static_cast<T>(inv);
        const T b = static_cast<T>(inv * inv * inv * gx / double(d));
        T* dxr = dx + row * d;
        for (int64_t j = 0; j < d; ++j) dxr[j] += a * gr[j] * w[j] - b * xr[j];
      }
    });
  }
  // Split over features so each dw_j has one writer (deterministic for any thread count).
  static void backward_w(T* dw, const T* dy, const T* x, const T* inv_rms, int64_t rows,
                         int64_t d) {
    parallel_for(d, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t row = 0; row < rows; ++row) {
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        const T inv = inv_rms[row];
        for (int64_t j = j0; j < j1; ++j) dw[j] += gr[j] * xr[j] * inv;
      }
    });
  }
};

template <class T>
class RmsNormNode;

template <class T>
Var<T> rmsnorm(Var<T> x, Var<T> weight, double eps) {
  const Tensor<T> X = x.value();
  const Tensor<T> W = weight.value();
  CBQ_CHECK(X.ndim() >= 1, "rmsnorm: input must have at least one dimension, got {}", X.shape());
  CBQ_CHECK(W.ndim() == 1 && W.size(0) == X.size(-1),
            "rmsnorm: weight {} does not match input {} (expected ({},))", W.shape(), X.shape(),
            X.size(-1));
  CBQ_CHECK(eps >= 0, "rmsnorm: eps must be non-negative, got {}", eps);
  check_same_device("rmsnorm", X, W);
  check_contiguous("rmsnorm", "input", X);
  check_contiguous("rmsnorm", "weight", W);
  const int64_t d = X.size(-1), rows = X.shape().rows();
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x, weight});
  Var<T> out = tape.output(X.shape(), rg);
  Tensor<T> inv_rms = tape.scratch(Shape{rows});  // (rows,)
  Tensor<T> Y = out.value();                      // shares the output's storage
  check_same_device("rmsnorm", Y, X);             // the tape allocates on its own device
  kernel_for(X.device(), &CpuRmsNorm<T>::forward, CudaRmsNorm<T>::forward, "rmsnorm")(
      Y.data(), inv_rms.data(), X.data(), W.data(), rows, d, eps);
  if (rg) tape.template record<RmsNormNode<T>>(out, x, weight, inv_rms, rows, d);
  return out;
}

template <class T>
class RmsNormNode final : public Node<T> {
 public:
  RmsNormNode(Var<T> x, Var<T> w, Tensor<T> inv_rms, int64_t rows, int64_t dim)
      : x_(x), w_(w), inv_rms_(std::move(inv_rms)), rows_(rows), dim_(dim) {}
  const char* name() const override { return "rmsnorm"; }
  void backward(Tape<T>& tape) override {
    const T* dy = tape.grad(this->output).data();  // (rows, d)
    const T* x = x_.value().data();                // (rows, d)
    const T* r = inv_rms_.data();                  // (rows,)
    const Device device = inv_rms_.device();
    if (x_.requires_grad())
      kernel_for(device, &CpuRmsNorm<T>::backward_x, CudaRmsNorm<T>::backward_x, "rmsnorm")(
          x_.grad().data(), dy, x, w_.value().data(), r, rows_, dim_);
    if (w_.requires_grad())
      kernel_for(device, &CpuRmsNorm<T>::backward_w, CudaRmsNorm<T>::backward_w, "rmsnorm")(
          w_.grad().data(), dy, x, r, rows_, dim_);
  }

 private:
  Var<T> x_, w_;
  Tensor<T> inv_rms_;  // (rows,)
  int64_t rows_, dim_;
};

}  // namespace cbq::ops
