#include <cbq/model/llama_block.hpp>
#include <cbq/model/opt_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/pass.hpp>

#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::quiet_options;
using cbq::testing::random_hidden;

namespace {
using W3 = Quantizer<3, PerGroup<8>>;
}  // namespace

TEST_CASE("cbq pass: every window's reconstruction loss goes down (tiny LLaMA, W3 g8, LoRA)") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 1));
  PassOptions o = quiet_options(4);
  o.balance_all_samples = true;  // training samples included (the held-out ones are 3 of 6)
  Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>> pass(o);
  auto result = pass.run_from_hidden(model, random_hidden(6, 12, c.dim, 7));
  REQUIRE(result.windows.size() == 2);
  for (const auto& w : result.windows) {
    CAPTURE(w.first_block);
    // Measured over all samples without the regulariser, before and after the window trains.
    CHECK(w.loss_after.reconstruction() < w.loss_before.reconstruction());
    CHECK(w.final_loss.reconstruction() < w.first_epoch_loss.reconstruction());
  }
  CHECK(result.layers.size() == 3 * 7);
}

TEST_CASE("cbq pass: hard rounding leaves every weight on the integer grid") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 2));
  Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>> pass(quiet_options(4));
  auto result = pass.run_from_hidden(model, random_hidden(3, 10, c.dim, 9));
  for (int64_t b = 0; b < model.num_blocks(); ++b)
    for (LinearLayer<float>* layer : model.blocks[b].linears()) {
      auto q = std::dynamic_pointer_cast<QuantLinear<float>>(layer->transform);
      REQUIRE(q);
      CHECK(q->hardened());
      const quant::QuantizedWeight& qw = q->result();
      Tensor<float> w = q->current_weight();
      // Every weight is s·(code − z) for an integer code in range.
      for (int64_t r = 0; r < qw.rows(); ++r)
        for (int64_t col = 0; col < qw.cols(); ++col) {
          const int64_t p = qw.param_index(r, col);
          const double code = static_cast<double>(w(r, col)) / qw.scale[p] + qw.zero[p];
          REQUIRE(std::abs(code - std::round(code)) < 1e-3);
          REQUIRE(qw.codes(r, col) <= qw.spec.qmax() - qw.spec.qmin());
          REQUIRE(w(r, col) == qw.value(r, col));
        }
      const LayerResult* lr = result.find(q->name());
      REQUIRE(lr);
    }
}

TEST_CASE("cbq pass: OPT blocks, per-token A4 activations and nearest rounding run end to end") {
  ModelConfig c = tiny_opt_config();
  Transformer<OptBlock<float>> model(c, random_weights(c, 3));
  PassOptions o = quiet_options(4);
  o.epochs = 2;
  Pass<Quantizer<4, PerChannel>, ActQuant<4>, SlidingWindow<2, 0>, NearestRounding> pass(o);
  auto result = pass.run_from_hidden(model, random_hidden(3, 10, c.dim, 11));
  CHECK(result.windows.size() == 2);
  CHECK(result.layers.size() == 3 * 6);
  for (const auto& l : result.layers) CHECK(l.act_clip_logit != 0.0);
}

TEST_CASE("cbq pass: a NaN in the calibration data names the sample") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 4));
  auto x = random_hidden(4, 8, c.dim, 13);
  x[2](5, 3) = std::numeric_limits<float>::quiet_NaN();
  Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>> pass(quiet_options(4));
  CHECK_THROWS_WITH_AS(
      pass.run_from_hidden(model, x),
      doctest::Contains("calibration sample 2 (block 0 input) holds a non-finite value"),
      cbq::Error);
}

TEST_CASE("cbq pass: a window larger than the model is a clear run-time error") {
  ModelConfig c = tiny_llama_config();  // 3 blocks
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 5));
  Pass<W3, ActQuant<16>, SlidingWindow<4, 1>, LoraRounding<2>> pass(quiet_options(4));
  CHECK_THROWS_WITH_AS(pass.run_from_hidden(model, random_hidden(2, 8, c.dim, 1)),
                       doctest::Contains("windows of 4 blocks but the model has only 3 blocks"),
                       cbq::Error);
  // SlidingWindow<2, 2> does not compile: "Overlap must be smaller than Blocks".
  static_assert(SlidingWindow<2, 1>::overlap == 1);
}

