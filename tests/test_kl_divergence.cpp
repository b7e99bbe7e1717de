// KL divergence and the llama-perplexity --kl-divergence statistics (eval/kl_divergence.hpp)
// against a naive computation on tiny models, the identical-model case and the error paths.
#include <algorithm>
#include <cbq/eval/kl_divergence.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/model/llama_block.hpp>
#include <cbq/model/opt_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/model/transformer.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "doctest/doctest.h"

using namespace cbq;

namespace {

using Llama = Transformer<LlamaBlock<float>>;

std::vector<int32_t> random_text(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  t[0] = 1;
  return t;
}

// Perturbs every linear weight by relative noise of size `eps` (a stand-in for quantization).
template <class Model>
void perturb(Model& m, double eps, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  for (auto& b : m.blocks)
    for (auto* l : b.linears()) {
      auto& w = l->weight.value;
      for (int64_t i = 0; i < w.numel(); ++i)
        w[i] = static_cast<float>(w[i] * (1 + eps * n01(rng)));
    }
}

struct NaiveKl {
  std::vector<double> kl, dp;
  double same = 0, nll = 0, nll_base = 0;
};

// Straight from the definitions, in long double, one position at a time.
template <class Model>
NaiveKl naive_kl(Model& base, Model& model, const std::vector<int32_t>& tokens, int64_t ctx,
                 bool llamacpp) {
  NaiveKl out;
  const int64_t windows = static_cast<int64_t>(tokens.size()) / ctx;
  const int64_t first = llamacpp ? ctx / 2 : 0;
  for (int64_t w = 0; w < windows; ++w) {
    std::vector<int32_t> win(tokens.begin() + w * ctx, tokens.begin() + (w + 1) * ctx);
    if (llamacpp) win[0] = 1;
    const Tensor<float> lb = base.logits(win).clone();
    const Tensor<float> lq = model.logits(win).clone();
    const int64_t V = lb.size(1);
    for (int64_t t = first; t <= ctx - 2; ++t) {
      std::vector<long double> p(static_cast<size_t>(V)), q(static_cast<size_t>(V));
      long double zp = 0, zq = 0;
      for (int64_t i = 0; i < V; ++i) {
        zp += std::exp(static_cast<long double>(lb(t, i)));
        zq += std::exp(static_cast<long double>(lq(t, i)));
      }
      for (int64_t i = 0; i < V; ++i) {
        p[static_cast<size_t>(i)] = std::exp(static_cast<long double>(lb(t, i))) / zp;
        q[static_cast<size_t>(i)] = std::exp(static_cast<long double>(lq(t, i))) / zq;
      }
      long double kl = 0;
      for (int64_t i = 0; i < V; ++i)
        kl += p[static_cast<size_t>(i)] *
              std::log(p[static_cast<size_t>(i)] / q[static_cast<size_t>(i)]);
      const auto pmax = std::max_element(p.begin(), p.end()) - p.begin();
      const auto qmax = std::max_element(q.begin(), q.end()) - q.begin();
      const auto y = static_cast<size_t>(win[static_cast<size_t>(t + 1)]);
      out.kl.push_back(static_cast<double>(kl));
      out.dp.push_back(static_cast<double>(q[y] - p[y]));
      out.same += pmax == qmax;
      out.nll -= static_cast<double>(std::log(q[y]));
      out.nll_base -= static_cast<double>(std::log(p[y]));
    }
  }
  return out;
}

double sorted_at(std::vector<double> v, double fraction) {  // the definition, by hand
  std::sort(v.begin(), v.end());
  const double pos = fraction * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const auto hi = static_cast<size_t>(std::ceil(pos));
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

}  // namespace

TEST_CASE("kl_divergence: equals a naive computation on a tiny model, both protocols") {
  const ModelConfig c = tiny_llama_config();
  Llama base(c, random_weights(c, 3));
  Llama model(c, random_weights(c, 3));
  perturb(model, 0.05, 9);
  const auto tokens = random_text(4 * c.max_seq_len + 5, c.vocab_size, 17);
  for (bool llamacpp : {true, false}) {
    CAPTURE(llamacpp);
    eval::KlOptions opt;
    opt.ctx = c.max_seq_len;
    opt.protocol = llamacpp ? eval::KlProtocol::kLlamaCpp : eval::KlProtocol::kGptq;
    const eval::KlDivergenceResult r = eval::kl_divergence(base, model, tokens, opt);
    const NaiveKl nv = naive_kl(base, model, tokens, c.max_seq_len, llamacpp);
    const auto n = static_cast<double>(nv.kl.size());
    REQUIRE(r.positions == static_cast<int64_t>(nv.kl.size()));
    CHECK(r.windows == 4);
    CHECK(r.positions == 4 * (llamacpp ? c.max_seq_len / 2 - 1 : c.max_seq_len - 1));
    double mean = 0, dp2 = 0, dp = 0;
    for (size_t k = 0; k < nv.kl.size(); ++k) {
      mean += nv.kl[k] / n;
      dp2 += nv.dp[k] * nv.dp[k] / n;
      dp += nv.dp[k] / n;
    }
    CHECK(mean > 1e-4);  // the perturbation is visible
    // The evaluation's LM head runs on the scored rows only, a GEMM of another shape than the
    // naive full forward; some OpenBLAS kernels (the generic Prescott ones) and builds (-O1 under
    // ASan) then sum in another order, so float logits agree to rounding, and the statistics to
    // 1e-6 (doctest's Approx: about 1e-6 absolute at these sizes), not bit for bit.
    CHECK(r.mean == doctest::Approx(mean).epsilon(1e-6));
    CHECK(r.median == doctest::Approx(sorted_at(nv.kl, 0.5)).epsilon(1e-6));
    CHECK(r.p90 == doctest::Approx(sorted_at(nv.kl, 0.9)).epsilon(1e-6));
    CHECK(r.p95 == doctest::Approx(sorted_at(nv.kl, 0.95)).epsilon(1e-6));
    CHECK(r.p99 == doctest::Approx(sorted_at(nv.kl, 0.99)).epsilon(1e-6));
    CHECK(r.p999 == doctest::Approx(sorted_at(nv.kl, 0.999)).epsilon(1e-6));
    CHECK(r.max == doctest::Approx(*std::max_element(nv.kl.begin(), nv.kl.end())).epsilon(1e-6));
    CHECK(r.min == doctest::Approx(*std::min_element(nv.kl.begin(), nv.kl.end())).epsilon(1e-6));
    CHECK(r.rms_dp == doctest::Approx(std::sqrt(dp2)).epsilon(1e-6));
    CHECK(r.mean_dp == doctest::Approx(dp).epsilon(1e-6));
    CHECK(r.same_top == doctest::Approx(nv.same / n).epsilon(1e-12));
    CHECK(r.same_top < 1.0);
    CHECK(r.ppl == doctest::Approx(std::exp(nv.nll / n)).epsilon(1e-6));
    CHECK(r.ppl_base == doctest::Approx(std::exp(nv.nll_base / n)).epsilon(1e-6));
    // The perplexities are those of the perplexity protocols over the same positions.
    const double ppl = llamacpp
                           ? eval::perplexity_llamacpp(model, tokens, c.max_seq_len, 1).perplexity
                           : eval::perplexity_gptq(model, tokens, c.max_seq_len).perplexity;
    CHECK(r.ppl == doctest::Approx(ppl).epsilon(1e-9));
    CHECK(std::isfinite(r.mean_error));
    CHECK(r.mean_error > 0);
  }
}

TEST_CASE("kl_divergence: identical models give 0 KL, 100 % top-1 and no probability change") {
  const ModelConfig c = tiny_llama_config();
  Llama a(c, random_weights(c, 5));
  Llama b(c, random_weights(c, 5));
  const auto tokens = random_text(3 * c.max_seq_len, c.vocab_size, 2);
  eval::KlOptions opt;
  opt.ctx = c.max_seq_len;
  for (Llama* other : {&a, &b}) {  // the same object twice, and an equal copy
    const auto r = eval::kl_divergence(a, *other, tokens, opt);
    CHECK(r.positions == 3 * (c.max_seq_len / 2 - 1));
    CHECK(std::abs(r.mean) < 1e-12);
    CHECK(std::abs(r.max) < 1e-12);
    CHECK(std::abs(r.min) < 1e-12);
    CHECK(r.same_top == 1.0);
    CHECK(r.rms_dp == 0.0);
    CHECK(r.ppl == r.ppl_base);
    CHECK(std::isfinite(r.ppl));
  }
}

TEST_CASE("kl_divergence: works across model families with one vocabulary (OPT base)") {
  ModelConfig c = tiny_opt_config();
  Transformer<OptBlock<float>> base(c, random_weights(c, 4));
  Transformer<OptBlock<float>> model(c, random_weights(c, 4));
  perturb(model, 0.1, 3);
  const auto tokens = random_text(2 * c.max_seq_len, c.vocab_size, 8);
  eval::KlOptions opt;
  opt.ctx = 16;
  opt.bos = c.bos_id;
  const auto r = eval::kl_divergence(base, model, tokens, opt);
  CHECK(r.windows == 4);
  CHECK(r.mean > 0);
  CHECK(r.p99 >= r.median);
  CHECK(r.max >= r.p999);
}

TEST_CASE("kl_divergence: a NaN in the model, a short text and a vocabulary mismatch fail") {
  const ModelConfig c = tiny_llama_config();
  Llama base(c, random_weights(c, 5));
  Llama model(c, random_weights(c, 5));
  const auto tokens = random_text(2 * c.max_seq_len, c.vocab_size, 2);
  eval::KlOptions opt;
  opt.ctx = c.max_seq_len;
  model.final_norm_weight.value[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(eval::kl_divergence(base, model, tokens, opt),
                       doctest::Contains("quantized model's logit"), Error);
  CHECK_THROWS_WITH_AS(eval::kl_divergence(model, base, tokens, opt),
                       doctest::Contains("base model's logit"), Error);
  CHECK_THROWS_WITH_AS(
      eval::kl_divergence(base, base, std::vector<int32_t>(c.max_seq_len - 1, 1), opt),
      doctest::Contains("fewer than one window"), Error);
  ModelConfig c2 = c;
  c2.vocab_size = c.vocab_size + 3;
  Llama wide(c2, random_weights(c2, 5));
  CHECK_THROWS_WITH_AS(eval::kl_divergence(base, wide, tokens, opt),
                       doctest::Contains("vocabulary"), Error);
  opt.ctx = 3;
  CHECK_THROWS_AS(eval::kl_divergence(base, base, tokens, opt), Error);
}
