#pragma once
// linear: y = x · Wᵀ + b, x (..., in), W (out, in), optional b (out,), y (..., out).
// Derivative (rows flattened, G = dy of shape (R, out)):
//   dx += G · W,  dW += Gᵀ · x,  db += Σ_rows G.
#include "cbq/ops/matmul.hpp"

namespace cbq::ops {

template <class T>
struct CudaLinear {
  // db[j] += Σ_r G[r, j], G (rows, cols)
  static inline void (*bias_backward)(T* db, const T* g, int64_t rows, int64_t cols) = nullptr;
  // y[r, j] += b[j]
  static inline void (*bias_forward)(T* y, const T* b, int64_t rows, int64_t cols) = nullptr;
};

template <class T>
class LinearNode final : public Node<T> {
 public:
  LinearNode(Var<T> x, Var<T> w, Var<T> b, int64_t rows, int64_t in, int64_t out)
      : x_(x), w_(w), b_(b), rows_(rows), in_(in), out_(out) {}
  const char* name() const override { return "linear"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& g = tape.grad(this->output);  // (rows, out)
    const Device dev = g.device();
    if (x_.requires_grad()) {  // dx (rows, in) += G (rows, out) · W (out, in)
      auto [dx, beta] = x_.grad_for_write();
      gemm<T>(dev, false, false, rows_, in_, out_, T(1), g.data(), out_, w_.value().data(), in_,
              beta, dx->data(), in_);
    }
    if (w_.requires_grad()) {  // dW (out, in) += Gᵀ (out, rows) · x (rows, in)
      auto [dw, beta] = w_.grad_for_write();
      gemm<T>(dev, true, false, out_, in_, rows_, T(1), g.data(), out_, x_.value().data(), in_,
              beta, dw->data(), in_);
    }
    if (b_.valid() && b_.requires_grad()) {
      T* db = b_.grad().data();
      if (dev == Device::cuda) {
        CBQ_CHECK(CudaLinear<T>::bias_backward, "linear: CUDA bias kernel not registered");
        CudaLinear<T>::bias_backward(db, g.data(), rows_, out_);
      } else {
        const T* gp = g.data();
        parallel_for(out_, 64, [&](int64_t j0, int64_t j1) {
          for (int64_t r = 0; r < rows_; ++r)
            for (int64_t j = j0; j < j1; ++j) db[j] += gp[r * out_ + j];
        });
      }
    }
  }

 private:
  Var<T> x_, w_, b_;
  int64_t rows_, in_, out_;
};

// `b` may be an invalid Var (Var<T>{}) for no bias.
template <class T>
Var<T> linear(Var<T> x, Var<T> w, Var<T> b = Var<T>{}) {
  const Tensor<T>& X = x.value();
  const Tensor<T>& W = w.value();
  CBQ_CHECK(W.ndim() == 2, "linear: weight must be 2-D (out, in), got {}", W.shape());
  CBQ_CHECK(X.ndim() >= 1 && X.size(-1) == W.size(1),
            "linear: input {} does not match weight {} (last dimension must be {})", X.shape(),
            W.shape(), W.size(1));
  check_contiguous("linear", "input", X);
  check_contiguous("linear", "weight", W);
  check_same_device("linear", X, W);
  const int64_t in = W.size(1), outf = W.size(0), rows = X.numel() / std::max<int64_t>(in, 1);
  if (b.valid()) {
    CBQ_CHECK(b.value().ndim() == 1 && b.value().size(0) == outf,
              "linear: bias {} does not match weight {} (expected ({},))", b.shape(), W.shape(),
              outf);
    check_same_device("linear", X, b.value());
  }
  Shape out_shape = X.shape();
  out_shape[-1] = outf;
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x, w, b});
  Var<T> out = tape.output(out_shape, rg);
  Tensor<T> Y = out.value();
  gemm<T>(X.device(), false, true, rows, outf, in, T(1), X.data(), in, W.data(), in, T(0), Y.data(),
          outf);
  if (b.valid()) {
    const T* bp = b.value().data();
    if (X.device() == Device::cuda) {
      CBQ_CHECK(CudaLinear<T>::bias_forward, "linear: CUDA bias kernel not registered");
      CudaLinear<T>::bias_forward(Y.data(), bp, rows, outf);
    } else {
      T* y = Y.data();
      parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < outf; ++j) y[r * outf + j] += bp[j];
      });
    }
  }
  if (rg) tape.template record<LinearNode<T>>(out, x, w, b, rows, in, outf);
  return out;
}

}  // namespace cbq::ops
