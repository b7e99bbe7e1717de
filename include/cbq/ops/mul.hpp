#pragma once
// mul: out = a ⊙ b, elementwise, same shape.
// Derivative: d a += d out ⊙ b, d b += d out ⊙ a.
// CUDA: cuda/cbq/cuda/ops/mul.cuh.
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
struct CpuMul {
  static void forward(T* out, const T* a, const T* b, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = a[i] * b[i];
    });
  }
  static void backward(T* d, const T* g, const T* other, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) d[i] += g[i] * other[i];
    });
  }
};

template <class T>
class MulNode;

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
  kernel_for(va.device(), &CpuMul<T>::forward, CudaMul<T>::forward, "mul")(
      out_value.data(), va.data(), vb.data(), va.numel());
  if (rg) tape.template record<MulNode<T>>(out, a, b);
  return out;
}

template <class T>
class MulNode final : public Node<T> {
 public:
  MulNode(Var<T> a, Var<T> b) : a_(a), b_(b) {}
  const char* name() const override { return "mul"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad = tape.grad(this->output);
    const auto kernel =
        kernel_for(grad.device(), &CpuMul<T>::backward, CudaMul<T>::backward, "mul");
    const int64_t n = a_.value().numel();
    // d a += g ⊙ b, d b += g ⊙ a (a and b may be the same variable: both terms accumulate).
    if (a_.requires_grad()) kernel(a_.grad().data(), grad.data(), b_.value().data(), n);
    if (b_.requires_grad()) kernel(b_.grad().data(), grad.data(), a_.value().data(), n);
  }

 private:
  Var<T> a_, b_;
};

}  // namespace cbq::ops
