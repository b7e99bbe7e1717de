#pragma once
// The tokenizer a GGUF file carries in its metadata (tokenizer.ggml.*): a SentencePiece ('llama')
// vocabulary in llama2.c's layout, or byte-level BPE ('gpt2') with llama.cpp's pre-tokenizers.
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/formats/gguf.hpp"
#include "cbq/tokenizer/byte_level_bpe.hpp"
#include "cbq/tokenizer/llama2c_tokenizer.hpp"

namespace cbq {

namespace detail {

// A llama2.c tokenizer built from the GGUF vocabulary when it has llama2.c's layout (BOS 1, EOS
// 2, byte tokens <0x00>..<0xFF> at 3..258), pieces as tokenizer.bin would hold them.
inline std::shared_ptr<const Tokenizer> gguf_llama2c_tokenizer(const io::GgufFile& f, int64_t vocab,
                                                               std::string& why_not) {
  const io::GgufValue* model = f.find("tokenizer.ggml.model");
  if (!model || model->type() != io::GgufType::string || model->as_string() != "llama") {
    why_not = "the vocabulary is not a SentencePiece ('llama') one";
    return nullptr;
  }
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  try {
    tokens = f.at("tokenizer.ggml.tokens").array<std::string>();
    scores = f.at("tokenizer.ggml.scores").array<float>();
    types = f.at("tokenizer.ggml.token_type").array<int32_t>();
  } catch (const Error& e) {
    why_not = e.what();
    return nullptr;
  }
  for (std::size_t i = 0; i < scores.size(); ++i)
    CBQ_CHECK(std::isfinite(scores[i]), "{}: tokenizer.ggml.scores[{}] = {} is not finite",
              f.path(), i, scores[i]);
  if (static_cast<int64_t>(tokens.size()) != vocab || scores.size() != tokens.size() ||
      types.size() != tokens.size()) {
    why_not = fmt::format("{} tokens, {} scores, {} types for a vocabulary of {}", tokens.size(),
                          scores.size(), types.size(), vocab);
    return nullptr;
  }
  if (f.get_or<int64_t>("tokenizer.ggml.bos_token_id", 1) != 1 ||
      f.get_or<int64_t>("tokenizer.ggml.eos_token_id", 2) != 2 || vocab < 259) {
    why_not = "BOS/EOS are not 1/2 as llama2.c's tokenizer has them";
    return nullptr;
  }
  for (int b = 0; b < 256; ++b)
    if (tokens[static_cast<std::size_t>(3 + b)] != fmt::format("<0x{:02X}>", b)) {
      why_not = fmt::format("token {} is not the byte token <0x{:02X}>", 3 + b, b);
      return nullptr;
    }
  static const std::string kSpace = "\xE2\x96\x81";
  std::vector<std::string> pieces;
  int32_t max_len = 0;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    std::string s;
    const std::string& t = tokens[i];
    for (std::size_t k = 0; k < t.size();) {
      if (t.compare(k, kSpace.size(), kSpace) == 0) {
        s += ' ';
        k += kSpace.size();
      } else {
        s += t[k++];
      }
    }
    // llama2.c stores BOS/EOS as "\n<s>\n" / "\n</s>\n" so text never matches them.
    if (types[i] == static_cast<int32_t>(TokenType::control) && (i == 1 || i == 2))
      s = "\n" + s + "\n";
    max_len = std::max<int32_t>(max_len, static_cast<int32_t>(s.size()));
    pieces.push_back(std::move(s));
  }
  return std::make_shared<Llama2cTokenizer>(f.path(), std::move(pieces), std::move(scores),
                                            max_len);
}

}  // namespace detail

// The byte-level BPE vocabulary of a GGUF with tokenizer.ggml.model = "gpt2", as llama.cpp reads
// it: tokens, token types, merges, pre-tokenizer name; BOS/EOS default to 11 (llama.cpp's gpt2
// defaults) unless the file names them; add_bos defaults to the pre-tokenizer's (true for
// llama-bpe and tekken). Throws a cbq::Error naming the file for a vocabulary cbq cannot run.
inline BpeVocabulary gguf_bpe_vocabulary(const io::GgufFile& f) {
  BpeVocabulary v;
  v.source = f.path();
  try {
    v.tokens = f.at("tokenizer.ggml.tokens").array<std::string>();
    CBQ_CHECK(f.find("tokenizer.ggml.merges"), "metadata key 'tokenizer.ggml.merges' is missing");
    v.merges = f.at("tokenizer.ggml.merges").array<std::string>();
    if (const io::GgufValue* t = f.find("tokenizer.ggml.token_type")) v.types = t->array<int32_t>();
  } catch (const Error& e) {
    fail("{}: byte-level (gpt2) vocabulary: {}", f.path(), e.what());
  }
  v.pre = f.get_or<std::string>("tokenizer.ggml.pre", "");
  auto pre = llama_cpp_pre_tokenizer(v.pre);
  CBQ_CHECK(pre.has_value(),
            "{}: pre-tokenizer '{}' (tokenizer.ggml.pre) is not supported; cbq knows: {}", f.path(),
            v.pre, kLlamaCppPreNames);
  const int64_t n = static_cast<int64_t>(v.tokens.size());
  auto id_of = [&](const char* key, int32_t fallback) -> int32_t {
    if (!f.find(key)) return fallback;
    const int64_t id = f.get<int64_t>(key);
    // llama.cpp keeps its default for an id outside the vocabulary.
    return id >= 0 && id < n ? static_cast<int32_t>(id) : fallback;
  };
  const int32_t dflt = n > 11 ? 11 : -1;
  v.bos = id_of("tokenizer.ggml.bos_token_id", pre->no_bos ? -1 : dflt);
  v.eos = id_of("tokenizer.ggml.eos_token_id", dflt);
  v.unk = id_of("tokenizer.ggml.unknown_token_id", -1);
  v.pad = id_of("tokenizer.ggml.padding_token_id", -1);
  v.add_bos = f.get_or<bool>("tokenizer.ggml.add_bos_token", pre->add_bos);
  v.add_eos = f.get_or<bool>("tokenizer.ggml.add_eos_token", false);
  return v;
}

// The file's tokenizer: llama2.c layout of a SentencePiece ('llama') vocabulary, or byte-level
// BPE ('gpt2'); null with the reason in `why_not` for other vocabularies (and none). A 'gpt2'
// vocabulary cbq cannot run is an error, not a silent "no tokenizer".
inline std::shared_ptr<const Tokenizer> gguf_tokenizer(const io::GgufFile& f, int64_t vocab,
                                                       std::string& why_not) {
  const io::GgufValue* model = f.find("tokenizer.ggml.model");
  if (model && model->type() == io::GgufType::string && model->as_string() == "gpt2") {
    auto tok = std::make_shared<ByteLevelBpeTokenizer>(gguf_bpe_vocabulary(f));
    CBQ_CHECK(tok->vocab_size() <= vocab,
              "{}: the vocabulary has {} tokens but token_embd.weight only {} rows", f.path(),
              tok->vocab_size(), vocab);
    return tok;
  }
  return detail::gguf_llama2c_tokenizer(f, vocab, why_not);
}

}  // namespace cbq
