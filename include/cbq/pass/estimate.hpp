#pragma once
// Planning a CBQ pass: its wall time and peak memory from the configuration, and a short
// measurement of the window step on this machine (cbq-quantize prints it before it starts:
// "estimate: CBQ pass about 42 min, 3.1 GiB peak (…)").
//
//   PassEstimate e = estimate_pass(model, spec, options, samples, seq_len);
//   fmt::print("{}\n", e.summary());
//
// Time. Per window (window_schedule: W blocks; S of them leave the window when it is done, the
// stride W − overlap, or all W for the last window; B of them enter it, new) the pass runs
//   E·(N − H) training steps                 t_step (measured, see below; H held-out samples),
//   2·N·W full-precision block forwards      t_fp_block (the targets T_fp(X_fp) and T_fp(X_q);
//                                            one unit fewer per sample where the first unit's
//                                            output is carried from the last window,
//                                            PassOptions::reuse_fp_outputs),
//   2·N quantized window forwards + losses   t_q_window (the reconstruction loss before / after;
//                                            with soft rounding also the hard-rounded H + N),
//   S·N hardened block forwards              t_advance (the quantized path advancing, each layer's
//                                            output error measured on the way),
//   with the GPTQ start, per new block b:    N·(t_hessian + (b − first)·t_q_window / W) and
//                                            t_gptq_block (the Hessians, then the solves),
// plus, with the output loss in every window, K·N full-precision block forwards once. The step
// is measured with and without the rounding regulariser, which is on for the (1 − round_warmup)
// share of steps. calibrate_window_step measures each of these on a scratch window of W blocks
// with the model's shapes and random weights (the values do not change the work), at the pass's
// sequence length, threads and device, for at least `min_seconds` each.
// Not modelled: CFP / SmoothQuant pre-processing, the output loss's head and later blocks inside
// each step, checkpoint writes (listed in `notes` when the configuration uses them).
//
// Memory (peak RSS on the CPU): what the process holds before the pass (its resident memory when
// the estimate is made: the model as loaded), and for every linear weight the
// QuantLinear's own copy (W), the hardened weight and its 8-bit codes (all held to the end of
// the pass), the activation sets (pass_activation_bytes; with an activation_dir they are file
// mappings the kernel can page out, listed apart), the training tape's arena of one window
// (measured), the trainable state of the window's layers (LoRA factors, steps, their gradients
// and Adam moments: measured), and a base of kBaseBytes for the process and its libraries.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/model/random.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/ops/add.hpp"
#include "cbq/ops/kl_softmax.hpp"
#include "cbq/ops/mse.hpp"
#include "cbq/ops/scale.hpp"
#include "cbq/optim/adam.hpp"
#include "cbq/pass/block_measurements.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/pass.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/window_schedule.hpp"

namespace cbq {

// What one window costs on this machine (calibrate_window_step).
struct StepCalibration {
  double step_seconds = 0;      // one training step without the rounding regulariser
  double step_reg_seconds = 0;  // ... with it
  double q_window_seconds = 0;  // the window forward with its quantizers, no gradients
  double fp_block_seconds = 0;  // one full-precision block forward, no gradients
  // The GPTQ start (PassOptions::weight_init = gptq; else 0): one sample's full-precision block
  // forward with the Hessians of its linear inputs accumulated, and the GPTQ solves of one
  // block's layers.
  double hessian_sample_seconds = 0, gptq_block_seconds = 0;
  // One sample through a hardened block with each layer's output error measured (the advance).
  double advance_sample_seconds = 0;
  std::size_t arena_bytes = 0;      // the training tape's arena after a step
  std::size_t trainable_bytes = 0;  // parameters, gradients and Adam moments of the window
  int64_t window_blocks = 0, seq_len = 0;
  int threads = 0;
};

struct PassEstimate {
  double seconds = 0;  // the whole pass
  double train_seconds = 0, forward_seconds = 0;
  double start_seconds = 0;        // the GPTQ start: Hessians and solves of every block
  int64_t windows = 0, steps = 0;  // steps over all windows
  std::size_t peak_bytes = 0;      // peak resident memory of the process
  std::size_t model_bytes = 0, quantizer_bytes = 0, activation_bytes = 0, window_bytes = 0;
  // What the process holds before the pass: its resident memory when the estimate was made
  // (the model as loaded, with whatever its loader keeps), else kBaseBytes + model_bytes.
  std::size_t base_bytes = 0;
  bool activations_in_files = false;  // activation_dir: the sets are paged file mappings
  StepCalibration calibration;
  std::vector<std::string> notes;  // what the configuration adds that is not modelled

