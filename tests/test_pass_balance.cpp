// The loss balance and the start-vs-trained rule of the CBQ pass (docs/PASS.md, "Loss balance",
// "Keeping the better of start and trained", "Fixed grid").
#include <unistd.h>

#include <cbq/model/llama_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/ops/reduce.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/pass.hpp>
#include <cbq/quant/gptq.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::quiet_options;
using cbq::testing::random_hidden;
using cbq::testing::same_bits;

namespace {
using W3 = Quantizer<3, PerGroup<8>>;
using TinyPass = Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>>;

bool same_codes(const quant::QuantizedWeight& a, const quant::QuantizedWeight& b) {
  return a.codes.shape() == b.codes.shape() &&
         std::memcmp(a.codes.data(), b.codes.data(), static_cast<size_t>(a.codes.numel())) == 0;
}

// What the pass prints to stdout while `f` runs.
template <class F>
std::string captured_stdout(F&& f) {
  cbq::testing::TempDir dir("stdout");
  const std::string path = dir.file("out.txt");
  std::fflush(stdout);
  const int saved = ::dup(1);
  FILE* file = std::fopen(path.c_str(), "w");
  REQUIRE(file);
  ::dup2(::fileno(file), 1);
  try {
    f();
  } catch (...) {
    std::fflush(stdout);
    ::dup2(saved, 1);
    ::close(saved);
    std::fclose(file);
    throw;
  }
  std::fflush(stdout);
  ::dup2(saved, 1);
  ::close(saved);
  std::fclose(file);
  return cbq::testing::read_all(path);
}

// Naive double references of the reconstruction terms in each loss scale (PassOptions).
struct Terms {
  double l2 = 0, kld = 0;
};
Terms naive_terms(const Tensor<float>& a, const Tensor<float>& b, LossScale scale,
                  double window_energy) {
  const int64_t L = a.size(0), d = a.size(1);
  Terms t;
  for (int64_t r = 0; r < L; ++r) {
    double energy = 0, err = 0;
    for (int64_t c = 0; c < d; ++c) {
      energy += static_cast<double>(a(r, c)) * a(r, c);
      const double e = static_cast<double>(a(r, c)) - b(r, c);
      err += e * e;
    }
    // The factor the softmax inputs are multiplied with.
    double f = 1;
    if (scale == LossScale::window) f = 1 / std::sqrt(window_energy / static_cast<double>(d));
    if (scale == LossScale::token) f = std::sqrt(static_cast<double>(d) / energy);
    double ma = -1e300, mb = -1e300;
    for (int64_t c = 0; c < d; ++c) {
      ma = std::max(ma, f * a(r, c));
      mb = std::max(mb, f * b(r, c));
    }
    double za = 0, zb = 0;
    for (int64_t c = 0; c < d; ++c) {
      za += std::exp(f * a(r, c) - ma);
      zb += std::exp(f * b(r, c) - mb);
    }
    double kl = 0;
    for (int64_t c = 0; c < d; ++c) {
      const double lp = f * a(r, c) - ma - std::log(za), lq = f * b(r, c) - mb - std::log(zb);
      kl += std::exp(lp) * (lp - lq);
    }
    t.kld += kl / static_cast<double>(L);
    if (scale == LossScale::absolute) t.l2 += err / static_cast<double>(L);
    if (scale == LossScale::window) t.l2 += err / window_energy / static_cast<double>(L);
    if (scale == LossScale::token) t.l2 += err / energy / static_cast<double>(L);
  }
  return t;
}
}  // namespace

