#pragma once
// Hugging Face tokenizer.json, BPE models of the two families the library supports:
//  * GPT-2 / OPT byte-level BPE: ByteLevel pre-tokenizer (GPT-2 regex split, bytes mapped to
//    printable code points), merges by rank, ByteLevel decoder.
//  * LLaMA / Mistral SentencePiece-style BPE: normalizer Prepend("▁") + Replace(" ", "▁") or a
//    Metaspace pre-tokenizer, merges by rank, byte_fallback <0xXX> tokens, a decoder that maps
//    "▁" back to spaces and drops the leading one.
// Added tokens (</s>, <|endoftext|>, ...) are matched in the raw text first. Other model types,
// normalizers and pre-tokenizers are rejected with an error naming the file and the field.
// See docs/FORMATS.md for what is (not) covered.
#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/io/mmap.hpp"
#include "cbq/tokenizer/tokenizer.hpp"
#include "cbq/tokenizer/unicode.hpp"

namespace cbq {

struct HfTokenizerOptions {
  // Override the BOS/EOS ids (else: tokenizer_config.json next to tokenizer.json, then the
  // post-processor template, then the tokens <s>/</s>, <|endoftext|>; -1 when none is found).
  std::optional<int32_t> bos_id, eos_id;
  // The model's vocabulary size: every token id must be below it (models may pad their
  // embedding beyond the tokenizer's vocabulary, as OPT does). 0 = no check.
  int64_t model_vocab_size = 0;
};

namespace detail {

// GPT-2's reversible byte → printable code point map.
inline const std::array<char32_t, 256>& byte_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    char32_t n = 0;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? static_cast<char32_t>(b) : 256 + n++;
    return t;
  }();
  return table;
}

// Splits `s` like the GPT-2 regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Bytes that are not valid UTF-8 count as "other" characters.
inline std::vector<std::string_view> gpt2_split(std::string_view s) {
  struct Cp {
    std::size_t pos;
    int len;
    char32_t cp;
  };
  std::vector<Cp> cps;
  for (std::size_t i = 0; i < s.size();) {
    char32_t cp = 0xFFFD;
    int n = utf8::decode(s, i, cp);
    if (n == 0) {
      n = 1;
      cp = 0xFFFD;
    }
    cps.push_back({i, n, cp});
    i += static_cast<std::size_t>(n);
  }
  const std::size_t N = cps.size();
  enum Cls { letter, number, space, other };
  auto cls = [&](std::size_t k) {
    char32_t c = cps[k].cp;
    if (unicode::in(c, unicode::kLetter)) return letter;
    if (unicode::in(c, unicode::kNumber)) return number;
    if (unicode::is_white_space(c)) return space;
    return other;
  };
  std::vector<std::string_view> out;
  auto emit = [&](std::size_t a, std::size_t b) {  // code points [a, b)
    std::size_t end = b < N ? cps[b].pos : s.size();
    out.push_back(s.substr(cps[a].pos, end - cps[a].pos));
  };
  std::size_t i = 0;
  while (i < N) {
    // Contractions.
    if (cps[i].cp == '\'' && i + 1 < N) {
      char32_t c1 = cps[i + 1].cp, c2 = i + 2 < N ? cps[i + 2].cp : 0;
      if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
        emit(i, i + 3);
        i += 3;
        continue;
      }
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
    }
    std::size_t start = i, j = i;
    if (cps[i].cp == ' ' && i + 1 < N && cls(i + 1) != space) j = i + 1;
    Cls c = cls(j);
    if (c != space) {
      std::size_t k = j;
      while (k < N && cls(k) == c) ++k;
      emit(start, k);
      i = k;
      continue;
    }
    // Whitespace run [i, k).
    std::size_t k = i;
    while (k < N && cls(k) == space) ++k;
    if (k == N || k - i == 1) {
      emit(i, k);
      i = k;
    } else {
      emit(i, k - 1);  // \s+(?!\S): leave the last space to prefix the next word
      i = k - 1;
    }
  }
  return out;
}

}  // namespace detail

class HfTokenizer : public Tokenizer {
 public:
  enum class Kind { byte_level, sentencepiece };

