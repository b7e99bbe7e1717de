// The CBQ pass's plan (pass/estimate.hpp): the time and memory model on a given calibration,
// and the calibration's measurements being usable. No timing is asserted: the measured numbers
// are only checked to be positive and finite.
#include <cbq/cbq.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/estimate.hpp>
#include <cmath>

#include "doctest/doctest.h"

using namespace cbq;

namespace {
StepCalibration fixed_calibration() {
  StepCalibration c;
  c.step_seconds = 0.1;
  c.step_reg_seconds = 0.2;
  c.q_window_seconds = 0.02;  // a window of 2 blocks
  c.fp_block_seconds = 0.005;
  c.hessian_sample_seconds = 0.003;
  c.gptq_block_seconds = 0.05;
  c.advance_sample_seconds = 0.012;
  c.arena_bytes = 1000;
  c.trainable_bytes = 24;
  c.window_blocks = 2;
  c.seq_len = 32;
  c.threads = 1;
  return c;
}
}  // namespace

TEST_CASE("pass estimate: time adds the steps, the forwards and the GPTQ start of every window") {
  const ModelConfig c = tiny_llama_config();  // 3 blocks: windows [0,1] and [1,2]
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 1));
  PassSpec spec;
  spec.weight.group_size = 4;
  PassOptions o;  // the GPTQ start, hard rounding with STE, keep-the-better
  o.epochs = 3;
  const int64_t N = 5, H = o.holdout_samples(N);
  REQUIRE(H == 2);  // max(4, 10 % of 5), at most N / 2
  const PassEstimate e = estimate_pass(m, spec, o, N, 32, fixed_calibration());
  CHECK(e.windows == 2);
  CHECK(e.steps == 2 * 3 * (N - H));  // the held-out samples do not train
  // 80 % of the steps carry the regulariser (round_warmup 0.2).
  const double step = 0.2 * 0.1 + 0.8 * 0.2;
  CHECK(e.train_seconds == doctest::Approx(18 * step));
  // Per window: 2·N·2 FP block forwards (N fewer in the second, which starts from the first's
  // T_fp(X_fp) at block 1: reuse_fp_outputs), 2·H window evaluations on the held-out samples
  // (0.02 s each), and N samples through each block leaving (0.012 s each): 1 after the first
  // window, 2 after the last.
  const double fwd = (N * 4 * 0.005 + 2 * H * 0.02 + N * 1 * 0.012) +
                     (N * 3 * 0.005 + 2 * H * 0.02 + N * 2 * 0.012);
  CHECK(e.forward_seconds == doctest::Approx(fwd));
  PassOptions recompute = o;
  recompute.reuse_fp_outputs = false;
  CHECK(estimate_pass(m, spec, recompute, N, 32, fixed_calibration()).forward_seconds ==
        doctest::Approx(fwd + N * 0.005));
  // The balance over every sample evaluates all N before and after.
  PassOptions all = o;
  all.balance_all_samples = true;
  CHECK(estimate_pass(m, spec, all, N, 32, fixed_calibration()).forward_seconds ==
        doctest::Approx(fwd + 2 * 2 * (N - H) * 0.02));
  // The GPTQ start of blocks 0, 1 (window [0,1]) and 2 (window [1,2]): N samples of Hessians,
  // after the window's earlier blocks on the quantized path (0.01 s a block), and the solves.
  const double start =
      (N * 0.003 + 0.05) + (N * (0.003 + 0.01) + 0.05) + (N * (0.003 + 0.01) + 0.05);
  CHECK(e.start_seconds == doctest::Approx(start));
  CHECK(e.seconds == doctest::Approx(e.train_seconds + e.forward_seconds + e.start_seconds));
  CHECK(e.summary().find("about") == 0);
  CHECK(e.summary().find("GPTQ start") != std::string::npos);

  // Soft rounding also evaluates the hard-rounded window on the held-out samples, before and
  // after.
  o.rounding_mode = quant::RoundingMode::soft;
  const PassEstimate soft = estimate_pass(m, spec, o, N, 32, fixed_calibration());
  CHECK(soft.forward_seconds == doctest::Approx(fwd + 2 * (H + H) * 0.02));

  // The RTN start has no start cost; without keep-the-better every sample trains.
  o.rounding_mode = quant::RoundingMode::hard_ste;
  o.weight_init = WeightInit::rtn;
  o.keep_better = false;
  const PassEstimate rtn = estimate_pass(m, spec, o, N, 32, fixed_calibration());
  CHECK(rtn.start_seconds == 0);
  CHECK(rtn.steps == 2 * 3 * N);

  // max_steps caps the steps of every window; no regulariser with γ = 0.
  o.max_steps = 4;
  o.gamma_round = 0;
  const PassEstimate capped = estimate_pass(m, spec, o, N, 32, fixed_calibration());
  CHECK(capped.steps == 8);
  CHECK(capped.train_seconds == doctest::Approx(8 * 0.1));

  // Adaptive groups add the dependency measurement: per sample (at most dependency_samples) and
  // unit, 3 unit forwards for error-gain, 1 for entropy; the units are halves of a block here.
  PassSpec acbq = acbq_spec(spec);
  o.dependency_samples = 3;
  o.dependency = DependencyMeasure::entropy;
  const PassEstimate entropy = estimate_pass(m, acbq, o, N, 32, fixed_calibration());
  o.dependency = DependencyMeasure::error_gain;
  const PassEstimate gain = estimate_pass(m, acbq, o, N, 32, fixed_calibration());
  const int64_t U = 2 * c.n_layers;
  CHECK(gain.forward_seconds - entropy.forward_seconds ==
        doctest::Approx(2.0 * 3 * U * 0.5 * 0.005));
  CHECK(gain.train_seconds == doctest::Approx(entropy.train_seconds));
}