  // "about 42 min, 3.1 GiB (…)": the headline and how it was made.
  std::string summary() const {
    std::string s = fmt::format(
        "about {}, {} peak (estimate: {} windows × {} steps of {:.3g} s, {:.3g} s with "
        "the rounding regulariser, measured at {} tokens on {} thread{}; forwards {}",
        human_duration(seconds), human_bytes(peak_bytes), windows,
        windows > 0 ? steps / windows : 0, calibration.step_seconds, calibration.step_reg_seconds,
        calibration.seq_len, calibration.threads, calibration.threads == 1 ? "" : "s",
        human_duration(forward_seconds));
    if (start_seconds > 0) s += fmt::format("; GPTQ start {}", human_duration(start_seconds));
    s += fmt::format(
        "; memory: now {:.0f} MiB (model {:.0f} MiB), quantizers {:.0f} MiB, activations {:.0f} "
        "MiB{}, window {:.0f} MiB)",
        mib(base_bytes), mib(model_bytes), mib(quantizer_bytes), mib(activation_bytes),
        activations_in_files ? " in files" : "", mib(window_bytes));
    for (const std::string& n : notes) s += "; " + n;
    return s;
  }

  static std::string human_duration(double s) {
    if (s < 90) return fmt::format("{:.0f} s", s);
    if (s < 5400) return fmt::format("{:.0f} min", s / 60);
    return fmt::format("{:.1f} h", s / 3600);
  }
  static std::string human_bytes(std::size_t b) {
    if (b < (std::size_t{1} << 30)) return fmt::format("{:.0f} MiB", mib(b));
    return fmt::format("{:.1f} GiB", static_cast<double>(b) / double(1 << 30));
  }
  static double mib(std::size_t b) { return static_cast<double>(b) / double(1 << 20); }
};

// Process and libraries before any model: measured for cbq-quantize (CPU build) on Debian 12.
inline constexpr std::size_t kBaseBytes = std::size_t{24} << 20;

// The resident memory of this process now (Linux /proc/self/statm), 0 where unknown.
inline std::size_t resident_bytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  unsigned long long pages = 0, resident = 0;
  const int read = std::fscanf(f, "%llu %llu", &pages, &resident);
  std::fclose(f);
  if (read != 2) return 0;
  return static_cast<std::size_t>(resident) * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

namespace detail {

template <class F>
double time_per_call(F&& f, double min_seconds, int min_calls, int max_calls) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  int calls = 0;
  double elapsed = 0;
  while (calls < max_calls && (calls < min_calls || elapsed < min_seconds)) {
    f();
    ++calls;
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  }
  return elapsed / std::max(calls, 1);
}

}  // namespace detail

