// Options of the CBQ pass beyond the paper (docs/PASS.md, "Beyond the paper"): the GPTQ start,
// learned norm parameters and the output-distribution loss.
#include <cbq/model/llama_block.hpp>
#include <cbq/model/opt_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/pass.hpp>
#include <cbq/quant/gptq.hpp>
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

}  // namespace

TEST_CASE("gptq start: an untrained QuantLinear started from GPTQ hardens to GPTQ's codes") {
  const int64_t rows = 16, cols = 32;
  Tensor<float> x = cbq::testing::randn<float>(Shape{200, cols}, 5);
  for (int64_t r = 0; r < 200; ++r)  // correlated columns, so GPTQ's feedback matters
    for (int64_t c = 1; c < cols; ++c) x(r, c) += 0.7f * x(r, c - 1);
  quant::HessianAccumulator acc(cols, "fc");
  acc.add_batch(x);
  Tensor<float> w = cbq::testing::randn<float>(Shape{rows, cols}, 6, 0.2f);
  for (RoundingKind rounding : {RoundingKind::lora, RoundingKind::full, RoundingKind::nearest}) {
    QuantLinearConfig cfg;
    cfg.weight = quant::GridSpec{3, false, quant::Granularity::per_group, 8};
    cfg.rounding = rounding;
    cfg.rank = 2;
    cfg.rounding_mode = quant::RoundingMode::hard_ste;
    cfg.lora_init.start = quant::LoraStart::adaround;  // h(V0) = the fractional part
    const quant::GptqResult g = quant::gptq_quantize(w, acc, cfg.weight);
    QuantLinear<float> q("fc", g.updated, cfg, &g.weight, true);
    CAPTURE(static_cast<int>(rounding));
    // The hard forward before any training is GPTQ's dequantized weight...
    const Tensor<float> start = q.current_weight();
    double worst = 0;
    for (int64_t i = 0; i < start.numel(); ++i)
      worst = std::max(worst, std::abs(static_cast<double>(start[i] - g.dequantized[i])));
    CHECK(worst <= 1e-6);
    // ...and hardening gives its codes, steps and zero-points.
    const quant::QuantizedWeight& qw = q.harden();
    CHECK(std::memcmp(qw.codes.data(), g.weight.codes.data(),
                      static_cast<size_t>(qw.codes.numel())) == 0);
    CHECK(same_bits(qw.scale, g.weight.scale));
    CHECK(same_bits(qw.zero, g.weight.zero));
  }
  // A starting grid of the wrong shape is refused with the layer's name.
  QuantLinearConfig cfg;
  cfg.weight = quant::GridSpec{3, false, quant::Granularity::per_group, 16};
  const quant::GptqResult g8 =
      quant::gptq_quantize(w, acc, quant::GridSpec{3, false, quant::Granularity::per_group, 8});
  CHECK_THROWS_WITH_AS(QuantLinear<float>("layers.0.fc", g8.updated, cfg, &g8.weight, true),
                       doctest::Contains("layers.0.fc: starting steps"), Error);
}

TEST_CASE("gptq start: the pass starts at GPTQ's solution and its windows improve on it") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 21));
  PassOptions o = quiet_options();
  o.weight_init = WeightInit::gptq;
  o.balance_all_samples = true;  // "improve": on the samples it trains on too (3 of 6 held out)
  TinyPass pass(o);
  auto result = pass.run_from_hidden(model, random_hidden(6, 12, c.dim, 3));
  CHECK(result.config == pass.describe() + " + GPTQ start");  // labels say how it was made
  REQUIRE(result.windows.size() == 2);
  for (const auto& w : result.windows) {
    CAPTURE(w.first_block);
    CHECK(w.loss_after.reconstruction() < w.loss_before.reconstruction());
  }
  // Without training (lr 0 everywhere) the first window's blocks keep GPTQ's start exactly:
  // compare with GPTQ on the same Hessians (block 0's input is the calibration input).
  Transformer<LlamaBlock<float>> fresh(c, random_weights(c, 21));
  PassOptions frozen = o;
  frozen.lr_weight_step = frozen.lr_act_step = frozen.lr_rounding = 0;
  frozen.gamma_round = 0;
  TinyPass still(frozen);
  const auto x = random_hidden(6, 12, c.dim, 3);
  auto kept = still.run_from_hidden(fresh, x);
  Transformer<LlamaBlock<float>> reference(c, random_weights(c, 21));
  auto linears = reference.blocks[0].linears();
  std::vector<quant::HessianAccumulator> acc;
  for (auto* l : linears) acc.emplace_back(l->in_features(), l->name);
  BlockContext<float> ctx;
  ctx.full_precision = true;
  ctx.on_linear_input = [&](const LinearLayer<float>& layer, const Tensor<float>& in) {
    for (size_t j = 0; j < linears.size(); ++j)
      if (linears[j] == &layer) acc[j].add_batch(in);
  };
  for (const auto& xi : x) reference.run_block(0, xi, ctx);
  for (size_t j = 0; j < linears.size(); ++j) {
    const quant::QuantizedWeight expected =
        quant::gptq_quantize(linears[j]->weight.value, acc[j], W3::spec()).weight;
    const LayerResult* got = kept.find("layers.0." + linears[j]->name);
    REQUIRE(got);
    CAPTURE(got->name);
    CHECK(std::memcmp(got->weight.codes.data(), expected.codes.data(),
                      static_cast<size_t>(expected.codes.numel())) == 0);
    CHECK(same_bits(got->weight.scale, expected.scale));
  }
}

