#pragma once
// layernorm (as torch.nn.LayerNorm over the last dimension, biased variance):
//   x̂ = (x − μ) · r,  r = 1 / sqrt(mean((x − μ)²) + eps),  y = x̂ ⊙ w + b
//   x (..., d), w (d,), optional b (d,), y (..., d).
// With g = dy ⊙ w, per row:
//   dx += r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
//   dw += Σ_rows dy ⊙ x̂,   db += Σ_rows dy
// Forward saves μ and r per row; backward rebuilds x̂ from x. Row reductions accumulate in double.
// CUDA (cuda/cbq/cuda/ops/layernorm.cuh): one block per row; dw, db by deterministic column sums.
#include <algorithm>
#include <cmath>

#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaLayerNorm {
  // y (rows, d) = x̂ ⊙ w (+ b), writing mean μ and inv_std r (rows,); b may be null
  static inline void (*forward)(T* y, T* mean, T* inv_std, const T* x, const T* w, const T* b,
                                int64_t rows, int64_t d, double eps) = nullptr;
  // dx (rows, d) += r · (g − mean(g) − x̂ · mean(g ⊙ x̂)) with g = dy ⊙ w
  static inline void (*backward_x)(T* dx, const T* dy, const T* x, const T* w, const T* mean,
                                   const T* inv_std, int64_t rows, int64_t d) = nullptr;
  // dw (d,) += Σ_rows dy ⊙ x̂ and db (d,) += Σ_rows dy; either may be null
  static inline void (*backward_wb)(T* dw, T* db, const T* dy, const T* x, const T* mean,
                                    const T* inv_std, int64_t rows, int64_t d) = nullptr;
};

template <class T>
struct CpuLayerNorm {
  // Two-pass variance in double; mean and inv_std (rounded to T) are written when not null (the
  // inference path, model/inference.hpp, passes null). b may be null; y may alias x.
  static void forward(T* y, T* mean, T* inv_std, const T* x, const T* w, const T* b, int64_t rows,
                      int64_t d, double eps) {
    parallel_for(rows, detail::row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const T* xr = x + row * d;
        double sum = 0;
        for (int64_t j = 0; j < d; ++j) sum += xr[j];
        const double m = sum / double(std::max<int64_t>(d, 1));
        double var = 0;  // two-pass: no cancellation for rows with a large mean
        for (int64_t j = 0; j < d; ++j) var += (xr[j] - m) * (xr[j] - m);
        var /= double(std::max<int64_t>(d, 1));
        const T mu = static_cast<T>(m);
        const T r = static_cast<T>(1.0 / std::sqrt(var + eps));
        if (mean) mean[row] = mu;
        if (inv_std) inv_std[row] = r;
        T* yr = y + row * d;
        for (int64_t j = 0; j < d; ++j) {
          const T xhat = (xr[j] - mu) * r;
          yr[j] = b ? xhat * w[j] + b[j] : xhat * w[j];
        }
      }
    });
  }
  static void backward_x(T* dx, const T* dy, const T* x, const T* w, const T* mu, const T* r,
                         int64_t rows, int64_t d) {
    parallel_for(rows, detail::row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        double sum_g = 0, sum_gx = 0;  // Σ g, Σ g ⊙ x̂ with g = dy ⊙ w
        for (int64_t j = 0; j < d; ++j) {
          const double g = double(gr[j]) * w[j];
          sum_g += g;
          sum_gx += g * (double(xr[j]) - mu[row]) * r[row];
        }
        const T mean_g = static_cast<T>(sum_g / double(d));
        const T mean_gx = static_cast<T>(sum_gx / double(d));
        T* dxr = dx + row * d;
        for (int64_t j = 0; j < d; ++j) {
          const T xhat = (xr[j] - mu[row]) * r[row];
          dxr[j] += r[row] * (gr[j] * w[j] - mean_g - xhat * mean_gx);
        }
      }
    });
  }
  // Split over features so each dw_j / db_j has one writer.
  static void backward_wb(T* dw, T* db, const T* dy, const T* x, const T* mu, const T* r,
                          int64_t rows, int64_t d) {
    parallel_for(d, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t row = 0; row < rows; ++row) {
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        if (dw)
          for (int64_t j = j0; j < j1; ++j) dw[j] += gr[j] * (xr[j] - mu[row]) * r[row];
        if (db)
          for (int64_t j = j0; j < j1; ++j) db[j] += gr[j];
      }
    });
  }
};