TEST_CASE("loss scale: each window's terms equal their definitions in every scale") {
  // Nothing learns and the rounding is nearest: the pass is RTN, so the first window's terms
  // before training compare T_fp(X_fp) of blocks 0..1 with the RTN blocks on the same input.
  ModelConfig c = tiny_llama_config();
  const auto x0 = random_hidden(3, 8, c.dim, 17);
  for (LossScale scale : {LossScale::absolute, LossScale::window, LossScale::token}) {
    CAPTURE(static_cast<int>(scale));
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 6));
    PassOptions o = quiet_options(1);
    o.lr_weight_step = 0;
    o.loss_scale = scale;
    o.balance_all_samples = true;  // the expectation below is over every sample
    PassSpec spec;
    spec.weight = W3::spec();
    spec.rounding = RoundingKind::nearest;
    auto result = CbqPass(spec, o).run_from_hidden(model, x0);
    BlockContext<float> fp;
    fp.full_precision = true;
    std::vector<Tensor<float>> targets, outputs;
    double energy = 0;
    int64_t tokens = 0;
    for (const auto& x : x0) {
      Tensor<float> t = x, y = x;
      for (int64_t b = 0; b <= 1; ++b) {
        t = model.run_block(b, t, fp);
        y = model.run_block(b, y);
      }
      for (int64_t i = 0; i < t.numel(); ++i) energy += static_cast<double>(t[i]) * t[i];
      tokens += t.size(0);
      targets.push_back(t);
      outputs.push_back(y);
    }
    energy /= static_cast<double>(tokens);
    Terms expected;
    for (size_t n = 0; n < x0.size(); ++n) {
      const Terms t = naive_terms(targets[n], outputs[n], scale, energy);
      expected.l2 += t.l2 / static_cast<double>(x0.size());
      expected.kld += t.kld / static_cast<double>(x0.size());
    }
    const WindowStats& w = result.windows[0];
    CHECK(w.energy_fp == doctest::Approx(energy).epsilon(1e-5));
    CHECK(w.loss_before.l2_fp == doctest::Approx(expected.l2).epsilon(1e-4));
    CHECK(w.loss_before.kld_fp == doctest::Approx(expected.kld).epsilon(1e-3));
    CHECK(std::isfinite(w.loss_before.kld_fp));
    CHECK(w.loss_before.kld_fp > 0);
  }
  // The relative terms do not change when the model's activations are 1000 times larger (the
  // absolute ones grow by 10^6): scale the calibration input (block 0 starts with a norm) and
  // every block's output projections.
  auto first_window = [&](LossScale scale, float factor) {
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 6));
    for (auto& block : model.blocks)
      for (LinearLayer<float>* l : block.linears())
        if (l->name == "o_proj" || l->name == "down_proj")
          for (int64_t i = 0; i < l->weight.value.numel(); ++i) l->weight.value[i] *= factor;
    auto x = x0;
    for (auto& t : x) {
      t = t.clone();
      for (int64_t i = 0; i < t.numel(); ++i) t[i] *= factor;
    }
    PassOptions o = quiet_options(1);
    o.lr_weight_step = 0;
    o.loss_scale = scale;
    PassSpec spec;
    spec.weight = W3::spec();
    spec.rounding = RoundingKind::nearest;
    return CbqPass(spec, o).run_from_hidden(model, x).windows[0].loss_before;
  };
  for (LossScale scale : {LossScale::window, LossScale::token}) {
    CAPTURE(static_cast<int>(scale));
    const LossTerms a = first_window(scale, 1), b = first_window(scale, 1000);
    CHECK(b.l2_fp == doctest::Approx(a.l2_fp).epsilon(2e-2));
    CHECK(b.l2_hom == doctest::Approx(a.l2_hom).epsilon(2e-2));
  }
  const LossTerms a = first_window(LossScale::absolute, 1),
                  b = first_window(LossScale::absolute, 1000);
  CHECK(b.l2_fp > 1e5 * a.l2_fp);
}

TEST_CASE("loss balance: every window records its terms, the hard rounding and the curve") {
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(6, 12, c.dim, 3);
  for (quant::RoundingMode mode : {quant::RoundingMode::hard_ste, quant::RoundingMode::soft}) {
    CAPTURE(static_cast<int>(mode));
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 21));
    PassOptions o = quiet_options(2);
    o.rounding_mode = mode;
    auto result = TinyPass(o).run_from_hidden(model, x);
    const int64_t train = 6 - o.holdout_samples(6);
    for (const WindowStats& w : result.windows) {
      CHECK(w.steps == 2 * train);
      REQUIRE(w.curve.size() == static_cast<size_t>(w.steps));
      for (const LossTerms& t : w.curve) CHECK(std::isfinite(t.total));
      CHECK(w.energy_fp > 0);
      CHECK(w.energy_hom > 0);
      // γ·L_round at β_start before training, at β_end after.
      CHECK(w.loss_before.round > 0);
      CHECK(w.loss_before.round <= o.gamma_round);
      CHECK(w.loss_after.round > 0);
      // Training on the hard codes: hardening changes nothing; soft: it does.
      if (mode == quant::RoundingMode::hard_ste)
        CHECK(w.loss_hard.total == w.loss_after.total);
      else
        CHECK(w.loss_hard.total != w.loss_after.total);
    }
  }
}

