#pragma once
// The run-time description of a CBQ pass (PassSpec: what the compile-time policies of
// pass/policies.hpp describe) and its options (PassOptions: learning rates, loss terms, device).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include "cbq/pass/policies.hpp"
#include "cbq/quant/lora_rounding.hpp"

namespace cbq {

// CFP (coarse-to-fine pre-processing) and the SmoothQuant-style alternative for the ablation.
enum class ActivationScaling { none, cfp, smoothquant };

// Where a pass on the GPU keeps its four calibration activation sets: automatic puts them in GPU
// memory when they fit beside the model and the window's working set, else in host memory (each
// sample is then copied to the GPU when a step uses it).
enum class ActivationPlacement { automatic, device, host };

// Where the learned quantizer of a layer starts: round-to-nearest of the layer's weight with
// min/max steps (the paper), or GPTQ's solution — the error-compensated weight GPTQ rounded, with
// its steps and zero-points, Hessians from the quantized path — so the learned rounding starts
// at GPTQ's codes (docs/PASS.md, "GPTQ start").
enum class WeightInit { rtn, gptq };

// What the window's reconstruction terms are measured against (docs/PASS.md, "Loss balance").
//   absolute: mean_t ‖a_t − b_t‖² and KL(softmax(a_t/τ) ‖ softmax(b_t/τ)) on the raw residual
//             stream — the paper's form, whose size follows the model's activation scale (on
//             SmolLM2-135M it grows 10^3-fold along the blocks);
//   window:   the L2 terms divided by the target's energy mean_t ‖a_t‖² over the window's
//             calibration samples (a relative error), the KL at τ = the target's RMS element;
//   token:    every token's error relative to its own target energy,
//             mean_t ‖a_t − b_t‖² / ‖a_t‖², and the KL over the RMS-normalised tokens
//             a_t / rms(a_t) (what the next block's norm sees) — no token or window dominates.
// With window or token the terms are dimensionless and γ_r weighs the regulariser against a
// relative error.
enum class LossScale { absolute, window, token };

// Whether the learned weight steps move the rounding grid (docs/PASS.md, "Fixed grid").
//   learned: Ŵ = s·(floor(W/s) + h(V) − z): a new step re-rounds every weight (the paper);
//   fixed:   Ŵ = (s/s₀)·s₀·(floor(W/s₀) + h(V) − z): the integer grid stays the start's (RTN's
//            or GPTQ's codes, up to the learned rounding h) and the step scales it;
//   automatic: fixed for the GPTQ start (GPTQ's error feedback is only valid for its own
//            codes), learned for the RTN start.
enum class GridMode { automatic, learned, fixed };

// How ACBQ's adaptive groups measure the dependency D(u, u+1) of adjacent units (docs/ACBQ.md,
// pass/adaptive_groups.hpp):
//   entropy:    1 − the mean over tokens of the Jensen–Shannon divergence (in bits) between the
//               two units' outputs as distributions over channels (softmax of the RMS-normalised
//               token, the distribution the KL term compares): how much of unit u's output
//               distribution unit u+1 passes on;
//   error_gain: how much unit u+1 amplifies an error made in unit u: the relative output error
//               after unit u+1 over the relative error after unit u, with unit u alone
//               round-to-nearest quantized.
enum class DependencyMeasure { entropy, error_gain };

struct PassOptions {
  // Optimisation (per window): E epochs over the N calibration samples, batch 1.
  int64_t epochs = 3;
  // Step-size rates are relative: an update moves a step by about lr × its initial (RTN) value.
  double lr_weight_step = 1e-2;  // s_w   (paper: 1e-7 — see docs/RESULTS.md)
  double lr_act_step = 1e-2;     // s_x, or the clipping logit c (absolute) (paper: 1e-6)
  double lr_rounding = 1e-2;     // A1, A2 or V (paper: 1e-4)
  double lr_min_fraction = 0.0;  // cosine annealing down to lr · lr_min_fraction
  bool lsq_grad_scale = true;
  // Loss: E(a, b) = l2 · mean_t ‖a_t − b_t‖² + kld · KL(softmax(a_t/τ) ‖ softmax(b_t/τ))
  bool loss_l2 = true;
  bool loss_kld = true;
  bool loss_homologous = true;      // the E(T_fp(X_q), T_q(X_q)) term
  bool loss_full_precision = true;  // the E(T_fp(X_fp), T_q(X_q)) term
  double kld_temperature = 1.0;     // multiplies the temperature loss_scale sets (absolute: 1)
  LossScale loss_scale = LossScale::token;
  // Each window keeps the better of its start and its trained state, judged by the
  // reconstruction loss with hard rounding on calibration samples held out from its training:
  // max(holdout_min, round(holdout_fraction · N)) of them, at most N / 2 (0 when N < 2: then the
  // training samples judge). Off: every sample trains and the trained state is kept (the paper).
  bool keep_better = true;
  double holdout_fraction = 0.1;
  int64_t holdout_min = 4;
  // The window's loss balance (WindowStats::loss_before/after/hard) is measured on the held-out
  // samples only when there are any: the start-vs-trained decision needs no more, and forwards
  // over every sample were about 15 % of a stories260K window (docs/PERFORMANCE.md). True: on
  // every sample, as the balance tables of docs/RESULTS.md (cbq-balance, `--balance-all-samples`).
  bool balance_all_samples = false;
  // With windows that overlap by one unit (the default 2/1), the full-precision output of a
  // window's first unit is the last window's T_fp(X_fp): the targets pass starts from it instead of
  // recomputing it (bit for bit the same: the same unit on the same input; one of the four unit
  // forwards of a window's targets). Off: recompute (tests compare the two). Not with the
  // attention-map term on the full-precision path, which captures every unit's q and k.
  bool reuse_fp_outputs = true;
  GridMode grid = GridMode::automatic;
  // > 0: the window that ends at the model's last block also minimises this weight times
  // KL(softmax(head(T_fp(X_fp))) ‖ softmax(head(T_q(X_q)))), the model's output distribution
  // (final norm and LM head in full precision) — what perplexity measures (docs/PASS.md).
  double output_kld = 0.0;
  bool output_kld_all = false;  // every window, through the later blocks in full precision
  // > 0: a window whose last unit is not among those it freezes also scores the frozen units'
  // output (the next window's input) against both targets there, T_fp(X_fp) and T_fp(X_q) at
  // unit finalize − 1, with this weight times the same L2 + KL terms (ours; docs/ACBQ.md
  // "Boundary loss"). Without it the frozen units are trained only through the later units,
  // which the next window trains again.
  double boundary_loss = 0.0;
  // ACBQ's attention-unit objective (docs/ACBQ.md): > 0 adds this weight λ times the mean over
  // query rows and heads of KL(P_fp ‖ P_q) for every attention in the window, P_fp the full-
  // precision path's attention probabilities, P_q the quantized path's (ops::attention_map_kl).
  double attention_kl = 0.0;
  // The maps it matches: the full-precision path's (false: FP blocks on FP inputs, as the L2
  // term against T_fp(X_fp)) or the homologous ones (true: FP weights on the quantized path's
  // input, as the term against T_fp(X_q)).
  bool attention_kl_homologous = false;
  // ACBQ's adaptive groups (PassSpec::schedule = adaptive): D(u, u+1) measured on the first
  // dependency_samples calibration samples, normalised by its mean over the model; consecutive
  // units join a group while the group's mean normalised dependency is at least group_threshold,
  // up to PassSpec::window_blocks units.
  DependencyMeasure dependency = DependencyMeasure::error_gain;
  double group_threshold = 1.0;
  int64_t dependency_samples = 16;
  // Adaptive groups: each window is extended unit by unit to at least this many units (0: its
  // group and the overlap groups after it, however short; ours, docs/ACBQ.md "Window span").
  int64_t min_window_units = 0;
  // A window that freezes only half a block (sub-block units) trains this fraction of the
  // epochs × samples steps (1: all of them). 0.5 gives every block CBQ's steps however finely the
  // windows advance (ours, docs/ACBQ.md "Window span"). No effect on whole-block units.
  double half_block_steps = 1.0;
  // Rounding regulariser γ_r · L_round, L_round = mean over the window's rounding weights of
  // (1 − |2h − 1|^β); β anneals from beta_start to beta_end after the warm-up.
  double gamma_round = 0.01;
  double beta_start = 20.0;
  double beta_end = 2.0;
  double round_warmup = 0.2;
  quant::LoraStart lora_start = quant::LoraStart::adaround;
  bool v0_tracks_step = true;  // AdaRound start: V0 follows the learned steps (PASS.md)
  // hard_ste: train on the integer weights (straight-through); soft: the paper's h(V) forward.
  quant::RoundingMode rounding_mode = quant::RoundingMode::hard_ste;
  double lora_a1_std = 0.0;  // 0: 1/sqrt(rank)
  // GPTQ start by default: closer to FP than the RTN start on every model and seed of the
  // defaults sweep (docs/RESULTS.md, "Defaults across models"); the presets below start at RTN.
  WeightInit weight_init = WeightInit::gptq;
  // Also learn the window's normalisation parameters (RMSNorm / LayerNorm weights and biases),
  // the non-quantized parameters that scale every quantized layer's input channels; the full-
  // precision targets keep the original values (docs/PASS.md, "Learned norms").
  bool learn_norms = false;
  double lr_norm = 1e-3;        // absolute (the parameters are O(1))
  double gptq_percdamp = 0.01;  // GPTQ start: dampening, λ = percdamp · mean(diag H)
  // Which step sizes learn (ablations).
  bool learn_weight_step = true;
  bool learn_act_step = true;
  // Pre-processing.
  ActivationScaling activation_scaling = ActivationScaling::none;
  bool cfp_weights = false;  // truncate weight outliers per layer (CFP coarse-to-fine)
  double smoothquant_alpha = 0.5;
  // Run.
  // Where the pass computes: cuda moves the model to the GPU (it stays there afterwards) and
  // trains every window there; the result (codes, scales) is on the host either way.
  Device device = Device::cpu;
  // Flush subnormal floats to zero on the CPU threads while the pass runs (core/denormals.hpp):
  // its backward makes them, and each costs x86 CPUs ~100 cycles; the results differ from a run
  // without it only where a value below 1.2e-38 (float) was rounded (docs/PASS.md).
  bool flush_denormals = true;
  ActivationPlacement activation_placement = ActivationPlacement::automatic;
  uint64_t seed = 0;
  bool verbose = true;
  int64_t max_steps = 0;  // > 0: stop each window after this many steps (smoke tests)
  // Checkpoints (pass/checkpoint.hpp): non-empty → write DIR/cbq-checkpoint.safetensors after
  // every window; with resume, continue from it when it exists (fingerprints must match).
  std::string checkpoint_dir;
  // Non-empty: keep the calibration activation sets in file mappings in this directory, paged
  // to disk by the kernel when they do not fit in memory (pass/activation_store.hpp).
  std::string activation_dir;
  bool resume = false;
  // Called after every optimiser step with (window index from 1, step within the window); tests
  // use it to kill the process mid-window.
  std::function<void(int64_t, int64_t)> on_step;

