#pragma once
// linear: y = x · Wᵀ + b, x (..., in), W (out, in), optional b (out,), y (..., out).
// Derivative (rows flattened, G = dy of shape (R, out)):
//   dx += G · W,  dW += Gᵀ · x,  db += Σ_rows G.
#include "cbq/ops/matmul.hpp"

namespace cbq::ops {

template <class T>
struct CudaLinear {
  // y[r, j] += b[j]
  static inline void (*bias_forward)(T* y, const T* b, int64_t rows, int64_t cols) = nullptr;
  // db[j] += Σ_r G[r, j], G (rows, cols)
  static inline void (*bias_backward)(T* db, const T* g, int64_t rows, int64_t cols) = nullptr;
};

// The product itself is a GEMM (ops::gemm, CpuGemm / CudaGemm); these are the bias kernels.
template <class T>
struct CpuLinear {
  static void bias_forward(T* y, const T* b, int64_t rows, int64_t cols) {
    parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < cols; ++j) y[r * cols + j] += b[j];
    });
  }
  // Split over columns so each db_j has one writer.
  static void bias_backward(T* db, const T* g, int64_t rows, int64_t cols) {
    parallel_for(cols, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = j0; j < j1; ++j) db[j] += g[r * cols + j];
    });
  }
};

template <class T>
class LinearNode;

// The arguments of one linear: x (..., in), W (out, in), b (out,) or an invalid Var.
template <class T>
struct LinearArgs {
  Var<T> x, w, b;
};

namespace detail {

// Checks one linear's arguments and makes its output; the product is computed by the caller.
template <class T>
struct LinearPlan {
  Var<T> out;
  int64_t rows = 0, in = 0, outf = 0;
  bool rg = false;
};

template <class T>
LinearPlan<T> plan_linear(const LinearArgs<T>& args) {
  const Var<T>& x = args.x;
  const Var<T>& b = args.b;
  const Tensor<T>& X = x.value();
  const Tensor<T>& W = args.w.value();
  CBQ_CHECK(W.ndim() == 2, "linear: weight must be 2-D (out, in), got {}", W.shape());
  CBQ_CHECK(X.ndim() >= 1 && X.size(-1) == W.size(1),
            "linear: input {} does not match weight {} (last dimension must be {})", X.shape(),
            W.shape(), W.size(1));
  check_contiguous("linear", "input", X);
  check_contiguous("linear", "weight", W);
  check_same_device("linear", X, W);
  LinearPlan<T> plan;
  plan.in = W.size(1);
  plan.outf = W.size(0);
  plan.rows = X.numel() / std::max<int64_t>(plan.in, 1);
  if (b.valid()) {
    CBQ_CHECK(b.value().ndim() == 1 && b.value().size(0) == plan.outf,
              "linear: bias {} does not match weight {} (expected ({},))", b.shape(), W.shape(),
              plan.outf);
    check_same_device("linear", X, b.value());
  }
  Shape out_shape = X.shape();
  out_shape[-1] = plan.outf;
  Tape<T>& tape = x.tape();
  plan.rg = tape.any_requires_grad({x, args.w, b});
  plan.out = tape.output(out_shape, plan.rg);
  return plan;
}

// Adds the bias to the product and records the node.
template <class T>
void finish_linear(const LinearArgs<T>& args, const LinearPlan<T>& plan) {
  const Var<T>& b = args.b;
  Tensor<T> Y = plan.out.value();
  const int64_t rows = plan.rows, outf = plan.outf;
  if (b.valid())
    kernel_for(Y.device(), &CpuLinear<T>::bias_forward, CudaLinear<T>::bias_forward,
               "linear (bias)")(Y.data(), b.value().data(), rows, outf);
  if (plan.rg)
    args.x.tape().template record<LinearNode<T>>(plan.out, args.x, args.w, b, rows, plan.in, outf);
}

template <class T>
blas::GemmArgs<T> forward_gemm(const LinearArgs<T>& args, const LinearPlan<T>& plan) {
  Tensor<T> y = plan.out.value();  // shares the output's storage
  return blas::gemm_args(false, true, plan.rows, plan.outf, plan.in, T(1), args.x.value().data(),
                         plan.in, args.w.value().data(), plan.in, T(0), y.data(), plan.outf);
}

}  // namespace detail

// Several independent linears (Q, K and V of one input; gate and up): the same values and nodes
// as linear() on each in turn, with the products computed side by side on the CPU
// (blas::gemm_batch). out[i] receives args[i]'s result.
template <class T>
void linear_batch(const LinearArgs<T>* args, int count, Var<T>* out) {
  if (count <= 0) return;
  const Device device = args[0].x.value().device();
  bool together = count <= blas::kMaxGemmBatch;
  for (int i = 1; i < count && together; ++i) together = args[i].x.value().device() == device;
  if (!together) {
    for (int i = 0; i < count; ++i) linear_batch(args + i, 1, out + i);
    return;
  }
  detail::LinearPlan<T> plans[blas::kMaxGemmBatch];
  blas::GemmArgs<T> gemms[blas::kMaxGemmBatch];
  for (int i = 0; i < count; ++i) {
    plans[i] = detail::plan_linear(args[i]);
    gemms[i] = detail::forward_gemm(args[i], plans[i]);
  }
  gemm_batch(device, gemms, count);
  for (int i = 0; i < count; ++i) {
    detail::finish_linear(args[i], plans[i]);
    out[i] = plans[i].out;
  }
}

// `b` may be an invalid Var (Var<T>{}) for no bias.
template <class T>
Var<T> linear(Var<T> x, Var<T> w, Var<T> b = Var<T>{}) {
  const LinearArgs<T> args{x, w, b};
  Var<T> out;
  linear_batch(&args, 1, &out);
  return out;
}

template <class T>
class LinearNode final : public Node<T> {
 public:
  LinearNode(Var<T> x, Var<T> w, Var<T> b, int64_t rows, int64_t in, int64_t out)
      : x_(x), w_(w), b_(b), rows_(rows), in_(in), out_(out) {}
  const char* name() const override { return "linear"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& g = tape.grad(this->output);  // (rows, out)
    const Device dev = g.device();
    // dx (rows, in) += G (rows, out) · W (out, in);  dW (out, in) += Gᵀ (out, rows) · x (rows, in)
    blas::GemmArgs<T> gemms[2];
    int count = 0;
    if (x_.requires_grad()) {
      auto [dx, beta] = x_.grad_for_write();
      gemms[count++] = blas::gemm_args(false, false, rows_, in_, out_, T(1), g.data(), out_,
                                       w_.value().data(), in_, beta, dx->data(), in_);
    }
    if (w_.requires_grad()) {
      auto [dw, beta] = w_.grad_for_write();
      gemms[count++] = blas::gemm_args(true, false, out_, in_, rows_, T(1), g.data(), out_,
                                       x_.value().data(), in_, beta, dw->data(), in_);
    }
    gemm_batch(dev, gemms, count);  // side by side on the CPU pool (core/blas.hpp)
    if (b_.valid() && b_.requires_grad())
      kernel_for(dev, &CpuLinear<T>::bias_backward, CudaLinear<T>::bias_backward, "linear (bias)")(
          b_.grad().data(), g.data(), rows_, out_);
  }

 private:
  Var<T> x_, w_, b_;
  int64_t rows_, in_, out_;
};

}  // namespace cbq::ops
