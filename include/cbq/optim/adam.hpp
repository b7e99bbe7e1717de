#pragma once
// Adam (Kingma & Ba 2015) with bias correction, over parameter groups that each have their own
// learning rate (CBQ trains weight steps, activation steps and rounding factors at very
// different rates). State (m, v) is kept in the parameter's scalar type, fp32 master values.
//
//   m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
//   p ← p − lr · m̂ / (sqrt(v̂) + ε),   m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/tape.hpp"

namespace cbq::optim {

// CUDA kernel (cuda/cbq/cuda/optim/adam.cuh): one fused update per element, the same expressions in
// the same order with IEEE round-to-nearest operations (no FMA contraction), so parameters and
// moments equal the CPU's bit for bit.
template <class T>
struct CudaAdam {
  // One Adam update of n elements with precomputed bias corrections; lr_scale (n) may be null.
  static inline void (*step)(T* param, T* m, T* v, const T* grad, const T* lr_scale, int64_t n,
                             T lr, T beta1, T beta2, T eps, T bias_correction1,
                             T bias_correction2) = nullptr;
};

template <class T>
struct CpuAdam {
  static void step(T* param, T* m, T* v, const T* grad, const T* lr_scale, int64_t n, T lr, T beta1,
                   T beta2, T eps, T bias_correction1, T bias_correction2) {
    parallel_for(n, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        m[i] = beta1 * m[i] + (1 - beta1) * grad[i];
        v[i] = beta2 * v[i] + (1 - beta2) * grad[i] * grad[i];
        const T update =
            lr * (m[i] / bias_correction1) / (std::sqrt(v[i] / bias_correction2) + eps);
        param[i] -= lr_scale ? lr_scale[i] * update : update;
      }
    });
  }
};

struct AdamOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

template <class T>
class Adam {
 public:
  struct Slot {
    Parameter<T>* param;
    Tensor<T> m, v;
    Tensor<T> lr_scale;  // optional per-element learning-rate factor (undefined: 1)
  };
  struct Group {
    std::string name;
    double lr;
    std::vector<Slot> slots;
  };

  explicit Adam(AdamOptions options = {}) : options_(options) {}

  // Adds a group; returns its index. Parameters must be trainable and outlive the optimiser.
  // `lr_scales[i]`, if given, multiplies the update of params[i] elementwise: with a step size's
  // initial value as its scale the update becomes relative (lr = fraction of the step per update),
  // which keeps one learning rate meaningful from 2-bit to 8-bit steps.
  int add_group(std::string name, const std::vector<Parameter<T>*>& params, double lr,
                const std::vector<Tensor<T>>& lr_scales = {}) {
    CBQ_CHECK(lr_scales.empty() || lr_scales.size() == params.size(),
              "Adam: group '{}' has {} parameters but {} learning-rate scales", name, params.size(),
              lr_scales.size());
    CBQ_CHECK(lr >= 0 && std::isfinite(lr), "Adam: learning rate of group '{}' is {}", name, lr);
    Group g{std::move(name), lr, {}};
    for (size_t i = 0; i < params.size(); ++i) {
      Parameter<T>* p = params[i];
      CBQ_CHECK(p && p->trainable, "Adam: parameter '{}' in group '{}' is not trainable",
                p ? p->name : "(null)", g.name);
      Tensor<T> scale;
      if (!lr_scales.empty()) {
        CBQ_CHECK(lr_scales[i].shape() == p->value.shape(),
                  "Adam: learning-rate scale {} does not match parameter '{}' {}",
                  lr_scales[i].shape(), p->name, p->value.shape());
        // Kept contiguous on the parameter's device (a copy when it lives elsewhere).
        scale = lr_scales[i].device() == p->value.device() && lr_scales[i].is_contiguous()
                    ? lr_scales[i]
                    : lr_scales[i].contiguous().to(p->value.device());
      }
      g.slots.push_back(Slot{p, Tensor<T>(p->value.shape(), p->value.device()),
                             Tensor<T>(p->value.shape(), p->value.device()), scale});
    }
    groups_.push_back(std::move(g));
    return static_cast<int>(groups_.size()) - 1;
  }

  std::size_t num_groups() const { return groups_.size(); }
  const Group& group(std::size_t i) const { return groups_.at(i); }
  Group& group(std::size_t i) { return groups_.at(i); }
  double lr(std::size_t i) const { return groups_.at(i).lr; }
  void set_lr(std::size_t i, double lr) { groups_.at(i).lr = lr; }
  int64_t steps() const { return t_; }
  void set_steps(int64_t t) { t_ = t; }  // for resuming from a checkpoint
  const AdamOptions& options() const { return options_; }

  // One update of every parameter from its accumulated gradient.
  void step() {
    ++t_;
    const T b1 = static_cast<T>(options_.beta1), b2 = static_cast<T>(options_.beta2);
    const T eps = static_cast<T>(options_.eps);
    const T bc1 = static_cast<T>(1 - std::pow(options_.beta1, static_cast<double>(t_)));
    const T bc2 = static_cast<T>(1 - std::pow(options_.beta2, static_cast<double>(t_)));
    for (Group& g : groups_) {
      const T lr = static_cast<T>(g.lr);
      for (Slot& s : g.slots) {
        Tensor<T>& p = s.param->value;
        const Tensor<T>& grad = s.param->grad;
        const int64_t n = p.numel();
        if (p.device() == Device::cuda)
          CBQ_CHECK(grad.device() == Device::cuda,
                    "Adam: parameter '{}' is on cuda but its gradient is on the cpu",
                    s.param->name);
        kernel_for(p.device(), &CpuAdam<T>::step, CudaAdam<T>::step, "Adam")(
            p.data(), s.m.data(), s.v.data(), grad.data(),
            s.lr_scale.defined() ? s.lr_scale.data() : nullptr, n, lr, b1, b2, eps, bc1, bc2);
      }
    }
  }

  void zero_grad() {
    for (Group& g : groups_)
      for (Slot& s : g.slots) s.param->zero_grad();
  }

 private:
  AdamOptions options_;
  std::vector<Group> groups_;
  int64_t t_ = 0;
};

}  // namespace cbq::optim
