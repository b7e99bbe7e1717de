#pragma once
// add: out = a + b, elementwise, same shape.
// Derivative: d a += d out, d b += d out (ops::accumulate).
// CUDA: cuda/cbq/cuda/ops/add.cuh.
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaAdd {
  // out[i] = a[i] + b[i], i < n
  static inline void (*forward)(T* out, const T* a, const T* b, int64_t n) = nullptr;
};

template <class T>
struct CpuAdd {
  static void forward(T* out, const T* a, const T* b, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
    });
  }
};

template <class T>
class AddNode;

template <class T>
Var<T> add(Var<T> a, Var<T> b) {
  check_same_shape("add", a.value(), b.value());
  check_same_device("add", a.value(), b.value());
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a, b});
  Var<T> out = tape.output(a.shape(), rg);
  const Tensor<T>& va = a.value();
  const Tensor<T>& vb = b.value();
  Tensor<T> vo = out.value();  // shares the output's storage
  check_contiguous("add", "a", va);
  check_contiguous("add", "b", vb);
  kernel_for(va.device(), &CpuAdd<T>::forward, CudaAdd<T>::forward, "add")(vo.data(), va.data(),
                                                                           vb.data(), va.numel());
  if (rg) tape.template record<AddNode<T>>(out, a, b);
  return out;
}

template <class T>
class AddNode final : public Node<T> {
 public:
  AddNode(Var<T> a, Var<T> b) : a_(a), b_(b) {}
  const char* name() const override { return "add"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& dout = tape.grad(this->output);
    if (a_.requires_grad()) accumulate(a_.grad(), dout);
    if (b_.requires_grad()) accumulate(b_.grad(), dout);
  }

 private:
  Var<T> a_, b_;
};

}  // namespace cbq::ops
