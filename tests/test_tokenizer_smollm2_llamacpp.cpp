// SmolLM2-135M-Instruct end to end against llama.cpp on the same GGUF, from committed fixtures
// (tests/fixtures/smollm2/llamacpp.json, made by tests/reference/make_smollm2_llamacpp_fixtures.sh
// with llama-simple and llama-perplexity, on the GGUF and on an F32 copy of it): greedy
// continuations of three prompts, and the llama.cpp-protocol perplexity of wikitext2_test.txt at
// context 2048 over the first chunks.
// Skipped with a message when the model file (scripts/fetch-models.sh) is absent.
//
// Cost (no KV cache in generate_greedy): CBQ_SMOLLM2_GREEDY_TOKENS tokens per prompt (default
// 12, at most the fixture's 64) and CBQ_SMOLLM2_PPL_CHUNKS chunks of 2048 tokens (default 1).
#include <doctest/doctest.h>

#include <algorithm>
#include <cbq/eval/perplexity.hpp>
#include <cbq/model/load.hpp>
#include <cbq/tokenizer/byte_level_bpe.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "support/files.hpp"
#include "support/smollm2.hpp"

namespace fs = std::filesystem;
using namespace cbq;
using nlohmann::json;

using cbq::testing::smollm2_gguf;

namespace {

const json& smollm2_reference() {
  static const json j = json::parse(cbq::testing::read_all(
      (fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "smollm2" / "llamacpp.json").string()));
  return j;
}

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  return std::clamp(v ? std::atoi(v) : fallback, lo, hi);
}

AnyModel& smollm2(const std::string& path) {
  static std::optional<AnyModel> model;
  if (!model) model.emplace(load_model(path));
  return *model;
}

}  // namespace

namespace {

// The text cbq generates after `prompt` greedily (n tokens, or fewer at an end-of-generation
// token), and how it compares with llama-simple's output for the same prompt.
struct Greedy {
  std::string text;
  bool stopped;
};
Greedy generate(AnyModel& m, const std::string& prompt, int n) {
  const auto* tok = dynamic_cast<const ByteLevelBpeTokenizer*>(m.tokenizer().get());
  REQUIRE(tok != nullptr);
  const std::vector<int32_t> ids = tok->encode(prompt);  // no BOS: add_bos_token is false
  const std::vector<int32_t> out =
      m.llama().generate_greedy(ids, static_cast<int64_t>(ids.size()) + n - 1, tok->eog_ids());
  return {tok->decode(out), static_cast<int>(out.size()) < n};
}
// Whether `g` is llama.cpp's continuation `expected` (the whole of it when generation stopped).
bool agrees(const Greedy& g, const std::string& expected) {
  return g.stopped ? g.text == expected : expected.compare(0, g.text.size(), g.text) == 0;
}

}  // namespace

TEST_CASE("SmolLM2 vs llama.cpp: greedy continuations are llama-simple's") {
  // Against llama.cpp on an F32 copy of the GGUF (the same dequantized weights cbq computes
  // with) the continuations must be identical. On the Q4_1 file itself llama.cpp quantizes the
  // activations to 8 bits in every matrix product (Q4_1 x Q8_1): where two logits are close its
  // greedy path can differ; reported, not required.
  const std::string path = smollm2_gguf();
  if (path.empty()) return;
  AnyModel& m = smollm2(path);
  REQUIRE(smollm2_reference().contains("f32"));
  const json& f32 = smollm2_reference()["f32"]["greedy"];
  const json& q41 = smollm2_reference()["greedy"];
  const int n = env_int("CBQ_SMOLLM2_GREEDY_TOKENS", 12, 1, f32["n_predict"].get<int>());
  for (std::size_t k = 0; k < f32["runs"].size(); ++k) {
    const std::string prompt = f32["runs"][k]["prompt"].get<std::string>();
    const std::string expected = f32["runs"][k]["output"].get<std::string>();
    INFO("prompt: ", prompt);
    REQUIRE(expected.compare(0, prompt.size(), prompt) == 0);  // llama-simple echoes the prompt
    const Greedy g = generate(m, prompt, n);
    INFO("cbq: ", g.text);
    INFO("llama.cpp (F32 GGUF): ", expected.substr(prompt.size()));
    CHECK(agrees(g, expected.substr(prompt.size())));
    const std::string q = q41["runs"][k]["output"].get<std::string>().substr(prompt.size());
    MESSAGE("prompt ", k + 1, ", ", n, " tokens: ", agrees(g, q) ? "identical to" : "differs from",
            " llama.cpp on the Q4_1 file");
  }
}

TEST_CASE("SmolLM2 vs llama.cpp: wikitext2 perplexity at context 2048 within 0.5 %") {
  const std::string path = smollm2_gguf();
  if (path.empty()) return;
  const fs::path wiki = fs::path(CBQ_EXTRA_DATA_DIR) / "text" / "wikitext2_test.txt";
  if (!fs::exists(wiki)) {
    MESSAGE("skipped: ", wiki.string(), " not found (CBQ_EXTRA_DATA_DIR)");
    return;
  }
  AnyModel& m = smollm2(path);
  const json& p = smollm2_reference()["perplexity"];
  const int64_t n_ctx = p["n_ctx"].get<int64_t>();
  const auto running = p["running"].get<std::vector<double>>();
  std::vector<double> running_f32;  // llama.cpp on the F32 copy, when the fixture has it
  if (smollm2_reference()["f32"].contains("perplexity"))
    running_f32 = smollm2_reference()["f32"]["perplexity"]["running"].get<std::vector<double>>();
  const int chunks = env_int("CBQ_SMOLLM2_PPL_CHUNKS", 1, 1, static_cast<int>(running.size()));
  // llama-perplexity tokenizes without BOS here (add_bos false) and, for such a model, leaves
  // each chunk's first token as it is: score every chunk on its own with that token as "BOS".
  const std::vector<int32_t> tokens = m.tokenizer()->encode(cbq::testing::read_all(wiki));
  double nll = 0;
  int64_t scored = 0;
  for (int c = 0; c < chunks; ++c) {
    const std::vector<int32_t> chunk(tokens.begin() + c * n_ctx, tokens.begin() + (c + 1) * n_ctx);
    const auto r = eval::perplexity_llamacpp(m.llama(), chunk, n_ctx, chunk[0]);
    REQUIRE(std::isfinite(r.mean_nll));
    nll += r.mean_nll * static_cast<double>(r.scored_tokens);
    scored += r.scored_tokens;
    const double ppl = std::exp(nll / static_cast<double>(scored));
    const double ref = running[static_cast<std::size_t>(c)];
    MESSAGE("chunk ", c + 1, ": cbq ", ppl, ", llama.cpp on the Q4_1 file ", ref, " (",
            100.0 * (ppl / ref - 1.0), " %)");
    CHECK(std::abs(ppl / ref - 1.0) < 0.005);
    if (static_cast<std::size_t>(c) < running_f32.size()) {
      // Same weights and float activations: only summation order and llama.cpp's f16 KV cache
      // differ, and its printout has 4 decimals.
      const double ref_f32 = running_f32[static_cast<std::size_t>(c)];
      MESSAGE("  llama.cpp on the F32 copy ", ref_f32, " (", 100.0 * (ppl / ref_f32 - 1.0), " %)");
      CHECK(std::abs(ppl / ref_f32 - 1.0) < 0.0005);
    }
  }
}