TEST_CASE("loss balance: measured on the held-out samples by default, on all when asked") {
  // Only a measurement: the codes are the same bit for bit either way; by default the balance is
  // the mean over the held-out samples, equal to the start-vs-trained losses in hard training.
  PassOptions rule;
  CHECK(rule.balance_samples(128) == 13);  // the held-out ones
  CHECK(rule.balance_samples(1) == 1);     // none held out: all
  rule.balance_all_samples = true;
  CHECK(rule.balance_samples(128) == 128);
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(8, 10, c.dim, 4);
  QuantizationResult by_sample[2];
  for (bool all : {false, true}) {
    CAPTURE(all);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 23));
    PassOptions o = quiet_options(2);
    o.balance_all_samples = all;
    by_sample[all] = TinyPass(o).run_from_hidden(model, x);
    for (const WindowStats& w : by_sample[all].windows) {
      REQUIRE(w.heldout == o.holdout_samples(8));
      CHECK(w.balance_samples == (all ? 8 : w.heldout));
      CHECK(std::isfinite(w.loss_before.total));
      CHECK(std::isfinite(w.loss_after.total));
      if (!all) {
        CHECK(w.loss_before.reconstruction() == w.heldout_start.reconstruction());
        CHECK(w.loss_hard.reconstruction() == w.heldout_trained.reconstruction());
      }
    }
  }
  const QuantizationResult &held_out = by_sample[0], &every = by_sample[1];
  REQUIRE(held_out.layers.size() == every.layers.size());
  for (size_t i = 0; i < every.layers.size(); ++i) {
    CAPTURE(every.layers[i].name);
    CHECK(same_codes(held_out.layers[i].weight, every.layers[i].weight));
    CHECK(same_bits(held_out.layers[i].weight.scale, every.layers[i].weight.scale));
  }
  // Over all 8 samples the means differ from those over the 4 held out.
  CHECK(held_out.windows[0].loss_before.total != every.windows[0].loss_before.total);
  // Without held-out samples there is nothing else to measure on: all of them.
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 23));
  PassOptions o = quiet_options(2);
  o.keep_better = false;
  for (const WindowStats& w : TinyPass(o).run_from_hidden(model, x).windows)
    CHECK(w.balance_samples == 8);
}

TEST_CASE("keep better: the held-out count follows the documented rule") {
  PassOptions o;
  CHECK(o.holdout_samples(1) == 0);
  CHECK(o.holdout_samples(2) == 1);
  CHECK(o.holdout_samples(5) == 2);
  CHECK(o.holdout_samples(8) == 4);
  CHECK(o.holdout_samples(40) == 4);
  CHECK(o.holdout_samples(128) == 13);
  CHECK(o.holdout_samples(1000) == 100);
  o.keep_better = false;
  CHECK(o.holdout_samples(128) == 0);
}

