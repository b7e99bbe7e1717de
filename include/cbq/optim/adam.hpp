#pragma once
// Adam (Kingma & Ba 2015) with bias correction, over parameter groups that each have their own
// learning rate (CBQ trains weight steps, activation steps and rounding factors at very
// different rates). State (m, v) is kept in the parameter's scalar type, fp32 master values.
//
//   m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
//   p ← p − lr · m̂ / (sqrt(v̂) + ε),   m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

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
    int64_t i = 0;
#if defined(__SSE2__)
    // Four floats at a time with the same IEEE operations in the same order (SSE2, x86-64's
    // baseline: no FMA to contract into), so the bits equal the loop below. That loop alone
    // stays scalar: with errno-setting sqrt GCC will not vectorise it.
    if constexpr (std::is_same_v<T, float>) {
      const __m128 b1 = _mm_set1_ps(beta1), c1 = _mm_set1_ps(1 - beta1);
      const __m128 b2 = _mm_set1_ps(beta2), c2 = _mm_set1_ps(1 - beta2);
      const __m128 vlr = _mm_set1_ps(lr), veps = _mm_set1_ps(eps);
      const __m128 bc1 = _mm_set1_ps(bias_correction1), bc2 = _mm_set1_ps(bias_correction2);
      for (; i + 4 <= n; i += 4) {
        const __m128 g = _mm_loadu_ps(grad + i);
        const __m128 mi = _mm_add_ps(_mm_mul_ps(b1, _mm_loadu_ps(m + i)), _mm_mul_ps(c1, g));
        const __m128 vi =
            _mm_add_ps(_mm_mul_ps(b2, _mm_loadu_ps(v + i)), _mm_mul_ps(_mm_mul_ps(c2, g), g));
        _mm_storeu_ps(m + i, mi);
        _mm_storeu_ps(v + i, vi);
        __m128 update = _mm_div_ps(_mm_mul_ps(vlr, _mm_div_ps(mi, bc1)),
                                   _mm_add_ps(_mm_sqrt_ps(_mm_div_ps(vi, bc2)), veps));
        if (lr_scale) update = _mm_mul_ps(_mm_loadu_ps(lr_scale + i), update);
        _mm_storeu_ps(param + i, _mm_sub_ps(_mm_loadu_ps(param + i), update));
      }
    }
#endif
    for (; i < n; ++i) {
      m[i] = beta1 * m[i] + (1 - beta1) * grad[i];
      v[i] = beta2 * v[i] + (1 - beta2) * grad[i] * grad[i];
      const T update = lr * (m[i] / bias_correction1) / (std::sqrt(v[i] / bias_correction2) + eps);
      param[i] -= lr_scale ? lr_scale[i] * update : update;
    }
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
    Tensor<T> lr_scale;       // optional per-element learning-rate factor (undefined: 1)
    int64_t cpu_offset = -1;  // a CPU parameter's first element among all CPU parameters' ones
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
                             Tensor<T>(p->value.shape(), p->value.device()), scale, -1});
      if (p->value.device() == Device::cpu) {
        g.slots.back().cpu_offset = cpu_elements_;
        cpu_elements_ += p->value.numel();
      }
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
        if (s.cpu_offset >= 0) continue;  // below, with the other CPU parameters
        const Tensor<T>& grad = s.param->grad;
        CBQ_CHECK(grad.device() == Device::cuda,
                  "Adam: parameter '{}' is on cuda but its gradient is on the cpu", s.param->name);
        kernel_for(s.param->value.device(), &CpuAdam<T>::step, CudaAdam<T>::step, "Adam")(
            s.param->value.data(), s.m.data(), s.v.data(), grad.data(),
            s.lr_scale.defined() ? s.lr_scale.data() : nullptr, s.param->value.numel(), lr, b1, b2,
            eps, bc1, bc2);
      }
    }
    // Elementwise: every element gets the same operations whatever the split.
    for_cpu_pieces([&](const Group& g, Slot& s, int64_t b, int64_t e) {
      CpuAdam<T>::step(s.param->value.data() + b, s.m.data() + b, s.v.data() + b,
                       s.param->grad.data() + b,
                       s.lr_scale.defined() ? s.lr_scale.data() + b : nullptr, e - b,
                       static_cast<T>(g.lr), b1, b2, eps, bc1, bc2);
    });
  }

  // Zeroes every gradient; the CPU ones in one split of all their elements, as in step().
  void zero_grad() {
    for (Group& g : groups_)
      for (Slot& s : g.slots)
        if (s.cpu_offset < 0) s.param->zero_grad();
    for_cpu_pieces([](const Group&, Slot& s, int64_t b, int64_t e) {
      if (s.param->grad.defined()) std::fill_n(s.param->grad.data() + b, e - b, T(0));
    });
  }

 private:
  static constexpr int64_t kCpuGrain = 1 << 12;  // elements per thread, at least
  // f(group, slot, begin, end) over pieces of the CPU slots, all their elements split over the
  // threads as one range (CBQ's parameters are many small tensors, each too small to split).
  template <class F>
  void for_cpu_pieces(F&& f) {
    if (cpu_elements_ == 0) return;
    parallel_for(cpu_elements_, kCpuGrain, [&](int64_t i0, int64_t i1) {
      for (Group& g : groups_)
        for (Slot& s : g.slots) {
          if (s.cpu_offset < 0) continue;
          const int64_t n = s.param->value.numel();
          const int64_t b = std::max(i0, s.cpu_offset), e = std::min(i1, s.cpu_offset + n);
          if (b < e) f(g, s, b - s.cpu_offset, e - s.cpu_offset);
        }
    });
  }

  AdamOptions options_;
  std::vector<Group> groups_;
  int64_t cpu_elements_ = 0;  // of all CPU parameters together
  int64_t t_ = 0;
};

}  // namespace cbq::optim
