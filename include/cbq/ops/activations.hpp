#pragma once
// Elementwise activations y = f(x), any shape, with dx += dy ⊙ f'(x):
//   silu(x) = x·σ(x)                       f'(x) = σ(x)·(1 + x·(1 − σ(x)))
//   relu(x) = max(x, 0)                    f'(x) = 1 if x > 0, else 0 (0 at exactly x = 0,
//                                          as PyTorch)
//   gelu(x) = x·Φ(x) = ½x·(1 + erf(x/√2))  f'(x) = Φ(x) + x·φ(x), φ(x) = exp(−x²/2)/√(2π)
// gelu is the exact erf form (PyTorch's default, approximate='none'), not the tanh
// approximation. Backward reads x from the input variable; nothing else is saved.
#include <cmath>
#include <numbers>
#include <type_traits>

#include "cbq/ops/common.hpp"
#include "cbq/ops/cpu_kernels.hpp"

namespace cbq::ops {

namespace detail {

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

struct Silu {
  static constexpr const char* name = "silu";
  template <class T>
  static T value(T x) {
    return x * sigmoid(x);
  }
  template <class T>
  static T derivative(T x) {
    const T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
};

struct Relu {
  static constexpr const char* name = "relu";
  template <class T>
  static T value(T x) {
    return x > T(0) ? x : T(0);
  }
  template <class T>
  static T derivative(T x) {
    return x > T(0) ? T(1) : T(0);
  }
};

struct Gelu {
  static constexpr const char* name = "gelu";
  static constexpr double kInvSqrt2 = 1.0 / std::numbers::sqrt2;
  static constexpr double kInvSqrt2Pi = std::numbers::inv_sqrtpi / std::numbers::sqrt2;  // φ(0)
  template <class T>
  static T value(T x) {
    return T(0.5) * x * (T(1) + std::erf(x * T(kInvSqrt2)));
  }
  template <class T>
  static T derivative(T x) {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2)));
    const T pdf = std::exp(T(-0.5) * x * x) * T(kInvSqrt2Pi);
    return cdf + x * pdf;
  }
};

}  // namespace detail

// CUDA kernels of activation F (detail::Silu, Relu, Gelu); cuda/cbq/cuda/ops/activations.cuh.
template <class T, class F>
struct CudaActivation {
  // y[i] = F(x[i]), i < n
  static inline void (*forward)(T* y, const T* x, int64_t n) = nullptr;
  // dx[i] += dy[i] · F'(x[i]), i < n
  static inline void (*backward)(T* dx, const T* dy, const T* x, int64_t n) = nullptr;
};

// The CPU kernels of activation F, with the hooks' signatures; silu is vectorized
// (ops/cpu_kernels.hpp).
template <class T, class F>
struct CpuActivation {
  static void forward(T* y, const T* x, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<F, detail::Silu>) {
        CBQ_SIMD_DISPATCH(simd::isa_for<T>(), silu_forward<T>(y, x, begin, end));
      } else {
        for (int64_t i = begin; i < end; ++i) y[i] = F::value(x[i]);
      }
    });
  }
  static void backward(T* dx, const T* dy, const T* x, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<F, detail::Silu>) {
        CBQ_SIMD_DISPATCH(simd::isa_for<T>(), silu_backward<T>(dx, dy, x, begin, end));
      } else {
        for (int64_t i = begin; i < end; ++i) dx[i] += dy[i] * F::derivative(x[i]);
      }
    });
  }
};

namespace detail {

template <class T, class F>
class ActivationNode;

template <class F, class T>
Var<T> activation(Var<T> x) {
  const Tensor<T> X = x.value();
  check_contiguous(F::name, "input", X);
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x});
  Var<T> out = tape.output(X.shape(), rg);
  Tensor<T> Y = out.value();         // shares the output's storage
  check_same_device(F::name, Y, X);  // the tape allocates on its own device
  kernel_for(X.device(), &CpuActivation<T, F>::forward, CudaActivation<T, F>::forward, F::name)(
      Y.data(), X.data(), X.numel());
  if (rg) tape.template record<ActivationNode<T, F>>(out, x);
  return out;
}

template <class T, class F>
class ActivationNode final : public Node<T> {
 public:
  explicit ActivationNode(Var<T> x) : x_(x) {}
  const char* name() const override { return F::name; }
  void backward(Tape<T>& tape) override {
    if (!x_.requires_grad()) return;
    const Tensor<T>& grad = tape.grad(this->output);
    kernel_for(grad.device(), &CpuActivation<T, F>::backward, CudaActivation<T, F>::backward,
               F::name)(x_.grad().data(), grad.data(), x_.value().data(), x_.value().numel());
  }

 private:
  Var<T> x_;
};

}  // namespace detail

template <class T>
Var<T> silu(Var<T> x) {
  return detail::activation<detail::Silu>(x);
}

template <class T>
Var<T> relu(Var<T> x) {
  return detail::activation<detail::Relu>(x);
}

// Exact erf form (PyTorch's nn.GELU() default), not the tanh approximation.
template <class T>
Var<T> gelu(Var<T> x) {
  return detail::activation<detail::Gelu>(x);
}

}  // namespace cbq::ops
