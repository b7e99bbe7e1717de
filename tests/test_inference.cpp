// The tape-free evaluation (model/inference.hpp, Transformer::token_nll): the same negative
// log-likelihoods as the tape path (logits() and ops::token_nll) for LLaMA and OPT, tied and
// untied heads, grouped-query attention, float and double, fake-quantized models (RTN with
// quantized inputs), and the perplexity functions on top of it.
#include <cbq/cbq.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/model/load.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/baselines.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "doctest/doctest.h"
#include "support/fixtures.hpp"

using namespace cbq;
using cbq::testing::random_tokens;

namespace {

// The tape path's NLLs of rows first..last: logits of the whole sequence, then ops::token_nll.
template <class Model>
std::vector<double> tape_nll(Model& m, const std::vector<int32_t>& tokens, int64_t first,
                             int64_t last) {
  const auto l = m.logits(tokens);
  std::vector<int32_t> targets(tokens.begin() + first + 1, tokens.begin() + last + 2);
  return ops::token_nll(l.slice(0, first, last + 1), targets);
}

// Largest |a − b| / max(1, |b|) over the rows; NaN anywhere gives infinity.
double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(1.0, std::abs(b[i])));
  }
  return worst;
}

ModelConfig wide_llama_config(bool tied) {
  ModelConfig c = tiny_llama_config();  // 4 heads / 2 kv heads, rotate-half RoPE
  c.dim = 48;
  c.hidden_dim = 72;
  c.n_heads = 6;
  c.n_kv_heads = 2;  // groups of 3 query heads, as SmolLM2
  c.head_dim = 8;
  c.vocab_size = 301;
  c.max_seq_len = 320;  // several 64-row query tiles and two 256-key blocks
  c.tied_embeddings = tied;
  return c;
}

// OPT with 200 positions and a vocabulary of 97 (every row of a 170-token sequence scored).
ModelConfig small_opt_config() {
  ModelConfig c = tiny_opt_config();
  c.max_seq_len = 200;
  c.vocab_size = 97;
  return c;
}

// RTN weights of `bits` in groups of 16 with 8-bit per-token inputs: every transform hook acts.
PassSpec fake_quant_spec(int bits) {
  PassSpec spec;
  spec.weight.bits = bits;
  spec.weight.granularity = quant::Granularity::per_group;
  spec.weight.group_size = 16;
  spec.act_bits = 8;
  spec.act_per_token = true;
  return spec;
}

}  // namespace

// Float tolerance of the tape-free NLLs against the tape path: the blocks compute with the same
// kernels in the same order, so the hidden states agree bit for bit for one thread count, and so
// did every NLL measured here; the LM head's GEMM runs on blocks of the scored rows instead of
// all rows, where another BLAS (or OpenBLAS on another CPU) may round a logit differently.
constexpr double kFloatTolerance = 1e-5;

TEST_CASE("inference: LLaMA token NLLs equal the tape path (tied and untied heads, GQA)") {
  for (bool tied : {true, false}) {
    CAPTURE(tied);
    const ModelConfig c = wide_llama_config(tied);
    Transformer<LlamaBlock<float>> m(c, random_weights(c, tied ? 11 : 12));
    for (int64_t n : {int64_t{1} + 1, int64_t{63}, int64_t{130}, int64_t{300}}) {
      CAPTURE(n);
      const auto tokens = random_tokens(n, c.vocab_size, 100 + static_cast<uint64_t>(n));
      for (auto [first, last] : {std::pair<int64_t, int64_t>{0, n - 2}, {(n - 1) / 2, n - 2}}) {
        const auto fast = m.token_nll(tokens, first, last);
        const auto ref = tape_nll(m, tokens, first, last);
        REQUIRE(fast.size() == static_cast<std::size_t>(last - first + 1));
        CHECK(max_rel_diff(fast, ref) < kFloatTolerance);
      }
    }
  }
}

TEST_CASE("inference: the LM head in many small row blocks gives the same NLLs") {
  const ModelConfig c = wide_llama_config(false);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 15));
  const auto tokens = random_tokens(250, c.vocab_size, 16);
  const auto whole = m.token_nll(tokens, 3, 248);
  m.workspace().head_block_bytes = 16 * sizeof(float) * static_cast<std::size_t>(c.vocab_size);
  const auto blocked = m.token_nll(tokens, 3, 248);  // 16 rows a block: 16 blocks, the last short
  m.workspace().head_block_bytes = 1;                // clamped to 16 rows
  const auto tiny = m.token_nll(tokens, 3, 248);
  CHECK(max_rel_diff(blocked, whole) < kFloatTolerance);
  CHECK(max_rel_diff(tiny, blocked) == 0.0);
  CHECK(max_rel_diff(blocked, tape_nll(m, tokens, 3, 248)) < kFloatTolerance);
}