  // The paper's hyper-parameters (Ding et al., §4.1), kept as a named preset. Under Adam the
  // step-size rates move nothing (DESIGN §2 "Known traps"); docs/RESULTS.md has the evidence.
  static PassOptions paper() {
    PassOptions o;
    o.lr_weight_step = 1e-7;
    o.lr_act_step = 1e-6;
    o.lr_rounding = 1e-4;
    o.lora_start = quant::LoraStart::half;
    o.v0_tracks_step = false;
    o.rounding_mode = quant::RoundingMode::soft;
    o.loss_scale = LossScale::absolute;
    o.keep_better = false;
    o.grid = GridMode::learned;
    o.weight_init = WeightInit::rtn;
    return o;
  }
  // The defaults before the loss balance and the keep-the-better rule (cbq ≤ 0.1, commit
  // 9a4b0dd): unnormalised terms, every sample trains, the trained state is kept, RTN start.
  static PassOptions classic() {
    PassOptions o;
    o.loss_scale = LossScale::absolute;
    o.keep_better = false;
    o.grid = GridMode::learned;
    o.weight_init = WeightInit::rtn;
    return o;
  }
  // For 4-bit activations (W4A4), with full-matrix rounding in the PassSpec
  // (cbq-quantize --preset a4): the output distribution's KL (weight 1) in the last window.
  // Chosen on stories260K, confirmed on aidreams260K, with and without rotation
  // (docs/ROTATION.md, "Variants of CBQ on the rotated model").
  static PassOptions low_bit_activations() {
    PassOptions o;
    o.output_kld = 1.0;
    return o;
  }
  // ACBQ (docs/ACBQ.md; cbq::Acbq, cbq-quantize --method acbq): the attention-map term at
  // weight attention_kl, the error-gain dependency for the adaptive groups, windows of at least
  // two blocks' units (CBQ's span) and 3/4 of the steps in windows that freeze half a block.
  static PassOptions acbq() {
    PassOptions o;
    o.attention_kl = 0.0;  // measured: no gain, 4x the step time (docs/ACBQ.md)
    o.dependency = DependencyMeasure::error_gain;
    o.group_threshold = 1.0;
    o.min_window_units = 4;     // measured on stories260K (docs/ACBQ.md "Window span")
    o.half_block_steps = 0.75;  // the same: 1.2–1.3× CBQ's time instead of 1.3–1.5×
    return o;
  }
  // The optimiser steps of a window that trains on n_train samples and freezes only half a
  // block (half_block) or more: epochs × n_train, scaled by half_block_steps, at most max_steps.
  int64_t window_steps(int64_t n_train, bool half_block) const {
    int64_t steps = epochs * n_train;
    if (half_block && half_block_steps != 1.0)
      steps = std::max<int64_t>(1, std::llround(static_cast<double>(steps) * half_block_steps));
    return max_steps > 0 ? std::min(steps, max_steps) : steps;
  }
  // Samples held out from training to judge start vs trained (see keep_better).
  int64_t holdout_samples(int64_t n) const {
    if (!keep_better || n < 2) return 0;
    const auto by_fraction =
        static_cast<int64_t>(std::llround(holdout_fraction * static_cast<double>(n)));
    return std::min(std::max(holdout_min, by_fraction), n / 2);
  }
  // How many samples (the last ones) the balance is measured on: see balance_all_samples.
  int64_t balance_samples(int64_t n) const {
    const int64_t heldout = holdout_samples(n);
    return heldout > 0 && !balance_all_samples ? heldout : n;
  }
  // Whether a window of units [first, last] starts its full-precision pass from the last window's
  // T_fp(X_fp), that window having ended at unit previous_last: see reuse_fp_outputs.
  bool carries_fp_output(int64_t previous_last, int64_t first, int64_t last) const {
    const bool captures_fp_attention = attention_kl > 0 && !attention_kl_homologous;
    return reuse_fp_outputs && previous_last == first && first < last && !captures_fp_attention;
  }
  // Whether the grid stays at the start's steps (see GridMode).
  bool fixed_grid() const {
    return grid == GridMode::fixed ||
           (grid == GridMode::automatic && weight_init == WeightInit::gptq);
  }
};

}  // namespace cbq