TEST_CASE("keep better: training forced to diverge returns the start's codes bit for bit") {
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(8, 10, c.dim, 5);
  PassOptions wild = quiet_options(2);
  wild.weight_init = WeightInit::rtn;            // the start compared with below
  wild.lr_weight_step = wild.lr_rounding = 1e4;  // absurd
  PassSpec spec = TinyPass::make_spec();

  // RTN start: the result is RTN's, layer by layer.
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 31));
  QuantizationResult result;
  const std::string printed = captured_stdout([&] {
    PassOptions o = wild;
    o.verbose = true;
    result = TinyPass(o).run_from_hidden(model, x);
  });
  Transformer<LlamaBlock<float>> rtn_model(c, random_weights(c, 31));
  const QuantizationResult rtn = quantize_baseline(rtn_model, Baseline::rtn, spec, x, {}, false);
  REQUIRE(result.layers.size() == rtn.layers.size());
  for (size_t i = 0; i < rtn.layers.size(); ++i) {
    CAPTURE(rtn.layers[i].name);
    CHECK(result.layers[i].name == rtn.layers[i].name);
    CHECK(same_codes(result.layers[i].weight, rtn.layers[i].weight));
    CHECK(same_bits(result.layers[i].weight.scale, rtn.layers[i].weight.scale));
    CHECK(result.layers[i].codes_changed == 0);
    CHECK(result.layers[i].output_error == result.layers[i].output_error_start);
  }
  // The decision is recorded (held-out samples, both losses) and printed.
  CHECK(result.windows_kept_start() == static_cast<int64_t>(result.windows.size()));
  for (const WindowStats& w : result.windows) {
    CHECK(w.judged);
    CHECK(w.heldout == 4);
    CHECK(w.heldout_start.reconstruction() < w.heldout_trained.reconstruction());
    CHECK(w.loss_after.reconstruction() > w.loss_before.reconstruction());  // it did diverge
  }
  CHECK(printed.find("window 1/2 held-out loss (4 samples): start") != std::string::npos);
  CHECK(printed.find("-> keeps the start") != std::string::npos);
  const std::vector<int32_t> tokens{3, 1, 4, 1, 5};
  CHECK(same_bits(model.logits(tokens), rtn_model.logits(tokens)));

  // GPTQ start: the result is the untrained GPTQ start's (lr 0), bit for bit.
  Transformer<LlamaBlock<float>> gptq_model(c, random_weights(c, 31)),
      still_model(c, random_weights(c, 31));
  PassOptions o = wild;
  o.weight_init = WeightInit::gptq;
  const QuantizationResult diverged = TinyPass(o).run_from_hidden(gptq_model, x);
  PassOptions frozen = quiet_options(2);
  frozen.weight_init = WeightInit::gptq;
  frozen.lr_weight_step = frozen.lr_act_step = frozen.lr_rounding = 0;
  frozen.keep_better = false;
  frozen.holdout_min = 0;
  const QuantizationResult start = TinyPass(frozen).run_from_hidden(still_model, x);
  CHECK(diverged.windows_kept_start() == static_cast<int64_t>(diverged.windows.size()));
  REQUIRE(diverged.layers.size() == start.layers.size());
  for (size_t i = 0; i < start.layers.size(); ++i) {
    CAPTURE(start.layers[i].name);
    CHECK(same_codes(diverged.layers[i].weight, start.layers[i].weight));
    CHECK(same_bits(diverged.layers[i].weight.scale, start.layers[i].weight.scale));
  }

  // Without the rule the same rates leave a worse model than the start.
  Transformer<LlamaBlock<float>> unguarded(c, random_weights(c, 31));
  o = wild;
  o.keep_better = false;
  const QuantizationResult bad = TinyPass(o).run_from_hidden(unguarded, x);
  CHECK(bad.windows_kept_start() == 0);
  bool any_different = false;
  for (size_t i = 0; i < bad.layers.size(); ++i)
    any_different = any_different || !same_codes(bad.layers[i].weight, rtn.layers[i].weight);
  CHECK(any_different);
}

