#include <cbq/eval/perplexity.hpp>
#include <cbq/model/llama_block.hpp>
#include <cbq/model/opt_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/model/transformer.hpp>

#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;
using cbq::testing::random_tokens;

namespace {

template <class Block>
void check_block_gradient(const ModelConfig& cfg) {
  WeightMap w = random_weights(cfg, 11);
  Block block(cfg, 1, w);
  auto r = gradcheck(
      [&](Tape<double>& tape, std::vector<Var<double>>& v) {
        return block.forward(tape, v[0], BlockContext<double>{});
      },
      {randn<double>(Shape{7, cfg.dim}, 5)});
  CHECK(r.max_rel_error < 1e-6);
}

template <class Block>
void check_channel_scaling_is_exact(const ModelConfig& cfg) {
  WeightMap w = random_weights(cfg, 21);
  Block block(cfg, 0, w);
  auto x = randn<double>(Shape{6, cfg.dim}, 3);
  Tape<double> tape;
  Tensor<double> before = block.forward(tape, tape.constant(x), {}).value().clone();
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<double> u(0.25, 4.0);
  for (auto& site : block.activation_sites()) {
    std::vector<double> s(static_cast<size_t>(site.producer_channels));
    for (auto& v : s) v = u(rng);
    apply_channel_scale(site, s);
  }
  tape.clear();
  Tensor<double> after = block.forward(tape, tape.constant(x), {}).value().clone();
  CHECK(max_abs_diff(before, after) < 1e-10);
}
}  // namespace

TEST_CASE("llama block: gradient check of the whole block in double (GQA, rotate-half RoPE)") {
  check_block_gradient<LlamaBlock<double>>(tiny_llama_config());
  ModelConfig c = tiny_llama_config();
  c.rope_layout = RopeLayout::interleaved;
  c.attention_bias = true;  // Qwen2-style q/k/v biases
  check_block_gradient<LlamaBlock<double>>(c);
}

TEST_CASE("opt block: gradient check of the whole block in double") {
  check_block_gradient<OptBlock<double>>(tiny_opt_config());
}

TEST_CASE("llama block: every linear layer is reachable by name") {
  ModelConfig c = tiny_llama_config();
  LlamaBlock<float> b(c, 0, random_weights(c, 1));
  std::vector<std::string> names;
  for (auto* l : b.linears()) names.push_back(l->name);
  CHECK(names == std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"});
  OptBlock<float> o(tiny_opt_config(), 0, random_weights(tiny_opt_config(), 1));
  names.clear();
  for (auto* l : o.linears()) names.push_back(l->name);
  CHECK(names == std::vector<std::string>{"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"});
}

TEST_CASE("activation sites: folding channel scales keeps the block's function (LLaMA GQA, OPT)") {
  check_channel_scaling_is_exact<LlamaBlock<double>>(tiny_llama_config());
  check_channel_scaling_is_exact<OptBlock<double>>(tiny_opt_config());
}

TEST_CASE("transformer: logits equal embed, blocks and head run one by one") {
  for (ModelConfig cfg : {tiny_llama_config(), tiny_opt_config()}) {
    auto run = [&](auto& model) {
      auto tokens = random_tokens(9, cfg.vocab_size, 4);
      std::vector<Tensor<float>> hidden;
      Tensor<float> logits = model.logits(tokens, &hidden).clone();
      REQUIRE(hidden.size() == static_cast<size_t>(cfg.n_layers + 1));
      Tensor<float> x = model.embed_tensor(tokens);
      CHECK(max_abs_diff(x, hidden[0]) == 0.0);
      for (int64_t i = 0; i < model.num_blocks(); ++i) {
        x = model.run_block(i, x);
        CHECK(max_abs_diff(x, hidden[static_cast<size_t>(i + 1)]) == 0.0);
      }
      CHECK(max_abs_diff(model.head_logits(x), logits) == 0.0);
      CHECK(logits.shape() == Shape{9, cfg.vocab_size});
    };
    if (cfg.family == Family::llama) {
      Transformer<LlamaBlock<float>> m(cfg, random_weights(cfg, 2));
      run(m);
    } else {
      Transformer<OptBlock<float>> m(cfg, random_weights(cfg, 2));
      run(m);
    }
  }
}

TEST_CASE("transformer: a missing or misshapen tensor names the tensor and the shapes") {
  ModelConfig c = tiny_llama_config();
  WeightMap w = random_weights(c, 3);
  w.erase("model.layers.1.mlp.up_proj.weight");
  CHECK_THROWS_WITH_AS(Transformer<LlamaBlock<float>>(c, w),
                       doctest::Contains("'model.layers.1.mlp.up_proj.weight' is missing"),
                       cbq::Error);
  w = random_weights(c, 3);
  w["model.norm.weight"] = Tensor<float>(Shape{c.dim + 1});
  CHECK_THROWS_WITH_AS(Transformer<LlamaBlock<float>>(c, w),
                       doctest::Contains("'model.norm.weight' has shape (17,), expected (16,)"),
                       cbq::Error);
}

TEST_CASE("perplexity: both protocols score the documented positions") {
  // A model whose logits are all equal predicts uniformly: perplexity = vocab size exactly,
  // whatever tokens are scored, so the count of scored tokens is what this test checks.
  ModelConfig c = tiny_llama_config();
  WeightMap w = random_weights(c, 4);
  for (auto& [name, t] : w)
    if (name == "model.norm.weight") t.fill(0.f);
  Transformer<LlamaBlock<float>> m(c, w);
  auto tokens = random_tokens(70, c.vocab_size, 8);
  auto g = eval::perplexity_gptq(m, tokens, 16);
  CHECK(g.windows == 4);
  CHECK(g.scored_tokens == 4 * 15);
  CHECK(g.perplexity == doctest::Approx(double(c.vocab_size)).epsilon(1e-5));
  auto l = eval::perplexity_llamacpp(m, tokens, 16, c.bos_id);
  CHECK(l.windows == 4);
  CHECK(l.scored_tokens == 4 * 7);  // positions 8..14
  CHECK(l.perplexity == doctest::Approx(double(c.vocab_size)).epsilon(1e-5));
  CHECK_THROWS_WITH_AS(eval::perplexity_gptq(m, random_tokens(10, c.vocab_size, 1), 16),
                       doctest::Contains("fewer than one window"), cbq::Error);
}