TEST_CASE("pass estimate: memory counts the model, the quantizers, activations and the window") {
  const ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 2));
  PassSpec spec;
  spec.weight.group_size = 4;
  PassOptions o;
  const PassEstimate e = estimate_pass(m, spec, o, 7, 32, fixed_calibration());
  CHECK(e.model_bytes == sizeof(float) * static_cast<std::size_t>(parameter_count(m)));
  std::size_t linear = 0;
  for (auto& b : m.blocks)
    for (auto* l : b.linears()) linear += static_cast<std::size_t>(l->weight.value.numel());
  CHECK(e.quantizer_bytes == static_cast<std::size_t>(linear * (8.0 + 1.0 + 8.0 / 4)));
  CHECK(e.activation_bytes == pass_activation_bytes(7, 32, c.dim, sizeof(float), 4));
  CHECK(e.window_bytes == 1024);
  CHECK(e.base_bytes == kBaseBytes + e.model_bytes);
  CHECK(e.peak_bytes ==
        kBaseBytes + e.model_bytes + e.quantizer_bytes + e.activation_bytes + e.window_bytes);
  // A measured base (the process's resident memory with the model loaded) replaces it.
  const PassEstimate measured = estimate_pass(m, spec, o, 7, 32, fixed_calibration(), 1 << 30);
  CHECK(measured.peak_bytes ==
        (std::size_t{1} << 30) + e.quantizer_bytes + e.activation_bytes + e.window_bytes);
  CHECK(resident_bytes() > 0);
  // Activations in files are mappings the kernel can page out: not in the peak.
  o.activation_dir = "/tmp";
  const PassEstimate files = estimate_pass(m, spec, o, 7, 32, fixed_calibration());
  CHECK(files.activations_in_files);
  CHECK(files.peak_bytes == e.peak_bytes - e.activation_bytes);
  // What is not modelled is said.
  CHECK(e.notes.empty());
  o.cfp_weights = true;
  CHECK(estimate_pass(m, spec, o, 7, 32, fixed_calibration()).notes.size() == 1);
}

TEST_CASE("pass estimate: the calibration measures a real window step") {
  ModelConfig c = tiny_llama_config();
  PassSpec spec;
  spec.weight.group_size = 4;
  spec.act_bits = 8;
  spec.act_per_token = true;
  PassOptions o;
  const StepCalibration cal =
      calibrate_window_step<LlamaBlock<float>>(c, spec, o, 24, /*min_seconds=*/0.0);
  REQUIRE(o.weight_init == WeightInit::gptq);  // the default: the GPTQ start is measured too
  for (double t :
       {cal.step_seconds, cal.step_reg_seconds, cal.q_window_seconds, cal.fp_block_seconds,
        cal.hessian_sample_seconds, cal.gptq_block_seconds, cal.advance_sample_seconds}) {
    CHECK(std::isfinite(t));
    CHECK(t > 0);
  }
  CHECK(cal.window_blocks == 2);
  CHECK(cal.seq_len == 24);
  CHECK(cal.arena_bytes > 0);
  CHECK(cal.trainable_bytes > 0);
  // OPT blocks too, and the estimate built on it is finite.
  ModelConfig oc = tiny_opt_config();
  Transformer<OptBlock<float>> opt(oc, random_weights(oc, 3));
  const PassEstimate e = estimate_pass(opt, spec, o, 4, 24, 0.0);
  CHECK(std::isfinite(e.seconds));
  CHECK(e.seconds > 0);
  CHECK(e.peak_bytes > e.model_bytes);
}
