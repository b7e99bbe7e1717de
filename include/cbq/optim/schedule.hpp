#pragma once
// Learning-rate schedules.
#include <cmath>
#include <cstdint>
#include <numbers>

#include "cbq/core/error.hpp"

namespace cbq::optim {

// Cosine annealing (Loshchilov & Hutter 2017) without restarts:
//   lr(t) = lr_min + (lr_max − lr_min) · (1 + cos(π · t / T)) / 2,  t ∈ [0, T],
// so lr(0) = lr_max and lr(T) = lr_min; t beyond T stays at lr_min.
class CosineSchedule {
 public:
  CosineSchedule(double lr_max, int64_t total_steps, double lr_min = 0.0)
      : lr_max_(lr_max), lr_min_(lr_min), total_(total_steps) {
    CBQ_CHECK(total_steps > 0, "CosineSchedule: total steps must be positive, got {}", total_steps);
    CBQ_CHECK(lr_min <= lr_max, "CosineSchedule: lr_min {} exceeds lr_max {}", lr_min, lr_max);
  }
  double at(int64_t step) const {
    if (step >= total_) return lr_min_;
    if (step <= 0) return lr_max_;
    const double c =
        std::cos(std::numbers::pi * static_cast<double>(step) / static_cast<double>(total_));
    return lr_min_ + (lr_max_ - lr_min_) * (1 + c) / 2;
  }
  int64_t total_steps() const { return total_; }

 private:
  double lr_max_, lr_min_;
  int64_t total_;
};

}  // namespace cbq::optim
