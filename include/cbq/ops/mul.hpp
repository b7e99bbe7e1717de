#pragma once
// mul: out = a ⊙ b, elementwise, same shape.
// Derivative: d a += d out ⊙ b, d b += d out ⊙ a.
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaMul {
  // out[i] = a[i] · b[i], i < n
  static inline void (*forward)(T* out, const T* a, const T* b, int64_t n) = nullptr;
  // d[i] += g[i] · other[i], i < n
  static inline void (*backward)(T* d, const T* g, const T* other, int64_t n) = nullptr;
};

template <class T>
class MulNode final : public Node<T> {
 public:
  MulNode(Var<T> a, Var<T> b) : a_(a), b_(b) {}
  const char* name() const override { return "mul"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad = tape.grad(this->output);
    const T* g = grad.data();
    const int64_t n = a_.value().numel();
    // d a += g ⊙ b, d b += g ⊙ a (a and b may be the same variable: both terms accumulate).
    auto accumulate_product = [&](Var<T> dst, Var<T> other) {
      T* d = dst.grad().data();
      const T* o = other.value().data();
      if (grad.device() == Device::cuda) {
        cuda_kernel(CudaMul<T>::backward, "mul")(d, g, o, n);
        return;
      }
      parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) d[i] += g[i] * o[i];
      });
    };
    if (a_.requires_grad()) accumulate_product(a_, b_);
    if (b_.requires_grad()) accumulate_product(b_, a_);
  }

 private:
  Var<T> a_, b_;
};

template <class T>
Var<T> mul(Var<T> a, Var<T> b) {
  check_same_shape("mul", a.value(), b.value());
  const Tensor<T>& va = a.value();
  const Tensor<T>& vb = b.value();
  check_same_device("mul", va, vb);
  check_contiguous("mul", "a", va);
  check_contiguous("mul", "b", vb);
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a, b});
  Var<T> out = tape.output(va.shape(), rg);
  Tensor<T> out_value = out.value();        // shares the output's storage
  check_same_device("mul", out_value, va);  // the tape allocates on its own device
  T* o = out_value.data();
  const T* x = va.data();
  const T* y = vb.data();
  if (va.device() == Device::cuda) {
    require_cuda("mul");
    cuda_kernel(CudaMul<T>::forward, "mul")(o, x, y, va.numel());
  } else {
    parallel_for(va.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = x[i] * y[i];
    });
  }
  if (rg) tape.template record<MulNode<T>>(out, a, b);
  return out;
}

}  // namespace cbq::ops
