// llama2.c tokenizer.bin: known ids, a literal transcription of llama2.c's quadratic encode as
// the reference, exact round trips on real text, vocabulary-size validation, corrupt files.
#include <doctest/doctest.h>

#include <cbq/tokenizer/llama2c_tokenizer.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "support/files.hpp"
#include "support/gradcheck.hpp"

namespace fs = std::filesystem;
using namespace cbq;

namespace {

using cbq::testing::error_of;
using cbq::testing::read_all;
using cbq::testing::TempDir;
using cbq::testing::write_all;

std::string models() { return cbq::testing::data_dir() + "/models/"; }

// llama2.c's encode(), transcribed literally (quadratic merge scan, strict '>' against -1e10).
std::vector<int32_t> reference_encode(const Llama2cTokenizer& t, const std::string& text, bool bos,
                                      bool eos) {
  std::vector<int32_t> tokens;
  if (bos) tokens.push_back(1);
  if (!text.empty()) tokens.push_back(t.find(" "));
  std::string buf;
  for (std::size_t i = 0; i < text.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if ((c & 0xC0) != 0x80) buf.clear();
    buf += static_cast<char>(c);
    unsigned char next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0;
    if ((next & 0xC0) == 0x80 && buf.size() < 4) continue;
    int32_t id = t.find(buf);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (unsigned char b : buf) tokens.push_back(b + 3);
    }
    buf.clear();
  }
  while (true) {
    float best_score = -1e10f;
    int best_id = -1, best_idx = -1;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      int id = t.find(t.piece(tokens[i]) + t.piece(tokens[i + 1]));
      if (id != -1 && t.score(id) > best_score) {
        best_score = t.score(id);
        best_id = id;
        best_idx = static_cast<int>(i);
      }
    }
    if (best_idx == -1) break;
    tokens[best_idx] = best_id;
    tokens.erase(tokens.begin() + best_idx + 1);
  }
  if (eos) tokens.push_back(2);
  return tokens;
}

std::vector<std::string> lines_of(const std::string& text, std::size_t max_lines) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (out.size() < max_lines && std::getline(in, line))
    if (!line.empty()) out.push_back(line);
  return out;
}

}  // namespace

TEST_CASE("tokenizer: llama2c tok512 known ids, round trip and the llama2.c reference") {
  const std::string path = models() + "tok512.bin";
  const std::string text_path = cbq::testing::data_dir() + "/text/tinystories_valid_200k.txt";
  if (!fs::exists(path) || !fs::exists(text_path)) {
    MESSAGE("skipped: " << path << " or " << text_path << " not found");
    return;
  }
  Llama2cTokenizer tok(path, 512);
  CHECK(tok.vocab_size() == 512);
  CHECK(tok.max_token_length() == 7);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.piece(3) == "<0x00>");
  CHECK(tok.piece(259) == " t");
  CHECK(tok.score(260) == -1.0f);

  // Ids computed by a Python transcription of llama2.c's encode.
  const std::string s = "Once upon a time, there was a little girl named Lily.";
  std::vector<int32_t> expected = {1,   403, 407, 261, 378, 432, 383, 286,
                                   261, 376, 298, 315, 421, 395, 317, 426};
  CHECK(tok.encode(s, true, false) == expected);
  expected.push_back(2);
  CHECK(tok.encode(s, true, true) == expected);
  CHECK(tok.decode(tok.encode(s, true, true)) == s);
  // Non-ASCII: byte fallback (id = byte + 3) for code points not in the vocabulary.
  const std::string u = "h\xC3\xA9llo w\xC3\xB6rld \xE6\x97\xA5\xE6\x9C\xAC\n!";
  CHECK(tok.encode(u, true, false) == std::vector<int32_t>{1, 270, 485, 306, 414, 263, 198, 185,
                                                           420, 341, 410, 233, 154, 168, 233, 159,
                                                           175, 13, 443});
  CHECK(tok.decode(tok.encode(u, true, false)) == u);
  CHECK(tok.encode("", true, false) == std::vector<int32_t>{1});
  CHECK(tok.encode("", false, false).empty());
  CHECK(tok.decode(std::vector<int32_t>{}).empty());

  // decode_piece follows llama2.c: leading space stripped only after BOS, <0xXX> → raw byte.
  CHECK(tok.decode_piece(1, 259) == "t");
  CHECK(tok.decode_piece(5, 259) == " t");
  CHECK(tok.decode_piece(5, 3 + 'A') == "A");
  CHECK_THROWS_AS(tok.decode_piece(1, 512), cbq::Error);
  CHECK_THROWS_AS(tok.decode(std::vector<int32_t>{-1}), cbq::Error);

  const std::string text = read_all(text_path);
  for (const auto& line : lines_of(text, 60)) {
    INFO(line);
    auto ids = tok.encode(line, true, false);
    CHECK(ids == reference_encode(tok, line, true, false));
    CHECK(tok.decode(ids) == line);
  }
  // The whole file at once (the heap-based merge keeps this fast), with and without BOS.
  auto ids = tok.encode(text, true, true);
  CHECK(tok.decode(ids) == text);
  CHECK(tok.decode(tok.encode(text, false, false)) == text);
  CHECK(ids.size() < text.size() / 2);
}

