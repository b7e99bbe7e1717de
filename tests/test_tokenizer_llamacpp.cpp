// Byte-level BPE from GGUF vocabularies against llama.cpp, from committed fixtures
// (tests/fixtures/tokenizers/llamacpp.json, made by tests/reference/
// make_llamacpp_tokenizer_fixtures.sh with llama-tokenize): SmolLM2-135M's own GGUF on whole
// texts and varied samples (skipped with a message when the model file is absent), and GGUF files
// written by cbq's exporter, read back, tokenizing as llama.cpp tokenizes them.
#include <doctest/doctest.h>

#include <cbq/export/gguf.hpp>
#include <cbq/model/load.hpp>
#include <cbq/model/random.hpp>
#include <cbq/tokenizer/byte_level_bpe.hpp>
#include <cbq/tokenizer/gguf_tokenizer.hpp>
#include <cbq/tokenizer/hf_tokenizer.hpp>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "support/files.hpp"
#include "support/smollm2.hpp"

namespace fs = std::filesystem;
using namespace cbq;
using nlohmann::json;
using Ids = std::vector<int32_t>;

namespace {

const fs::path kTokenizerFixtures = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "tokenizers";

const json& reference() {
  static const json j =
      json::parse(cbq::testing::read_all((kTokenizerFixtures / "llamacpp.json").string()));
  return j;
}
std::vector<std::string> samples() {
  const json hf = json::parse(cbq::testing::read_all((kTokenizerFixtures / "hf.json").string()));
  auto texts = hf["texts"].get<std::vector<std::string>>();
  const fs::path wiki = fs::path(CBQ_EXTRA_DATA_DIR) / "text" / "wikitext2_test.txt";
  if (fs::exists(wiki)) {
    std::string head = cbq::testing::read_all(wiki.string()).substr(0, 4096);
    texts.push_back(head.substr(0, head.rfind('\n') + 1));
  }
  return texts;
}

// The llama.cpp fixtures hash id sequences with 64-bit FNV-1a over their little-endian bytes.
std::string fnv1a64(const Ids& ids) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (int32_t id : ids)
    for (int k = 0; k < 4; ++k) {
      h ^= (static_cast<uint32_t>(id) >> (8 * k)) & 0xFFu;
      h *= 0x100000001B3ull;
    }
  return fmt::format("{:016x}", h);
}

}  // namespace

using cbq::testing::smollm2_gguf;

TEST_CASE("tokenizer: SmolLM2's GGUF vocabulary tokenizes as llama-tokenize") {
  const std::string path = smollm2_gguf();
  if (path.empty()) return;
  io::GgufFile f(path);
  std::string why;
  const auto tok = gguf_tokenizer(f, 49152, why);
  REQUIRE(tok != nullptr);
  const auto* bl = dynamic_cast<const ByteLevelBpeTokenizer*>(tok.get());
  REQUIRE(bl != nullptr);
  CHECK(bl->vocabulary().pre == "smollm");
  CHECK(tok->vocab_size() == 49152);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK_FALSE(tok->add_bos());  // the file says add_bos_token false
  Ids eog = bl->eog_ids();
  std::sort(eog.begin(), eog.end());
  CHECK(eog == Ids{0, 2});  // <|endoftext|>, <|im_end|>

  const json& ref = reference()["smollm2"];
  const auto texts = samples();
  const auto& want = ref["varied_ids"];
  for (std::size_t i = 0; i < texts.size(); ++i) {
    INFO("text ", i, ": ", texts[i].substr(0, 200));
    const Ids ids = tok->encode(texts[i]);
    CHECK(ids == want[i].get<Ids>());
    if (texts[i].find("<|") == std::string::npos)  // control tokens decode to nothing
      CHECK(tok->decode(ids) == texts[i]);
  }
  for (const auto& [name, w] : ref["files"].items()) {
    fs::path p = fs::path(CBQ_DATA_DIR) / "text" / name;
    if (!fs::exists(p)) p = fs::path(CBQ_EXTRA_DATA_DIR) / "text" / name;
    if (!fs::exists(p)) {
      MESSAGE("skipped ", name, ": not in CBQ_DATA_DIR or CBQ_EXTRA_DATA_DIR");
      continue;
    }
    INFO(name);
    const std::string text = cbq::testing::read_all(p.string());
    REQUIRE(text.size() == w["bytes"].get<std::size_t>());
    const Ids ids = tok->encode(text);
    CHECK(ids.size() == w["tokens"].get<std::size_t>());
    CHECK(fnv1a64(ids) == w["fnv1a64"].get<std::string>());
    CHECK(tok->decode(ids) == text);
  }
}