TEST_CASE("keep better: training that turns non-finite stops and the window keeps its start") {
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(8, 10, c.dim, 5);
  Transformer<LlamaBlock<float>> rtn_model(c, random_weights(c, 31));
  const QuantizationResult rtn =
      quantize_baseline(rtn_model, Baseline::rtn, TinyPass::make_spec(), x, {}, false);
  // A NaN put into a learned parameter of block 0 after window 1's step `at` (mid-window: the next
  // step's loss is NaN; the last step: the trained state's evaluation is).
  auto run = [&](Transformer<LlamaBlock<float>>& model, int64_t at, bool keep_better) {
    PassOptions o = quiet_options(2);
    o.weight_init = WeightInit::rtn;
    o.keep_better = keep_better;
    o.verbose = true;
    o.on_step = [&model, at](int64_t window, int64_t step) {
      if (window != 1 || step != at) return;
      auto q = std::dynamic_pointer_cast<QuantLinear<float>>(model.blocks[0].q_proj.transform);
      REQUIRE(q);
      q->rounding_params()[0]->value[0] = std::numeric_limits<float>::quiet_NaN();
    };
    QuantizationResult result;
    const std::string printed =
        captured_stdout([&] { result = TinyPass(o).run_from_hidden(model, x); });
    return std::pair<QuantizationResult, std::string>{result, printed};
  };
  Transformer<LlamaBlock<float>> clean_model(c, random_weights(c, 31));
  const int64_t steps = run(clean_model, -1, true).first.windows.at(0).steps;
  REQUIRE(steps > 3);
  for (const int64_t at : {int64_t{2}, steps - 1}) {
    CAPTURE(at);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 31));
    const auto [result, printed] = run(model, at, true);
    REQUIRE(result.windows.size() == 2);
    const WindowStats& w = result.windows[0];
    CHECK_FALSE(w.diverged.empty());
    CHECK(w.kept_start);
    CHECK(w.steps == at + 1);  // it stopped at the NaN
    CHECK(static_cast<int64_t>(w.curve.size()) == w.steps);
    CHECK(w.diverged.find("is not finite after an update (window 1, blocks 0..1") !=
          std::string::npos);
    CHECK(std::isfinite(w.heldout_trained.reconstruction()));
    CHECK(w.heldout_trained.reconstruction() == w.heldout_start.reconstruction());
    for (const LossTerms& t : w.curve) CHECK(std::isfinite(t.total));
    CHECK(result.windows[1].diverged.empty());  // the next window trains as usual
    CHECK(printed.find("window 1/2: training diverged and stopped; the window keeps its start") !=
          std::string::npos);
    // Block 0 is RTN's, code for code.
    const size_t block0 = model.blocks[0].linears().size();
    REQUIRE(result.layers.size() == rtn.layers.size());
    for (size_t i = 0; i < block0; ++i) {
      CAPTURE(rtn.layers[i].name);
      CHECK(same_codes(result.layers[i].weight, rtn.layers[i].weight));
      CHECK(same_bits(result.layers[i].weight.scale, rtn.layers[i].weight.scale));
    }
    for (const LayerResult& l : result.layers) CHECK(std::isfinite(l.output_error));
    const Tensor<float> logits = model.logits(std::vector<int32_t>{3, 1, 4, 1, 5});
    for (int64_t i = 0; i < logits.numel(); ++i) REQUIRE(std::isfinite(logits[i]));
  }
  // Without the keep-better rule there is no start to go back to: an error naming the window.
  Transformer<LlamaBlock<float>> unguarded(c, random_weights(c, 31));
  CHECK_THROWS_WITH_AS(run(unguarded, 2, false), doctest::Contains("window 1"), Error);
}

TEST_CASE("keep better: ordinary training keeps its trained state when it is better") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 21));
  PassOptions o = quiet_options(4);
  o.weight_init = WeightInit::rtn;  // a start that training can improve on this toy model
  auto result = TinyPass(o).run_from_hidden(model, random_hidden(12, 12, c.dim, 3));
  for (const WindowStats& w : result.windows) {
    CHECK(w.judged);
    CHECK(w.heldout == 4);
    CHECK(w.kept_start == (w.heldout_start.reconstruction() < w.heldout_trained.reconstruction()));
  }
  CHECK(result.windows_kept_start() < static_cast<int64_t>(result.windows.size()));
  // Some codes moved; every layer's output error is measured for the start and the end. (The
  // window's loss, not each layer's own error, is what training lowers: layers compensate each
  // other, so a layer's error may rise.)
  double changed = 0;
  for (const LayerResult& l : result.layers) {
    changed += l.codes_changed;
    CHECK(l.output_error_start > 0);
    CHECK(l.output_error > 0);
    CHECK(std::isfinite(l.output_error));
  }
  CHECK(changed > 0);
}

