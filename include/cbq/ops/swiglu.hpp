#pragma once
// swiglu: y = silu(gate) ⊙ up, fused (the LLaMA MLP's gate), gate and up of the same shape.
// With s = σ(gate):
//   d gate += dy ⊙ up ⊙ s·(1 + gate·(1 − s))
//   d up   += dy ⊙ gate·s
// Backward reads gate and up from their variables; nothing else is saved. The CPU loops are
// vectorized (ops/cpu_kernels.hpp; exp within 1 ulp of the C library's).
#include "cbq/ops/activations.hpp"
#include "cbq/ops/cpu_kernels.hpp"

namespace cbq::ops {

template <class T>
struct CudaSwiglu {
  // y[i] = gate[i] · σ(gate[i]) · up[i], i < n
  static inline void (*forward)(T* y, const T* gate, const T* up, int64_t n) = nullptr;
  // d gate and d up as above; either may be null (no gradient wanted)
  static inline void (*backward)(T* dgate, T* dup, const T* dy, const T* gate, const T* up,
                                 int64_t n) = nullptr;
};

template <class T>
struct CpuSwiglu {
  // y may alias gate or up (the inference path writes y over gate).
  static void forward(T* y, const T* gate, const T* up, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(), swiglu_forward<T>(y, gate, up, begin, end));
    });
  }
  static void backward(T* dgate, T* dup, const T* dy, const T* gate, const T* up, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                        swiglu_backward<T>(dgate, dup, dy, gate, up, begin, end));
    });
  }
};

template <class T>
class SwigluNode;

template <class T>
Var<T> swiglu(Var<T> gate, Var<T> up) {
  const Tensor<T> G = gate.value();
  const Tensor<T> U = up.value();
  check_same_shape("swiglu", G, U);
  check_same_device("swiglu", G, U);
  check_contiguous("swiglu", "gate", G);
  check_contiguous("swiglu", "up", U);
  Tape<T>& tape = gate.tape();
  const bool rg = tape.any_requires_grad({gate, up});
  Var<T> out = tape.output(G.shape(), rg);
  Tensor<T> Y = out.value();          // shares the output's storage
  check_same_device("swiglu", Y, G);  // the tape allocates on its own device
  kernel_for(G.device(), &CpuSwiglu<T>::forward, CudaSwiglu<T>::forward, "swiglu")(
      Y.data(), G.data(), U.data(), G.numel());
  if (rg) tape.template record<SwigluNode<T>>(out, gate, up);
  return out;
}

template <class T>
class SwigluNode final : public Node<T> {
 public:
  SwigluNode(Var<T> gate, Var<T> up) : gate_(gate), up_(up) {}
  const char* name() const override { return "swiglu"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad = tape.grad(this->output);
    T* dg = gate_.requires_grad() ? gate_.grad().data() : nullptr;
    T* du = up_.requires_grad() ? up_.grad().data() : nullptr;
    kernel_for(grad.device(), &CpuSwiglu<T>::backward, CudaSwiglu<T>::backward, "swiglu")(
        dg, du, grad.data(), gate_.value().data(), up_.value().data(), gate_.value().numel());
  }

 private:
  Var<T> gate_, up_;
};

}  // namespace cbq::ops