TEST_CASE("cbq pass: window targets follow the full-precision path for every window shape") {
  // With nothing learning and nearest rounding the pass reduces to RTN, so each window's initial
  // L2 term must equal the error between the FP model's output of that window (from the FP
  // input) and the RTN-quantized window applied to the quantized path's input.
  ModelConfig c = tiny_llama_config();  // 3 blocks
  for (auto [B, O] : {std::pair<int64_t, int64_t>{1, 0}, {2, 0}, {2, 1}}) {
    CAPTURE(B);
    CAPTURE(O);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 6));
    PassOptions o = quiet_options(4);
    o.epochs = 1;
    o.lr_weight_step = 0;
    o.loss_kld = false;
    o.loss_scale = LossScale::absolute;  // (the other scales: test_pass_balance.cpp)
    o.balance_all_samples = true;        // the expectation below is over every sample
    PassSpec spec;
    spec.weight = W3::spec();
    spec.window_blocks = B;
    spec.window_overlap = O;
    spec.rounding = RoundingKind::nearest;
    auto x0 = random_hidden(3, 8, c.dim, 17);
    auto result = CbqPass(spec, o).run_from_hidden(model, x0);
    const auto windows = window_schedule(model.num_blocks(), B, O);
    REQUIRE(result.windows.size() == windows.size());
    BlockContext<float> fp;
    fp.full_precision = true;
    for (size_t wi = 0; wi < windows.size(); ++wi) {
      double expected = 0;
      for (const auto& x : x0) {
        Tensor<float> target = x, y = x;
        for (int64_t b = 0; b <= windows[wi].last; ++b) {
          target = model.run_block(b, target, fp);
          y = model.run_block(b, y);  // quantized (hardened RTN) blocks
        }
        Tape<float> tape;
        expected += ops::row_sq_error(tape.constant(target), tape.constant(y)).value()[0];
      }
      expected /= static_cast<double>(x0.size());
      CHECK(result.windows[wi].loss_before.l2_fp == doctest::Approx(expected).epsilon(1e-4));
    }
  }
}

TEST_CASE("cbq pass: learned steps need a V0 that tracks them (a frozen V0 makes the loss rise)") {
  // The literal AdaRound start freezes V0 = h⁻¹(W/s0 − floor(W/s0)). Once s moves, the soft
  // weight floor(W/s) + h(V0) drifts away from W/s while the straight-through gradient does not
  // see it: training the steps alone makes the window loss worse. Recomputing V0 from the current
  // step (the default) makes the same training reduce it. docs/PASS.md quotes these numbers.
  ModelConfig c = tiny_llama_config();
  auto x0 = random_hidden(6, 12, c.dim, 7);
  double rise = 0, fall = 0;
  for (bool track : {false, true}) {
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 1));
    PassOptions o = quiet_options(4);
    o.weight_init = WeightInit::rtn;  // V0 tracking concerns the AdaRound (RTN) start
    o.epochs = 8;
    o.lr_rounding = 0;  // steps only
    o.rounding_mode = quant::RoundingMode::soft;
    o.v0_tracks_step = track;
    auto r =
        Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>>(o).run_from_hidden(model, x0);
    const auto& w = r.windows.front();
    MESSAGE(std::string(track ? "tracking" : "frozen")
            << " V0: window 1 loss " << w.loss_before.reconstruction() << " -> "
            << w.loss_after.reconstruction());
    (track ? fall : rise) = w.loss_after.reconstruction() / w.loss_before.reconstruction();
  }
  CHECK(rise > 1.0);
  CHECK(fall < 1.0);
}

TEST_CASE("cbq pass: activation quantization only on the chosen linear layers") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 21));
  PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.granularity = quant::Granularity::per_group;
  spec.weight.group_size = 8;
  spec.act_bits = 8;
  spec.act_layers = {"q_proj", "down_proj"};
  PassOptions o = quiet_options(4);
  o.epochs = 1;
  CbqPass pass(spec, o);
  auto result = pass.run_from_hidden(model, random_hidden(3, 10, c.dim, 5));
  CHECK(result.config.find("inputs of q_proj,down_proj") != std::string::npos);
  for (const LayerResult& l : result.layers) {
    CAPTURE(l.name);
    const bool chosen = l.name.ends_with(".q_proj") || l.name.ends_with(".down_proj");
    CHECK((l.act_scale > 0) == chosen);
  }
  // The baselines honour the same choice.
  Transformer<LlamaBlock<float>> model2(c, random_weights(c, 21));
  auto rtn =
      quantize_baseline(model2, Baseline::rtn, spec, random_hidden(3, 10, c.dim, 5), {}, false);
  for (const LayerResult& l : rtn.layers)
    CHECK((l.act_scale > 0) == (l.name.ends_with(".q_proj") || l.name.ends_with(".down_proj")));
  // An unknown name is refused with the names that exist.
  spec.act_layers = {"qkv_proj"};
  CHECK_THROWS_WITH_AS(CbqPass(spec, o).run_from_hidden(model2, random_hidden(2, 6, c.dim, 1)),
                       doctest::Contains("no linear layer named 'qkv_proj'"), Error);
}