TEST_CASE("fixed grid: learned steps scale the start's codes and never re-round them") {
  const int64_t rows = 16, cols = 32;
  Tensor<float> x = cbq::testing::randn<float>(Shape{200, cols}, 5);
  for (int64_t r = 0; r < 200; ++r)
    for (int64_t col = 1; col < cols; ++col) x(r, col) += 0.7f * x(r, col - 1);
  quant::HessianAccumulator acc(cols, "fc");
  acc.add_batch(x);
  Tensor<float> w = cbq::testing::randn<float>(Shape{rows, cols}, 6, 0.2f);
  const quant::GridSpec grid{3, false, quant::Granularity::per_group, 8};
  const quant::GptqResult g = quant::gptq_quantize(w, acc, grid);
  for (RoundingKind rounding : {RoundingKind::lora, RoundingKind::full, RoundingKind::nearest})
    for (bool fixed : {false, true}) {
      CAPTURE(static_cast<int>(rounding));
      CAPTURE(fixed);
      QuantLinearConfig cfg;
      cfg.weight = grid;
      cfg.rounding = rounding;
      cfg.rank = 2;
      cfg.rounding_mode = quant::RoundingMode::hard_ste;
      cfg.lora_init.start = quant::LoraStart::adaround;
      cfg.fixed_grid = fixed;
      QuantLinear<float> q("fc", g.updated, cfg, &g.weight, true);
      // Untrained, either grid is GPTQ's solution.
      const Tensor<float> start = q.current_weight();
      for (int64_t i = 0; i < start.numel(); ++i)
        REQUIRE(std::abs(start[i] - g.dequantized[i]) <= 1e-6f * (1 + std::abs(g.dequantized[i])));
      // Move every step by a different factor between 0.7 and 1.3.
      Tensor<float>& s = q.weight_step_params()[0]->value;
      Tensor<float> factor = Tensor<float>::empty(s.shape());
      for (int64_t i = 0; i < s.numel(); ++i) {
        factor[i] = 0.7f + 0.6f * static_cast<float>((i * 37) % 11) / 10.0f;
        s[i] *= factor[i];
      }
      const Tensor<float> moved = q.current_weight();
      const quant::QuantizedWeight& qw = q.harden();
      if (fixed) {
        // GPTQ's codes with the new steps: the forward is factor × GPTQ's weight.
        CHECK(same_codes(qw, g.weight));
        CHECK(same_bits(qw.scale, s));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t col = 0; col < cols; ++col) {
            const int64_t p = qw.param_index(r, col);
            REQUIRE(moved(r, col) ==
                    doctest::Approx(factor[p] * g.dequantized(r, col)).epsilon(1e-5));
          }
      } else {
        CHECK_FALSE(same_codes(qw, g.weight));  // the learned grid re-rounds (PASS.md)
      }
    }
}

TEST_CASE("fixed grid: gradients of the steps and rounding factors match finite differences") {
  // In double, soft rounding: y = x·Ŵᵀ with Ŵ = (s/s₀)·s₀·(floor(W/s₀) + h(V0 + A1·A2) − z) is
  // smooth in s, A1 and A2 (the codes' integer part never moves).
  const int64_t rows = 6, cols = 16;
  const Tensor<double> w = cbq::testing::randn<double>(Shape{rows, cols}, 8, 0.3);
  const Tensor<double> x = cbq::testing::randn<double>(Shape{5, cols}, 9);
  for (RoundingKind rounding : {RoundingKind::lora, RoundingKind::full, RoundingKind::nearest})
    for (quant::Granularity gran : {quant::Granularity::per_group, quant::Granularity::per_channel,
                                    quant::Granularity::per_tensor}) {
      CAPTURE(static_cast<int>(rounding));
      CAPTURE(static_cast<int>(gran));
      QuantLinearConfig cfg;
      cfg.weight = quant::GridSpec{3, false, gran, 8};
      cfg.rounding = rounding;
      cfg.rank = 2;
      cfg.rounding_mode = quant::RoundingMode::soft;
      cfg.fixed_grid = true;
      cfg.lora_init.a1_std = 0.5;
      QuantLinear<double> q("fc", w, cfg);
      LinearLayer<double> layer("fc", w);
      std::vector<Parameter<double>*> params = q.weight_step_params();
      for (auto* p : q.rounding_params()) params.push_back(p);
      // Rounding factors away from zero so that A1 and A2 both carry gradients.
      for (auto* p : q.rounding_params())
        for (int64_t i = 0; i < p->value.numel(); ++i)
          p->value[i] = 0.3 * std::sin(static_cast<double>(i) + 1.0);
      for (int64_t i = 0; i < params[0]->value.numel(); ++i) params[0]->value[i] *= 1.1;
      const Tensor<double> proj = cbq::testing::randn<double>(Shape{5, rows}, 10);
      auto loss = [&](Tape<double>& tape) {
        const ops::LinearArgs<double> a = *q.linear_args(tape, layer, tape.constant(x), nullptr);
        return ops::sum(ops::mul(ops::linear(a.x, a.w), tape.constant(proj)));
      };
      for (auto* p : params) p->grad = Tensor<double>(p->value.shape());
      Tape<double> tape;
      tape.backward(loss(tape));
      for (auto* p : params) {
        CAPTURE(p->name);
        REQUIRE(p->grad.defined());
        double diff = 0, norm = 0;
        for (int64_t i = 0; i < p->value.numel(); ++i) {
          const double saved = p->value[i], eps = 1e-6;
          p->value[i] = saved + eps;
          Tape<double> t1;
          const double up = loss(t1).value()[0];
          p->value[i] = saved - eps;
          Tape<double> t2;
          const double down = loss(t2).value()[0];
          p->value[i] = saved;
          const double numeric = (up - down) / (2 * eps);
          diff = std::max(diff, std::abs(numeric - p->grad[i]));
          norm = std::max(norm, std::abs(numeric));
        }
        CHECK(std::isfinite(diff));
        CHECK(diff <= 1e-6 * std::max(1.0, norm));
        if (p == params[0]) CHECK(norm > 0);
      }
    }
}

