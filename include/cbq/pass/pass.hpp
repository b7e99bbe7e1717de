#pragma once
// The CBQ pass (Ding et al., arXiv 2312.07950): cross-block reconstruction over a sliding window
// of transformer blocks, jointly learning weight steps, activation steps / clipping factors and
// the LoRA-Rounding of every linear layer. DESIGN §2 is the specification; docs/PASS.md explains
// the implementation choices.
//
// Per window [i, k] (window_schedule):
//   targets   T_fp(X_fp) (the full-precision path) and T_fp(X_q) (homologous: full-precision
//             blocks fed the quantized path), both constant while the window trains;
//   loss      E(T_fp(X_fp), T_q(X_q)) + E(T_fp(X_q), T_q(X_q)) + γ·L_round,
//             E(a, b) = mean_t ‖a_t − b_t‖² + mean_t KL(softmax(a_t) ‖ softmax(b_t)), each term
//             scaled per PassOptions::loss_scale (default: relative to each target token);
//   training  E epochs over the N − H samples, batch 1, Adam (three parameter groups), cosine LR;
//   judge     the better of the window's start and trained state on H held-out samples stays;
//   then      blocks leaving their last window are hard-rounded and frozen, and X_q advances.
//
// On the GPU (PassOptions::device = cuda) the model moves to the device and every forward,
// backward and optimiser step runs there; the activation sets live in GPU memory when they fit
// (else in host memory, one sample copied up per use), and the codes and scales of the result
// are on the host. docs/CUDA.md, "The pass on the GPU".
//
// Here: the schedule-driven run (quantizers installed per block, targets, hardening). The window's
// loss is pass/window_loss.hpp, its training pass/window_trainer.hpp, the window schedule
// pass/window_schedule.hpp, checkpoints and resume pass/resume.hpp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/denormals.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/ops/add.hpp"
#include "cbq/ops/kl_softmax.hpp"
#include "cbq/ops/linear.hpp"
#include "cbq/ops/matmul.hpp"
#include "cbq/ops/mse.hpp"
#include "cbq/ops/mul.hpp"
#include "cbq/ops/scale.hpp"
#include "cbq/pass/activation_store.hpp"
#include "cbq/pass/adaptive_groups.hpp"
#include "cbq/pass/block_measurements.hpp"
#include "cbq/pass/calibration.hpp"
#include "cbq/pass/checkpoint.hpp"
#include "cbq/pass/checks_and_timing.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/device_support.hpp"
#include "cbq/pass/preprocess.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/resume.hpp"
#include "cbq/pass/units.hpp"
#include "cbq/pass/window_loss.hpp"
#include "cbq/pass/window_schedule.hpp"
#include "cbq/pass/window_trainer.hpp"
#include "cbq/quant/gptq.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

// The configuration a pass runs with; Pass<...> builds it from its template arguments, and
// command-line tools build it at run time.
struct PassSpec {
  quant::GridSpec weight;
  int act_bits = 16;
  bool act_per_token = false;  // dynamic per-token (else static per-tensor) below 16 bits
  // Windows of whole blocks (CBQ) or of sub-block units (ACBQ: each block's attention and FFN
  // halves, pass/units.hpp); window_blocks and window_overlap count units.
  UnitKind units = UnitKind::blocks;
  // sliding: windows of window_blocks units overlapping by window_overlap; adaptive: groups of
  // at most window_blocks units from measured dependencies, each window a group and the
  // window_overlap groups after it (pass/adaptive_groups.hpp).
  WindowKind schedule = WindowKind::sliding;
  int64_t window_blocks = 2;
  int64_t window_overlap = 1;
  // Full-matrix (one variable per weight) since 2026-12-06: it was closer to FP than LoRA-Rounding
  // r5 at every setting of the cross-model sweep (docs/RESULTS.md, "Rounding"); the paper's
  // LoRA-Rounding (rank 5) holds a fraction of its state, for windows too large for that.
  RoundingKind rounding = RoundingKind::full;
  int64_t rank = 5;  // LoRA-Rounding's rank
  // Which linear layers' inputs are quantized below 16 bits, by the block's names (q_proj,
  // down_proj, fc1, ...); empty: all of them.
  std::vector<std::string> act_layers;

