// Token ids against the reference tools, from committed fixtures (no Python or llama.cpp at test
// time): tiny tokenizer.json files of every pre-tokenizer / normalizer kind with the ids Hugging
// Face `tokenizers` gives for a varied text (tests/reference/make_tokenizer_fixtures.py), and the
// same tokenizers written as GGUF byte-level vocabularies and read back.
#include <doctest/doctest.h>

#include <cbq/tokenizer/byte_level_bpe.hpp>
#include <cbq/tokenizer/hf_tokenizer.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "support/files.hpp"

namespace fs = std::filesystem;
using namespace cbq;
using nlohmann::json;
using Ids = std::vector<int32_t>;

namespace {

const fs::path kFixtures = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "tokenizers";

json read_json(const fs::path& p) { return json::parse(cbq::testing::read_all(p.string())); }

}  // namespace

TEST_CASE("tokenizer: tokenizer.json of every pre-tokenizer kind matches Hugging Face tokenizers") {
  const json ref = read_json(kFixtures / "hf.json");
  const auto texts = ref["texts"].get<std::vector<std::string>>();
  REQUIRE(texts.size() > 10);
  REQUIRE(ref["tokenizers"].size() >= 12);
  for (const auto& [name, want] : ref["tokenizers"].items()) {
    INFO(name);
    const HfTokenizer tok = HfTokenizer::load((kFixtures / "hf" / (name + ".json")).string());
    for (std::size_t i = 0; i < texts.size(); ++i) {
      INFO("text ", i, ": ", texts[i]);
      CHECK(tok.encode(texts[i], false, false) == want["ids"][i].get<Ids>());
      CHECK(tok.encode(texts[i]) == want["ids_special"][i].get<Ids>());
    }
  }
}
