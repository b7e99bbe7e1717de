#pragma once
// Hugging Face tokenizer.json with a BPE model, run as `tokenizers` 0.2x runs it:
//   added tokens cut out of the raw text (leftmost-longest; single_word, lstrip, rstrip), the
//   normalizer on each remaining segment, normalized added tokens cut out of that, the
//   pre-tokenizer steps, BPE over each piece, the post-processor's BOS/EOS.
// Normalizers: NFC, NFD, NFKC, NFKD, Lowercase, Strip, StripAccents, Prepend, Replace (string or
// regex), Sequence. Pre-tokenizers: Split (regex or string; every behavior; invert), Digits,
// Punctuation, ByteLevel (add_prefix_space, use_regex), Metaspace (replacement, prepend_scheme,
// split), Whitespace, WhitespaceSplit, CharDelimiterSplit, Sequence. Regexes run on cbq's
// matcher in its Oniguruma dialect (regex.hpp). Anything else is an error naming the file and
// the field. See docs/FORMATS.md.
#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/tokenizer/bpe.hpp"
#include "cbq/tokenizer/byte_level_bpe.hpp"
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
      if (c.is_object() && c.contains("add_bos_token") && c["add_bos_token"].is_boolean())
        tok.add_bos_ = c["add_bos_token"].get<bool>();
      if (c.is_object() && c.contains("add_eos_token") && c["add_eos_token"].is_boolean())
        tok.add_eos_ = c["add_eos_token"].get<bool>();
    }
    return tok;
  }

  using Tokenizer::encode;
  std::vector<int32_t> encode(std::string_view text, bool bos, bool eos) const override {
    std::vector<int32_t> ids;
    if (bos) {
      CBQ_CHECK(bos_ >= 0, "{}: encode with BOS, but the tokenizer has no BOS token", source_);
      ids.push_back(bos_);
    }
    // 1. Added tokens that match the raw text.
    for (const Segment& seg : split_added(text, raw_added_, true)) {
      if (seg.token >= 0) {
        ids.push_back(seg.token);
        continue;
      }
      // 2. Normalize, then cut out the added tokens that match normalized text.
      std::string norm = normalize(text.substr(seg.begin, seg.end - seg.begin));
      for (const Segment& s2 : split_added(norm, normalized_added_, seg.begin == 0)) {
        if (s2.token >= 0) {
          ids.push_back(s2.token);
          continue;
        }
        // 3. Pre-tokenize, 4. BPE.
        std::vector<bpe::Piece> pieces{{norm.substr(s2.begin, s2.end - s2.begin), s2.at_origin}};
        for (const auto& step : steps_) step->apply(pieces);
        for (const auto& p : pieces) model_.encode_word(p.text, ids);
      }
    }
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

  int32_t vocab_size() const override { return model_.size(); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  bool add_bos() const override { return add_bos_ && bos_ >= 0; }
  bool add_eos() const override { return add_eos_ && eos_ >= 0; }
  const std::string& piece(int32_t id) const override {
    check_id(id);
    return model_.pieces[static_cast<std::size_t>(id)];
  }
  // BPE has no scores: -(rank + 1) of the merge producing the token, 0 for base tokens.
  float score(int32_t id) const override {
    check_id(id);
    const int32_t r = ranks_[static_cast<std::size_t>(id)];
    return r < 0 ? 0.0f : -static_cast<float>(r + 1);
  }
  Kind kind() const { return byte_level_ ? Kind::byte_level : Kind::sentencepiece; }
  const std::string& source() const { return source_; }
  // Id of a vocabulary piece or added token, or -1.
  int32_t find(std::string_view piece) const { return model_.find(piece); }
  bool is_added(int32_t id) const { return added_flag_[static_cast<std::size_t>(id)] != 0; }
  bool is_special_added(int32_t id) const { return special_[static_cast<std::size_t>(id)] != 0; }

  // The vocabulary as a GGUF byte-level ("gpt2") vocabulary, with the llama.cpp pre-tokenizer
  // name that splits text as this tokenizer does; a cbq::Error when there is none (a
  // SentencePiece-style tokenizer, or a pre-tokenizer llama.cpp has no name for).
  BpeVocabulary gguf_vocabulary() const {
    CBQ_CHECK(byte_level_,
              "{}: not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer): it has no GGUF "
              "'gpt2' vocabulary",
              source_);
    BpeVocabulary v;
    v.source = source_;
    v.pre = gguf_pre_name();
    const int32_t n = vocab_size();
    for (int32_t id = 0; id < n; ++id) {
      const std::string& p = model_.pieces[static_cast<std::size_t>(id)];
      TokenType t = TokenType::normal;
      if (p.empty())
        t = TokenType::unused;
      else if (is_added(id))
        t = is_special_added(id) ? TokenType::control : TokenType::user_defined;
      v.tokens.push_back(p.empty() ? fmt::format("[PAD{}]", id) : p);
      v.types.push_back(static_cast<int32_t>(t));
    }
    v.merges = merges_text_;
    v.bos = bos_;
    v.eos = eos_;
    v.unk = model_.unk;
    v.add_bos = add_bos();
    v.add_eos = add_eos();
    return v;
  }

 private:
  struct AddedToken {
    int32_t id;
    std::string content;  // as matched: raw, or normalized for normalized tokens
    bool special, lstrip, rstrip, single_word;
  };
  struct Segment {
    std::size_t begin, end;
    int32_t token;  // -1: text
    bool at_origin;
  };
  [[noreturn]] void unsupported(const std::string& field, const std::string& what) const {
    fail("{}: field \"{}\": {}", source_, field, what);
  }

  // ---- parsing ----
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
    model_.byte_fallback = m.value("byte_fallback", false);
    model_.fuse_unk = m.value("fuse_unk", false);
    model_.ignore_merges = m.value("ignore_merges", false);

    CBQ_CHECK(m.contains("vocab") && m["vocab"].is_object(), "{}: missing \"model.vocab\" object",
              source_);
    // Ids index dense tables: bound them by the number of tokens the file defines (gaps are
    // allowed while at least half the ids are used), so a huge id cannot force a huge allocation.
    const bool has_added = j.contains("added_tokens") && j["added_tokens"].is_array();
    const int64_t id_limit =
        2 * static_cast<int64_t>(m["vocab"].size() + (has_added ? j["added_tokens"].size() : 0));
    auto add_piece = [&](const std::string& piece, int64_t id, const char* field) {
      CBQ_CHECK(id >= 0 && id < id_limit,
                "{}: {}: id {} of \"{}\" out of range: the file defines {} tokens, ids must be "
                "below {}",
                source_, field, id, piece, id_limit / 2, id_limit);
      model_.ids[piece] = static_cast<int32_t>(id);
      if (static_cast<int64_t>(model_.pieces.size()) <= id)
        model_.pieces.resize(static_cast<std::size_t>(id + 1));
      model_.pieces[static_cast<std::size_t>(id)] = piece;
    };
    for (const auto& [piece, id] : m["vocab"].items()) {
      CBQ_CHECK(id.is_number_integer(), "{}: model.vocab: id of \"{}\" is not an integer", source_,
                piece);
      add_piece(piece, id.get<int64_t>(), "model.vocab");
    }
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      model_.unk = find(m["unk_token"].get<std::string>());
      CBQ_CHECK(model_.unk >= 0, "{}: model.unk_token \"{}\" is not in the vocabulary", source_,
                m["unk_token"].get<std::string>());
    }
    if (m.contains("merges") && !m["merges"].is_null()) {
      CBQ_CHECK(m["merges"].is_array(), "{}: model.merges is not an array", source_);
      // Every merge makes a token: a list far longer than the vocabulary is not a real one.
      const std::size_t max_merges = 4 * m["vocab"].size() + 1024;
      CBQ_CHECK(m["merges"].size() <= max_merges,
                "{}: model.merges has {} entries for a vocabulary of {} (at most {})", source_,
                m["merges"].size(), m["vocab"].size(), max_merges);
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
        CBQ_CHECK(find(a) >= 0 && find(b) >= 0 && find(a + b) >= 0,
                  "{}: model.merges[{}] (\"{}\", \"{}\") uses a token not in the vocabulary",
                  source_, rank, a, b);
        model_.add_merge(a, b, rank, source_);
        merges_text_.push_back(a + " " + b);
        ++rank;
      }
    }
    std::vector<AddedToken> added;
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
      for (const auto& t : j["added_tokens"]) {
        CBQ_CHECK(t.is_object() && t.contains("id") && t.contains("content") &&
                      t["content"].is_string() && t["id"].is_number_integer(),
                  "{}: added_tokens entry {} lacks an integer id or a content string", source_,
                  t.dump());
        AddedToken a{0,
                     t["content"].get<std::string>(),
                     t.value("special", false),
                     t.value("lstrip", false),
                     t.value("rstrip", false),
                     t.value("single_word", false)};
        CBQ_CHECK(!a.content.empty(), "{}: added token with id {} has empty content", source_,
                  t["id"].dump());
        const int64_t id = t["id"].get<int64_t>();
        add_piece(a.content, id, "added_tokens");
        a.id = static_cast<int32_t>(id);
        // Special tokens are not normalized unless they say so; others are by default.
        const bool normalized = t.value("normalized", !a.special);
        (normalized ? normalized_added_ : raw_added_).push_back(a);
        added.push_back(a);
      }
    }
    CBQ_CHECK(!model_.pieces.empty(), "{}: empty vocabulary", source_);
    model_.finish();
    ranks_ = model_.merge_ranks();
    const std::size_t n = model_.pieces.size();
    special_.assign(n, 0);
    added_flag_.assign(n, 0);
    for (const auto& a : added) {
      added_flag_[static_cast<std::size_t>(a.id)] = 1;
      if (a.special) special_[static_cast<std::size_t>(a.id)] = 1;
    }

    parse_normalizer(j.contains("normalizer") ? j["normalizer"] : nlohmann::json(), "normalizer");
    // Normalized added tokens match the normalized text: normalize their content once.
    for (auto& a : normalized_added_) a.content = normalize(a.content);
    std::erase_if(normalized_added_, [](const AddedToken& a) { return a.content.empty(); });
    for (auto* list : {&raw_added_, &normalized_added_})
      std::stable_sort(list->begin(), list->end(), [](const AddedToken& x, const AddedToken& y) {
        return x.content.size() > y.content.size();  // longest first at each position
      });
    for (auto [list, index] : {std::pair{&raw_added_, &raw_by_byte_},
                               std::pair{&normalized_added_, &normalized_by_byte_}})
      for (uint32_t k = 0; k < list->size(); ++k)
        (*index)[static_cast<unsigned char>((*list)[k].content[0])].push_back(k);
    parse_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json(),
                        "pre_tokenizer");
    parse_decoder(j.contains("decoder") ? j["decoder"] : nlohmann::json(), "decoder");
    parse_post_processor(j.contains("post_processor") ? j["post_processor"] : nlohmann::json(),
                         "post_processor");
    auto first_of = [&](std::initializer_list<const char*> names) {
      for (const char* nm : names)
        if (int32_t id = find(nm); id >= 0) return id;
      return int32_t{-1};
    };
    if (bos_ < 0) bos_ = first_of({"<s>", "<|begin_of_text|>", "<|endoftext|>", "</s>"});
    if (eos_ < 0) eos_ = first_of({"</s>", "<|end_of_text|>", "<|endoftext|>"});
  }

  std::string str(const nlohmann::json& n, const char* key, const std::string& field) const {
    if (!n.contains(key) || !n[key].is_string())
      unsupported(field + "." + key, "missing or not a string");
    return n[key].get<std::string>();
  }
  const nlohmann::json& list(const nlohmann::json& n, const char* key,
                             const std::string& field) const {
    if (!n.contains(key) || !n[key].is_array())
      unsupported(field + "." + key, "missing or not a list");
    return n[key];
  }
  // A Split / Replace pattern: {"String": s} (literal) or {"Regex": r}.
  regex::Regex pattern(const nlohmann::json& p, const std::string& field) const {
    if (!p.is_object()) unsupported(field, "missing or not an object");
    try {
      if (p.contains("Regex") && p["Regex"].is_string())
        return regex::Regex(p["Regex"].get<std::string>(), regex::Dialect::oniguruma);
      if (p.contains("String") && p["String"].is_string()) {
        std::string escaped;
        for (char c : p["String"].get<std::string>()) {
          if (std::string_view("\\^$.|?*+()[]{}-").find(c) != std::string_view::npos)
            escaped += '\\';
          escaped += c;
        }
        return regex::Regex(escaped, regex::Dialect::oniguruma);
      }
    } catch (const Error& e) {
      unsupported(field, e.what());
    }
    unsupported(field, "neither {\"String\": ...} nor {\"Regex\": ...}");
  }

  struct NormOp {
    enum Kind { prepend, replace, strip, lowercase, nfc, nfd, nfkc, nfkd, strip_accents } kind;
    std::string text;
    std::shared_ptr<regex::Regex> re;
    bool left = false, right = false;
  };

  void parse_normalizer(const nlohmann::json& n, const std::string& field) {
    if (n.is_null()) return;
    if (!n.is_object()) unsupported(field, "not an object");
    const std::string type = n.value("type", std::string());
    NormOp op{NormOp::prepend, {}, nullptr};
    if (type == "Sequence") {
      const auto& l = list(n, "normalizers", field);
      for (std::size_t i = 0; i < l.size(); ++i)
        parse_normalizer(l[i], fmt::format("{}.normalizers[{}]", field, i));
      return;
    } else if (type == "Prepend") {
      op.text = str(n, "prepend", field);
    } else if (type == "Replace") {
      op.kind = NormOp::replace;
      if (!n.contains("pattern")) unsupported(field + ".pattern", "missing or not an object");
      op.re = std::make_shared<regex::Regex>(pattern(n["pattern"], field + ".pattern"));
      op.text = str(n, "content", field);
    } else if (type == "Strip") {
      op.kind = NormOp::strip;
      op.left = n.value("strip_left", true);
      op.right = n.value("strip_right", true);
    } else if (type == "Lowercase") {
      op.kind = NormOp::lowercase;
    } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
      op.kind = type == "NFC"    ? NormOp::nfc
                : type == "NFD"  ? NormOp::nfd
                : type == "NFKC" ? NormOp::nfkc
                                 : NormOp::nfkd;
    } else if (type == "StripAccents") {
      op.kind = NormOp::strip_accents;
    } else {
      unsupported(field, fmt::format("normalizer \"{}\" is not supported (NFC, NFD, NFKC, NFKD, "
                                     "Lowercase, Strip, StripAccents, Prepend, Replace, Sequence)",
                                     type));
    }
    norm_ops_.push_back(std::move(op));
  }

  std::string normalize(std::string_view in) const {
    std::string s(in);
    // Chained Replace ops can grow the text exponentially: cap the growth far above what real
    // normalizers need.
    const std::size_t max_size = 64 * in.size() + 4096;
    auto check_size = [&](std::size_t n) {
      CBQ_CHECK(n <= max_size, "{}: the normalizer grows a {}-byte text beyond {} bytes", source_,
                in.size(), max_size);
    };
    std::vector<char32_t> cps;
    for (const NormOp& op : norm_ops_) {
      if (s.empty()) break;
      switch (op.kind) {
        case NormOp::prepend:
          check_size(s.size() + op.text.size());
          s = op.text + s;
          break;
        case NormOp::replace: {
          std::string r;
          const bpe::Spans spans = bpe::regex_spans(*op.re, s);
          for (const auto& [range, match] : spans) {
            if (match)
              r += op.text;
            else
              r.append(s, range.first, range.second - range.first);
            check_size(r.size());
          }
          s = std::move(r);
          break;
        }
        case NormOp::strip: {
          unicode::decode_utf8(s, cps);
          std::size_t b = 0, e = cps.size();
          if (op.left)
            while (b < e && unicode::is_white_space(cps[b])) ++b;
          if (op.right)
            while (e > b && unicode::is_white_space(cps[e - 1])) --e;
          cps = std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(b),
                                      cps.begin() + static_cast<std::ptrdiff_t>(e));
          s = unicode::encode_utf8(cps);
          break;
        }
        case NormOp::lowercase:
          unicode::decode_utf8(s, cps);
          unicode::lowercase(cps);
          s = unicode::encode_utf8(cps);
          break;
        case NormOp::strip_accents:
          unicode::decode_utf8(s, cps);
          std::erase_if(cps, [](char32_t c) { return unicode::in(c, unicode::kMark); });
          s = unicode::encode_utf8(cps);
          break;
        default: {
          unicode::decode_utf8(s, cps);
          unicode::normalize(cps, op.kind == NormOp::nfc    ? unicode::Form::nfc
                                  : op.kind == NormOp::nfd  ? unicode::Form::nfd
                                  : op.kind == NormOp::nfkc ? unicode::Form::nfkc
                                                            : unicode::Form::nfkd);
          s = unicode::encode_utf8(cps);
          check_size(s.size());
        }
      }
    }
    return s;
  }

  bpe::SplitBehavior behavior(const nlohmann::json& p, const std::string& field,
                              const char* dflt) const {
    const std::string b = p.contains("behavior") ? str(p, "behavior", field) : std::string(dflt);
    if (b == "Removed") return bpe::SplitBehavior::removed;
    if (b == "Isolated") return bpe::SplitBehavior::isolated;
    if (b == "MergedWithPrevious") return bpe::SplitBehavior::merged_with_previous;
    if (b == "MergedWithNext") return bpe::SplitBehavior::merged_with_next;
    if (b == "Contiguous") return bpe::SplitBehavior::contiguous;
    unsupported(field + ".behavior", fmt::format("unknown behavior \"{}\"", b));
  }

  void parse_pre_tokenizer(const nlohmann::json& p, const std::string& field) {
    if (p.is_null()) return;
    if (!p.is_object()) unsupported(field, "not an object");
    const std::string type = p.value("type", std::string());
    using bpe::CharSplit;
    if (type == "Sequence") {
      const auto& l = list(p, "pretokenizers", field);
      for (std::size_t i = 0; i < l.size(); ++i)
        parse_pre_tokenizer(l[i], fmt::format("{}.pretokenizers[{}]", field, i));
    } else if (type == "Split") {
      if (!p.contains("pattern")) unsupported(field + ".pattern", "missing");
      steps_.push_back(std::make_shared<bpe::RegexSplit>(pattern(p["pattern"], field + ".pattern"),
                                                         behavior(p, field, "Isolated"),
                                                         p.value("invert", false)));
    } else if (type == "Digits") {
      steps_.push_back(std::make_shared<CharSplit>(CharSplit::Kind::digits,
                                                   p.value("individual_digits", false)
                                                       ? bpe::SplitBehavior::isolated
                                                       : bpe::SplitBehavior::contiguous));
    } else if (type == "Punctuation") {
      steps_.push_back(std::make_shared<CharSplit>(CharSplit::Kind::punctuation,
                                                   behavior(p, field, "Isolated")));
    } else if (type == "WhitespaceSplit") {
      steps_.push_back(
          std::make_shared<CharSplit>(CharSplit::Kind::whitespace, bpe::SplitBehavior::removed));
    } else if (type == "Whitespace") {
      steps_.push_back(std::make_shared<bpe::RegexSplit>(
          regex::Regex("\\w+|[^\\w\\s]+", regex::Dialect::oniguruma), bpe::SplitBehavior::removed,
          true));
    } else if (type == "CharDelimiterSplit") {
      const std::string d = str(p, "delimiter", field);
      std::vector<char32_t> cps;
      unicode::decode_utf8(d, cps);
      if (cps.size() != 1) unsupported(field + ".delimiter", "not a single character");
      steps_.push_back(std::make_shared<CharSplit>(CharSplit::Kind::delimiter,
                                                   bpe::SplitBehavior::removed, cps[0]));
    } else if (type == "ByteLevel") {
      byte_level_ = true;
      steps_.push_back(std::make_shared<bpe::ByteLevelStep>(p.value("add_prefix_space", false),
                                                            p.value("use_regex", true),
                                                            regex::Dialect::oniguruma));
    } else if (type == "Metaspace") {
      replacement_ = p.contains("replacement") ? str(p, "replacement", field) : kSpm;
      bpe::MetaspaceStep::Prepend scheme = bpe::MetaspaceStep::Prepend::always;
      if (p.contains("prepend_scheme")) {
        const std::string s = str(p, "prepend_scheme", field);
        if (s == "first")
          scheme = bpe::MetaspaceStep::Prepend::first;
        else if (s == "never")
          scheme = bpe::MetaspaceStep::Prepend::never;
        else if (s != "always")
          unsupported(field + ".prepend_scheme", fmt::format("unknown value \"{}\"", s));
      } else if (!p.value("add_prefix_space", true)) {
        scheme = bpe::MetaspaceStep::Prepend::never;
      }
      steps_.push_back(
          std::make_shared<bpe::MetaspaceStep>(replacement_, scheme, p.value("split", true)));
    } else {
      unsupported(field, fmt::format("pre-tokenizer \"{}\" is not supported (Split, Digits, "
                                     "Punctuation, ByteLevel, Metaspace, Whitespace, "
                                     "WhitespaceSplit, CharDelimiterSplit, Sequence)",
                                     type));
    }
  }

  void parse_decoder(const nlohmann::json& d, const std::string& field) {
    if (d.is_null()) return;
    if (!d.is_object()) unsupported(field, "not an object");
    const std::string type = d.value("type", std::string());
    if (type == "Sequence") {
      const auto& l = list(d, "decoders", field);
      for (std::size_t i = 0; i < l.size(); ++i)
        parse_decoder(l[i], fmt::format("{}.decoders[{}]", field, i));
    } else if (type == "Strip") {
      if (d.value("content", std::string(" ")) == " " && d.value("start", 0) > 0)
        strip_leading_space_ = true;
    } else if (type == "Metaspace") {
      std::string scheme = d.contains("prepend_scheme")
                               ? str(d, "prepend_scheme", field)
                               : (d.value("add_prefix_space", true) ? "always" : "never");
      if (scheme != "never") strip_leading_space_ = true;
      if (d.contains("replacement") && d["replacement"].is_string())
        replacement_ = d["replacement"].get<std::string>();
    } else if (type == "ByteLevel" || type == "Replace" || type == "ByteFallback" ||
               type == "Fuse") {
      // Implied by the model kind.
    } else {
      unsupported(field, fmt::format("decoder \"{}\" is not supported", type));
    }
  }

  // BOS/EOS from the post-processor: TemplateProcessing's single-sequence template (special
  // tokens before / after "A"), Roberta/Bert processing's cls / sep.
  void parse_post_processor(const nlohmann::json& pp, const std::string& field) {
    if (pp.is_null()) return;
    if (!pp.is_object()) unsupported(field, "not an object");
    const std::string type = pp.value("type", std::string());
    if (type == "Sequence") {
      const auto& l = list(pp, "processors", field);
      for (std::size_t i = 0; i < l.size(); ++i)
        parse_post_processor(l[i], fmt::format("{}.processors[{}]", field, i));
    } else if (type == "TemplateProcessing") {
      const auto& single = list(pp, "single", field);
      bool seen_a = false;
      for (const auto& piece : single) {
        if (piece.contains("Sequence")) {
          seen_a = true;
        } else if (piece.contains("SpecialToken") && piece["SpecialToken"].is_object()) {
          const int32_t id = find(piece["SpecialToken"].value("id", std::string()));
          CBQ_CHECK(id >= 0, "{}: {}: special token {} is not in the vocabulary", source_, field,
                    piece["SpecialToken"].dump());
          (seen_a ? eos_ : bos_) = id;
          (seen_a ? add_eos_ : add_bos_) = true;
        }
      }
    } else if (type == "RobertaProcessing" || type == "BertProcessing") {
      for (auto [key, target, flag] :
           {std::tuple{"cls", &bos_, &add_bos_}, std::tuple{"sep", &eos_, &add_eos_}}) {
        if (!pp.contains(key) || !pp[key].is_array() || pp[key].empty() || !pp[key][0].is_string())
          unsupported(field + "." + key, "missing or not [token, id]");
        *target = find(pp[key][0].get<std::string>());
        CBQ_CHECK(*target >= 0, "{}: {}.{}: token not in the vocabulary", source_, field, key);
        *flag = true;
      }
    } else if (type != "ByteLevel") {
      unsupported(field, fmt::format("post-processor \"{}\" is not supported", type));
    }
  }

  // The llama.cpp pre-tokenizer name whose splitting equals this tokenizer's.
  std::string gguf_pre_name() const {
    auto describe = [&] {
      return fmt::format(
          "{}: its pre-tokenizer has no llama.cpp equivalent (cbq maps ByteLevel "
          "with regex, Digits + ByteLevel, Split(Llama-3 / Qwen2 regex) + "
          "ByteLevel without regex)",
          source_);
    };
    for (const NormOp& op : norm_ops_)
      CBQ_CHECK(op.kind == NormOp::nfc,
                "{}: normalizer steps other than NFC have no llama.cpp equivalent", source_);
    auto byte_level = [&](std::size_t i, bool regex) {
      auto* b = dynamic_cast<const bpe::ByteLevelStep*>(steps_[i].get());
      return b && !b->add_prefix_space() && b->use_regex() == regex;
    };
    if (steps_.size() == 1 && byte_level(0, true)) return "gpt-2";
    if (steps_.size() == 2 && byte_level(1, true))
      if (auto* d = dynamic_cast<const bpe::CharSplit*>(steps_[0].get());
          d && d->kind() == bpe::CharSplit::Kind::digits &&
          d->behavior() == bpe::SplitBehavior::isolated)
        return "smollm";
    if (steps_.size() == 2 && byte_level(1, false))
      if (auto* s = dynamic_cast<const bpe::RegexSplit*>(steps_[0].get());
          s && s->behavior() == bpe::SplitBehavior::isolated && !s->invert()) {
        const std::string& r = s->regex().pattern();
        if (r == kLlama3OnigRegex) return model_.ignore_merges ? "llama-bpe" : "dbrx";
        if (r == kQwen2OnigRegex) return "qwen2";
      }
    fail("{}", describe());
  }

  // ---- encoding ----

  // Cuts the tokens of `list` out of `text` as tokenizers' AddedVocabulary::find_matches does.
  std::vector<Segment> split_added(std::string_view text, const std::vector<AddedToken>& list,
                                   bool text_at_origin) const {
    std::vector<Segment> out;
    auto push_text = [&](std::size_t b, std::size_t e) {
      if (e > b) out.push_back({b, e, -1, text_at_origin && b == 0});
    };
    if (list.empty()) {
      push_text(0, text.size());
      return out;
    }
    std::size_t start = 0;  // end of the previous match
    std::size_t pos = 0;
    const auto& by_byte = &list == &raw_added_ ? raw_by_byte_ : normalized_by_byte_;
    while (pos < text.size()) {
      const AddedToken* match = nullptr;
      for (uint32_t k : by_byte[static_cast<unsigned char>(text[pos])])  // longest first
        if (text.compare(pos, list[k].content.size(), list[k].content) == 0) {
          match = &list[k];
          break;
        }
      if (!match) {
        ++pos;
        continue;
      }
      std::size_t b = pos, e = pos + match->content.size();
      pos = e;
      if (match->single_word && (!boundary_before(text, b) || !boundary_after(text, e))) continue;
      if (match->lstrip) b = std::max(start, space_start(text, b));
      if (match->rstrip) e = space_end(text, e);
      push_text(start, b);
      out.push_back({b, e, match->id, false});
      start = pos = e;
    }
    push_text(start, text.size());
    return out;
  }
  static bool is_word(char32_t c) {
    return unicode::in(c, unicode::kLetter | unicode::kMark | unicode::bit(unicode::tables::Nd) |
                              unicode::bit(unicode::tables::Nl) |
                              unicode::bit(unicode::tables::Pc));
  }
  static bool boundary_before(std::string_view t, std::size_t b) {
    if (b == 0) return true;
    std::size_t k = b - 1;
    while (k > 0 && (static_cast<unsigned char>(t[k]) & 0xC0) == 0x80) --k;
    char32_t c;
    return utf8::decode(t, k, c) == 0 || !is_word(c);
  }
  static bool boundary_after(std::string_view t, std::size_t e) {
    char32_t c;
    return e >= t.size() || utf8::decode(t, e, c) == 0 || !is_word(c);
  }
  static std::size_t space_start(std::string_view t, std::size_t b) {
    while (b > 0) {
      std::size_t k = b - 1;
      while (k > 0 && (static_cast<unsigned char>(t[k]) & 0xC0) == 0x80) --k;
      char32_t c;
      if (utf8::decode(t, k, c) == 0 || !unicode::is_white_space(c)) break;
      b = k;
    }
    return b;
  }
  static std::size_t space_end(std::string_view t, std::size_t e) {
    while (e < t.size()) {
      char32_t c;
      const int n = utf8::decode(t, e, c);
      if (n == 0 || !unicode::is_white_space(c)) break;
      e += static_cast<std::size_t>(n);
    }
    return e;
  }

  bool is_special(int32_t id) const {
    return id == bos_ || id == eos_ || special_[static_cast<std::size_t>(id)];
  }

  std::string token_text(int32_t id, bool at_start) const {
    const std::string& p = model_.pieces[static_cast<std::size_t>(id)];
    if (is_added(id)) return p;
    if (byte_level_) return bpe::byte_level_decode(p);
    std::string out;
    int byte = model_.byte_fallback ? utf8::parse_byte_piece(p) : -1;
    if (byte >= 0) {
      out = std::string(1, static_cast<char>(byte));
    } else {
      const std::string& rep = replacement_;
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

  inline static const std::string kSpm = "\xE2\x96\x81";  // "▁"

 public:
  // The Split regexes of Llama-3 and Qwen2 tokenizer.json files, as written there.
  inline static const std::string kLlama3OnigRegex =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
      "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  inline static const std::string kQwen2OnigRegex =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
      "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

 private:
  std::string source_;
  bpe::Model model_;
  std::vector<int32_t> ranks_;
  std::vector<std::string> merges_text_;
  std::vector<char> special_, added_flag_;
  std::vector<AddedToken> raw_added_, normalized_added_;
  // Indices into those lists by first byte, longest first.
  std::array<std::vector<uint32_t>, 256> raw_by_byte_, normalized_by_byte_;
  std::vector<NormOp> norm_ops_;
  std::vector<std::shared_ptr<const bpe::Step>> steps_;
  int32_t bos_ = -1, eos_ = -1;
  bool add_bos_ = false, add_eos_ = false;
  bool byte_level_ = false;
  std::string replacement_ = kSpm;
  bool strip_leading_space_ = false;
};

}  // namespace cbq