  ActMode act_mode() const {
    if (act_bits >= 16) return ActMode::none;
    return act_per_token ? ActMode::dynamic_per_token : ActMode::static_per_tensor;
  }
  // The per-layer quantizer configuration (weights, activations, rounding) of this spec.
  QuantLinearConfig layer_config() const {
    QuantLinearConfig c;
    c.weight = weight;
    c.act_bits = act_bits;
    c.act_mode = act_mode();
    c.rounding = rounding;
    c.rank = rank;
    return c;
  }
  // The configuration of the linear layer named `linear` (its activations may stay unquantized).
  QuantLinearConfig layer_config(const std::string& linear) const {
    QuantLinearConfig c = layer_config();
    if (!quantizes_input_of(linear)) {
      c.act_bits = 16;
      c.act_mode = ActMode::none;
    }
    return c;
  }
  bool quantizes_input_of(const std::string& linear) const {
    return act_layers.empty() ||
           std::find(act_layers.begin(), act_layers.end(), linear) != act_layers.end();
  }
  // Every name in act_layers must be a linear layer of the model's blocks.
  template <class Block>
  void check_act_layers(Block& block) const {
    std::string known;
    for (auto* l : block.linears()) known += (known.empty() ? "" : ", ") + l->name;
    for (const std::string& name : act_layers) {
      bool found = false;
      for (auto* l : block.linears()) found = found || l->name == name;
      CBQ_CHECK(found, "activation quantization: no linear layer named '{}' in a block (it has {})",
                name, known);
    }
  }
  // "W4A16 g32" (what RTN and GPTQ share with CBQ).
  std::string describe_quantizer() const {
    std::string gran = weight.granularity == quant::Granularity::per_group
                           ? fmt::format("g{}", weight.group_size)
                           : (weight.granularity == quant::Granularity::per_channel ? "per-channel"
                                                                                    : "per-tensor");
    std::string act = act_bits >= 16 ? "" : (act_per_token ? " per-token" : " per-tensor");
    if (act_bits < 16 && !act_layers.empty()) {
      std::string list;
      for (const auto& n : act_layers) list += (list.empty() ? "" : ",") + n;
      act += " inputs of " + list;
    }
    return fmt::format("W{}A{} {}{}{}", weight.bits, act_bits, gran, weight.symmetric ? " sym" : "",
                       act);
  }
  // "W4A16 g32 window 2/1 LoRA-Rounding r5".
  std::string describe() const {
    std::string round = rounding == RoundingKind::lora
                            ? fmt::format("LoRA-Rounding r{}", rank)
                            : (rounding == RoundingKind::full ? "full AdaRound" : "nearest");
    const std::string window =
        schedule == WindowKind::adaptive
            ? fmt::format("adaptive groups ≤ {}{}", window_blocks,
                          window_overlap > 0 ? fmt::format(" overlap {}", window_overlap) : "")
            : fmt::format("window {}/{}", window_blocks, window_overlap);
    return fmt::format("{} {}{} {}", describe_quantizer(), window,
                       units == UnitKind::sub_blocks ? " sub-block units" : "", round);
  }
};

// Whether the pass holds the full-precision model's last hidden states (output loss in every
// window).
inline bool pass_holds_fp_outputs(const PassOptions& o) {
  return o.output_kld > 0 && o.output_kld_all;
}
// How many N × L × d activation sets the pass holds: X_fp, X_q and the two targets, with the
// output loss in every window the full-precision model's last hidden states, and with the
// boundary loss the homologous target at the frozen units' output (X_fp is its other target).
inline int pass_activation_sets(const PassOptions& o) {
  return 4 + (pass_holds_fp_outputs(o) ? 1 : 0) + (o.boundary_loss > 0 ? 1 : 0);
}
// Bytes of those sets.
inline std::size_t pass_activation_bytes(int64_t samples, int64_t seq_len, int64_t dim,
                                         std::size_t scalar_bytes = sizeof(float), int sets = 4) {
  return static_cast<std::size_t>(sets) * static_cast<std::size_t>(samples * seq_len * dim) *
         scalar_bytes;
}

class CbqPass {
 public:
  CbqPass(const PassSpec& spec, PassOptions options = {}) : spec_(spec), options_(options) {
    spec_.weight.validate("CBQ");
    CBQ_CHECK(spec_.act_bits >= 16 || (spec_.act_bits >= 2 && spec_.act_bits <= 8),
              "CBQ: {} activation bits is unsupported (2 to 8, or 16 for none)", spec_.act_bits);
    CBQ_CHECK(spec_.rounding != RoundingKind::lora || spec_.rank >= 1,
              "CBQ: LoRA-Rounding rank {} must be at least 1", spec_.rank);
    CBQ_CHECK(spec_.window_overlap >= 0, "CBQ: window overlap {} must be ≥ 0",
              spec_.window_overlap);
    CBQ_CHECK(options_.attention_kl >= 0 && std::isfinite(options_.attention_kl),
              "CBQ: the attention-map weight {} must be a finite number ≥ 0",
              options_.attention_kl);
    CBQ_CHECK(options_.half_block_steps > 0 && options_.half_block_steps <= 1,
              "CBQ: the step fraction {} of half-block windows must be in (0, 1]",
              options_.half_block_steps);
    CBQ_CHECK(options_.boundary_loss >= 0 && std::isfinite(options_.boundary_loss),
              "CBQ: the boundary-loss weight {} must be a finite number ≥ 0",
              options_.boundary_loss);
  }
  const PassOptions& options() const { return options_; }
  const PassSpec& spec() const { return spec_; }