TEST_CASE("tokenizer: llama2c 32k LLaMA vocabulary known ids and round trip") {
  const std::string path = models() + "tokenizer32k.bin";
  const std::string text_path = cbq::testing::data_dir() + "/text/tinystories_valid_200k.txt";
  if (!fs::exists(path) || !fs::exists(text_path)) {
    MESSAGE("skipped: " << path << " or " << text_path << " not found");
    return;
  }
  Llama2cTokenizer tok(path, 32000);
  CHECK(tok.max_token_length() == 27);
  // The LLaMA-2 SentencePiece ids ("▁Once" = 9038, "▁upon" = 2501, ...).
  CHECK(tok.encode("Once upon a time, there was a little girl named Lily.", true, false) ==
        std::vector<int32_t>{1, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257, 365,
                             2354, 29889});
  const std::string u = "h\xC3\xA9llo w\xC3\xB6rld \xE6\x97\xA5\xE6\x9C\xAC\n!";
  CHECK(tok.encode(u, true, false) ==
        std::vector<int32_t>{1, 298, 3610, 417, 281, 1340, 430, 29871, 30325, 30346, 13, 29991});
  const std::string text = read_all(text_path);
  for (const auto& line : lines_of(text, 25)) {
    INFO(line);
    auto ids = tok.encode(line, true, false);
    CHECK(ids == reference_encode(tok, line, true, false));
    CHECK(tok.decode(ids) == line);
  }
  CHECK(tok.decode(tok.encode(text, true, true)) == text);
  // Invalid UTF-8 and control bytes survive through byte fallback.
  const std::string bad = std::string("a\xFF\xC3(b\x80\x01 z\xE6\x97", 12);
  CHECK(tok.decode(tok.encode(bad, true, false)) == bad);
}

TEST_CASE("tokenizer: llama2c vocabulary size is validated against the model") {
  const std::string path = models() + "tok512.bin";
  if (!fs::exists(path)) {
    MESSAGE("skipped: " << path << " not found");
    return;
  }
  Llama2cTokenizer inferred(path);  // no model size: every token in the file
  CHECK(inferred.vocab_size() == 512);
  CHECK_NOTHROW(inferred.check_vocab_size(512, "stories260K.bin"));
  std::string msg = error_of([&] { inferred.check_vocab_size(32000, "model.bin"); });
  CHECK(msg.find("tokenizer has 512 tokens but the model's vocabulary has 32000") !=
        std::string::npos);

  msg = error_of([&] { Llama2cTokenizer t(path, 600); });
  CHECK_MESSAGE(
      msg.find("holds only 512 tokens but the model's vocabulary has 600") != std::string::npos,
      msg);
  CHECK(msg.find(path) != std::string::npos);
  msg = error_of([&] { Llama2cTokenizer t(path, 500); });
  CHECK_MESSAGE(
      msg.find("holds 512 tokens but the model's vocabulary has 500") != std::string::npos, msg);
}

TEST_CASE("tokenizer: llama2c corrupt tokenizer files throw naming the file and offsets") {
  const std::string src = models() + "tok512.bin";
  if (!fs::exists(src)) {
    MESSAGE("skipped: " << src << " not found");
    return;
  }
  TempDir dir("tok_corrupt");
  const std::string raw = read_all(src);
  const std::string path = dir.file("tok.bin");
  for (std::size_t cut : {std::size_t{0}, std::size_t{2}, std::size_t{9}, std::size_t{13},
                          raw.size() / 2, raw.size() - 1}) {
    write_all(path, raw.substr(0, cut));
    std::string msg = error_of([&] { Llama2cTokenizer t(path, 512); });
    CHECK_MESSAGE(msg.find(path) != std::string::npos, msg);
    CHECK_MESSAGE(
        (msg.find("truncated") != std::string::npos || msg.find("holds only") != std::string::npos),
        msg);
  }
  // A negative token length.
  std::string bad = raw;
  int32_t neg = -5;
  std::memcpy(bad.data() + 8, &neg, 4);
  write_all(path, bad);
  std::string msg = error_of([&] { Llama2cTokenizer t(path, 512); });
  CHECK_MESSAGE(msg.find("token 0 has negative length -5") != std::string::npos, msg);
  // A huge token length.
  int32_t huge = 0x7FFFFFFF;
  std::memcpy(bad.data() + 8, &huge, 4);
  write_all(path, bad);
  msg = error_of([&] { Llama2cTokenizer t(path, 512); });
  CHECK_MESSAGE(msg.find("need 2147483647 bytes") != std::string::npos, msg);
  // Trailing garbage.
  write_all(path, raw + "xyz");
  msg = error_of([&] { Llama2cTokenizer t(path, 512); });
  CHECK_MESSAGE(msg.find("3 trailing bytes after the 512 tokens") != std::string::npos, msg);
}

