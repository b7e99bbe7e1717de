#pragma once
// kl_softmax: mean over rows of KL(p_r ‖ q_r) with p_r = softmax(a_r / τ) (the target) and
// q_r = softmax(b_r / τ) (the model), softmax over the last dimension:
//   L = (1/R) Σ_r Σ_j p_rj (log p_rj − log q_rj).
// Convention: mean over rows, sum over the last (hidden) dimension, the temperature τ > 0 divides
// the logits, and there is no τ² factor (Hinton's distillation scaling): at τ = 1, the only value
// CBQ's reconstruction loss uses, the two agree; callers that sweep τ and want gradient
// magnitudes independent of it multiply the loss by τ² themselves.
// Derivative, with d_j = log p_j − log q_j, KL_r = Σ_j p_j d_j and g = d L (the seed):
//   d a_rj += g / (R τ) · p_j (d_j − KL_r)
//   d b_rj += g / (R τ) · (q_j − p_j)
// Identical inputs give exactly zero loss and zero gradients. Stability: log p is formed as
// (a_j − max a) / τ − shift_a with shift_a = log Σ_k exp((a_k − max a) / τ) ∈ [0, log n], so
// nothing overflows and float keeps its precision for logits in the hundreds. Saved for backward:
// shift_a, shift_b and KL_r per row; the row maxima are recomputed.
// CPU: the same double formulas in vectors (ops/cpu_kernels.hpp: exp within 2 ulp of double's,
// sums over a row in lanes), so float results agree with a scalar evaluation to their last bit
// but for rare roundings.
// CUDA (cuda/cbq/cuda/ops/kl_softmax.cuh): one block per row, the same double formulas; the mean
// over rows is a fixed-order reduction in double.
#include <algorithm>
#include <cmath>

#include "cbq/ops/cpu_kernels.hpp"
#include "cbq/ops/softmax.hpp"

namespace cbq::ops {

template <class T>
struct CudaKlSoftmax {
  // saved (rows, 3) = shift_a, shift_b, KL_r (rounded to T), out[0] = T(Σ_r KL_r / rows) (double
  // sums); a, b (rows, n), inv_tau = 1 / τ
  static inline void (*forward)(T* out, T* saved, const T* a, const T* b, int64_t rows, int64_t n,
                                double inv_tau) = nullptr;
  // da, db (rows, n) += the derivatives above with g = g[0] (on the device); either may be null
  static inline void (*backward)(T* da, T* db, const T* g, const T* a, const T* b, const T* saved,
                                 int64_t rows, int64_t n, double inv_tau) = nullptr;
};

template <class T>
struct CpuKlSoftmax {
  static void forward(T* out, T* saved, const T* a, const T* b, int64_t rows, int64_t n,
                      double inv_tau) {
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(), kl_forward_rows<T>(a, b, saved, r0, r1, n, inv_tau));
    });
    double total = 0;  // serial over rows: deterministic
    for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(saved[3 * r + 2]);
    out[0] = static_cast<T>(total / static_cast<double>(rows));
  }
  // The maxima are recomputed; the shifts and KL_r come from the forward pass.
  static void backward(T* da, T* db, const T* g, const T* a, const T* b, const T* saved,
                       int64_t rows, int64_t n, double inv_tau) {
    const double coef = static_cast<double>(g[0]) * inv_tau / static_cast<double>(rows);
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                        kl_backward_rows<T>(da, db, a, b, saved, r0, r1, n, inv_tau, coef));
    });
  }
};

template <class T>
class KlSoftmaxNode;

// Mean over rows of KL(softmax(a/τ) ‖ softmax(b/τ)) over the last dimension; a is the target.
template <class T>
Var<T> kl_softmax(Var<T> a, Var<T> b, T temperature = T(1)) {
  const Tensor<T>& va = a.value();
  const Tensor<T>& vb = b.value();
  check_same_shape("kl_softmax", va, vb);
  check_same_device("kl_softmax", va, vb);
  detail::check_rows_input("kl_softmax", va);
  detail::check_rows_input("kl_softmax", vb);
  CBQ_CHECK(std::isfinite(static_cast<double>(temperature)) && temperature > T(0),
            "kl_softmax: temperature must be positive and finite, got {}", temperature);
  const int64_t n = va.shape().cols(), rows = va.shape().rows();
  CBQ_CHECK(rows > 0 && n > 0, "kl_softmax: inputs of shape {} are empty", va.shape());
  const double inv_tau = 1.0 / static_cast<double>(temperature);
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a, b});
  Tensor<T> saved = tape.scratch(Shape{rows, 3});  // shift_a, shift_b, KL_r per row
  check_same_device("kl_softmax", saved, va);      // the tape allocates on its own device
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> out_value = out.value();  // shares the output's storage
  kernel_for(va.device(), &CpuKlSoftmax<T>::forward, CudaKlSoftmax<T>::forward, "kl_softmax")(
      out_value.data(), saved.data(), va.data(), vb.data(), rows, n, inv_tau);
  if (rg) tape.template record<KlSoftmaxNode<T>>(out, a, b, temperature, saved);
  return out;
}

template <class T>
class KlSoftmaxNode final : public Node<T> {
 public:
  KlSoftmaxNode(Var<T> a, Var<T> b, T temperature, Tensor<T> saved)
      : a_(a), b_(b), temperature_(temperature), saved_(std::move(saved)) {}
  const char* name() const override { return "kl_softmax"; }
  void backward(Tape<T>& tape) override {
    const bool grad_a = a_.requires_grad(), grad_b = b_.requires_grad();
    if (!grad_a && !grad_b) return;
    const Tensor<T>& va = a_.value();
    const Tensor<T>& grad = tape.grad(this->output);
    kernel_for(grad.device(), &CpuKlSoftmax<T>::backward, CudaKlSoftmax<T>::backward, "kl_softmax")(
        grad_a ? a_.grad().data() : nullptr, grad_b ? b_.grad().data() : nullptr, grad.data(),
        va.data(), b_.value().data(), saved_.data(), va.shape().rows(), va.shape().cols(),
        1.0 / static_cast<double>(temperature_));
  }

 private:
  Var<T> a_, b_;
  T temperature_;
  Tensor<T> saved_;  // (R, 3): shift_a, shift_b, KL_r
};

}  // namespace cbq::ops