TEST_CASE("learned norms: the full-precision path keeps the original values") {
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(5, 10, c.dim, 8);
  // With a zero norm learning rate the run is bit-identical to one without learned norms:
  // the swaps around every full-precision computation change nothing.
  Transformer<LlamaBlock<float>> plain(c, random_weights(c, 4)), swapped(c, random_weights(c, 4));
  PassOptions o = quiet_options(2);
  TinyPass(o).run_from_hidden(plain, x);
  o.learn_norms = true;
  o.lr_norm = 0;
  TinyPass(o).run_from_hidden(swapped, x);
  const std::vector<int32_t> tokens{1, 4, 2, 8, 5};
  CHECK(same_bits(plain.logits(tokens), swapped.logits(tokens)));
  // Learning them moves them, lowers every window's loss, and leaves them frozen afterwards.
  Transformer<LlamaBlock<float>> learned(c, random_weights(c, 4));
  Transformer<LlamaBlock<float>> original(c, random_weights(c, 4));
  o.lr_norm = 1e-2;
  auto result = TinyPass(o).run_from_hidden(learned, x);
  for (const auto& w : result.windows) CHECK(w.loss_after.total < w.loss_before.total);
  for (int64_t b = 0; b < learned.num_blocks(); ++b) {
    auto now = learned.blocks[b].other_parameters();
    auto was = original.blocks[b].other_parameters();
    for (size_t i = 0; i < now.size(); ++i) {
      CAPTURE(now[i]->name);
      CHECK_FALSE(same_bits(now[i]->value, was[i]->value));
      CHECK_FALSE(now[i]->trainable);
    }
  }
}

TEST_CASE("learned norms: the full-precision path after learning equals the untouched model's") {
  // The last checkpoint holds X_fp advanced through every block in full precision, block 1 after
  // window 1 learned its norms: with the originals swapped in it equals a run without learning.
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(4, 10, c.dim, 17);
  auto final_fp_path = [&](bool learn, const std::string& tag) {
    cbq::testing::TempDir dir(tag);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 5));
    PassOptions o = quiet_options(2);
    o.weight_init = WeightInit::rtn;  // from GPTQ's start the toy windows keep the start
    o.learn_norms = learn;
    o.lr_norm = 3e-2;
    o.checkpoint_dir = dir.path.string();
    TinyPass(o).run_from_hidden(model, x);
    io::SafetensorsFile f(checkpoint_path(o.checkpoint_dir));
    std::vector<Tensor<float>> out;
    for (size_t n = 0; n < x.size(); ++n) out.push_back(f.to_float(fmt::format("x_fp.{}", n)));
    // The learned values are in the checkpoint too, different from the originals.
    if (learn) {
      const Tensor<float> learned =
          f.to_float("norm." + model.blocks[1].other_parameters()[0]->name);
      Transformer<LlamaBlock<float>> original(c, random_weights(c, 5));
      CHECK_FALSE(same_bits(learned, original.blocks[1].other_parameters()[0]->value));
    }
    return out;
  };
  const auto plain = final_fp_path(false, "norms-plain");
  const auto learned = final_fp_path(true, "norms-learned");
  REQUIRE(plain.size() == learned.size());
  for (size_t n = 0; n < plain.size(); ++n) CHECK(same_bits(plain[n], learned[n]));
}

