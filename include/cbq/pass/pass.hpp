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
#include "cbq/pass/block_measurements.hpp"
#include "cbq/pass/calibration.hpp"
#include "cbq/pass/checkpoint.hpp"
#include "cbq/pass/checks_and_timing.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/device_support.hpp"
#include "cbq/pass/preprocess.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/resume.hpp"
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
  int64_t window_blocks = 2;
  int64_t window_overlap = 1;
  RoundingKind rounding = RoundingKind::lora;
  int64_t rank = 5;
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
    return fmt::format("{} window {}/{} {}", describe_quantizer(), window_blocks, window_overlap,
                       round);
  }
};

// How many N × L × d activation sets the pass holds: X_fp, X_q and the two targets, and with the
// output loss in every window the full-precision model's last hidden states.
inline int pass_activation_sets(const PassOptions& o) {
  return o.output_kld > 0 && o.output_kld_all ? 5 : 4;
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
    const auto windows = window_schedule(K, spec_.window_blocks, spec_.window_overlap);
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
    result.config = describe() + describe_extensions(o);
    result.activation_bytes = pass_activation_bytes(N, L, d, sizeof(T), pass_activation_sets(o));
    if (o.verbose)
      fmt::print(
          "CBQ: {} blocks, {} windows of {} (overlap {}), {} samples × {} tokens, {} "
          "epochs; activations {:.1f} MiB\n",
          K, windows.size(), spec_.window_blocks, spec_.window_overlap, N, L, o.epochs,
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

    // Output loss in every window: the full-precision model's last hidden state of each sample,
    // the target all windows share, computed once here instead of in every step.
    ActivationSet<T> fp_output_set;
    std::vector<Tensor<T>> t_out;
    if (pass_activation_sets(o) == 5) {
      fp_output_set =
          ActivationSet<T>(N, L, d, o.activation_dir, "T_fp(X) at the last block", act_device);
      t_out = fp_output_set.tensors();
      for (int64_t n = 0; n < N; ++n) {
        Tensor<T> x = x_fp[n];
        for (int64_t b = 0; b < K; ++b) x = model.run_block(b, x, fp_context<T>());
        t_out[n].copy_from(x);
      }
    }

    std::vector<std::vector<std::shared_ptr<QuantLinear<T>>>> qlayers(static_cast<size_t>(K));
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
        windows_done = resume_from_checkpoint(o, model, windows, fingerprint, progress,
                                              [&](int64_t b) { return install(model, b); });
      }
    }

    int64_t window_index = 0;
    for (const Window& w : windows) {
      ++window_index;
      if (window_index <= windows_done) continue;  // restored from the checkpoint
      const auto wstart = std::chrono::steady_clock::now();
      // 1. Quantizers for blocks entering their first window.
      for (int64_t b = w.first; b <= w.last; ++b)
        if (qlayers[b].empty()) {
          if (o.learn_norms)  // learn in a copy: the original may be a read-only mapping
            for (Parameter<T>* p : model.blocks[b].other_parameters()) {
              fp_norms.emplace_back(p, p->value);
              p->value = p->value.clone();
            }
          if (o.weight_init == WeightInit::gptq) {
            swap_norms();
            auto hessians = block_hessians(model, w, b, x_q);
            swap_norms();
            qlayers[b] = install(model, b, hessians);
          } else
            qlayers[b] = install(model, b);
        }
      const double start_seconds = detail::seconds_since(wstart);
      auto phase = std::chrono::steady_clock::now();
      // 2. Targets: T_fp(X_fp) with X_fp advanced to the next window start on the way, and the
      //    homologous T_fp(X_q), whose pass also calibrates static activation steps.
      std::vector<quant::MinMaxObserver<T>> ranges = observers<T>(model, w);
      swap_norms();  // the full-precision values
      for (int64_t n = 0; n < N; ++n) {
        Tensor<T> x = x_fp[n], next;
        for (int64_t b = w.first; b <= w.last; ++b) {
          x = model.run_block(b, x, fp_context<T>());
          detail::check_finite(x, fmt::format("the full-precision path after block {} (window {}, "
                                              "calibration sample {})",
                                              b, window_index, n));
          if (b + 1 == w.finalize) next = x;
        }
        t_fp[n].copy_from(x);
        x_fp[n].copy_from(next);  // the FP path enters the next window (at block w.finalize)
        Tensor<T> h = x_q[n];
        for (int64_t b = w.first; b <= w.last; ++b) {
          BlockContext<T> ctx = fp_context<T>();
          ctx.on_linear_input = [&, b](const LinearLayer<T>& layer, const Tensor<T>& in) {
            detail::observe(ranges[observer_index(model, w, b, layer)], in);
          };
          h = model.run_block(b, h, ctx);
        }
        t_hom[n].copy_from(h);
      }
      swap_norms();  // the learned values
      init_activation_steps(model, w, qlayers, ranges);

      // 3. Optimise the window (and keep the better of its start and its trained state).
      const LossScaling<T> scaling = measure_loss_scaling(o, t_fp, t_hom, model.device());
      const double targets_seconds = detail::seconds_since(phase);
      WindowStats stats = train_window(model, w, qlayers, x_q, t_fp, t_hom, t_out, scaling, o,
                                       window_index, static_cast<int64_t>(windows.size()), start);
      stats.times.start = start_seconds;  // train_window timed its steps and evaluations
      stats.times.targets = targets_seconds;
      phase = std::chrono::steady_clock::now();

      // 4. Blocks leaving their last window: harden, freeze, advance the quantized path.
      for (int64_t b = w.first; b < w.finalize; ++b) {
        for (Parameter<T>* p : model.blocks[b].other_parameters()) {
          p->trainable = false;
          p->grad = Tensor<T>();
        }
        for (auto& q : qlayers[b]) q->harden();
        // Advance the quantized path, measuring each layer's output error on its inputs.
        LayerOutputErrors<T> errors(model, b, qlayers[b]);
        BlockContext<T> ctx;
        ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
          errors.add(layer, in);
        };
        for (int64_t n = 0; n < N; ++n) {
          x_q[n].copy_from(model.run_block(b, x_q[n], ctx));
          detail::check_finite(x_q[n], fmt::format("the quantized path after block {} (window {}, "
                                                   "calibration sample {})",
                                                   b, window_index, n));
        }
        errors.finish();
        for (auto& q : qlayers[b]) result.layers.push_back(layer_result(*q));
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
            "advance {}); blocks {}..{} frozen\n",
            window_index, windows.size(), detail::format_duration(detail::seconds_since(wstart)),
            detail::format_duration(stats.times.start),
            detail::format_duration(stats.times.targets), stats.steps,
            detail::format_duration(stats.times.steps),
            detail::format_duration(stats.times.evaluations),
            detail::format_duration(stats.times.advance), w.first, w.finalize - 1);
    }
    result.seconds = detail::seconds_since(start);
    return result;
  }

  std::string describe() const { return spec_.describe(); }
  // The options beyond the paper that are on (PASS.md), for result labels: "" when none.
  static std::string describe_extensions(const PassOptions& o) {
    std::string s;
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

  // Installs a QuantLinear on every linear layer of block b. With Hessians (the GPTQ start) each
  // layer starts from GPTQ's solution: the compensated weight it rounded, its steps and zeros.
  template <class Model>
  auto install(Model& model, int64_t b, const std::vector<quant::HessianAccumulator>& gptq = {}) {
    using T = typename Model::T;
    std::vector<std::shared_ptr<QuantLinear<T>>> out;
    int64_t j = 0;
    for (LinearLayer<T>* layer : model.blocks[b].linears()) {
      const std::string name = fmt::format("layers.{}.{}", b, layer->name);
      Tensor<T> w = layer->weight.value.clone();
      if (options_.cfp_weights) quant::truncate_weight_outliers(w, name);
      const QuantLinearConfig config = layer_config(b * 64 + j, layer->name);
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

  template <class T, class Model>
  static std::vector<quant::MinMaxObserver<T>> observers(Model& model, const Window& w) {
    std::vector<quant::MinMaxObserver<T>> v;
    for (int64_t b = w.first; b <= w.last; ++b)
      for (auto* layer : model.blocks[b].linears())
        v.push_back(quant::MinMaxObserver<T>{fmt::format("layers.{}.{} input", b, layer->name)});
    return v;
  }
  template <class Model, class Layer>
  static size_t observer_index(Model& model, const Window& w, int64_t b, const Layer& layer) {
    size_t i = 0;
    for (int64_t c = w.first; c <= w.last; ++c)
      for (auto* l : model.blocks[c].linears()) {
        if (c == b && l == &layer) return i;
        ++i;
      }
    fail("CBQ: linear layer '{}' of block {} not found", layer.name, b);
  }

  template <class Model, class Q, class R>
  void init_activation_steps(Model& model, const Window& w, Q& qlayers, R& ranges) {
    if (spec_.act_bits >= 16 || spec_.act_per_token) return;
    size_t i = 0;
    for (int64_t b = w.first; b <= w.last; ++b) {
      auto linears = model.blocks[b].linears();
      for (size_t j = 0; j < linears.size(); ++j, ++i) {
        auto& q = qlayers[b][j];
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
template <class WeightQ, class ActQ, class WindowPolicy, class Rounding>
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

  explicit Pass(PassOptions options = {}) : CbqPass(make_spec(), options) {}

  static PassSpec make_spec() {
    PassSpec s;
    s.weight = WeightQ::spec();
    s.act_bits = ActQ::bits;
    s.act_per_token = ActQ::per_token;
    s.window_blocks = WindowPolicy::blocks;
    s.window_overlap = WindowPolicy::overlap;
    s.rounding = rounding_traits<Rounding>::kind;
    s.rank = rounding_traits<Rounding>::rank;
    return s;
  }
};

}  // namespace cbq
