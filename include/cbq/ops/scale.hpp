#pragma once
// scale: out = alpha · a for a constant scalar alpha.
// Derivative: d a += alpha · d out (ops::accumulate, so CUDA uses the axpy kernel).
// CUDA: cuda/cbq/cuda/ops/scale.cuh.
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaScale {
  // out[i] = alpha · x[i], i < n
  static inline void (*forward)(T* out, const T* x, T alpha, int64_t n) = nullptr;
};

template <class T>
struct CpuScale {
  static void forward(T* out, const T* x, T alpha, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = alpha * x[i];
    });
  }
};

template <class T>
class ScaleNode;

template <class T>
Var<T> scale(Var<T> a, T alpha) {
  const Tensor<T>& va = a.value();
  check_contiguous("scale", "a", va);
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a});
  Var<T> out = tape.output(va.shape(), rg);
  Tensor<T> out_value = out.value();          // shares the output's storage
  check_same_device("scale", out_value, va);  // the tape allocates on its own device
  kernel_for(va.device(), &CpuScale<T>::forward, CudaScale<T>::forward, "scale")(
      out_value.data(), va.data(), alpha, va.numel());
  if (rg) tape.template record<ScaleNode<T>>(out, a, alpha);
  return out;
}

template <class T>
class ScaleNode final : public Node<T> {
 public:
  ScaleNode(Var<T> a, T alpha) : a_(a), alpha_(alpha) {}
  const char* name() const override { return "scale"; }
  void backward(Tape<T>& tape) override {
    if (a_.requires_grad()) accumulate(a_.grad(), tape.grad(this->output), alpha_);
  }

 private:
  Var<T> a_;
  T alpha_;
};

}  // namespace cbq::ops
