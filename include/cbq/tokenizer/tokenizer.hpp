#pragma once
// The tokenizer interface shared by the llama2.c (tokenizer.bin) and Hugging Face
// (tokenizer.json) tokenizers, and the UTF-8 helpers both use.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cbq/core/error.hpp"

namespace cbq {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text`, with BOS prepended / EOS appended on request.
  virtual std::vector<int32_t> encode(std::string_view text, bool bos, bool eos) const = 0;
  // Token ids of `text` with BOS / EOS as the tokenizer adds them by default (llama.cpp's
  // add_bos / add_eos, Hugging Face's post-processor): what the reference tools produce.
  std::vector<int32_t> encode(std::string_view text) const {
    return encode(text, add_bos(), add_eos());
  }
  // The text of `ids`. Special tokens (BOS, EOS, other special added tokens) produce no text;
  // raw-byte tokens produce their byte. decode(encode(t, ...)) == t for any text the vocabulary
  // covers (invalid UTF-8 included when the tokenizer has byte fallback / is byte-level).
  virtual std::string decode(std::span<const int32_t> ids) const = 0;
  // The text that `id` contributes when it follows `prev` (for streaming generation).
  virtual std::string decode_piece(int32_t prev, int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  // Whether encode(text) prepends BOS / appends EOS (llama2.c and SentencePiece-style LLaMA
  // tokenizers: BOS; SmolLM2's and GPT-2's byte-level BPE: neither).
  virtual bool add_bos() const { return bos_id() >= 0; }
  virtual bool add_eos() const { return false; }
  // The stored string of token `id` (as in the vocabulary file) and its merge score / priority.
  virtual const std::string& piece(int32_t id) const = 0;
  virtual float score(int32_t id) const = 0;

  // Throws unless the tokenizer's vocabulary has exactly the model's size.
  void check_vocab_size(int64_t model_vocab_size, std::string_view source) const {
    CBQ_CHECK(model_vocab_size == vocab_size(),
              "{}: tokenizer has {} tokens but the model's vocabulary has {}", source, vocab_size(),
              model_vocab_size);
  }

 protected:
  void check_id(int32_t id) const {
    CBQ_CHECK(id >= 0 && id < vocab_size(), "tokenizer: token id {} out of range [0, {})", id,
              vocab_size());
  }
};

namespace utf8 {

// Length of the UTF-8 sequence starting with lead byte `c` (1 for invalid lead bytes).
inline int sequence_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}

// Decodes the code point at s[i]; returns its byte length, or 0 when the bytes there are not
// valid UTF-8 (overlong, surrogate, out of range or truncated).
inline int decode(std::string_view s, std::size_t i, char32_t& cp) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  int n = sequence_length(c);
  if (n == 1) {
    cp = c;
    return c < 0x80 ? 1 : 0;
  }
  if (i + n > s.size()) return 0;
  char32_t v = c & (0x7F >> n);
  for (int k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    v = (v << 6) | (b(i + k) & 0x3F);
  }
  static constexpr char32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < kMin[n] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  cp = v;
  return n;
}

inline void append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

inline bool valid(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    char32_t cp;
    int n = decode(s, i, cp);
    if (n == 0) return false;
    i += static_cast<std::size_t>(n);
  }
  return true;
}

// "<0xAB>" → 0xAB; -1 for anything else.
inline int parse_byte_piece(std::string_view p) {
  if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  int hi = hex(p[3]), lo = hex(p[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

}  // namespace utf8
}  // namespace cbq
