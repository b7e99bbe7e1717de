#pragma once
// Squared-error losses, shape (1,); either operand may be a constant.
//   mse(a, b)          = (1/N) Σ_i (a_i − b_i)²            N = number of elements
//   row_sq_error(a, b) = (1/R) Σ_r ‖a_r − b_r‖²  over the last dimension, R rows
//                      (the L2 term mean_t ‖a_t − b_t‖² of CBQ's reconstruction loss)
// Both are c · Σ_i (a_i − b_i)² with c = 1/N or 1/R.
// Derivative: d a_i += 2c · g · (a_i − b_i),  d b_i −= 2c · g · (a_i − b_i).
// Nothing is saved: backward re-reads a and b, which live on the tape anyway.
#include "cbq/ops/reduce.hpp"

namespace cbq::ops {

template <class T>
struct CudaSquaredError {
  // out[0] = T(Σ_i (a[i] − b[i])² / divisor), accumulated in double; out on the device
  static inline void (*forward)(T* out, const T* a, const T* b, int64_t n,
                                double divisor) = nullptr;
  // d[i] += sign · (2 · coefficient · g[0]) · (a[i] − b[i]); g (1,) on the device
  static inline void (*backward)(T* d, const T* g, const T* a, const T* b, T coefficient, T sign,
                                 int64_t n) = nullptr;
};

template <class T>
struct CpuSquaredError {
  static void forward(T* out, const T* a, const T* b, int64_t n, double divisor) {
    const double total = detail::blocked_sum(n, [&](int64_t i) {
      const double diff = static_cast<double>(a[i]) - static_cast<double>(b[i]);
      return diff * diff;
    });
    out[0] = static_cast<T>(total / divisor);
  }
  static void backward(T* d, const T* g, const T* a, const T* b, T coefficient, T sign, int64_t n) {
    const T k = T(2) * coefficient * g[0];
    const T ks = sign * k;
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) d[i] += ks * (a[i] - b[i]);
    });
  }
};

template <class T>
class SquaredErrorNode;

namespace detail {
// c · Σ (a − b)² with c = 1/N (per_row = false) or 1/R (per_row = true).
template <class T>
Var<T> squared_error(const char* op, Var<T> a, Var<T> b, bool per_row) {
  const Tensor<T>& va = a.value();
  const Tensor<T>& vb = b.value();
  check_same_shape(op, va, vb);
  check_same_device(op, va, vb);
  check_contiguous(op, "a", va);
  check_contiguous(op, "b", vb);
  if (per_row) CBQ_CHECK(va.ndim() >= 1, "{}: inputs must have at least one dimension", op);
  const int64_t count = per_row ? va.shape().rows() : va.numel();
  CBQ_CHECK(count > 0 && va.numel() > 0, "{}: inputs of shape {} are empty", op, va.shape());
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a, b});
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> out_value = out.value();     // shares the output's storage
  check_same_device(op, out_value, va);  // the tape allocates on its own device
  kernel_for(va.device(), &CpuSquaredError<T>::forward, CudaSquaredError<T>::forward, op)(
      out_value.data(), va.data(), vb.data(), va.numel(), static_cast<double>(count));
  if (rg)
    tape.template record<SquaredErrorNode<T>>(out, a, b,
                                              static_cast<T>(1.0 / static_cast<double>(count)), op);
  return out;
}
}  // namespace detail

template <class T>
class SquaredErrorNode final : public Node<T> {
 public:
  SquaredErrorNode(Var<T> a, Var<T> b, T coefficient, const char* name)
      : a_(a), b_(b), coefficient_(coefficient), name_(name) {}
  const char* name() const override { return name_; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad = tape.grad(this->output);
    const auto kernel = kernel_for(grad.device(), &CpuSquaredError<T>::backward,
                                   CudaSquaredError<T>::backward, name_);
    const T* a = a_.value().data();
    const T* b = b_.value().data();
    const int64_t n = a_.value().numel();
    if (a_.requires_grad()) kernel(a_.grad().data(), grad.data(), a, b, coefficient_, T(1), n);
    if (b_.requires_grad()) kernel(b_.grad().data(), grad.data(), a, b, coefficient_, T(-1), n);
  }

 private:
  Var<T> a_, b_;
  T coefficient_;
  const char* name_;
};

// Mean over all elements of (a − b)².
template <class T>
Var<T> mse(Var<T> a, Var<T> b) {
  return detail::squared_error("mse", a, b, false);
}

// Mean over rows of the squared L2 norm of (a_r − b_r) over the last dimension.
template <class T>
Var<T> row_sq_error(Var<T> a, Var<T> b) {
  return detail::squared_error("row_sq_error", a, b, true);
}

}  // namespace cbq::ops
