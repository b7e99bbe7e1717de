#pragma once
// Byte-level BPE as llama.cpp runs a GGUF vocabulary with tokenizer.ggml.model = "gpt2": the
// pre-tokenizer name (tokenizer.ggml.pre) selects llama.cpp's list of split regexes, control /
// user-defined / unknown tokens are cut out of the raw text first (longest first, every
// occurrence), each remaining fragment is split by the regexes in turn, mapped to the byte-level
// alphabet and merged by rank. Built from a plain BpeVocabulary (the GGUF reading glue is in
// io/gguf_export.hpp), so it can also be written back (io::export_gguf).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/tokenizer/bpe.hpp"
#include "cbq/tokenizer/tokenizer.hpp"

namespace cbq {

// llama.cpp's llama_token_type (GGUF tokenizer.ggml.token_type).
enum class TokenType : int32_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6
};

// What a GGUF byte-level ("gpt2") vocabulary holds.
struct BpeVocabulary {
  std::string source;               // names the vocabulary in errors (e.g. the file)
  std::vector<std::string> tokens;  // token texts in the byte-level alphabet ("Ġthe")
  std::vector<int32_t> types;       // TokenType per token; empty = all normal
  std::vector<std::string> merges;  // "a b" in rank order
  std::string pre;                  // llama.cpp pre-tokenizer name (tokenizer.ggml.pre)
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;
  bool add_bos = false, add_eos = false;
};

// llama.cpp's pre-tokenizer for a `pre` name: its regexes (applied in turn, each match isolated),
// whether whole pre-tokens found in the vocabulary skip the merges, and the add_bos default.
struct LlamaCppPreTokenizer {
  std::vector<std::string> regexes;
  bool ignore_merges = false;
  bool add_bos = false;
  bool no_bos = false;  // llama.cpp clears the default BOS (chatglm)
};

namespace detail {
inline const char* kLlama3Regex =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
inline const char* kGpt2NoTailRegex =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
inline const char* kQwen2Regex =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
inline const char* kPoroRegex = " ?[^(\\s|.,!?\u2026\u3002\uFF0C\u3001\u0964\u06D4\u060C)]+";
}  // namespace detail