// Measures the window step and the forwards of a CBQ pass with `spec` and `options` on `config`'s
// block shapes at `seq_len` tokens: a scratch model of W blocks (random weights, its own
// quantizers; the caller's model is not touched), on options.device, with cbq's current thread
// count. Each quantity is timed after one warm-up call, for at least min_seconds (and at least
// one call).
template <TransformerBlock Block>
StepCalibration calibrate_window_step(const ModelConfig& config, const PassSpec& spec,
                                      const PassOptions& options, int64_t seq_len,
                                      double min_seconds = 0.3) {
  using T = typename Block::scalar_type;
  CBQ_CHECK(seq_len >= 2, "calibrate_window_step: sequence length {} is below 2", seq_len);
  const FlushDenormals flush(options.flush_denormals);  // as the pass computes
  StepCalibration cal;
  ModelConfig c = config;
  // Sub-block units: a window of W halves is timed as ⌈W / 2⌉ whole blocks.
  const int64_t window_blocks =
      spec.units == UnitKind::sub_blocks ? (spec.window_blocks + 1) / 2 : spec.window_blocks;
  c.n_layers = std::max<int64_t>(1, std::min(window_blocks, config.n_layers));
  c.vocab_size = 8;  // the embedding is not used
  c.max_seq_len = std::max(c.max_seq_len, seq_len);
  cal.window_blocks = c.n_layers;
  cal.seq_len = seq_len;
  cal.threads = num_threads();
  Transformer<Block> model(c, random_weights(c, 1));
  if (options.device != Device::cpu) model.to(options.device);
  const Device device = model.device();

  Tensor<float> host_x(Shape{seq_len, c.dim});
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t i = 0; i < host_x.numel(); ++i) host_x[i] = normal(rng);
  Tensor<T> x = host_x.template cast<T>();
  if (device != Device::cpu) x = x.to(device);

  // Full-precision forwards first, before any quantizer is installed. Where the pass runs the
  // samples side by side (sample_chunks), so do the timed calls: one sample per chunk, the time
  // per sample their wall time / the samples.
  BlockContext<T> fp;
  fp.full_precision = true;
  PassUnits<Transformer<Block>> units(model, UnitKind::blocks);
  const int64_t timed = sample_chunks(kSampleChunks, device, c.dim);
  const std::vector<Tensor<T>> xs(static_cast<size_t>(timed), x);
  auto fp_blocks = [&] {
    for_sample_chunks<T>(timed, static_cast<int>(timed), device,
                         [&](int, int64_t begin, int64_t end, Tape<T>& tp) {
                           for (int64_t n = begin; n < end; ++n)
                             units.run(tp, 0, xs[static_cast<size_t>(n)], fp);
                         });
  };
  fp_blocks();
  cal.fp_block_seconds =
      detail::time_per_call(fp_blocks, min_seconds / 3, 1, 50) / static_cast<double>(timed);
  Tensor<T> target = x;
  for (int64_t b = 0; b < c.n_layers; ++b) target = model.run_block(b, target, fp);
  if (options.weight_init == WeightInit::gptq) {
    const Window first{0, 0, 1};
    std::vector<quant::HessianAccumulator> hessians = unit_hessians(units, first, 0, xs);
    cal.hessian_sample_seconds =
        detail::time_per_call([&] { hessians = unit_hessians(units, first, 0, xs); },
                              min_seconds / 3, 1, 50) /
        static_cast<double>(timed);
    quant::GptqOptions go;
    go.percdamp = options.gptq_percdamp;
    cal.gptq_block_seconds = detail::time_per_call(
        [&] {
          auto linears = model.blocks[0].linears();
          for (size_t j = 0; j < linears.size(); ++j) {
            const Tensor<T>& w = linears[j]->weight.value;
            const Tensor<float> wf = (w.is_cpu() ? w : w.to(Device::cpu)).template cast<float>();
            quant::gptq_quantize(wf, hessians[j], spec.layer_config(linears[j]->name).weight, go);
          }
        },
        min_seconds / 3, 1, 20);
  }

  // Quantizers as CbqPass::install sets them up.
  std::vector<std::shared_ptr<QuantLinear<T>>> layers;
  std::vector<Parameter<T>*> steps, acts, rounds;
  std::vector<Tensor<T>> step_scales, act_scales;
  int64_t j = 0;
  for (auto& blk : model.blocks)
    for (LinearLayer<T>* layer : blk.linears()) {
      QuantLinearConfig qc = spec.layer_config(layer->name);
      qc.lora_init.start = options.lora_start;
      qc.lora_init.a1_std = options.lora_a1_std;
      qc.lora_init.seed = static_cast<uint64_t>(j++);
      qc.lsq_grad_scale = options.lsq_grad_scale;
      qc.v0_tracks_step = options.v0_tracks_step;
      qc.rounding_mode = options.rounding_mode;
      auto q = std::make_shared<QuantLinear<T>>(layer->name, layer->weight.value, qc);
      layer->transform = q;
      if (qc.act_mode == ActMode::static_per_tensor) q->init_activation_range(T(-4), T(4));
      if (options.learn_weight_step) {
        for (auto* p : q->weight_step_params()) steps.push_back(p);
        for (auto& t : q->weight_step_lr_scales()) step_scales.push_back(t);
      }
      if (options.learn_act_step) {
        for (auto* p : q->act_params()) acts.push_back(p);
        for (auto& t : q->act_lr_scales()) act_scales.push_back(t);
      }
      for (auto* p : q->rounding_params()) rounds.push_back(p);
      layers.push_back(q);
    }
  optim::Adam<T> adam;
  if (!steps.empty()) adam.add_group("weight steps", steps, options.lr_weight_step, step_scales);
  if (!acts.empty()) adam.add_group("activation steps", acts, options.lr_act_step, act_scales);
  if (!rounds.empty()) adam.add_group("rounding", rounds, options.lr_rounding);
  adam.zero_grad();

  Tape<T> tape(device);
  const T tau = static_cast<T>(options.kld_temperature);
  auto forward_loss = [&](Tape<T>& tp, bool with_reg) {
    const T beta = static_cast<T>(options.beta_start);
    TransformLosses<T> losses{beta, {}};  // each layer's regulariser, with its weight
    Var<T> y = tp.constant(x);
    BlockContext<T> ctx;
    if (with_reg) ctx.losses = &losses;
    for (auto& blk : model.blocks) y = blk.forward(tp, y, ctx);
    Var<T> loss;
    auto add = [&](Var<T> t) { loss = loss.valid() ? ops::add(loss, t) : t; };
    for (int term = 0; term < 2; ++term) {  // against T_fp(X_fp) and T_fp(X_q)
      if (!(term == 0 ? options.loss_full_precision : options.loss_homologous)) continue;
      Var<T> t = tp.constant(target);
      if (options.loss_l2) add(ops::row_sq_error(t, y));
      if (options.loss_kld) add(ops::kl_softmax(t, y, tau));
    }
    if (with_reg) {
      Var<T> reg;
      for (const auto& [layer, r] : losses.rounding) reg = reg.valid() ? ops::add(reg, r) : r;
      if (reg.valid()) add(ops::scale(reg, static_cast<T>(options.gamma_round)));
    }
    return loss;
  };
  auto step = [&](bool with_reg) {
    tape.clear();
    Var<T> loss = forward_loss(tape, with_reg);
    tape.backward(loss);
    adam.step();
    adam.zero_grad();
    for (auto& q : layers) q->project_steps();
  };
  const bool reg_possible = options.gamma_round > 0 && spec.rounding != RoundingKind::nearest;
  step(reg_possible);  // sizes the arena
  step(false);
  cal.step_seconds = detail::time_per_call([&] { step(false); }, min_seconds, 1, 50);
  cal.step_reg_seconds = reg_possible
                             ? detail::time_per_call([&] { step(true); }, min_seconds, 1, 50)
                             : cal.step_seconds;
  cal.arena_bytes = tape.arena_bytes();
  for (auto* group : {&steps, &acts, &rounds})
    for (Parameter<T>* p : *group)  // value, gradient, two Adam moments
      cal.trainable_bytes += 4 * sizeof(T) * static_cast<std::size_t>(p->value.numel());
  Tape<T> eval(device);
  auto q_forward = [&] {
    eval.clear();
    NoGrad<T> off(eval);
    forward_loss(eval, false);
  };
  q_forward();
  cal.q_window_seconds = detail::time_per_call(q_forward, min_seconds / 3, 1, 50);

  // The advance: block 0 hardened, one sample through it measuring its layers' output errors.
  const std::size_t block0_layers = model.blocks[0].linears().size();
  const std::vector<std::shared_ptr<QuantLinear<T>>> block0(
      layers.begin(), layers.begin() + static_cast<std::ptrdiff_t>(block0_layers));
  for (auto& q : block0) q->harden();
  auto advance = [&] {
    LayerOutputErrors<T> errors(model.blocks[0].linears(), block0, static_cast<int>(timed));
    for_sample_chunks<T>(timed, static_cast<int>(timed), device,
                         [&](int chunk, int64_t begin, int64_t end, Tape<T>& tp) {
                           BlockContext<T> ctx;
                           ctx.on_linear_input = [&](const LinearLayer<T>& layer,
                                                     const Tensor<T>& in) {
                             errors.add(layer, in, chunk);
                           };
                           for (int64_t n = begin; n < end; ++n)
                             units.run(tp, 0, xs[static_cast<size_t>(n)], ctx);
                         });
  };
  advance();
  cal.advance_sample_seconds =
      detail::time_per_call(advance, min_seconds / 3, 1, 50) / static_cast<double>(timed);
  return cal;
}