  // Quantizes `model` in place (installs a QuantLinear on every linear layer, hardened at the
  // end) and returns the integer weights and statistics.
  template <TransformerBlock Block>
  QuantizationResult run(Transformer<Block>& model, const Calibration& calib) {
    using T = typename Block::scalar_type;
    CBQ_CHECK(calib.size() >= 1, "CBQ: no calibration samples");
    // Embed on the pass's device (pre-processing runs on the host: the model moves later then).
    if (model.device() != options_.device && options_.activation_scaling == ActivationScaling::none)
      model.to(options_.device);
    std::vector<Tensor<T>> x0;
    for (int64_t n = 0; n < calib.size(); ++n) x0.push_back(model.embed_tensor(calib.samples[n]));
    return run_from_hidden(model, std::move(x0));
  }

  // The same pass from precomputed block-0 inputs (N tensors of shape (L, d)).
  template <TransformerBlock Block>
  QuantizationResult run_from_hidden(Transformer<Block>& model,
                                     std::vector<Tensor<typename Block::scalar_type>> inputs) {
    using T = typename Block::scalar_type;
    const auto start = std::chrono::steady_clock::now();
    const PassOptions& o = options_;
    const FlushDenormals flush(o.flush_denormals);  // every CPU thread, until the pass returns
    const int64_t K = model.num_blocks(), N = static_cast<int64_t>(inputs.size());
    CBQ_CHECK(N >= 1, "CBQ: no calibration samples");
    CBQ_CHECK(o.epochs >= 1, "CBQ: epochs must be at least 1, got {}", o.epochs);
    CBQ_CHECK(o.loss_full_precision || o.loss_homologous,
              "CBQ: both reconstruction terms are switched off; nothing to learn from");
    CBQ_CHECK(o.loss_l2 || o.loss_kld, "CBQ: both the L2 and the KLD terms are switched off");
    PassUnits<Transformer<Block>> units(model, spec_.units);
    const int64_t U = units.count();
    // Sliding windows now; adaptive groups after pre-processing, from the model it leaves.
    std::vector<Window> windows;
    if (spec_.schedule == WindowKind::sliding)
      windows = window_schedule(U, spec_.window_blocks, spec_.window_overlap);
    else
      CBQ_CHECK(spec_.window_blocks >= 1 && spec_.window_blocks <= U,
                "CBQ: adaptive groups of up to {} units, but the model has {} units",
                spec_.window_blocks, U);
    if (K > 0) spec_.check_act_layers(model.blocks[0]);
    const int64_t L = inputs[0].ndim() == 2 ? inputs[0].size(0) : 0, d = model.config.dim;
    for (int64_t n = 0; n < N; ++n) {
      CBQ_CHECK(inputs[n].ndim() == 2 && inputs[n].size(0) == L && inputs[n].size(1) == d,
                "CBQ: calibration sample {} has shape {}, expected ({}, {}) like sample 0", n,
                inputs[n].shape(), L, d);
      detail::check_finite(inputs[n], fmt::format("calibration sample {} (block 0 input)", n));
    }
    for (int64_t b = 0; b < K; ++b)
      for (auto* layer : model.blocks[b].linears())
        detail::check_finite(
            layer->weight.value,
            fmt::format("the weight of layers.{}.{} (block {})", b, layer->name, b));
    const bool checkpointing = !o.checkpoint_dir.empty();
    PassFingerprint fingerprint;
    if (checkpointing) {
      CBQ_CHECK((std::is_same_v<T, float>),
                "CBQ: checkpoints need a float32 model (this one computes in {}-byte scalars)",
                sizeof(T));
      fingerprint = {model_fingerprint(model), data_fingerprint(inputs),
                     config_fingerprint(describe(), o)};
    }

    QuantizationResult result;
    result.method = "cbq";
    result.config = describe() + describe_extensions(o, spec_);
    result.activation_bytes = pass_activation_bytes(N, L, d, sizeof(T), pass_activation_sets(o));
    if (o.verbose)
      fmt::print(
          "CBQ: {} blocks{}, {} windows of {} (overlap {}), {} samples × {} tokens, {} "
          "epochs; activations {:.1f} MiB\n",
          K, units.sub_blocks() ? fmt::format(" ({} sub-block units)", U) : std::string(),
          spec_.schedule == WindowKind::adaptive ? std::string("adaptive")
                                                 : fmt::format("{}", windows.size()),
          spec_.window_blocks, spec_.window_overlap, N, L, o.epochs,
          static_cast<double>(result.activation_bytes) / (1 << 20));
    if (o.verbose && !o.activation_dir.empty())
      fmt::print("CBQ: activations live in file mappings in {} (paged to disk as needed)\n",
                 o.activation_dir);

    // On the GPU, pre-processing (host loops over the model's weights) runs first, on the host.
    const bool preprocess_on_host = o.device != Device::cpu;
    if (preprocess_on_host && o.activation_scaling != ActivationScaling::none) {
      if (model.device() != Device::cpu) model.to(Device::cpu);
      result.preprocess = scale_activation_outliers(
          model, detail::on_host(inputs), o.activation_scaling, o.smoothquant_alpha, o.verbose);
    }
    if (model.device() != o.device) model.to(o.device);

    // The four activation sets (host memory, file-backed in activation_dir, or GPU memory).
    const Device act_device = activation_device(model, result.activation_bytes, L);
    ActivationSet<T> fp_set(N, L, d, o.activation_dir, "X_fp", act_device),
        q_set(N, L, d, o.activation_dir, "X_q", act_device),
        fp_target_set(N, L, d, o.activation_dir, "T_fp(X_fp)", act_device),
        hom_target_set(N, L, d, o.activation_dir, "T_fp(X_q)", act_device);
    std::vector<Tensor<T>> x_fp = fp_set.tensors(), x_q = q_set.tensors();
    std::vector<Tensor<T>> t_fp = fp_target_set.tensors(), t_hom = hom_target_set.tensors();
    for (int64_t n = 0; n < N; ++n) {
      x_fp[n].copy_from(inputs[n]);
      x_q[n].copy_from(inputs[n]);
    }
    inputs.clear();

    // Pre-processing: activation outlier scaling folded into the producers (exact), computed
    // from the full-precision path on the calibration data.
    if (!preprocess_on_host && o.activation_scaling != ActivationScaling::none)
      result.preprocess = scale_activation_outliers(model, x_fp, o.activation_scaling,
                                                    o.smoothquant_alpha, o.verbose);

    if (spec_.schedule == WindowKind::adaptive) {
      result.dependencies =
          unit_dependencies(units, x_fp, o.dependency, o.dependency_samples,
                            [&](int64_t u, bool on) { quantize_unit_nearest(units, u, on); });
      const std::vector<Window> groups =
          adaptive_groups(result.dependencies, o.group_threshold, spec_.window_blocks);
      windows = group_windows(groups, spec_.window_overlap, o.min_window_units);
      for (const Window& g : groups)
        result.groups.push_back({g.first, g.last, units.range(g.first, g.last)});
      if (o.verbose) print_groups(result, windows.size());
    }

    // Output loss in every window: the full-precision model's last hidden state of each sample,
    // the target all windows share, computed once here instead of in every step.
    ActivationSet<T> fp_output_set;
    std::vector<Tensor<T>> t_out;
    if (pass_holds_fp_outputs(o)) {
      fp_output_set =
          ActivationSet<T>(N, L, d, o.activation_dir, "T_fp(X) at the last block", act_device);
      t_out = fp_output_set.tensors();
      for (int64_t n = 0; n < N; ++n) {
        Tensor<T> x = x_fp[n];
        for (int64_t b = 0; b < K; ++b) x = model.run_block(b, x, fp_context<T>());
        t_out[n].copy_from(x);
      }
    }

    // Boundary loss: T_fp(X_q) at the output of the units a window freezes (their T_fp(X_fp) is
    // X_fp once the window's targets have advanced it).
    ActivationSet<T> boundary_set;
    std::vector<Tensor<T>> t_boundary_hom;
    if (o.boundary_loss > 0) {
      boundary_set = ActivationSet<T>(N, L, d, o.activation_dir,
                                      "T_fp(X_q) at the frozen units' output", act_device);
      t_boundary_hom = boundary_set.tensors();
    }

    // The installed quantizers per unit.
    std::vector<std::vector<std::shared_ptr<QuantLinear<T>>>> qlayers(static_cast<size_t>(U));
    // Learned norms: (parameter, the value it does not hold now). Swapped around every full-
    // precision computation, so the full-precision path keeps the model's original values.
    std::vector<std::pair<Parameter<T>*, Tensor<T>>> fp_norms;
    auto swap_norms = [&] {
      for (auto& [p, other] : fp_norms) std::swap(p->value, other);
    };

    PassProgress<T> progress{x_fp, x_q, qlayers, fp_norms, initialised_, result};
    int64_t windows_done = 0;
    if (checkpointing && o.resume && std::filesystem::exists(checkpoint_path(o.checkpoint_dir))) {
      if constexpr (std::is_same_v<T, float>) {
        windows_done = resume_from_checkpoint(o, units, windows, fingerprint, progress,
                                              [&](int64_t u) { return install(units, u); });
      }
    }

    int64_t window_index = 0;
    // The unit whose full-precision output t_fp holds (the last window's last unit; −1: none, as
    // after a resume, which does not restore t_fp).
    int64_t t_fp_unit = -1;
    for (const Window& w : windows) {
      ++window_index;
      if (window_index <= windows_done) continue;  // restored from the checkpoint
      const auto wstart = std::chrono::steady_clock::now();
      // 1. Quantizers for units entering their first window.
      for (int64_t u = w.first; u <= w.last; ++u)
        if (qlayers[u].empty()) {
          if (o.learn_norms)  // learn in a copy: the original may be a read-only mapping
            for (Parameter<T>* p : units.parameters(u)) {
              fp_norms.emplace_back(p, p->value);
              p->value = p->value.clone();
            }
          if (o.weight_init == WeightInit::gptq) {
            swap_norms();
            auto hessians = unit_hessians(units, w, u, x_q);
            swap_norms();
            qlayers[u] = install(units, u, hessians);
          } else
            qlayers[u] = install(units, u);
        }
      const double start_seconds = detail::seconds_since(wstart);
      auto phase = std::chrono::steady_clock::now();
      // 2. Targets: T_fp(X_fp) with X_fp advanced to the next window start on the way, and the
      //    homologous T_fp(X_q), whose pass also calibrates static activation steps.
      std::vector<quant::MinMaxObserver<T>> ranges;  // only static activation steps use them
      if (static_activation_steps()) ranges = observers<T>(units, w);
      // With the attention-map term, the q and k of every attention on the full-precision path
      // (or, homologous, with full-precision weights on the quantized path).
      AttentionTargets<T> attention;
      BlockContext<T> fp_ctx = fp_context<T>();
      size_t attention_index = 0;
      int64_t sample = 0;
      std::function<void(Var<T>, Var<T>)> capture;
      if (o.attention_kl > 0)
        capture = [&](Var<T> q, Var<T> k) {
          if (attention.q.size() <= attention_index) {
            attention.q.emplace_back(static_cast<size_t>(N));
            attention.k.emplace_back(static_cast<size_t>(N));
          }
          attention.q[attention_index][static_cast<size_t>(sample)] = q.value().clone();
          attention.k[attention_index][static_cast<size_t>(sample)] = k.value().clone();
          ++attention_index;
        };
      if (!o.attention_kl_homologous) fp_ctx.on_attention = capture;
      // The boundary loss's targets, where the window trains units beyond those it freezes.
      BoundaryTargets<T> boundary;
      if (o.boundary_loss > 0 && w.finalize <= w.last) {
        boundary.unit = w.finalize - 1;
        boundary.fp = &x_fp;
        boundary.hom = &t_boundary_hom;
      }
      // The first unit's full-precision output carried from the last window (reuse_fp_outputs).
      const bool reuse = o.carries_fp_output(t_fp_unit, w.first, w.last);
      swap_norms();  // the full-precision values
      // The samples side by side unless a callback must see them in order.
      const int target_chunks =
          sample_chunks(N, model.device(), model.config.dim, !capture && ranges.empty());
      for_sample_chunks<T>(
          N, target_chunks, model.device(), [&](int, int64_t begin, int64_t end, Tape<T>& tape) {
            for (int64_t n = begin; n < end; ++n) {
              Tensor<T> x = reuse ? t_fp[n].clone() : x_fp[n], next;
              if (capture) {
                attention_index = 0;
                sample = n;
              }
              if (reuse && w.first + 1 == w.finalize) next = x;
              for (int64_t u = reuse ? w.first + 1 : w.first; u <= w.last; ++u) {
                x = units.run(tape, u, x, fp_ctx);
                detail::check_finite(x, fmt::format("the full-precision path after {} (window {}, "
                                                    "calibration sample {})",
                                                    units.range(u, u), window_index, n));
                if (u + 1 == w.finalize) next = x;
              }
              t_fp[n].copy_from(x);
              x_fp[n].copy_from(next);  // the FP path enters the next window (at unit w.finalize)
              Tensor<T> h = x_q[n];
              if (capture) attention_index = 0;
              for (int64_t u = w.first; u <= w.last; ++u) {
                BlockContext<T> ctx = fp_context<T>();
                if (o.attention_kl_homologous) ctx.on_attention = capture;
                if (!ranges.empty())
                  ctx.on_linear_input = [&, u](const LinearLayer<T>& layer, const Tensor<T>& in) {
                    detail::observe(ranges[observer_index(units, w, u, layer)], in);
                  };
                h = units.run(tape, u, h, ctx);
                if (boundary.unit == u) t_boundary_hom[n].copy_from(h);
              }
              t_hom[n].copy_from(h);
            }
          });
      swap_norms();  // the learned values
      t_fp_unit = w.last;
      init_activation_steps(units, w, qlayers, ranges);

      // 3. Optimise the window (and keep the better of its start and its trained state).
      const LossScaling<T> scaling = measure_loss_scaling(o, t_fp, t_hom, model.device());
      if (boundary.unit >= 0)
        boundary.scaling = measure_loss_scaling(o, x_fp, t_boundary_hom, model.device());
      const double targets_seconds = detail::seconds_since(phase);
      WindowStats stats =
          train_window(units, w, qlayers, x_q, t_fp, t_hom, t_out, scaling, o, window_index,
                       static_cast<int64_t>(windows.size()), start, &attention, &boundary);
      stats.times.start = start_seconds;  // train_window timed its steps and evaluations
      stats.times.targets = targets_seconds;
      phase = std::chrono::steady_clock::now();

      // 4. Units leaving their last window: harden, freeze, advance the quantized path.
      for (int64_t u = w.first; u < w.finalize; ++u) {
        for (Parameter<T>* p : units.parameters(u)) {
          p->trainable = false;
          p->grad = Tensor<T>();
        }
        for (auto& q : qlayers[u]) q->harden();
        // Advance the quantized path, measuring each layer's output error on its inputs.
        const int advance_chunks = sample_chunks(N, model.device(), model.config.dim);
        LayerOutputErrors<T> errors(units.linears(u), qlayers[u], advance_chunks);
        for_sample_chunks<T>(
            N, advance_chunks, model.device(),
            [&](int chunk, int64_t begin, int64_t end, Tape<T>& tape) {
              BlockContext<T> ctx;
              ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
                errors.add(layer, in, chunk);
              };
              for (int64_t n = begin; n < end; ++n) {
                x_q[n].copy_from(units.run(tape, u, x_q[n], ctx));
                detail::check_finite(x_q[n], fmt::format("the quantized path after {} (window {}, "
                                                         "calibration sample {})",
                                                         units.range(u, u), window_index, n));
              }
            });
        errors.finish();
        for (auto& q : qlayers[u]) result.layers.push_back(layer_result(*q));
      }
      stats.times.advance = detail::seconds_since(phase);
      result.windows.push_back(stats);
      if (checkpointing) {
        if constexpr (std::is_same_v<T, float>)
          save_window_checkpoint(o.checkpoint_dir, fingerprint, window_index, w.last, progress);
      }
      if (o.verbose)
        fmt::print(
            "CBQ: window {}/{} done in {} (start {}, targets {}, {} steps {}, evaluations {}, "
            "advance {}); {} frozen\n",
            window_index, windows.size(), detail::format_duration(detail::seconds_since(wstart)),
            detail::format_duration(stats.times.start),
            detail::format_duration(stats.times.targets), stats.steps,
            detail::format_duration(stats.times.steps),
            detail::format_duration(stats.times.evaluations),
            detail::format_duration(stats.times.advance), units.range(w.first, w.finalize - 1));
    }
    result.seconds = detail::seconds_since(start);
    return result;
  }

  std::string describe() const { return spec_.describe(); }
  // The options beyond the paper that are on (PASS.md), for result labels: "" when none.
  static std::string describe_extensions(const PassOptions& o, const PassSpec& spec = {}) {
    std::string s;
    if (spec.schedule == WindowKind::adaptive && o.min_window_units > 0)
      s += fmt::format(" + windows ≥ {} units", o.min_window_units);
    if (o.half_block_steps != 1.0 && spec.units == UnitKind::sub_blocks)
      s += fmt::format(" + half-block windows x{:g} steps", o.half_block_steps);
    if (o.boundary_loss > 0) s += fmt::format(" + boundary loss x{:g}", o.boundary_loss);
    if (o.weight_init == WeightInit::gptq) s += " + GPTQ start";
    if (o.fixed_grid() != (o.weight_init == WeightInit::gptq))
      s += o.fixed_grid() ? " + fixed grid" : " + learned grid";
    if (o.learn_norms) s += fmt::format(" + learned norms (lr {:g})", o.lr_norm);
    if (o.output_kld > 0)
      s += fmt::format(" + output KL x{:g} ({})", o.output_kld,
                       o.output_kld_all ? "every window" : "last window");
    return s;
  }

 private:
  // Where the activation sets live: the host unless the model is on the GPU and they fit there
  // (see ActivationPlacement) beside a rough estimate of the window's working set: per block,
  // 10 weight-sized tensors (the layer's copy of W, V0, the soft weight, its saved factors and
  // gradients) and 48 activations of L × (d + hidden).
  template <class Model>
  Device activation_device(Model& model, std::size_t activation_bytes, int64_t L) const {
    using T = typename Model::T;
    const PassOptions& o = options_;
    if (model.device() == Device::cpu) return Device::cpu;
    CBQ_CHECK(o.activation_placement != ActivationPlacement::device || o.activation_dir.empty(),
              "CBQ: activations cannot be both on the GPU and file-backed in {}", o.activation_dir);
    if (o.activation_placement == ActivationPlacement::device) return model.device();
    if (o.activation_placement == ActivationPlacement::host || !o.activation_dir.empty()) {
      if (o.verbose) fmt::print("CBQ: activations in host memory, copied to the GPU per use\n");
      return Device::cpu;
    }
    std::size_t block_bytes = 0;
    if (model.num_blocks() > 0)
      for (auto* layer : model.blocks[0].linears())
        block_bytes += sizeof(T) * static_cast<std::size_t>(layer->weight.value.numel());
    const std::size_t per_block =
        10 * block_bytes +
        48 * sizeof(T) * static_cast<std::size_t>(L * (model.config.dim + model.config.hidden_dim));
    const std::size_t working =
        static_cast<std::size_t>(std::min(spec_.window_blocks, model.num_blocks())) * per_block;
    std::size_t free_bytes = 0, total_bytes = 0;
    const bool known = detail::device_memory(free_bytes, total_bytes);
    const bool fits = known && activation_bytes + working <= free_bytes;
    if (o.verbose)
      fmt::print(
          "CBQ: activations {} ({:.1f} MiB; the window needs about {:.1f} MiB more; {:.1f} of "
          "{:.1f} MiB free)\n",
          fits ? "in GPU memory" : "in host memory, copied to the GPU per use",
          static_cast<double>(activation_bytes) / (1 << 20),
          static_cast<double>(working) / (1 << 20), static_cast<double>(free_bytes) / (1 << 20),
          static_cast<double>(total_bytes) / (1 << 20));
    return fits ? model.device() : Device::cpu;
  }

  template <class T>
  static BlockContext<T> fp_context() {
    BlockContext<T> ctx;
    ctx.full_precision = true;
    return ctx;
  }

  QuantLinearConfig layer_config(int64_t layer_seed, const std::string& linear) const {
    QuantLinearConfig c = spec_.layer_config(linear);
    c.lora_init.start = options_.lora_start;
    c.lora_init.a1_std = options_.lora_a1_std;
    c.lora_init.seed = options_.seed * 1000003ULL + static_cast<uint64_t>(layer_seed);
    c.lsq_grad_scale = options_.lsq_grad_scale;
    c.v0_tracks_step = options_.v0_tracks_step;
    c.rounding_mode = options_.rounding_mode;
    c.fixed_grid = options_.fixed_grid();
    return c;
  }

  // Installs a QuantLinear on every linear layer of unit u. With Hessians (the GPTQ start) each
  // layer starts from GPTQ's solution: the compensated weight it rounded, its steps and zeros.
  template <class Model>
  auto install(PassUnits<Model>& units, int64_t u,
               const std::vector<quant::HessianAccumulator>& gptq = {}) {
    using T = typename Model::T;
    std::vector<std::shared_ptr<QuantLinear<T>>> out;
    const int64_t b = units.block(u), offset = units.linear_offset(u);
    int64_t j = 0;
    for (LinearLayer<T>* layer : units.linears(u)) {
      const std::string name = fmt::format("layers.{}.{}", b, layer->name);
      Tensor<T> w = layer->weight.value.clone();
      if (options_.cfp_weights) quant::truncate_weight_outliers(w, name);
      const QuantLinearConfig config = layer_config(b * 64 + offset + j, layer->name);
      std::shared_ptr<QuantLinear<T>> q;
      if (!gptq.empty()) {
        quant::GptqOptions go;
        go.percdamp = options_.gptq_percdamp;
        const Tensor<float> wf = (w.is_cpu() ? w : w.to(Device::cpu)).template cast<float>();
        quant::GptqResult g =
            quant::gptq_quantize(wf, gptq.at(static_cast<size_t>(j)), config.weight, go);
        Tensor<T> start = g.updated.template cast<T>();
        if (!w.is_cpu()) start = start.to(w.device());
        q = std::make_shared<QuantLinear<T>>(name, start, config, &g.weight, true);
      } else {
        q = std::make_shared<QuantLinear<T>>(name, w, config);
      }
      ++j;
      layer->transform = q;
      out.push_back(q);
    }
    return out;
  }

  // Installs (on) or removes round-to-nearest quantizers on unit u's layers (the error-gain
  // dependency): weights at the spec's grid, activations per token when the spec quantizes
  // them per token (static per-tensor activation steps are not calibrated yet: left off).
  template <class Model>
  void quantize_unit_nearest(PassUnits<Model>& units, int64_t u, bool on) {
    using T = typename Model::T;
    for (LinearLayer<T>* layer : units.linears(u)) {
      if (!on) {
        layer->transform = nullptr;
        continue;
      }
      QuantLinearConfig c = spec_.layer_config(layer->name);
      c.rounding = RoundingKind::nearest;
      if (c.act_mode == ActMode::static_per_tensor) {
        c.act_bits = 16;
        c.act_mode = ActMode::none;
      }
      layer->transform = std::make_shared<QuantLinear<T>>(
          fmt::format("layers.{}.{}", units.block(u), layer->name), layer->weight.value, c);
    }
  }

  static void print_groups(const QuantizationResult& r, size_t windows) {
    std::string d, g;
    for (double x : r.dependencies) d += fmt::format(" {:.3g}", x);
    for (const auto& group : r.groups) g += fmt::format(" [{}]", group.label);
    fmt::print("CBQ: dependencies D(u, u+1):{}\nCBQ: {} groups, {} windows:{}\n", d,
               r.groups.size(), windows, g);
  }

  template <class T, class Model>
  static std::vector<quant::MinMaxObserver<T>> observers(PassUnits<Model>& units, const Window& w) {
    std::vector<quant::MinMaxObserver<T>> v;
    for (int64_t u = w.first; u <= w.last; ++u)
      for (auto* layer : units.linears(u))
        v.push_back(quant::MinMaxObserver<T>{
            fmt::format("layers.{}.{} input", units.block(u), layer->name)});
    return v;
  }
  template <class Model, class Layer>
  static size_t observer_index(PassUnits<Model>& units, const Window& w, int64_t u,
                               const Layer& layer) {
    size_t i = 0;
    for (int64_t c = w.first; c <= w.last; ++c)
      for (auto* l : units.linears(c)) {
        if (c == u && l == &layer) return i;
        ++i;
      }
    fail("CBQ: linear layer '{}' of {} not found", layer.name, units.range(u, u));
  }

  // Activation steps initialised from calibration ranges (quantized, per-tensor activations).
  bool static_activation_steps() const { return spec_.act_bits < 16 && !spec_.act_per_token; }

  template <class Model, class Q, class R>
  void init_activation_steps(PassUnits<Model>& units, const Window& w, Q& qlayers, R& ranges) {
    if (!static_activation_steps()) return;
    size_t i = 0;
    for (int64_t u = w.first; u <= w.last; ++u) {
      auto linears = units.linears(u);
      for (size_t j = 0; j < linears.size(); ++j, ++i) {
        auto& q = qlayers[u][j];
        // Blocks carried over from the previous window keep their learned steps.
        if (q->hardened() || initialised_.count(q->name())) continue;
        q->init_activation_range(ranges[i].min, ranges[i].max);
        initialised_.insert(q->name());
      }
    }
  }

  PassSpec spec_;
  PassOptions options_;
  std::set<std::string> initialised_;
};