TEST_CASE("inference: the hidden states equal the tape path's bit for bit") {
  const ModelConfig c = wide_llama_config(true);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 21));
  const auto tokens = random_tokens(290, c.vocab_size, 22);
  std::vector<Tensor<float>> inputs;
  m.logits(tokens, &inputs);  // inputs.back(): the last block's output on the tape
  const Tensor<float> hidden = m.infer_hidden(m.workspace(), tokens);
  REQUIRE(hidden.shape() == inputs.back().shape());
  double worst = 0;
  for (int64_t i = 0; i < hidden.numel(); ++i)
    worst = std::max(worst, std::abs(double(hidden[i]) - double(inputs.back()[i])));
  CHECK(worst == 0.0);
}

TEST_CASE("inference: OPT (biases, LayerNorm, learned positions, ReLU) equals the tape path") {
  ModelConfig c = small_opt_config();
  for (bool tied : {true, false}) {
    CAPTURE(tied);
    c.tied_embeddings = tied;
    Transformer<OptBlock<float>> m(c, random_weights(c, tied ? 31 : 32));
    const auto tokens = random_tokens(170, c.vocab_size, 33);
    CHECK(max_rel_diff(m.token_nll(tokens, 0, 168), tape_nll(m, tokens, 0, 168)) < kFloatTolerance);
    CHECK(max_rel_diff(m.token_nll(tokens, 85, 168), tape_nll(m, tokens, 85, 168)) <
          kFloatTolerance);
  }
}

TEST_CASE("inference: double models agree with the tape path to double rounding") {
  ModelConfig c = wide_llama_config(false);
  c.n_layers = 2;
  const WeightMap w = random_weights(c, 41);
  Transformer<LlamaBlock<double>> m(c, w);
  const auto tokens = random_tokens(270, c.vocab_size, 42);
  CHECK(max_rel_diff(m.token_nll(tokens, 0, 268), tape_nll(m, tokens, 0, 268)) < 1e-12);
}

TEST_CASE("inference: fake-quantized models (RTN W4 g16 with 8-bit inputs) equal the tape path") {
  const ModelConfig c = wide_llama_config(true);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 51));
  const auto calib = random_tokens(64, c.vocab_size, 52);
  const PassSpec spec = fake_quant_spec(4);
  const auto before = m.token_nll(calib, 0, 62);
  quantize_baseline(m, Baseline::rtn, spec, {m.embed_tensor(calib)}, {}, false);
  const auto tokens = random_tokens(280, c.vocab_size, 53);
  const auto fast = m.token_nll(tokens, 0, 278);
  CHECK(max_rel_diff(fast, tape_nll(m, tokens, 0, 278)) < kFloatTolerance);
  // The transforms did act: the quantized model scores differently from the float one.
  CHECK(max_rel_diff(m.token_nll(calib, 0, 62), before) > 1e-3);
  clear_quantization(m);
  CHECK(max_rel_diff(m.token_nll(calib, 0, 62), before) == 0.0);
}

TEST_CASE("inference: perplexity through token_nll matches the logits-based computation") {
  const ModelConfig c = wide_llama_config(false);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 61));
  const auto tokens = random_tokens(3 * 128 + 17, c.vocab_size, 62);
  const auto gptq = eval::perplexity_gptq(m, tokens, 128);
  const auto cpp = eval::perplexity_llamacpp(m, tokens, 128, 1);
  // The same protocols written out with the tape path.
  double nll_gptq = 0, nll_cpp = 0;
  for (int64_t w = 0; w < 3; ++w) {
    std::vector<int32_t> window(tokens.begin() + w * 128, tokens.begin() + (w + 1) * 128);
    for (double v : tape_nll(m, window, 0, 126)) nll_gptq += v;
    window[0] = 1;
    for (double v : tape_nll(m, window, 64, 126)) nll_cpp += v;
  }
  CHECK(gptq.scored_tokens == 3 * 127);
  CHECK(cpp.scored_tokens == 3 * 63);
  CHECK(std::abs(gptq.mean_nll - nll_gptq / (3 * 127)) < 1e-6);
  CHECK(std::abs(cpp.mean_nll - nll_cpp / (3 * 63)) < 1e-6);
  // kKeepFirstToken keeps each chunk's first token (llama.cpp for add_bos_token = false).
  const auto kept = eval::perplexity_llamacpp(m, tokens, 128, eval::kKeepFirstToken);
  double nll_kept = 0;
  for (int64_t w = 0; w < 3; ++w) {
    std::vector<int32_t> window(tokens.begin() + w * 128, tokens.begin() + (w + 1) * 128);
    for (double v : tape_nll(m, window, 64, 126)) nll_kept += v;
  }
  CHECK(std::abs(kept.mean_nll - nll_kept / (3 * 63)) < 1e-6);
}

TEST_CASE("perplexity: llama.cpp's chunk start follows the tokenizer's add_bos") {
  // tok512 (llama2.c) adds BOS: chunks start with it, as llama-perplexity sets them.
  const Llama2cTokenizer llama2c(std::string(CBQ_DATA_DIR) + "/models/tok512.bin");
  REQUIRE(llama2c.add_bos());
  CHECK(eval::llamacpp_chunk_bos(llama2c) == 1);
  CHECK(llama2c.encode("Once upon a time").front() == 1);
  // A byte-level BPE with a BOS token it does not add (SmolLM2's GGUF: bos 1, add_bos false):
  // the chunks keep their first token and the text gets no BOS.
  HfTokenizerOptions options;
  options.bos_id = 0;
  const HfTokenizer smol = HfTokenizer::load(
      std::string(CBQ_SOURCE_DIR) + "/tests/fixtures/tokenizers/hf/smollm_digits_bytelevel.json",
      options);
  REQUIRE(smol.bos_id() == 0);
  CHECK_FALSE(smol.add_bos());
  CHECK(eval::llamacpp_chunk_bos(smol) == eval::kKeepFirstToken);
  CHECK(smol.encode("Once upon a time") == smol.encode("Once upon a time", false, false));
}