TEST_CASE(
    "QuantLinear: a forward asked for its rounding regulariser gives it with the weight, as the "
    "regulariser computed on its own") {
  const int64_t rows = 24, cols = 40;
  for (RoundingKind kind : {RoundingKind::lora, RoundingKind::full})
    for (bool tracks : {true, false}) {
      CAPTURE(static_cast<int>(kind));
      CAPTURE(tracks);
      QuantLinearConfig cfg;
      cfg.weight = quant::GridSpec{4, false, quant::Granularity::per_group, 8};
      cfg.rounding = kind;
      cfg.rank = 3;
      cfg.rounding_mode = quant::RoundingMode::hard_ste;
      cfg.lora_init.start = quant::LoraStart::adaround;
      cfg.v0_tracks_step = tracks;
      const Tensor<float> w = cbq::testing::randn<float>(Shape{rows, cols}, 3, 0.2f);
      LinearLayer<float> layer("fc", w);
      auto q = std::make_shared<QuantLinear<float>>("fc", w, cfg);
      for (Parameter<float>* p : q->rounding_params())  // away from the start, where h is binary
        for (int64_t i = 0; i < p->value.numel(); ++i)
          p->value[i] += 0.3f * std::sin(static_cast<float>(i));
      const Tensor<float> x = cbq::testing::randn<float>(Shape{5, cols}, 4);
      struct Result {
        float reg;
        std::vector<Tensor<float>> grads;
      };
      std::vector<Parameter<float>*> params = q->weight_step_params();
      for (Parameter<float>* p : q->rounding_params()) params.push_back(p);
      // One step: forward (asked for the regulariser or not), backward of Σ y + 3·r.
      auto step = [&](Tape<float>& tape, bool with_forward, float beta) {
        tape.clear();
        TransformLosses<float> losses{beta, {}};
        Var<float> y = q->forward(tape, layer, tape.constant(x), with_forward ? &losses : nullptr);
        Var<float> r;
        if (with_forward) {
          REQUIRE(losses.rounding.size() == 1);
          CHECK(losses.rounding[0].first == q.get());
          r = losses.rounding[0].second;
        } else {
          CHECK(losses.rounding.empty());
          r = q->rounding_regularizer(tape, beta);
        }
        REQUIRE(r.valid());
        for (Parameter<float>* p : params) p->zero_grad();
        tape.backward(ops::add(ops::sum(y), ops::scale(r, 3.f)));
        Result out{r.value()[0], {}};
        for (Parameter<float>* p : params) out.grads.push_back(p->grad.clone());
        return out;
      };
      Tape<float> tape;
      const Result separate = step(tape, false, 5.f);
      const Result fused = step(tape, true, 5.f);
      CHECK(std::isfinite(separate.reg));
      CHECK(fused.reg == separate.reg);
      REQUIRE(fused.grads.size() == separate.grads.size());
      for (std::size_t i = 0; i < fused.grads.size(); ++i) {
        double worst = 0, scale = 0;
        for (int64_t k = 0; k < fused.grads[i].numel(); ++k) {
          worst = std::max(worst, std::abs(double(fused.grads[i][k]) - separate.grads[i][k]));
          scale = std::max(scale, std::abs(double(separate.grads[i][k])));
        }
        CHECK(scale > 0);
        CHECK(worst <= 2e-5 * scale);
      }
      // Another β gives that β's value; every forward gives its own term.
      tape.clear();
      TransformLosses<float> beta4{4.f, {}};
      q->forward(tape, layer, tape.constant(x), &beta4);
      q->forward(tape, layer, tape.constant(x), &beta4);
      REQUIRE(beta4.rounding.size() == 2);
      Tape<float> other;
      const float alone4 = q->rounding_regularizer(other, 4.f).value()[0];
      CHECK(beta4.rounding[0].second.value()[0] == alone4);
      CHECK(beta4.rounding[1].second.value()[0] == alone4);
      CHECK(alone4 != separate.reg);
      // β = 0 asks for nothing; a hardened layer has nothing to regularise.
      tape.clear();
      TransformLosses<float> none{0.f, {}};
      q->forward(tape, layer, tape.constant(x), &none);
      CHECK(none.rounding.empty());
      q->harden();
      tape.clear();
      TransformLosses<float> after{5.f, {}};
      q->forward(tape, layer, tape.constant(x), &after);
      CHECK(after.rounding.empty());
      CHECK_FALSE(q->rounding_regularizer(tape, 5.f).valid());
    }
}