// The pre-tokenizers of llama.cpp 0.3.16 (llama-vocab.cpp) that cbq reproduces; nullopt for a
// name cbq does not know (or refuses: kimi-k2 and superbpe, whose splitting llama.cpp does with
// code of its own; the BERT-style jina/roberta ones, which add a separator token).
inline std::optional<LlamaCppPreTokenizer> llama_cpp_pre_tokenizer(std::string_view pre) {
  using namespace detail;
  auto is = [&](std::initializer_list<const char*> names) {
    for (const char* n : names)
      if (pre == n) return true;
    return false;
  };
  LlamaCppPreTokenizer p;
  if (pre.empty() || pre == "default") {
    p.regexes = {"[\\p{P}\\$\\+<=>\\^~\\|]+", kGpt2NoTailRegex, "\\p{N}+", "[0-9][0-9][0-9]"};
  } else if (is({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                 "lfm2"})) {
    p.regexes = {kLlama3Regex};
    p.ignore_merges = true;
    p.add_bos = true;
  } else if (is({"dbrx", "smaug-bpe"})) {
    p.regexes = {kLlama3Regex};
  } else if (is({"deepseek-llm"})) {
    p.regexes = {
        "[\r\n]",
        "\\s?[A-Za-z\u00B5\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u01BA\u01BC-\u01BF\u01C4-\u0293\u0295"
        "-\u02AF\u0370-\u0373\u0376\u0377\u037B-\u037D\u037F\u0386\u0388-\u038A\u038C\u038E-\u03A1"
        "\u03A3-\u03F5\u03F7-\u0481\u048A-\u052F\u0531-\u0556\u10A0-\u10C5\u13A0-\u13F5\u13F8-"
        "\u13FD"
        "\u1C90-\u1CBA\u1CBD-\u1CBF\u1D00-\u1D2B\u1D6B-\u1D77\u1D79-\u1D9A\u1E00-\u1F15\u1F18-"
        "\u1F1D"
        "\u1F20-\u1F45\u1F48-\u1F4D\u1F50-\u1F57\u1F59\u1F5B\u1F5D\u1F5F-\u1F7D\u1F80-\u1FB4\u1FB6"
        "-\u1FBC\u1FBE\u1FC2-\u1FC4\u1FC6-\u1FCC\u1FD0-\u1FD3\u1FD6-\u1FDB\u1FE0-\u1FEC\u1FF2-"
        "\u1FF4"
        "\u1FF6-\u1FFC\u2102\u2107\u210A-\u2113\u2115\u2119-\u211D\u2124\u2126\u2128\u212A-\u212D"
        "\u212F-\u2134\u2139\u213C-\u213F\u2145-\u2149\u214E\u2183\u2184\u2C00-\u2C7B\u2C7E-\u2CE4"
        "\u2CEB-\u2CEE\u2CF2\u2CF3\uA640-\uA66D\uA680-\uA69B\uA722-\uA76F\uA771-\uA787\uA78B-\uA78E"
        "\uAB70-\uABBF\uFB00-\uFB06\uFB13-\uFB17\uFF21-\uFF3A\uFF41-\uFF5A\U00010400-\U0001044F"
        "\U000104B0-\U000104D3\U000104D8-\U000104FB\U00010C80-\U00010CB2\U00010CC0-"
        "\U00010CF2\U000118A0"
        "-\U000118DF\U0001E900-\U0001E943]+",
        "\\s?[!-/:-~\uFF01-\uFF0F\uFF1A-\uFF5E\u2018-\u201F\u3000-\u3002]+",
        "\\s+$",
        "[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+",
        "\\p{N}+",
    };
  } else if (is({"deepseek-v3", "hunyuan-dense"})) {
    p.regexes = {"\\p{N}{1,3}", "[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+",
                 "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?["
                 "\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"};
  } else if (is({"deepseek-coder"})) {
    p.regexes = {"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+",
                 "[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+", "\\p{N}"};
  } else if (is({"falcon"})) {
    p.regexes = {"[\\p{P}\\$\\+<=>\\^~\\|`]+", kGpt2NoTailRegex, "[0-9][0-9][0-9]"};
  } else if (is({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                 "minerva-7b"})) {
    p.regexes = {"\\p{N}", kGpt2NoTailRegex};
  } else if (is({"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                 "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion", "exaone4"})) {
    p.regexes = {kGpt2NoTailRegex};
  } else if (is({"stablelm2", "qwen2", "deepseek-r1-qwen", "megrez", "hunyuan"})) {
    p.regexes = {kQwen2Regex};
  } else if (is({"poro-chat", "bloom", "gpt3-finnish"})) {
    p.regexes = {kPoroRegex};
  } else if (is({"glm4", "chatglm-bpe"})) {
    p.regexes = {kLlama3Regex};
    p.no_bos = true;
  } else if (is({"viking"})) {
    p.regexes = {kPoroRegex, "\\p{N}"};
  } else if (is({"tekken"})) {
    p.regexes = {
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]"
        "?"
        "((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*["
        "\\r\\n]+|\\s+(?!\\S)|\\s+"};
    p.ignore_merges = true;
    p.add_bos = true;
  } else if (is({"gpt-4o", "llama4"})) {
    p.regexes = {
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR]["
        "eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=["
        "\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"};
  } else if (is({"bailingmoe"})) {
    p.regexes = {
        "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"};
  } else if (is({"seed-coder"})) {
    p.regexes = {
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
        "\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"};
  } else {
    return std::nullopt;
  }
  return p;
}

// The names llama_cpp_pre_tokenizer knows, for messages.
inline const char* kLlamaCppPreNames =
    "default, llama-bpe (llama3, llama-v3, falcon3, falcon-h1, pixtral, midm-2.0, lfm2), dbrx, "
    "smaug-bpe, deepseek-llm, deepseek-v3, hunyuan-dense, deepseek-coder, falcon, starcoder "
    "(refact, command-r, smollm, codeshell, exaone, minerva-7b), gpt-2 (phi-2, jina-es, jina-de, "
    "gigachat, jina-v2-es, jina-v2-de, a.x-4.0, mellum, mpt, olmo, jais, trillion, exaone4), "
    "qwen2 (stablelm2, deepseek-r1-qwen, megrez, hunyuan), poro-chat, bloom, gpt3-finnish, glm4, "
    "chatglm-bpe, viking, tekken, gpt-4o, llama4, bailingmoe, seed-coder";

class ByteLevelBpeTokenizer : public Tokenizer {
 public:
  // Checks `v` (sizes, ids, merges, pre-tokenizer name) and builds the tokenizer; a cbq::Error
  // names v.source and what is wrong.
  explicit ByteLevelBpeTokenizer(BpeVocabulary v) : vocab_(std::move(v)) {
    const std::string& src = vocab_.source;
    const int64_t n = static_cast<int64_t>(vocab_.tokens.size());
    CBQ_CHECK(n > 0, "{}: the vocabulary has no tokens", src);
    CBQ_CHECK(n <= INT32_MAX, "{}: {} tokens are too many", src, n);
    CBQ_CHECK(vocab_.types.empty() || static_cast<int64_t>(vocab_.types.size()) == n,
              "{}: {} token types for {} tokens", src, vocab_.types.size(), n);
    if (vocab_.types.empty()) vocab_.types.assign(static_cast<std::size_t>(n), 1);
    auto pre = llama_cpp_pre_tokenizer(vocab_.pre);
    CBQ_CHECK(pre.has_value(),
              "{}: pre-tokenizer '{}' (tokenizer.ggml.pre) is not supported; cbq knows: {}", src,
              vocab_.pre, kLlamaCppPreNames);
    pre_ = *pre;
    for (const std::string& r : pre_.regexes)
      steps_.emplace_back(regex::Regex(r, regex::Dialect::llama_cpp), bpe::SplitBehavior::isolated,
                          false);

    model_.pieces = vocab_.tokens;
    for (int32_t id = 0; id < static_cast<int32_t>(n); ++id) {
      std::string& t = model_.pieces[static_cast<std::size_t>(id)];
      if (t.empty()) t = fmt::format("[EMPTY_{}]", id);  // as llama.cpp
      model_.ids[t] = id;                                // the last id wins, as in llama.cpp
    }
    model_.ignore_merges = pre_.ignore_merges;
    for (std::size_t r = 0; r < vocab_.merges.size(); ++r) {
      const std::string& m = vocab_.merges[r];
      const std::size_t sp = m.find(' ', 1);
      CBQ_CHECK(sp != std::string::npos, "{}: merge {} \"{}\" is not \"a b\"", src, r, m);
      model_.add_merge(std::string_view(m).substr(0, sp), std::string_view(m).substr(sp + 1),
                       static_cast<int32_t>(r), fmt::format("{}: merges[{}]", src, r));
    }
    model_.finish();
    ranks_ = model_.merge_ranks();

    // Special ids: the defaults of llama.cpp's gpt2 vocabularies, then the file's.
    for (int32_t* id : {&vocab_.bos, &vocab_.eos, &vocab_.unk, &vocab_.pad})
      CBQ_CHECK(*id >= -1 && *id < n, "{}: special token id {} out of range [0, {})", src, *id, n);
    attrs_.resize(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < attrs_.size(); ++i) attrs_[i] = vocab_.types[i];
    // llama.cpp marks these as control (end of generation) whatever their type says.
    for (const char* eog :
         {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
          "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})
      if (int32_t id = model_.find(eog); id >= 0) {
        attrs_[static_cast<std::size_t>(id)] = static_cast<int32_t>(TokenType::control);
        eog_.push_back(id);
      }
    if (vocab_.eos >= 0 && std::find(eog_.begin(), eog_.end(), vocab_.eos) == eog_.end())
      eog_.push_back(vocab_.eos);
    for (int32_t id = 0; id < static_cast<int32_t>(n); ++id) {
      const auto t = static_cast<TokenType>(attrs_[static_cast<std::size_t>(id)]);
      if (t == TokenType::control || t == TokenType::user_defined || t == TokenType::unknown)
        special_.push_back(id);
    }
    std::stable_sort(special_.begin(), special_.end(), [&](int32_t a, int32_t b) {
      return model_.pieces[static_cast<std::size_t>(a)].size() >
             model_.pieces[static_cast<std::size_t>(b)].size();
    });
  }

  using Tokenizer::encode;
  std::vector<int32_t> encode(std::string_view text, bool bos, bool eos) const override {
    return encode(text, bos, eos, true);
  }
  // parse_special = false leaves control and unknown tokens in the text as text (what
  // llama-perplexity does); user-defined tokens are always matched (as in llama.cpp).
  std::vector<int32_t> encode(std::string_view text, bool bos, bool eos, bool parse_special) const {
    std::vector<int32_t> ids;
    if (bos) {
      CBQ_CHECK(vocab_.bos >= 0, "{}: encode with BOS, but the vocabulary has no BOS token",
                vocab_.source);
      ids.push_back(vocab_.bos);
    }
    // Fragments: text ranges (token -1) and special tokens, as tokenizer_st_partition.
    struct Fragment {
      std::size_t begin, end;
      int32_t token;
    };
    std::vector<Fragment> frags;
    if (!text.empty()) frags.push_back({0, text.size(), -1});
    for (int32_t id : special_) {
      const auto type = static_cast<TokenType>(attrs_[static_cast<std::size_t>(id)]);
      if (!parse_special && type != TokenType::user_defined) continue;
      const std::string& s = model_.pieces[static_cast<std::size_t>(id)];
      std::vector<Fragment> next;
      next.reserve(frags.size());
      for (const Fragment& f : frags) {
        if (f.token >= 0) {
          next.push_back(f);
          continue;
        }
        std::size_t pos = f.begin;
        for (;;) {
          const std::size_t m = text.substr(0, f.end).find(s, pos);
          if (m == std::string_view::npos) break;
          if (m > pos) next.push_back({pos, m, -1});
          next.push_back({m, m + s.size(), id});
          pos = m + s.size();
        }
        if (pos < f.end) next.push_back({pos, f.end, -1});
      }
      frags.swap(next);
    }
    std::vector<bpe::Piece> pieces;
    for (const Fragment& f : frags) {
      if (f.token >= 0) {
        ids.push_back(f.token);
        continue;
      }
      pieces.assign(1,
                    bpe::Piece{std::string(text.substr(f.begin, f.end - f.begin)), f.begin == 0});
      for (const auto& step : steps_) step.apply(pieces);
      for (const auto& p : pieces) model_.encode_word(bpe::byte_level_encode(p.text), ids);
    }
    if (eos) {
      CBQ_CHECK(vocab_.eos >= 0, "{}: encode with EOS, but the vocabulary has no EOS token",
                vocab_.source);
      ids.push_back(vocab_.eos);
    }
    return ids;
  }

  std::string decode(std::span<const int32_t> ids) const override {
    std::string out;
    for (int32_t id : ids) out += decode_piece(-1, id);
    return out;
  }
  // llama.cpp's token_to_piece without special tokens: control tokens give nothing, user-defined
  // ones their text, the rest their bytes.
  std::string decode_piece(int32_t /*prev*/, int32_t id) const override {
    check_id(id);
    const auto t = static_cast<TokenType>(attrs_[static_cast<std::size_t>(id)]);
    if (t == TokenType::control || t == TokenType::unused) return {};
    const std::string& p = model_.pieces[static_cast<std::size_t>(id)];
    if (t == TokenType::user_defined) return p;
    return bpe::byte_level_decode(p);
  }

  int32_t vocab_size() const override { return model_.size(); }
  int32_t bos_id() const override { return vocab_.bos; }
  int32_t eos_id() const override { return vocab_.eos; }
  bool add_bos() const override { return vocab_.add_bos; }
  bool add_eos() const override { return vocab_.add_eos; }
  const std::string& piece(int32_t id) const override {
    check_id(id);
    return vocab_.tokens[static_cast<std::size_t>(id)];
  }
  // GGUF gpt2 vocabularies carry no scores: -(rank + 1) of the merge making the token, else 0.
  float score(int32_t id) const override {
    check_id(id);
    const int32_t r = ranks_[static_cast<std::size_t>(id)];
    return r < 0 ? 0.0f : -static_cast<float>(r + 1);
  }
  // Token ids that end generation (llama.cpp's EOG set: EOS and the end-of-turn tokens).
  const std::vector<int32_t>& eog_ids() const { return eog_; }
  TokenType token_type(int32_t id) const {
    check_id(id);
    return static_cast<TokenType>(attrs_[static_cast<std::size_t>(id)]);
  }
  const BpeVocabulary& vocabulary() const { return vocab_; }
  const LlamaCppPreTokenizer& pre_tokenizer() const { return pre_; }
  int32_t find(std::string_view piece) const { return model_.find(piece); }

 private:
  BpeVocabulary vocab_;
  LlamaCppPreTokenizer pre_;
  std::vector<bpe::RegexSplit> steps_;
  bpe::Model model_;
  std::vector<int32_t> attrs_;
  std::vector<int32_t> special_;  // control / user-defined / unknown, longest first
  std::vector<int32_t> eog_;
  std::vector<int32_t> ranks_;
};

}  // namespace cbq