TEST_CASE("tokenizer: llama2c tiny hand-made vocabulary merges by score, leftmost on ties") {
  TempDir dir("tok_tiny");
  // ids: 0 <unk>, 1 BOS, 2 EOS, 3..258 bytes, then pieces with scores.
  std::vector<std::pair<std::string, float>> vocab = {
      {"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  for (int b = 0; b < 256; ++b) vocab.push_back({fmt::format("<0x{:02X}>", b), 0});
  const std::vector<std::pair<std::string, float>> extra = {{" ", -1},   {"a", -1},   {"b", -1},
                                                            {"ab", -2},  {"ba", -2},  {" a", -3},
                                                            {"aba", -1}, {"abab", -9}};
  vocab.insert(vocab.end(), extra.begin(), extra.end());
  std::string bytes;
  int32_t max_len = 4;
  bytes.append(reinterpret_cast<const char*>(&max_len), 4);
  for (const auto& [p, s] : vocab) {
    int32_t n = static_cast<int32_t>(p.size());
    bytes.append(reinterpret_cast<const char*>(&s), 4);
    bytes.append(reinterpret_cast<const char*>(&n), 4);
    bytes += p;
  }
  const std::string path = dir.file("tiny.bin");
  write_all(path, bytes);
  Llama2cTokenizer tok(path, static_cast<int64_t>(vocab.size()));
  const int32_t sp = 259, a = 260, b = 261, ab = 262, ba = 263, spa = 264, aba = 265;
  // " abab": [sp a b a b]; ab(-2) and ba(-2) tie → leftmost "ab" at index 1: [sp ab a b];
  // then candidates ab+a=aba(-1), a+b=ab(-2) → aba: [sp aba b]; abab = aba+b? "abab"(-9) → merge.
  CHECK(tok.encode("abab", false, false) == std::vector<int32_t>{sp, 266});
  // " ba": [sp b a] → ba(-2) beats nothing else (" b" not in vocab): [sp ba].
  CHECK(tok.encode("ba", false, false) == std::vector<int32_t>{sp, ba});
  // " a": " a"(-3) is the only merge.
  CHECK(tok.encode("a", true, false) == std::vector<int32_t>{1, spa});
  // Unknown character: byte fallback.
  CHECK(tok.encode("c", false, false) == std::vector<int32_t>{sp, 'c' + 3});
  CHECK(tok.decode(std::vector<int32_t>{1, spa, ab, 'c' + 3}) == "aabc");
  CHECK(reference_encode(tok, "abab", false, false) == tok.encode("abab", false, false));
  (void)a;
  (void)b;
  (void)aba;
}

TEST_CASE("tokenizer: llama2c fixture tokenizer.bin matches the recorded encodings") {
  const fs::path dir = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "tiny-llama";
  if (!fs::exists(dir / "tokenizer.bin") || !fs::exists(dir / "reference.json")) {
    MESSAGE("skipped: tests/fixtures/tiny-llama not found");
    return;
  }
  auto r = nlohmann::json::parse(std::ifstream(dir / "reference.json"));
  if (!r.contains("llama2c_encodings")) {
    MESSAGE("skipped: no llama2c_encodings in reference.json");
    return;
  }
  Llama2cTokenizer tok((dir / "tokenizer.bin").string(), 512);
  int n = 0;
  for (const auto& c : r["llama2c_encodings"]) {
    const std::string text = c["text"].get<std::string>();
    INFO(text);
    // Recorded without BOS; llama2.c's dummy-prefix space is included in the ids.
    auto ids = c["ids"].get<std::vector<int32_t>>();
    CHECK(tok.encode(text, false, false) == ids);
    CHECK(tok.decode(ids) == text);
    ++n;
  }
  CHECK(n > 0);
}

TEST_CASE("tokenizer: llama2c encode with BOS or EOS beyond a tiny vocabulary throws") {
  // Found by fuzz/fuzz_llama2c_tokenizer: a one-token file; BOS (id 1) was pushed and then read
  // by the merge loop as pieces_[1], past the end of the vocabulary.
  TempDir dir("tok_one");
  std::string bytes(4, '\0');  // max_token_length 0
  const float score = 0.f;
  const int32_t len = 1;
  bytes.append(reinterpret_cast<const char*>(&score), 4);
  bytes.append(reinterpret_cast<const char*>(&len), 4);
  bytes += "a";
  const std::string path = dir.file("one.bin");
  write_all(path, bytes);
  Llama2cTokenizer tok(path);
  REQUIRE(tok.vocab_size() == 1);
  std::string msg = error_of([&] { tok.encode("aa", true, false); });
  CHECK_MESSAGE(msg.find("BOS needs token 1 but the vocabulary has 1 tokens") != std::string::npos,
                msg);
  msg = error_of([&] { tok.encode("", false, true); });
  CHECK_MESSAGE(msg.find("EOS needs token 2 but the vocabulary has 1 tokens") != std::string::npos,
                msg);
  // Without BOS/EOS the unknown space falls back to byte token 0x20 + 3 = 35, also missing.
  msg = error_of([&] { tok.encode("a", false, false); });
  CHECK_MESSAGE(msg.find("byte fallback for 0x20") != std::string::npos, msg);
}