template <class T>
class LayerNormNode;

// `bias` may be an invalid Var (Var<T>{}) for no bias.
template <class T>
Var<T> layernorm(Var<T> x, Var<T> weight, Var<T> bias, double eps) {
  const Tensor<T> X = x.value();
  const Tensor<T> W = weight.value();
  CBQ_CHECK(X.ndim() >= 1, "layernorm: input must have at least one dimension, got {}", X.shape());
  const int64_t d = X.size(-1), rows = X.shape().rows();
  CBQ_CHECK(W.ndim() == 1 && W.size(0) == d,
            "layernorm: weight {} does not match input {} (expected ({},))", W.shape(), X.shape(),
            d);
  CBQ_CHECK(eps >= 0, "layernorm: eps must be non-negative, got {}", eps);
  check_same_device("layernorm", X, W);
  check_contiguous("layernorm", "input", X);
  check_contiguous("layernorm", "weight", W);
  const T* b = nullptr;
  if (bias.valid()) {
    const Tensor<T> B = bias.value();
    CBQ_CHECK(B.ndim() == 1 && B.size(0) == d,
              "layernorm: bias {} does not match input {} (expected ({},))", B.shape(), X.shape(),
              d);
    check_same_device("layernorm", X, B);
    check_contiguous("layernorm", "bias", B);
    b = B.data();
  }
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x, weight, bias});
  Var<T> out = tape.output(X.shape(), rg);
  Tensor<T> mean = tape.scratch(Shape{rows});     // (rows,)
  Tensor<T> inv_std = tape.scratch(Shape{rows});  // (rows,)
  Tensor<T> Y = out.value();                      // shares the output's storage
  check_same_device("layernorm", Y, X);           // the tape allocates on its own device
  kernel_for(X.device(), &CpuLayerNorm<T>::forward, CudaLayerNorm<T>::forward, "layernorm")(
      Y.data(), mean.data(), inv_std.data(), X.data(), W.data(), b, rows, d, eps);
  if (rg) tape.template record<LayerNormNode<T>>(out, x, weight, bias, mean, inv_std, rows, d);
  return out;
}

template <class T>
class LayerNormNode final : public Node<T> {
 public:
  LayerNormNode(Var<T> x, Var<T> w, Var<T> b, Tensor<T> mean, Tensor<T> inv_std, int64_t rows,
                int64_t dim)
      : x_(x),
        w_(w),
        b_(b),
        mean_(std::move(mean)),
        inv_std_(std::move(inv_std)),
        rows_(rows),
        dim_(dim) {}
  const char* name() const override { return "layernorm"; }
  void backward(Tape<T>& tape) override {
    const T* dy = tape.grad(this->output).data();  // (rows, d)
    const T* x = x_.value().data();                // (rows, d)
    const T* mu = mean_.data();                    // (rows,)
    const T* r = inv_std_.data();                  // (rows,)
    const Device device = inv_std_.device();
    const auto backward_x =
        kernel_for(device, &CpuLayerNorm<T>::backward_x, CudaLayerNorm<T>::backward_x, "layernorm");
    const auto backward_wb = kernel_for(device, &CpuLayerNorm<T>::backward_wb,
                                        CudaLayerNorm<T>::backward_wb, "layernorm");
    if (x_.requires_grad())
      backward_x(x_.grad().data(), dy, x, w_.value().data(), mu, r, rows_, dim_);
    T* dw = w_.requires_grad() ? w_.grad().data() : nullptr;
    T* db = b_.valid() && b_.requires_grad() ? b_.grad().data() : nullptr;
    if (dw || db) backward_wb(dw, db, dy, x, mu, r, rows_, dim_);
  }

 private:
  Var<T> x_, w_, b_;
  Tensor<T> mean_, inv_std_;  // (rows,) each
  int64_t rows_, dim_;
};

}  // namespace cbq::ops