// The pass configured at compile time:
//   cbq::Pass<cbq::Quantizer<4, cbq::PerGroup<32>>, cbq::ActQuant<16>, cbq::SlidingWindow<2, 1>,
//             cbq::LoraRounding<5>> pass(options);
template <class WeightQ, class ActQ, class WindowPolicy, class Rounding,
          class UnitPolicy = BlockUnits>
class Pass : public CbqPass {
  static_assert(is_quantizer<WeightQ>::value,
                "cbq::Pass: the first argument must be a cbq::Quantizer<Bits, Granularity>");
  static_assert(RoundingPolicy<Rounding>,
                "cbq::Pass: the rounding must be LoraRounding<Rank>, NearestRounding or "
                "FullRounding");

 public:
  using weight_quantizer = WeightQ;
  using act_quantizer = ActQ;
  using window = WindowPolicy;
  using rounding = Rounding;
  using units = UnitPolicy;

  explicit Pass(PassOptions options = {}) : CbqPass(make_spec(), options) {}

  template <TransformerBlock Block>
  QuantizationResult run(Transformer<Block>& model, const Calibration& calib) {
    static_assert(!UnitPolicy::sub_blocks || SplitTransformerBlock<Block>,
                  "cbq::Pass: SubBlockUnits need a block type that exposes its attention and FFN "
                  "halves (cbq::SplitTransformerBlock)");
    return CbqPass::run(model, calib);
  }