TEST_CASE("LayerOutputErrors: the errors from the inputs' Gram matrix equal the direct ones") {
  // 300 output rows: more than one block of the quadratic forms' products (kGramRows).
  REQUIRE(LayerOutputErrors<float>::kGramRows < 300);
  for (const int64_t rows : {int64_t{12}, int64_t{300}}) {
    const int64_t cols = 20;
    CAPTURE(rows);
    QuantLinearConfig cfg;
    cfg.weight = quant::GridSpec{3, false, quant::Granularity::per_group, 10};
    cfg.rounding = RoundingKind::full;
    cfg.lora_init.start = quant::LoraStart::adaround;
    const Tensor<float> w = cbq::testing::randn<float>(Shape{rows, cols}, 5, 0.3f);
    LinearLayer<float> layer("fc", w);
    auto q = std::make_shared<QuantLinear<float>>("fc", w, cfg);
    for (Parameter<float>* p : q->rounding_params())  // a final weight away from the start
      for (int64_t i = 0; i < p->value.numel(); ++i) p->value[i] += 2.0f * std::sin(1.0f + i);
    q->harden();
    const Tensor<float> start = q->start_weight(), final_weight = q->current_weight();
    std::vector<Tensor<float>> inputs;
    for (uint64_t seed : {6, 7, 8})
      inputs.push_back(cbq::testing::randn<float>(Shape{9, cols}, seed));
    // Σ over inputs and rows of ‖x (a − w)ᵀ‖², in double.
    auto direct = [&](const Tensor<float>& a, bool minus_w) {
      double total = 0;
      for (const Tensor<float>& x : inputs)
        for (int64_t r = 0; r < x.shape().rows(); ++r)
          for (int64_t o = 0; o < rows; ++o) {
            double y = 0;
            for (int64_t i = 0; i < cols; ++i)
              y += double(x[r * cols + i]) *
                   (double(a[o * cols + i]) - (minus_w ? double(w[o * cols + i]) : 0.0));
            total += y * y;
          }
      return total;
    };
    const double energy = direct(w, false);
    const double expected_start = direct(start, true) / energy;
    const double expected_final = direct(final_weight, true) / energy;
    REQUIRE(expected_start > 0);
    REQUIRE(std::abs(expected_final - expected_start) > 1e-3 * expected_start);

    LayerOutputErrors<float> errors({&layer}, {q});
    for (const Tensor<float>& x : inputs) errors.add(layer, x);
    errors.finish();
    CHECK(std::isfinite(q->output_error_start()));
    CHECK(q->output_error_start() == doctest::Approx(expected_start).epsilon(1e-6));
    CHECK(q->output_error() == doctest::Approx(expected_final).epsilon(1e-6));

    // The same inputs split over two chunks (the samples side by side, pass/units.hpp): the same
    // errors, the chunks' Gram matrices merged in order.
    for (const int chunks : {2, 3}) {
      CAPTURE(chunks);
      LayerOutputErrors<float> split({&layer}, {q}, chunks);
      for (size_t i = 0; i < inputs.size(); ++i)
        split.add(layer, inputs[i],
                  static_cast<int>(i * static_cast<size_t>(chunks) / inputs.size()));
      split.finish();
      CHECK(q->output_error_start() == doctest::Approx(expected_start).epsilon(1e-6));
      CHECK(q->output_error() == doctest::Approx(expected_final).epsilon(1e-6));
      CHECK_THROWS_WITH_AS(split.add(layer, inputs[0], chunks), doctest::Contains("chunk"),
                           std::exception);
    }

    // A non-finite input names the layer.
    Tensor<float> bad = inputs[0].clone();
    bad[3] = std::numeric_limits<float>::quiet_NaN();
    LayerOutputErrors<float> broken({&layer}, {q});
    CHECK_THROWS_WITH_AS(broken.add(layer, bad), doctest::Contains("fc"), std::exception);
  }
}