  // Parses tokenizer.json text; `source` names it in errors.
  HfTokenizer(std::string_view json_text, std::string source, HfTokenizerOptions options = {})
      : source_(std::move(source)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(json_text);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: invalid JSON: {}", source_, e.what());
    }
    try {
      parse(j);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: unexpected tokenizer.json structure: {}", source_, e.what());
    }
    if (options.bos_id) bos_ = *options.bos_id;
    if (options.eos_id) eos_ = *options.eos_id;
    if (options.model_vocab_size > 0)
      CBQ_CHECK(vocab_size() <= options.model_vocab_size,
                "{}: tokenizer has {} tokens but the model's vocabulary has only {}", source_,
                vocab_size(), options.model_vocab_size);
    for (int32_t id : {bos_, eos_})
      CBQ_CHECK(id >= -1 && id < vocab_size(), "{}: BOS/EOS id {} out of range [0, {})", source_,
                id, vocab_size());
  }

  // Reads `path` (tokenizer.json or a folder holding it). BOS/EOS come from the folder's
  // tokenizer_config.json when it names them and the options do not.
  static HfTokenizer load(const std::string& path, HfTokenizerOptions options = {}) {
    namespace fs = std::filesystem;
    fs::path p(path);
    if (fs::is_directory(p)) p /= "tokenizer.json";
    fs::path cfg = p.parent_path() / "tokenizer_config.json";
    HfTokenizer tok(io::read_text_file(p.string()), p.string(), options);
    if (fs::exists(cfg)) {
      nlohmann::json c;
      try {
        c = nlohmann::json::parse(io::read_text_file(cfg.string()));
      } catch (const nlohmann::json::exception& e) {
        fail("{}: invalid JSON: {}", cfg.string(), e.what());
      }
      auto token_of = [&](const char* key) -> std::optional<int32_t> {
        if (!c.is_object() || !c.contains(key)) return std::nullopt;
        const auto& v = c[key];
        std::string content;
        if (v.is_string())
          content = v.get<std::string>();
        else if (v.is_object() && v.contains("content") && v["content"].is_string())
          content = v["content"].get<std::string>();
        else
          return std::nullopt;
        auto id = tok.find(content);
        CBQ_CHECK(id >= 0, "{}: {} \"{}\" is not in the vocabulary of {}", cfg.string(), key,
                  content, p.string());
        return id;
      };
      if (!options.bos_id)
        if (auto id = token_of("bos_token")) tok.bos_ = *id;
      if (!options.eos_id)
        if (auto id = token_of("eos_token")) tok.eos_ = *id;
    }
    return tok;
  }

  std::vector<int32_t> encode(std::string_view text, bool bos, bool eos) const override {
    std::vector<int32_t> ids;
    if (bos) {
      CBQ_CHECK(bos_ >= 0, "{}: encode with BOS, but the tokenizer has no BOS token", source_);
      ids.push_back(bos_);
    }
    // Split on added tokens, then normalize / pre-tokenize / BPE the text between them.
    std::size_t pos = 0, seg_start = 0;
    bool first_segment = true;
    auto flush = [&](std::size_t end) {
      if (end > seg_start)
        encode_segment(text.substr(seg_start, end - seg_start), first_segment, ids);
      first_segment = false;
    };
    while (pos < text.size()) {
      const AddedToken* match = nullptr;
      auto it = added_by_first_byte_.find(static_cast<unsigned char>(text[pos]));
      if (it != added_by_first_byte_.end())
        for (std::size_t k : it->second)  // longest first
          if (text.substr(pos, added_[k].content.size()) == added_[k].content) {
            match = &added_[k];
            break;
          }
      if (!match) {
        ++pos;
        continue;
      }
      std::size_t begin = pos, end = pos + match->content.size();
      if (match->lstrip)
        while (begin > seg_start && is_space(text[begin - 1])) --begin;
      if (match->rstrip)
        while (end < text.size() && is_space(text[end])) ++end;
      flush(begin);
      ids.push_back(match->id);
      pos = seg_start = end;
    }
    flush(text.size());
    if (eos) {
      CBQ_CHECK(eos_ >= 0, "{}: encode with EOS, but the tokenizer has no EOS token", source_);
      ids.push_back(eos_);
    }
    return ids;
  }

  std::string decode(std::span<const int32_t> ids) const override {
    std::string out;
    bool at_start = true;
    for (int32_t id : ids) {
      check_id(id);
      if (is_special(id)) continue;
      out += token_text(id, at_start);
      at_start = false;
    }
    return out;
  }

  std::string decode_piece(int32_t prev, int32_t id) const override {
    check_id(id);
    if (is_special(id)) return {};
    return token_text(id, prev < 0 || prev == bos_);
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  const std::string& piece(int32_t id) const override {
    check_id(id);
    return pieces_[static_cast<std::size_t>(id)];
  }
  // BPE has no scores: -(rank + 1) of the merge producing the token, 0 for base tokens.
  float score(int32_t id) const override {
    check_id(id);
    return scores_[static_cast<std::size_t>(id)];
  }
  Kind kind() const { return kind_; }
  const std::string& source() const { return source_; }
  // Id of a vocabulary piece or added token, or -1.
  int32_t find(std::string_view piece) const {
    auto it = vocab_.find(std::string(piece));
    return it == vocab_.end() ? -1 : it->second;
  }

 private:
  struct AddedToken {
    int32_t id;
    std::string content;
    bool special, lstrip, rstrip;
  };
  struct Merge {
    int32_t rank, id;
  };
  static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  [[noreturn]] void unsupported(const std::string& field, const std::string& what) const {
    fail("{}: field \"{}\": {}", source_, field, what);
  }

  void parse(const nlohmann::json& j) {
    CBQ_CHECK(j.is_object(), "{}: tokenizer.json is not a JSON object", source_);
    CBQ_CHECK(j.contains("model") && j["model"].is_object(), "{}: missing \"model\" object",
              source_);
    const auto& m = j["model"];
    const std::string type = m.value("type", std::string("BPE"));
    if (type != "BPE")
      unsupported("model.type", fmt::format("\"{}\" is not supported (BPE only)", type));
    if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0.0)
      unsupported("model.dropout", "BPE dropout is not supported");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !m[k].get<std::string>().empty())
        unsupported(std::string("model.") + k, "is not supported");
    byte_fallback_ = m.value("byte_fallback", false);
    fuse_unk_ = m.value("fuse_unk", false);
    ignore_merges_ = m.value("ignore_merges", false);

    CBQ_CHECK(m.contains("vocab") && m["vocab"].is_object(), "{}: missing \"model.vocab\" object",
              source_);
    // Ids index dense tables: bound them by the number of tokens the file defines (gaps are
    // allowed while at least half the ids are used), so a huge id cannot force a huge allocation.
    const bool has_added = j.contains("added_tokens") && j["added_tokens"].is_array();
    const int64_t id_limit =
        2 * static_cast<int64_t>(m["vocab"].size() + (has_added ? j["added_tokens"].size() : 0));
    int64_t size = 0;
    auto add_piece = [&](const std::string& piece, int64_t id, const char* field) {
      CBQ_CHECK(id >= 0 && id < id_limit,
                "{}: {}: id {} of \"{}\" out of range: the file defines {} tokens, ids must be "
                "below {}",
                source_, field, id, piece, id_limit / 2, id_limit);
      size = std::max(size, id + 1);
      vocab_.emplace(piece, static_cast<int32_t>(id));
      if (static_cast<int64_t>(pieces_.size()) <= id) {
        pieces_.resize(static_cast<std::size_t>(id + 1));
        scores_.resize(static_cast<std::size_t>(id + 1), 0.0f);
        special_.resize(static_cast<std::size_t>(id + 1), 0);
      }
      pieces_[static_cast<std::size_t>(id)] = piece;
    };
    for (const auto& [piece, id] : m["vocab"].items()) {
      CBQ_CHECK(id.is_number_integer(), "{}: model.vocab: id of \"{}\" is not an integer", source_,
                piece);
      add_piece(piece, id.get<int64_t>(), "model.vocab");
    }
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      unk_ = find(m["unk_token"].get<std::string>());
      CBQ_CHECK(unk_ >= 0, "{}: model.unk_token \"{}\" is not in the vocabulary", source_,
                m["unk_token"].get<std::string>());
    }
    if (m.contains("merges")) {
      CBQ_CHECK(m["merges"].is_array(), "{}: model.merges is not an array", source_);
      int32_t rank = 0;
      for (const auto& mg : m["merges"]) {
        std::string a, b;
        if (mg.is_string()) {
          const std::string s = mg.get<std::string>();
          auto sp = s.find(' ', 1);
          CBQ_CHECK(sp != std::string::npos, "{}: model.merges[{}] \"{}\" is not \"a b\"", source_,
                    rank, s);
          a = s.substr(0, sp);
          b = s.substr(sp + 1);
        } else {
          CBQ_CHECK(mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string(),
                    "{}: model.merges[{}] is not a pair of strings", source_, rank);
          a = mg[0].get<std::string>();
          b = mg[1].get<std::string>();
        }
        int32_t ia = find(a), ib = find(b), im = find(a + b);
        CBQ_CHECK(ia >= 0 && ib >= 0 && im >= 0,
                  "{}: model.merges[{}] (\"{}\", \"{}\") uses a token not in the vocabulary",
                  source_, rank, a, b);
        merges_.emplace(pair_key(ia, ib), Merge{rank, im});
        if (scores_[static_cast<std::size_t>(im)] == 0.0f)
          scores_[static_cast<std::size_t>(im)] = -static_cast<float>(rank + 1);
        ++rank;
      }
    }
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
      for (const auto& t : j["added_tokens"]) {
        CBQ_CHECK(t.is_object() && t.contains("id") && t.contains("content") &&
                      t["content"].is_string() && t["id"].is_number_integer(),
                  "{}: added_tokens entry {} lacks an integer id or a content string", source_,
                  t.dump());
        AddedToken a{static_cast<int32_t>(0), t["content"].get<std::string>(),
                     t.value("special", false), t.value("lstrip", false), t.value("rstrip", false)};
        CBQ_CHECK(!a.content.empty(), "{}: added token with id {} has empty content", source_,
                  t["id"].dump());
        const int64_t id = t["id"].get<int64_t>();
        add_piece(a.content, id, "added_tokens");
        a.id = static_cast<int32_t>(id);
        vocab_[a.content] = a.id;
        if (a.special) special_[static_cast<std::size_t>(a.id)] = 1;
        added_.push_back(a);
      }
    }
    for (std::size_t k = 0; k < added_.size(); ++k)
      added_by_first_byte_[static_cast<unsigned char>(added_[k].content[0])].push_back(k);
    for (auto& [b, list] : added_by_first_byte_)
      std::stable_sort(list.begin(), list.end(), [&](std::size_t x, std::size_t y) {
        return added_[x].content.size() > added_[y].content.size();
      });
    added_flag_.assign(pieces_.size(), 0);
    for (const auto& a : added_) added_flag_[static_cast<std::size_t>(a.id)] = 1;
    (void)size;
    CBQ_CHECK(!pieces_.empty(), "{}: empty vocabulary", source_);

    parse_normalizer(j.contains("normalizer") ? j["normalizer"] : nlohmann::json(), "normalizer");
    parse_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json(),
                        "pre_tokenizer");
    parse_decoder(j.contains("decoder") ? j["decoder"] : nlohmann::json(), "decoder");
    kind_ = byte_level_ ? Kind::byte_level : Kind::sentencepiece;
    if (byte_level_) {
      const auto& table = detail::byte_to_unicode();
      for (int b = 0; b < 256; ++b) unicode_to_byte_[table[b]] = static_cast<unsigned char>(b);
    } else {
      for (int b = 0; b < 256; ++b) byte_ids_[b] = find(fmt::format("<0x{:02X}>", b));
    }
    find_special_ids(j);
  }

  void parse_normalizer(const nlohmann::json& n, const std::string& field) {
    if (n.is_null()) return;
    const std::string type = n.value("type", std::string());
    if (type == "Sequence") {
      for (std::size_t i = 0; i < n.at("normalizers").size(); ++i)
        parse_normalizer(n.at("normalizers")[i], fmt::format("{}.normalizers[{}]", field, i));
    } else if (type == "Prepend") {
      norm_ops_.push_back({true, "", n.at("prepend").get<std::string>()});
    } else if (type == "Replace") {
      const auto& p = n.at("pattern");
      if (!p.contains("String"))
        unsupported(field + ".pattern", "only String patterns are supported (not Regex)");
      norm_ops_.push_back(
          {false, p["String"].get<std::string>(), n.at("content").get<std::string>()});
      CBQ_CHECK(!norm_ops_.back().from.empty(), "{}: {}: empty Replace pattern", source_, field);
    } else {
      unsupported(field, fmt::format("normalizer \"{}\" is not supported (Prepend, Replace, "
                                     "Sequence)",
                                     type));
    }
  }

  void parse_pre_tokenizer(const nlohmann::json& p, const std::string& field) {
    if (p.is_null()) return;
    const std::string type = p.value("type", std::string());
    if (type == "Sequence") {
      for (std::size_t i = 0; i < p.at("pretokenizers").size(); ++i)
        parse_pre_tokenizer(p.at("pretokenizers")[i],
                            fmt::format("{}.pretokenizers[{}]", field, i));
    } else if (type == "ByteLevel") {
      byte_level_ = true;
      add_prefix_space_ = p.value("add_prefix_space", false);
      use_regex_ = p.value("use_regex", true);
    } else if (type == "Metaspace") {
      metaspace_ = true;
      replacement_ = p.value("replacement", std::string("\xE2\x96\x81"));
      metaspace_split_ = p.value("split", true);
      if (p.contains("prepend_scheme")) {
        const std::string s = p["prepend_scheme"].get<std::string>();
        if (s != "always" && s != "first" && s != "never")
          unsupported(field + ".prepend_scheme", fmt::format("unknown value \"{}\"", s));
        prepend_scheme_ = s;
      } else {
        prepend_scheme_ = p.value("add_prefix_space", true) ? "always" : "never";
      }
    } else {
      unsupported(field, fmt::format("pre-tokenizer \"{}\" is not supported (ByteLevel, "
                                     "Metaspace, Sequence)",
                                     type));
    }
  }

  void parse_decoder(const nlohmann::json& d, const std::string& field) {
    if (d.is_null()) return;
    const std::string type = d.value("type", std::string());
    if (type == "Sequence") {
      for (std::size_t i = 0; i < d.at("decoders").size(); ++i)
        parse_decoder(d.at("decoders")[i], fmt::format("{}.decoders[{}]", field, i));
    } else if (type == "Strip") {
      if (d.value("content", std::string(" ")) == " " && d.value("start", 0) > 0)
        strip_leading_space_ = true;
    } else if (type == "Metaspace") {
      std::string scheme = d.contains("prepend_scheme")
                               ? d["prepend_scheme"].get<std::string>()
                               : (d.value("add_prefix_space", true) ? "always" : "never");
      if (scheme != "never") strip_leading_space_ = true;
    } else if (type == "ByteLevel" || type == "Replace" || type == "ByteFallback" ||
               type == "Fuse") {
      // Implied by the model kind.
    } else {
      unsupported(field, fmt::format("decoder \"{}\" is not supported", type));
    }
  }

  void find_special_ids(const nlohmann::json& j) {
    // The post-processor's single-sequence template: special tokens before/after "A".
    if (j.contains("post_processor") && j["post_processor"].is_object()) {
      const auto& pp = j["post_processor"];
      std::vector<nlohmann::json> procs;
      if (pp.value("type", std::string()) == "Sequence" && pp.contains("processors"))
        for (const auto& x : pp["processors"]) procs.push_back(x);
      else
        procs.push_back(pp);
      for (const auto& p : procs) {
        if (p.value("type", std::string()) != "TemplateProcessing" || !p.contains("single"))
          continue;
        bool seen_a = false;
        for (const auto& piece : p["single"]) {
          if (piece.contains("Sequence")) {
            seen_a = true;
          } else if (piece.contains("SpecialToken")) {
            int32_t id = find(piece["SpecialToken"].value("id", std::string()));
            if (id >= 0) (seen_a ? eos_ : bos_) = id;
          }
        }
      }
    }
    auto first_of = [&](std::initializer_list<const char*> names) {
      for (const char* n : names)
        if (int32_t id = find(n); id >= 0) return id;
      return int32_t{-1};
    };
    if (bos_ < 0) bos_ = first_of({"<s>", "<|begin_of_text|>", "<|endoftext|>", "</s>"});
    if (eos_ < 0) eos_ = first_of({"</s>", "<|end_of_text|>", "<|endoftext|>"});
  }

  bool is_special(int32_t id) const {
    return id == bos_ || id == eos_ || special_[static_cast<std::size_t>(id)];
  }

  std::string token_text(int32_t id, bool at_start) const {
    const std::string& p = pieces_[static_cast<std::size_t>(id)];
    if (is_added(id)) return p;
    std::string out;
    if (byte_level_) {
      for (std::size_t i = 0; i < p.size();) {
        char32_t cp;
        int n = utf8::decode(p, i, cp);
        if (n == 0) {
          out += p[i++];
          continue;
        }
        auto it = unicode_to_byte_.find(cp);
        if (it != unicode_to_byte_.end())
          out += static_cast<char>(it->second);
        else
          out.append(p, i, static_cast<std::size_t>(n));
        i += static_cast<std::size_t>(n);
      }
      return out;
    }
    int byte = byte_fallback_ ? utf8::parse_byte_piece(p) : -1;
    if (byte >= 0) {
      out = std::string(1, static_cast<char>(byte));
    } else {
      const std::string& rep = metaspace_ ? replacement_ : kSpm;
      for (std::size_t i = 0; i < p.size();) {
        if (!rep.empty() && p.compare(i, rep.size(), rep) == 0) {
          out += ' ';
          i += rep.size();
        } else {
          out += p[i++];
        }
      }
    }
    if (at_start && strip_leading_space_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

  bool is_added(int32_t id) const { return added_flag_[static_cast<std::size_t>(id)] != 0; }

  void encode_segment(std::string_view seg, bool first_segment, std::vector<int32_t>& ids) const {
    std::string s(seg);
    // Chained Replace ops can grow the text exponentially ("a" -> "aa...", repeated): cap the
    // growth far above what real normalizers (Prepend "▁", Replace " " -> "▁") need.
    const std::size_t max_size = 64 * seg.size() + 4096;
    auto check_size = [&](std::size_t n) {
      CBQ_CHECK(n <= max_size, "{}: the normalizer grows a {}-byte text beyond {} bytes", source_,
                seg.size(), max_size);
    };
    for (const auto& op : norm_ops_) {
      if (s.empty()) break;
      if (op.prepend) {
        check_size(s.size() + op.to.size());
        s = op.to + s;
      } else {
        std::string r;
        for (std::size_t i = 0; i < s.size();) {
          if (s.compare(i, op.from.size(), op.from) == 0) {
            r += op.to;
            check_size(r.size());
            i += op.from.size();
          } else {
            r += s[i++];
          }
        }
        s = std::move(r);
      }
    }
    if (byte_level_) {
      if (add_prefix_space_ && !s.empty() && s[0] != ' ') s.insert(s.begin(), ' ');
      std::vector<std::string_view> words;
      if (use_regex_)
        words = detail::gpt2_split(s);
      else
        words.push_back(s);
      const auto& table = detail::byte_to_unicode();
      for (std::string_view w : words) {
        std::string mapped;
        for (unsigned char b : w) utf8::append(mapped, table[b]);
        bpe(mapped, ids);
      }
      return;
    }
    if (metaspace_) {
      std::string r;
      for (char c : s) {
        if (c == ' ')
          r += replacement_;
        else
          r += c;
      }
      if (!r.empty() &&
          (prepend_scheme_ == "always" || (prepend_scheme_ == "first" && first_segment)) &&
          r.compare(0, replacement_.size(), replacement_) != 0)
        r = replacement_ + r;
      s = std::move(r);
      if (metaspace_split_) {
        std::size_t start = 0;
        for (std::size_t i = 1; i <= s.size(); ++i) {
          if (i == s.size() || s.compare(i, replacement_.size(), replacement_) == 0) {
            bpe(std::string_view(s).substr(start, i - start), ids);
            start = i;
          }
        }
        return;
      }
    }
    bpe(s, ids);
  }

  // BPE of one word: characters (code points) → ids (byte fallback / unk), then repeatedly merge
  // the adjacent pair of lowest rank (leftmost on ties), as tokenizers' Word::merge_all.
  void bpe(std::string_view word, std::vector<int32_t>& ids) const {
    if (word.empty()) return;
    if (ignore_merges_)
      if (int32_t id = find(word); id >= 0) {
        ids.push_back(id);
        return;
      }
    std::vector<int32_t> sym;
    for (std::size_t i = 0; i < word.size();) {
      char32_t cp;
      int n = utf8::decode(word, i, cp);
      if (n == 0) n = 1;
      std::string_view ch = word.substr(i, static_cast<std::size_t>(n));
      i += static_cast<std::size_t>(n);
      int32_t id = find(ch);
      if (id >= 0) {
        sym.push_back(id);
        continue;
      }
      bool all_bytes = byte_fallback_;
      if (byte_fallback_)
        for (unsigned char b : ch) all_bytes = all_bytes && byte_ids_[b] >= 0;
      if (all_bytes) {
        for (unsigned char b : ch) sym.push_back(byte_ids_[b]);
      } else if (unk_ >= 0) {
        if (!(fuse_unk_ && !sym.empty() && sym.back() == unk_)) sym.push_back(unk_);
      }
      // else: dropped, as tokenizers does without an unk token
    }
    const int n = static_cast<int>(sym.size());
    std::vector<int> next(n), prev(n);
    std::vector<char> alive(n, 1);
    for (int i = 0; i < n; ++i) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    struct Cand {
      int32_t rank;
      int left, right;
      int32_t left_id, right_id, merged;
    };
    auto worse = [](const Cand& a, const Cand& b) {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    };
    std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
    auto push = [&](int left) {
      if (left < 0 || next[left] < 0) return;
      int right = next[left];
      auto it = merges_.find(pair_key(sym[left], sym[right]));
      if (it != merges_.end())
        heap.push({it->second.rank, left, right, sym[left], sym[right], it->second.id});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      if (!alive[c.left] || !alive[c.right] || next[c.left] != c.right ||
          sym[c.left] != c.left_id || sym[c.right] != c.right_id)
        continue;
      sym[c.left] = c.merged;
      alive[c.right] = 0;
      next[c.left] = next[c.right];
      if (next[c.right] >= 0) prev[next[c.right]] = c.left;
      push(prev[c.left]);
      push(c.left);
    }
    for (int i = 0; i < n; ++i)
      if (alive[i]) ids.push_back(sym[i]);
  }

  struct NormOp {
    bool prepend;
    std::string from, to;
  };
  inline static const std::string kSpm = "\xE2\x96\x81";  // "▁"

  std::string source_;
  Kind kind_ = Kind::sentencepiece;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<char> special_;
  std::unordered_map<uint64_t, Merge> merges_;
  std::vector<AddedToken> added_;
  std::map<unsigned char, std::vector<std::size_t>> added_by_first_byte_;
  std::vector<char> added_flag_;
  std::vector<NormOp> norm_ops_;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  int32_t unk_ = -1, bos_ = -1, eos_ = -1;
  bool byte_level_ = false, add_prefix_space_ = false, use_regex_ = true;
  bool metaspace_ = false, metaspace_split_ = true;
  std::string replacement_ = kSpm, prepend_scheme_ = "always";
  bool strip_leading_space_ = false;
  std::array<int32_t, 256> byte_ids_{};
  std::unordered_map<char32_t, unsigned char> unicode_to_byte_;
};

}  // namespace cbq
