#pragma once
// What a quantization pass returns: the integer weights of every linear layer with their scales
// and zero-points, the learned activation quantizers, and the statistics of the run.
#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "cbq/quant/grid.hpp"

namespace cbq {

struct LossTerms {
  double total = 0, l2_fp = 0, kld_fp = 0, l2_hom = 0, kld_hom = 0, round = 0;
  double output_kld = 0;  // the last window's KL of the model's output distribution (option)
  // λ · the attention-map KL of the window's attention units (ACBQ; PassOptions::attention_kl)
  double attention_kl = 0;
  // the weighted L2 + KL of the frozen units' output (PassOptions::boundary_loss)
  double boundary = 0;
  LossTerms& operator+=(const LossTerms& o) {
    total += o.total;
    l2_fp += o.l2_fp;
    kld_fp += o.kld_fp;
    l2_hom += o.l2_hom;
    kld_hom += o.kld_hom;
    round += o.round;
    output_kld += o.output_kld;
    attention_kl += o.attention_kl;
    boundary += o.boundary;
    return *this;
  }
  LossTerms operator/(double k) const {
    return {total / k, l2_fp / k,      kld_fp / k,       l2_hom / k,  kld_hom / k,
            round / k, output_kld / k, attention_kl / k, boundary / k};
  }
  // The reconstruction part (what the window is meant to minimise, without the regulariser).
  double reconstruction() const {
    return l2_fp + kld_fp + l2_hom + kld_hom + output_kld + attention_kl + boundary;
  }
};

// Where a window's wall time went (not kept in checkpoints: 0 for windows a run resumed past).
struct WindowTimes {
  double start = 0;        // installing the window's new quantizers (with the GPTQ start: its
                           // Hessians and solves)
  double targets = 0;      // the full-precision targets, activation ranges, loss scaling
  double steps = 0;        // the optimiser steps
  double evaluations = 0;  // the window loss over all samples before and after (and the judging)
  double advance = 0;      // hardening, the quantized path's advance and the layers' errors
  double total() const { return start + targets + steps + evaluations + advance; }
};

struct WindowStats {
  // The window's first and last unit (blocks, or sub-block units: pass/units.hpp) and its label
  // ("blocks 0..1", "units 0.attention..0.ffn").
  int64_t first_block = 0, last_block = 0, steps = 0;
  std::string units;
  double seconds = 0;  // train_window: the steps and the evaluations
  WindowTimes times;
  // Means over the last `balance_samples` calibration samples (the held-out ones, or all of them:
  // PassOptions::balance_all_samples), in the pass's loss scale (PassOptions::loss_scale).
  // `total` is the reconstruction part; `round` holds γ_r·L_round at β_start (before) / β_end
  // (after), not added to `total`.
  int64_t balance_samples = 0;   // 0 in checkpoints written before it was recorded (then: all)
  LossTerms loss_before;         // before the window trains, in the training forward
  LossTerms loss_after;          // after training, in the training forward
  LossTerms loss_hard;           // after training with hard rounding (what harden() deploys)
  LossTerms first_epoch_loss;    // mean over the first epoch's steps (training terms)
  LossTerms final_loss;          // mean over the last epoch's steps
  std::vector<LossTerms> curve;  // every optimiser step's training terms, in order
  // The targets' energy mean_t ‖a_t‖² (T_fp(X_fp), T_fp(X_q)) over the window's samples.
  double energy_fp = 0, energy_hom = 0;
  // Start vs trained (PassOptions::keep_better): the reconstruction with hard rounding on the
  // `heldout` samples held out from training (0: judged on the training samples), and whether
  // the window went back to its start.
  bool judged = false;
  int64_t heldout = 0;
  LossTerms heldout_start, heldout_trained;
  bool kept_start = false;
  // Why training stopped early, when it turned non-finite (the window then keeps its start and
  // heldout_trained holds the start's terms); empty when it did not.
  std::string diverged;
};

struct LayerResult {
  std::string name;  // "layers.3.q_proj"
  quant::QuantizedWeight weight;
  double act_scale = 0;  // static per-tensor activation step (0: none)
  double act_zero = 0;
  double act_clip_logit = 0;  // per-token clipping factor σ(c) (0 logit: none)
  double step_change = 0;     // CBQ: mean |s − s_RTN| / s_RTN at the end
  double rounding_flips = 0;  // CBQ: fraction of codes that differ from round-to-nearest
  double codes_changed = 0;   // CBQ: fraction of codes that differ from the start's (RTN/GPTQ)
  // CBQ: ‖x(Ŵ − W)ᵀ‖² / ‖xWᵀ‖² over the layer's calibration inputs on the quantized path, for
  // the start's weight and the final one.
  double output_error_start = 0, output_error = 0;
};

struct SiteScaling {
  std::string name;  // "layers.0.attn_in"
  int64_t channels = 0, scaled = 0;
  double max_before = 0, max_after = 0;  // largest per-channel |activation| maximum
};

struct PreprocessStats {
  std::string method;  // "cfp", "smoothquant"
  std::vector<SiteScaling> sites;
};

struct QuantizationResult {
  std::string method;  // "cbq", "rtn", "gptq"
  std::string config;  // e.g. "W4A16 g32 window 2/1 LoRA-Rounding r5"
  std::vector<LayerResult> layers;
  std::vector<WindowStats> windows;
  PreprocessStats preprocess;
  double seconds = 0;
  std::size_t activation_bytes = 0;  // calibration activations held by the pass
  // Adaptive groups (ACBQ): the measured D(u, u+1) of adjacent units, and the groups chosen from
  // them; both empty for sliding windows.
  std::vector<double> dependencies;
  struct UnitGroup {
    int64_t first = 0, last = 0;  // units [first, last]
    std::string label;            // e.g. "units 3.attention..3.ffn"
  };
  std::vector<UnitGroup> groups;

  // Means over layers of step_change and rounding_flips.
  // Windows that went back to their start (PassOptions::keep_better).
  int64_t windows_kept_start() const {
    int64_t n = 0;
    for (const auto& w : windows) n += w.kept_start ? 1 : 0;
    return n;
  }
  std::pair<double, double> learning_summary() const {
    double a = 0, b = 0;
    for (const auto& l : layers) {
      a += l.step_change;
      b += l.rounding_flips;
    }
    const double n = std::max<double>(1.0, static_cast<double>(layers.size()));
    return {a / n, b / n};
  }
  const LayerResult* find(const std::string& name) const {
    for (const auto& l : layers)
      if (l.name == name) return &l;
    return nullptr;
  }
};

}  // namespace cbq