TEST_CASE("fixed grid: the GPTQ start uses it by default, and it keeps GPTQ's codes fixed") {
  PassOptions o;  // the default: GPTQ start, automatic grid, so fixed
  CHECK(o.weight_init == WeightInit::gptq);
  CHECK(o.fixed_grid());
  o.weight_init = WeightInit::rtn;
  CHECK_FALSE(o.fixed_grid());
  CHECK(PassOptions::paper().weight_init == WeightInit::rtn);
  CHECK(PassOptions::classic().weight_init == WeightInit::rtn);
  o.weight_init = WeightInit::gptq;
  CHECK(o.fixed_grid());
  o.grid = GridMode::learned;
  CHECK_FALSE(o.fixed_grid());
  // A pass from GPTQ's start with nearest rounding and learned steps: every code stays GPTQ's
  // (only the steps move), unlike the learned grid.
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(6, 10, c.dim, 40);
  PassSpec spec = TinyPass::make_spec();
  spec.rounding = RoundingKind::nearest;
  for (GridMode grid : {GridMode::automatic, GridMode::learned}) {
    CAPTURE(static_cast<int>(grid));
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 8));
    PassOptions p = quiet_options(3);
    p.weight_init = WeightInit::gptq;
    p.grid = grid;
    p.lr_weight_step = 3e-2;
    p.keep_better = false;
    auto result = CbqPass(spec, p).run_from_hidden(model, x);
    double moved = 0, changed = 0;
    for (const LayerResult& l : result.layers) {
      moved += l.step_change;
      changed += l.codes_changed;
    }
    CHECK(moved > 0);
    if (grid == GridMode::automatic)
      CHECK(changed == 0);
    else
      CHECK(changed > 0);
  }
}

TEST_CASE("targets: the full-precision output carried from the last window equals the recomputed") {
  // Windows 2/1 over 3 blocks: the second window's first block is the first window's last, whose
  // full-precision output T_fp(X_fp) the targets pass starts from (reuse_fp_outputs). The same
  // unit on the same input: every loss and every code is the same bit for bit.
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(6, 10, c.dim, 8);
  QuantizationResult runs[2];
  for (bool reuse : {false, true}) {
    CAPTURE(reuse);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 29));
    PassOptions o = quiet_options(2);
    o.reuse_fp_outputs = reuse;
    runs[reuse] = TinyPass(o).run_from_hidden(model, x);
  }
  const QuantizationResult &recomputed = runs[0], &carried = runs[1];
  REQUIRE(recomputed.windows.size() == 2);
  REQUIRE(carried.windows.size() == 2);
  for (size_t k = 0; k < 2; ++k) {
    CAPTURE(k);
    REQUIRE(std::isfinite(carried.windows[k].loss_before.total));
    CHECK(carried.windows[k].loss_before.total == recomputed.windows[k].loss_before.total);
    CHECK(carried.windows[k].loss_after.total == recomputed.windows[k].loss_after.total);
  }
  REQUIRE(carried.layers.size() == recomputed.layers.size());
  for (size_t i = 0; i < carried.layers.size(); ++i) {
    CAPTURE(carried.layers[i].name);
    CHECK(same_codes(carried.layers[i].weight, recomputed.layers[i].weight));
    CHECK(same_bits(carried.layers[i].weight.scale, recomputed.layers[i].weight.scale));
  }
}
