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

namespace detail {
// The CPU forward y[i] = g[i]·σ(g[i])·u[i], i < n, over the pool (y may alias g or u).
template <class T>
void swiglu_cpu(T* y, const T* g, const T* u, int64_t n) {
  parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    CBQ_SIMD_DISPATCH(simd::isa_for<T>(), swiglu_forward<T>(y, g, u, begin, end));
  });
}
}  // namespace detail

template <class T>
class SwigluNode final : public Node<T> {
 public:
  SwigluNode(Var<T> gate, Var<T> up) : gate_(gate), up_(up) {}
  const char* name() const override { return "swiglu"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad = tape.grad(this->output);
    const T* dy = grad.data();
    const T* g = gate_.value().data();
    const T* u = up_.value().data();
    T* dg = gate_.requires_grad() ? gate_.grad().data() : nullptr;
    T* du = up_.requires_grad() ? up_.grad().data() : nullptr;
    if (grad.device() == Device::cuda) {
      cuda_kernel(CudaSwiglu<T>::backward, "swiglu")(dg, du, dy, g, u, gate_.value().numel());
      return;
    }
    parallel_for(gate_.value().numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(), swiglu_backward<T>(dg, du, dy, g, u, begin, end));
    });
  }

 private:
  Var<T> gate_, up_;
};

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
  T* y = Y.data();
  const T* g = G.data();
  const T* u = U.data();
  if (G.device() == Device::cuda) {
    require_cuda("swiglu");
    cuda_kernel(CudaSwiglu<T>::forward, "swiglu")(y, g, u, G.numel());
  } else {
    detail::swiglu_cpu(y, g, u, G.numel());
  }
  if (rg) tape.template record<SwigluNode<T>>(out, gate, up);
  return out;
}

}  // namespace cbq::ops
