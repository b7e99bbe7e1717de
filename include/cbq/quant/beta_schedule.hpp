#pragma once
// The β schedule of LoRA-Rounding's rounding regulariser (quant/adaround.hpp) over a window's
// optimisation steps.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "cbq/core/error.hpp"

namespace cbq::quant {

// β schedule of the regulariser: off during the warm-up (the first warmup_fraction of the
// window's steps), then β anneals from beta_start at the first regularised step to beta_end at
// the last step (total_steps − 1). Linear by default, as AdaRound's temperature decay; cosine
// (β = end + (start − end)·(1 + cos πp)/2) on request.
struct BetaSchedule {
  enum class Anneal { linear, cosine };
  int64_t total_steps = 0;
  double warmup_fraction = 0.2;
  double beta_start = 20.0;
  double beta_end = 2.0;
  Anneal anneal = Anneal::linear;

  void validate() const {
    CBQ_CHECK(total_steps >= 1, "BetaSchedule: total_steps = {} must be at least 1", total_steps);
    CBQ_CHECK(warmup_fraction >= 0.0 && warmup_fraction < 1.0,
              "BetaSchedule: warmup_fraction = {} must be in [0, 1)", warmup_fraction);
    CBQ_CHECK(beta_start >= 1.0 && beta_end >= 1.0,
              "BetaSchedule: beta_start = {} and beta_end = {} must be at least 1", beta_start,
              beta_end);
  }
  int64_t warmup_steps() const {
    return static_cast<int64_t>(std::floor(warmup_fraction * static_cast<double>(total_steps)));
  }
  // Whether the regulariser is on at `step` (0-based).
  bool active(int64_t step) const {
    validate();
    return step >= warmup_steps();
  }
  // Fraction of the annealing done at `step`: 0 at the first regularised step, 1 at the last.
  double progress(int64_t step) const {
    validate();
    const int64_t w = warmup_steps(), span = total_steps - 1 - w;
    if (span <= 0) return step >= w ? 1.0 : 0.0;
    return std::clamp(static_cast<double>(step - w) / static_cast<double>(span), 0.0, 1.0);
  }
  // β at `step` (beta_start during the warm-up, where it is unused).
  double beta(int64_t step) const {
    const double p = progress(step);
    if (anneal == Anneal::linear) return beta_start + (beta_end - beta_start) * p;
    return beta_end + (beta_start - beta_end) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
  }
};

}  // namespace cbq::quant