TEST_CASE("output loss: the model's output KL is reported, weighted and reduced by training") {
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(5, 10, c.dim, 12);
  for (bool all : {false, true}) {
    CAPTURE(all);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 9));
    PassOptions o = quiet_options(3);
    o.output_kld = 10;
    o.output_kld_all = all;
    o.balance_all_samples = true;  // training lowers it on the samples it trains on
    auto result = TinyPass(o).run_from_hidden(model, x);
    REQUIRE(result.windows.size() == 2);
    // Window 1 ends at block 1 of 3: it has the term only when every window does.
    CHECK((result.windows[0].loss_before.output_kld > 0) == all);
    const WindowStats& last = result.windows[1];
    CHECK(last.loss_before.output_kld > 0);
    CHECK(last.loss_after.output_kld < last.loss_before.output_kld);
    CHECK(last.loss_after.reconstruction() < last.loss_before.reconstruction());
  }
  // The term is weight × KL: doubling the weight doubles the reported value before training.
  Transformer<LlamaBlock<float>> a(c, random_weights(c, 9)), b(c, random_weights(c, 9));
  PassOptions o = quiet_options(1);
  o.max_steps = 1;
  o.output_kld = 1;
  auto ra = TinyPass(o).run_from_hidden(a, x);
  o.output_kld = 2;
  auto rb = TinyPass(o).run_from_hidden(b, x);
  CHECK(rb.windows[1].loss_before.output_kld ==
        doctest::Approx(2 * ra.windows[1].loss_before.output_kld).epsilon(1e-5));
}

TEST_CASE("output loss and learned norms run on OPT blocks (LayerNorm weights and biases)") {
  ModelConfig c = tiny_opt_config();
  const auto x = random_hidden(4, 10, c.dim, 30);
  Transformer<OptBlock<float>> model(c, random_weights(c, 13));
  PassOptions o = quiet_options(2);
  o.learn_norms = true;
  o.output_kld = 5;
  o.output_kld_all = true;
  o.keep_better = false;  // all 4 samples train (2 would be held out)
  auto result = TinyPass(o).run_from_hidden(model, x);
  CHECK(result.config.find("+ learned norms (lr 0.001) + output KL x5 (every window)") !=
        std::string::npos);
  for (const auto& w : result.windows) {
    CHECK(w.loss_after.total < w.loss_before.total);
    CHECK(w.loss_after.output_kld > 0);
  }
  CHECK(result.layers.size() == static_cast<size_t>(c.n_layers) * 6);
  // The GPTQ start on OPT (biases, LayerNorm): a finite result for every layer. (Training from
  // it need not lower the loss on this 4-sample toy: docs/PASS.md, "GPTQ start".)
  Transformer<OptBlock<float>> gptq_model(c, random_weights(c, 13));
  o.weight_init = WeightInit::gptq;
  auto g = TinyPass(o).run_from_hidden(gptq_model, x);
  CHECK(g.layers.size() == static_cast<size_t>(c.n_layers) * 6);
  for (const auto& w : g.windows) CHECK(std::isfinite(w.loss_after.total));
}

TEST_CASE(
    "boundary loss: the frozen units' output is scored, weighted, in every window but the last") {
  ModelConfig c = tiny_llama_config();
  const auto x = random_hidden(6, 10, c.dim, 31);
  auto run = [&](double weight, int64_t epochs) {
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 17));
    PassOptions o = quiet_options(epochs);
    o.boundary_loss = weight;
    o.balance_all_samples = true;
    return TinyPass(o).run_from_hidden(model, x);
  };
  const QuantizationResult off = run(0, 2), one = run(1, 2), two = run(2, 2);
  REQUIRE(one.windows.size() == 2);  // 3 blocks, windows [0, 1] and [1, 2]
  CHECK(one.config.find("+ boundary loss x1") != std::string::npos);
  CHECK(off.config.find("boundary") == std::string::npos);
  for (const auto& w : off.windows) CHECK(w.loss_before.boundary == 0);
  // Window 1 freezes block 0 and trains block 1 too: its start is scored at block 0's output.
  const WindowStats& first = one.windows[0];
  CHECK(first.loss_before.boundary > 0);
  CHECK(std::isfinite(first.loss_after.boundary));
  CHECK(first.loss_after.reconstruction() < first.loss_before.reconstruction());
  // The weight multiplies the term (same start: nothing has trained before window 1).
  CHECK(two.windows[0].loss_before.boundary ==
        doctest::Approx(2 * first.loss_before.boundary).epsilon(1e-5));
  // The other terms of that start do not depend on it.
  CHECK(one.windows[0].loss_before.l2_fp == off.windows[0].loss_before.l2_fp);
  // The last window freezes everything it trains: no boundary.
  CHECK(one.windows[1].loss_before.boundary == 0);
  CHECK(one.windows[1].loss_after.boundary == 0);
  // A weight that cannot work is a clear error.
  PassOptions bad = quiet_options(1);
  bad.boundary_loss = -1;
  CHECK_THROWS_WITH_AS(TinyPass{bad}, doctest::Contains("boundary-loss weight -1"), Error);
  bad.boundary_loss = NAN;
  CHECK_THROWS_WITH_AS(TinyPass{bad}, doctest::Contains("boundary-loss weight nan"), Error);
}