TEST_CASE("tokenizer: load_model gives SmolLM2's GGUF its byte-level tokenizer") {
  const std::string path = smollm2_gguf();
  if (path.empty()) return;
  AnyModel m = load_model(path);
  REQUIRE(m.tokenizer() != nullptr);
  CHECK(describe(m).find("Tokenizer: 49152 tokens, BOS 1, EOS 2.") != std::string::npos);
  CHECK(m.tokenizer()->encode("Hello world 123") == Ids{19556, 905, 216, 33, 34, 35});
}

TEST_CASE("tokenizer: GGUF export of byte-level vocabularies reads back as llama.cpp reads it") {
  // llama-tokenize's ids on the files cbq's exporter wrote (a tiny LLaMA carrying each
  // vocabulary): cbq must write the same vocabulary again and read it back to the same ids.
  const auto texts = samples();
  cbq::testing::TempDir dir("tok_export");
  int checked = 0;
  for (const auto& [name, want] : reference()["exported"].items()) {
    INFO(name);
    std::shared_ptr<const Tokenizer> src;
    if (name == "smollm2_vocab") {
      const std::string path = smollm2_gguf();
      if (path.empty()) continue;
      io::GgufFile f(path);
      std::string why;
      src = gguf_tokenizer(f, 49152, why);
    } else {
      src = std::make_shared<HfTokenizer>(
          HfTokenizer::load((kTokenizerFixtures / "hf" / (name + ".json")).string()));
    }
    REQUIRE(src != nullptr);
    ModelConfig c = tiny_llama_config();
    c.vocab_size = src->vocab_size();
    Transformer<LlamaBlock<float>> m(c, random_weights(c, 1));
    const std::string file = dir.file(name + ".gguf");
    io::export_gguf(file, m, src.get(), nullptr);
    io::GgufModel back = io::load_gguf(file);
    REQUIRE(back.tokenizer != nullptr);
    const auto* bl = dynamic_cast<const ByteLevelBpeTokenizer*>(back.tokenizer.get());
    REQUIRE(bl != nullptr);
    CHECK(back.tokenizer->vocab_size() == src->vocab_size());
    CHECK(back.tokenizer->bos_id() == src->bos_id());
    CHECK(back.tokenizer->add_bos() == src->add_bos());
    int differ_from_source = 0;
    for (std::size_t i = 0; i < texts.size(); ++i) {
      INFO("text ", i, ": ", texts[i].substr(0, 200));
      const Ids ids = back.tokenizer->encode(texts[i]);
      CHECK(ids == want[i].get<Ids>());
      differ_from_source += ids != src->encode(texts[i]);
    }
    // A tokenizer.json and llama.cpp's reading of its GGUF differ only where the two references
    // do: Unicode 15.1 vs 16.0 letters, (?i:'s) folding "ſ", the NFC normalizer llama.cpp skips.
    MESSAGE(name, ": llama.cpp's ids differ from the source tokenizer's on ", differ_from_source,
            " of ", texts.size(), " texts");
    ++checked;
  }
  CHECK(checked >= 4);
}