TEST_CASE("inference: buffers are reused, results do not depend on earlier calls") {
  const ModelConfig c = wide_llama_config(true);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 71));
  const auto a = random_tokens(300, c.vocab_size, 72);
  const auto b = random_tokens(40, c.vocab_size, 73);
  const auto first = m.token_nll(a, 0, 298);
  const std::size_t bytes = m.workspace().bytes();
  const auto small = m.token_nll(b, 0, 38);
  const auto again = m.token_nll(a, 0, 298);
  CHECK(m.workspace().bytes() == bytes);  // nothing grew for a repeat or a shorter window
  CHECK(max_rel_diff(again, first) == 0.0);
  CHECK(max_rel_diff(small, tape_nll(m, b, 0, 38)) < kFloatTolerance);
}

TEST_CASE("inference: thread counts give the same NLLs within float rounding") {
  const ModelConfig c = wide_llama_config(true);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 81));
  const auto tokens = random_tokens(310, c.vocab_size, 82);
  const int before = num_threads();
  set_num_threads(1);
  const auto one = m.token_nll(tokens, 0, 308);
  set_num_threads(3);
  const auto three = m.token_nll(tokens, 0, 308);
  set_num_threads(before);
  CHECK(max_rel_diff(one, three) < kFloatTolerance);
}

TEST_CASE("inference: bad rows and tokens name the problem") {
  const ModelConfig c = wide_llama_config(true);
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 91));
  const auto tokens = random_tokens(20, c.vocab_size, 92);
  CHECK_THROWS_WITH_AS(m.token_nll(tokens, 5, 19),
                       doctest::Contains("token_nll: scored rows 5..19"), cbq::Error);
  CHECK_THROWS_WITH_AS(m.token_nll(tokens, 6, 5), doctest::Contains("token_nll"), cbq::Error);
  auto bad = tokens;
  bad[3] = static_cast<int32_t>(c.vocab_size);
  CHECK_THROWS_WITH_AS(m.token_nll(bad, 0, 18), doctest::Contains("id 301 at position 3"),
                       cbq::Error);
  const auto longer = random_tokens(c.max_seq_len + 1, c.vocab_size, 93);
  CHECK_THROWS_WITH_AS(m.token_nll(longer, 0, 10), doctest::Contains("exceed the context length"),
                       cbq::Error);
}

namespace {
template <class Model>
void check_scored_logits(Model& m, const std::vector<int32_t>& tokens, int64_t first,
                         int64_t last) {
  CAPTURE(first);
  CAPTURE(last);
  const Tensor<float> fast = m.scored_logits(tokens, first, last);
  REQUIRE(fast.shape() == Shape{last - first + 1, m.config.vocab_size});
  const Tensor<float> ref = m.logits(tokens).slice(0, first, last + 1).contiguous().clone();
  // Relative to the largest logit; a NaN on either side makes max_abs_diff NaN and fails.
  CHECK(cbq::testing::max_abs_diff(fast, ref) <
        kFloatTolerance * std::max(1.0, cbq::testing::max_abs(ref)));
}
}  // namespace

TEST_CASE(
    "inference: scored_logits equals rows of the tape path's logits (LLaMA, OPT, quantized)") {
  for (bool tied : {true, false}) {
    CAPTURE(tied);
    const ModelConfig c = wide_llama_config(tied);
    Transformer<LlamaBlock<float>> m(c, random_weights(c, tied ? 61 : 62));
    const auto tokens = random_tokens(260, c.vocab_size, 63);
    check_scored_logits(m, tokens, 0, 259);
    check_scored_logits(m, tokens, 130, 258);
    check_scored_logits(m, tokens, 7, 7);
  }
  const ModelConfig oc = small_opt_config();
  Transformer<OptBlock<float>> opt(oc, random_weights(oc, 64));
  check_scored_logits(opt, random_tokens(170, oc.vocab_size, 65), 85, 168);

  const ModelConfig c = wide_llama_config(true);
  Transformer<LlamaBlock<float>> q(c, random_weights(c, 66));
  const PassSpec spec = fake_quant_spec(3);
  quantize_baseline(q, Baseline::rtn, spec, {q.embed_tensor(random_tokens(64, c.vocab_size, 67))},
                    {}, false);
  check_scored_logits(q, random_tokens(200, c.vocab_size, 68), 100, 198);
  CHECK_THROWS_WITH_AS(q.scored_logits(random_tokens(10, c.vocab_size, 69), 5, 10),
                       doctest::Contains("rows 5..10 must lie in 0..9"), Error);
}