// The estimate for a pass of `spec` / `options` over `model` with `samples` calibration segments
// of `seq_len` tokens, from `cal` (calibrate_window_step at the same settings).
// `base_bytes`: what the process holds before the pass (0: kBaseBytes + the model's parameters).
template <TransformerBlock Block>
PassEstimate estimate_pass(Transformer<Block>& model, const PassSpec& spec,
                           const PassOptions& options, int64_t samples, int64_t seq_len,
                           const StepCalibration& cal, std::size_t base_bytes = 0) {
  using T = typename Block::scalar_type;
  PassEstimate e;
  e.calibration = cal;
  e.base_bytes = base_bytes;
  const int64_t K = model.num_blocks(), N = samples;
  // With sub-block units each unit costs half a block (its share of the block's timings).
  const bool halves = spec.units == UnitKind::sub_blocks;
  const double unit_blocks = halves ? 0.5 : 1.0;
  // Adaptive groups are not known before the pass measures them: timed as groups of the maximum
  // size, each window a group and its overlap groups (a window's steps cost per unit, so the total
  // barely depends on the group sizes; the number of windows does).
  const int64_t U = halves ? 2 * K : K;
  const bool adaptive = spec.schedule == WindowKind::adaptive;
  // (PassOptions::min_window_units lengthens each window, not the stride of one group.)
  const int64_t span = adaptive
                           ? std::min(U, std::max((spec.window_overlap + 1) * spec.window_blocks,
                                                  options.min_window_units))
                           : spec.window_blocks;
  const int64_t shared = adaptive
                             ? std::max<int64_t>(0, std::min(span - 1, span - spec.window_blocks))
                             : spec.window_overlap;
  const auto windows = window_schedule(U, span, shared);
  e.windows = static_cast<int64_t>(windows.size());
  const int64_t heldout = options.holdout_samples(N);
  // Window-loss evaluations before and after over the balance samples (the held-out ones, or all:
  // PassOptions::balance_all_samples), and with soft rounding also the hard-rounded judging (the
  // held-out samples at the start, the balance samples after).
  const bool soft = options.rounding_mode == quant::RoundingMode::soft;
  const auto balance = static_cast<double>(options.balance_samples(N));
  const double evaluations = 2.0 * balance + (soft ? balance + static_cast<double>(heldout) : 0.0);
  const bool gptq_start = options.weight_init == WeightInit::gptq;
  int64_t next_new = 0;  // the first block no window has held yet
  const double reg_share = options.gamma_round > 0 && spec.rounding != RoundingKind::nearest
                               ? std::clamp(1.0 - options.round_warmup, 0.0, 1.0)
                               : 0.0;
  const double t_step = (1 - reg_share) * cal.step_seconds + reg_share * cal.step_reg_seconds;
  if (adaptive)
    e.notes.push_back(
        fmt::format("adaptive groups timed as groups of {} units", spec.window_blocks));
  if (options.attention_kl > 0) e.notes.push_back("the attention-map term is not included");
  const double q_block =
      cal.q_window_seconds / static_cast<double>(std::max<int64_t>(1, cal.window_blocks));
  const double cal_blocks = static_cast<double>(std::max<int64_t>(1, cal.window_blocks));
  for (const Window& w : windows) {
    const double blocks = static_cast<double>(w.last - w.first + 1) * unit_blocks;
    const double leaving = static_cast<double>(w.finalize - w.first) * unit_blocks;
    const int64_t steps = options.window_steps(N - heldout, halves && w.finalize - w.first == 1);
    e.steps += steps;
    // Whole-block windows are the calibrated window (ratio 1).
    e.train_seconds +=
        static_cast<double>(steps) * t_step * (halves || adaptive ? blocks / cal_blocks : 1.0);
    // The first unit's full-precision output carried from the last window (reuse_fp_outputs).
    const bool reused = options.carries_fp_output(next_new - 1, w.first, w.last);
    const double fp_blocks = 2.0 * blocks - (reused ? unit_blocks : 0.0);
    e.forward_seconds += static_cast<double>(N) * fp_blocks * cal.fp_block_seconds +
                         evaluations * cal.q_window_seconds * blocks / cal_blocks +
                         static_cast<double>(N) * leaving * cal.advance_sample_seconds;
    // With the GPTQ start, the units new to this window: those after the previous window's
    // last (all of the first window's).
    if (gptq_start)
      for (int64_t u = std::max(w.first, next_new); u <= w.last; ++u)
        e.start_seconds +=
            unit_blocks *
            (static_cast<double>(N) * (cal.hessian_sample_seconds +
                                       static_cast<double>(u - w.first) * unit_blocks * q_block) +
             cal.gptq_block_seconds);
    next_new = w.last + 1;
  }
  if (pass_holds_fp_outputs(options))
    e.forward_seconds += static_cast<double>(K * N) * cal.fp_block_seconds;
  // Adaptive groups: the dependency measurement before the first window, per sample and unit
  // one unit forward for entropy, three for error-gain (quantized, and the next unit on both).
  if (adaptive)
    e.forward_seconds +=
        (options.dependency == DependencyMeasure::entropy ? 1.0 : 3.0) *
        static_cast<double>(std::min(N, std::max<int64_t>(1, options.dependency_samples)) * U) *
        unit_blocks * cal.fp_block_seconds;
  e.seconds = e.train_seconds + e.forward_seconds + e.start_seconds;

  // Memory.
  std::size_t linear_weights = 0, params = 0;
  auto count = [&](const Parameter<T>& p) {
    if (p.value.defined()) params += static_cast<std::size_t>(p.value.numel());
  };
  count(model.embed_tokens);
  count(model.embed_positions);
  count(model.final_norm_weight);
  count(model.final_norm_bias);
  count(model.lm_head);
  for (auto& b : model.blocks) {
    for (LinearLayer<T>* l : b.linears()) {
      count(l->weight);
      count(l->bias);
      linear_weights += static_cast<std::size_t>(l->weight.value.numel());
    }
    for (Parameter<T>* p : b.other_parameters()) count(*p);
  }
  e.model_bytes = params * sizeof(T);
  // W, the hardened weight, the codes, and per group a float step and zero.
  const double group = spec.weight.granularity == quant::Granularity::per_group
                           ? static_cast<double>(spec.weight.group_size)
                           : static_cast<double>(model.config.dim);
  e.quantizer_bytes = static_cast<std::size_t>(
      static_cast<double>(linear_weights) * (2.0 * sizeof(T) + 1.0 + 2.0 * sizeof(float) / group));
  e.activation_bytes =
      pass_activation_bytes(N, seq_len, model.config.dim, sizeof(T), pass_activation_sets(options));
  e.activations_in_files = !options.activation_dir.empty();
  e.window_bytes = cal.arena_bytes + cal.trainable_bytes;
  if (e.base_bytes == 0) e.base_bytes = kBaseBytes + e.model_bytes;
  e.peak_bytes = e.base_bytes + e.quantizer_bytes + e.window_bytes +
                 (e.activations_in_files ? 0 : e.activation_bytes);
  if (options.activation_scaling != ActivationScaling::none || options.cfp_weights)
    e.notes.push_back("pre-processing (CFP / SmoothQuant) is not included");
  if (options.output_kld > 0)
    e.notes.push_back("the output loss's later blocks and LM head in each step are not included");
  if (!options.checkpoint_dir.empty()) e.notes.push_back("checkpoint writes are not included");
  if (options.device != Device::cpu)
    e.notes.push_back("memory is host memory; the device holds the window and activations");
  return e;
}

// calibrate_window_step on `model`'s shapes, then estimate_pass, with this process's resident
// memory now (the loaded model included) as the base of the peak.
template <TransformerBlock Block>
PassEstimate estimate_pass(Transformer<Block>& model, const PassSpec& spec,
                           const PassOptions& options, int64_t samples, int64_t seq_len,
                           double min_seconds = 0.3) {
  const std::size_t now = resident_bytes();
  return estimate_pass(
      model, spec, options, samples, seq_len,
      calibrate_window_step<Block>(model.config, spec, options, seq_len, min_seconds), now);
}

}  // namespace cbq
