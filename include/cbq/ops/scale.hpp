#pragma once
// scale: out = alpha · a for a constant scalar alpha.
// Derivative: d a += alpha · d out (ops::accumulate, so CUDA uses the axpy kernel).
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaScale {
  // out[i] = alpha · x[i], i < n
  static inline void (*forward)(T* out, const T* x, T alpha, int64_t n) = nullptr;
};

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

template <class T>
Var<T> scale(Var<T> a, T alpha) {
  const Tensor<T>& va = a.value();
  check_contiguous("scale", "a", va);
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a});
  Var<T> out = tape.output(va.shape(), rg);
  Tensor<T> out_value = out.value();          // shares the output's storage
  check_same_device("scale", out_value, va);  // the tape allocates on its own device
  T* o = out_value.data();
  const T* x = va.data();
  if (va.device() == Device::cuda) {
    require_cuda("scale");
    cuda_kernel(CudaScale<T>::forward, "scale")(o, x, alpha, va.numel());
  } else {
    parallel_for(va.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = alpha * x[i];
    });
  }
  if (rg) tape.template record<ScaleNode<T>>(out, a, alpha);
  return out;
}

}  // namespace cbq::ops