  static PassSpec make_spec() {
    PassSpec s;
    s.weight = WeightQ::spec();
    s.act_bits = ActQ::bits;
    s.act_per_token = ActQ::per_token;
    s.window_blocks = WindowPolicy::blocks;
    s.window_overlap = WindowPolicy::overlap;
    s.schedule = WindowPolicy::adaptive ? WindowKind::adaptive : WindowKind::sliding;
    s.units = UnitPolicy::sub_blocks ? UnitKind::sub_blocks : UnitKind::blocks;
    s.rounding = rounding_traits<Rounding>::kind;
    s.rank = rounding_traits<Rounding>::rank;
    return s;
  }
};

// The ACBQ configuration of a run-time spec (its quantizers and rounding kept): sub-block units
// in adaptive groups of up to max_units units.
inline PassSpec acbq_spec(PassSpec spec, int64_t max_units = 2, int64_t overlap_groups = 1) {
  spec.units = UnitKind::sub_blocks;
  spec.schedule = WindowKind::adaptive;
  spec.window_blocks = max_units;
  spec.window_overlap = overlap_groups;
  return spec;
}

// ACBQ (docs/ACBQ.md): sub-block units in adaptive groups of up to MaxUnits, run with
// PassOptions::acbq() (the attention-map term and the dependency measure):
//   cbq::Acbq<cbq::Quantizer<2, cbq::PerGroup<64>>> pass(cbq::PassOptions::acbq());
template <class WeightQ, class ActQ = ActQuant<16>, class Rounding = LoraRounding<5>,
          int MaxUnits = 2>
using Acbq = Pass<WeightQ, ActQ, AdaptiveWindow<MaxUnits>, Rounding, SubBlockUnits>;

}  // namespace cbq