TEST_CASE("tokenizer: GGUF byte-level vocabularies cbq cannot run are errors naming the file") {
  auto vocab = [] {
    BpeVocabulary v;
    v.source = "/x/model.gguf";
    v.tokens = {"a", "b", "ab", "Ġ"};
    v.merges = {"a b"};
    v.pre = "smollm";
    return v;
  };
  CHECK_NOTHROW(ByteLevelBpeTokenizer{vocab()});
  BpeVocabulary v = vocab();
  v.pre = "kimi-k2";
  CHECK_THROWS_WITH_AS(ByteLevelBpeTokenizer{v},
                       doctest::Contains("/x/model.gguf: pre-tokenizer 'kimi-k2'"), Error);
  v = vocab();
  v.merges.push_back("a c");
  CHECK_THROWS_WITH_AS(ByteLevelBpeTokenizer{v}, doctest::Contains("merges[1]"), Error);
  v = vocab();
  v.merges.push_back("ab");
  CHECK_THROWS_WITH_AS(ByteLevelBpeTokenizer{v}, doctest::Contains("is not \"a b\""), Error);
  v = vocab();
  v.types = {1, 1};
  CHECK_THROWS_WITH_AS(ByteLevelBpeTokenizer{v}, doctest::Contains("2 token types for 4 tokens"),
                       Error);
  v = vocab();
  v.bos = 9;
  CHECK_THROWS_WITH_AS(ByteLevelBpeTokenizer{v}, doctest::Contains("out of range"), Error);

  // Through a GGUF file: an unknown pre-tokenizer name fails load_gguf, naming the file.
  cbq::testing::TempDir dir("tok_pre");
  ModelConfig c = tiny_llama_config();
  c.vocab_size = 4;
  Transformer<LlamaBlock<float>> m(c, random_weights(c, 1));
  BpeVocabulary good = vocab();
  auto tok = std::make_shared<ByteLevelBpeTokenizer>(good);
  const std::string file = dir.file("m.gguf");
  io::export_gguf(file, m, tok.get(), nullptr);
  {
    io::GgufFile f(file);
    CHECK(f.get<std::string>("tokenizer.ggml.pre") == "smollm");
    CHECK(f.get<std::string>("tokenizer.ggml.model") == "gpt2");
    CHECK(f.at("tokenizer.ggml.merges").array<std::string>() == std::vector<std::string>{"a b"});
  }
  std::string bytes = cbq::testing::read_all(file);
  const std::size_t at = bytes.find("smollm");
  REQUIRE(at != std::string::npos);
  bytes.replace(at, 6, "sm0llm");
  cbq::testing::write_all(file, bytes);
  const std::string msg = cbq::testing::error_of([&] { io::load_gguf(file); });
  CHECK_MESSAGE(
      msg.find(file + ": pre-tokenizer 'sm0llm' (tokenizer.ggml.pre)") != std::string::npos, msg);
  // With a tokenizer given, the model still loads (its vocabulary is not read).
  CHECK_NOTHROW(io::load_gguf(file, /*read_tokenizer=*/false));
}

TEST_CASE("tokenizer: llama.cpp special tokens: control tokens only with parse_special") {
  BpeVocabulary v;
  v.source = "special";
  v.tokens = {"<|endoftext|>", "<|im_start|>", "<tool>", "a", "b", "ab", "<", "|", ">", "Ġ"};
  v.types = {3, 3, 4, 1, 1, 1, 1, 1, 1, 1};
  v.merges = {"a b"};
  v.pre = "gpt-2";
  v.bos = 1;
  v.eos = 0;
  ByteLevelBpeTokenizer tok(v);
  CHECK(tok.encode("ab<|im_start|>ab<tool>", false, false) == Ids{5, 1, 5, 2});
  // parse_special = false (llama-perplexity): control tokens stay text, user-defined ones match.
  const Ids plain = tok.encode("ab<|im_start|>ab<tool>", false, false, false);
  CHECK(plain.size() > 4);
  CHECK(std::find(plain.begin(), plain.end(), 1) == plain.end());
  CHECK(plain.back() == 2);
  CHECK(tok.decode(Ids{5, 1, 5, 2, 0}) == "abab<tool>");
  CHECK(tok.encode("ab", true, true) == Ids{1, 5, 0});
}
