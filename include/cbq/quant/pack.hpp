#pragma once
// Integer packing of quantized weights (stored codes in [0, 2^b − 1], see QuantizedWeight).
//
// 32-bit words, GPTQ style: along the input dimension (the columns of an (out, in) weight) the
// codes of a row form one little-endian bit stream in which code k occupies bits
// [b·k, b·k + b). Word w holds stream bits [32·w, 32·w + 32), its bit 0 the stream's lowest.
//   b = 2, 4, 8: 32/b whole codes per word, code k in word k/(32/b) at shift b·(k mod 32/b).
//   b = 3:       32 codes per 3 words; codes 10 and 21 straddle a word boundary exactly as
//                AutoGPTQ's pack() writes them (code 10: bits 30–31 of word 0 and bit 0 of
//                word 1; code 21: bit 31 of word 1 and bits 0–1 of word 2).
//   (b = 5, 6, 7 follow the same stream rule; GPTQ loaders only read 2, 3, 4 and 8.)
// A row of `cols` codes takes ceil(cols·b / 32) words; the unused high bits of the last word
// are zero. GPTQ checkpoints need cols·b to be a multiple of 32 (in_features % 32 == 0 covers
// every width); the packer does not require it.
// pack_u32 gives (rows, words) — row-major by output channel; pack_gptq_qweight gives GPTQ's
// qweight layout (words, rows), i.e. the transpose, the layout HF / vLLM GPTQ loaders read.
//
// Bytes, 4 bits: two codes per byte along the row, the even column in the low nibble; an odd
// last column leaves the high nibble zero. (GGUF's Q4_0 orders nibbles differently within a
// block of 32 — element j and j + 16 share a byte — the GGUF writer does its own.)
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/tensor.hpp"
#include "cbq/quant/grid.hpp"

namespace cbq::quant {

inline void check_pack_bits(const char* op, int bits) {
  CBQ_CHECK(bits >= 2 && bits <= 8, "{}: {} bits is unsupported (2 to 8)", op, bits);
}

// Words per row of `cols` codes of `bits` bits.
inline int64_t packed_words(int64_t cols, int bits) { return (cols * bits + 31) / 32; }

// Code k of one packed row.
inline uint32_t extract_code(const uint32_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t w = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint64_t v = row[w] >> shift;
  if (shift + bits > 32) v |= static_cast<uint64_t>(row[w + 1]) << (32 - shift);
  return static_cast<uint32_t>(v) & ((uint32_t{1} << bits) - 1u);
}

namespace detail {
inline void pack_row(const uint8_t* codes, int64_t cols, int bits, uint32_t* out, int64_t r,
                     const char* op) {
  const int64_t nw = packed_words(cols, bits);
  std::fill(out, out + nw, 0u);
  const uint32_t limit = uint32_t{1} << bits;
  for (int64_t k = 0; k < cols; ++k) {
    const uint32_t c = codes[k];
    CBQ_CHECK(c < limit, "{}: code {} at ({}, {}) does not fit {} bits", op, c, r, k, bits);
    const int64_t bit = k * bits;
    const int64_t w = bit >> 5;
    const int shift = static_cast<int>(bit & 31);
    out[w] |= c << shift;
    if (shift + bits > 32) out[w + 1] |= c >> (32 - shift);
  }
}
}  // namespace detail

// (rows, cols) codes → (rows, ceil(cols·bits/32)) words.
inline Tensor<uint32_t> pack_u32(const Tensor<uint8_t>& codes, int bits) {
  constexpr const char* op = "quant::pack_u32";
  check_pack_bits(op, bits);
  CBQ_CHECK(codes.ndim() == 2 && codes.is_contiguous() && codes.is_cpu(),
            "{}: codes must be a contiguous 2-D CPU tensor, got {}", op, codes.shape());
  const int64_t rows = codes.size(0), cols = codes.size(1), nw = packed_words(cols, bits);
  Tensor<uint32_t> out = Tensor<uint32_t>::empty(Shape{rows, nw});
  for (int64_t r = 0; r < rows; ++r)
    detail::pack_row(codes.data() + r * cols, cols, bits, out.data() + r * nw, r, op);
  return out;
}

// Inverse of pack_u32; `cols` is the number of codes per row (the padding is dropped).
inline Tensor<uint8_t> unpack_u32(const Tensor<uint32_t>& words, int bits, int64_t cols) {
  constexpr const char* op = "quant::unpack_u32";
  check_pack_bits(op, bits);
  CBQ_CHECK(words.ndim() == 2 && words.is_contiguous() && words.is_cpu(),
            "{}: words must be a contiguous 2-D CPU tensor, got {}", op, words.shape());
  const int64_t rows = words.size(0), nw = words.size(1);
  CBQ_CHECK(nw == packed_words(cols, bits),
            "{}: {} columns of {} bits need {} words per row, the tensor has {}", op, cols, bits,
            packed_words(cols, bits), nw);
  Tensor<uint8_t> out = Tensor<uint8_t>::empty(Shape{rows, cols});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      out[r * cols + k] = static_cast<uint8_t>(extract_code(words.data() + r * nw, k, bits));
  return out;
}

// GPTQ's qweight layout: (ceil(in·bits/32), out), word (w, o) packing codes (o, ·) of stream
// word w. codes is (out, in).
inline Tensor<uint32_t> pack_gptq_qweight(const Tensor<uint8_t>& codes, int bits) {
  Tensor<uint32_t> rowwise = pack_u32(codes, bits);
  const int64_t out = rowwise.size(0), nw = rowwise.size(1);
  Tensor<uint32_t> t = Tensor<uint32_t>::empty(Shape{nw, out});
  for (int64_t o = 0; o < out; ++o)
    for (int64_t w = 0; w < nw; ++w) t[w * out + o] = rowwise[o * nw + w];
  return t;
}
inline Tensor<uint8_t> unpack_gptq_qweight(const Tensor<uint32_t>& qweight, int bits, int64_t in) {
  CBQ_CHECK(qweight.ndim() == 2, "quant::unpack_gptq_qweight: qweight must be 2-D, got {}",
            qweight.shape());
  return unpack_u32(qweight.transpose(0, 1).contiguous(), bits, in);
}

// 4-bit byte packing: (rows, cols) → (rows, ceil(cols/2)), even column in the low nibble.
inline Tensor<uint8_t> pack_nibbles(const Tensor<uint8_t>& codes) {
  constexpr const char* op = "quant::pack_nibbles";
  CBQ_CHECK(codes.ndim() == 2 && codes.is_contiguous() && codes.is_cpu(),
            "{}: codes must be a contiguous 2-D CPU tensor, got {}", op, codes.shape());
  const int64_t rows = codes.size(0), cols = codes.size(1), nb = (cols + 1) / 2;
  Tensor<uint8_t> out(Shape{rows, nb});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const uint8_t c = codes[r * cols + k];
      CBQ_CHECK(c < 16, "{}: code {} at ({}, {}) does not fit 4 bits", op, c, r, k);
      out[r * nb + k / 2] |= static_cast<uint8_t>(k % 2 == 0 ? c : c << 4);
    }
  return out;
}
inline Tensor<uint8_t> unpack_nibbles(const Tensor<uint8_t>& packed, int64_t cols) {
  constexpr const char* op = "quant::unpack_nibbles";
  CBQ_CHECK(packed.ndim() == 2 && packed.is_contiguous() && packed.is_cpu(),
            "{}: packed must be a contiguous 2-D CPU tensor, got {}", op, packed.shape());
  const int64_t rows = packed.size(0), nb = packed.size(1);
  CBQ_CHECK(nb == (cols + 1) / 2, "{}: {} columns need {} bytes per row, the tensor has {}", op,
            cols, (cols + 1) / 2, nb);
  Tensor<uint8_t> out = Tensor<uint8_t>::empty(Shape{rows, cols});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const uint8_t b = packed[r * nb + k / 2];
      out[r * cols + k] = static_cast<uint8_t>(k % 2 == 0 ? b & 0x0F : b >> 4);
    }
  return out;
}

// A QuantizedWeight whose codes are packed into 32-bit words (pack_u32 layout).
struct PackedWeight {
  GridSpec spec;
  int64_t rows = 0, cols = 0;
  Tensor<uint32_t> words;  // (rows, packed_words(cols, bits))
  Tensor<float> scale, zero;
  std::vector<int32_t> group_index;

  static PackedWeight pack(const QuantizedWeight& q) {
    PackedWeight p;
    p.spec = q.spec;
    p.rows = q.rows();
    p.cols = q.cols();
    p.words = pack_u32(q.codes, q.spec.bits);
    p.scale = q.scale;
    p.zero = q.zero;
    p.group_index = q.group_index;
    return p;
  }
  QuantizedWeight unpack() const {
    QuantizedWeight q;
    q.spec = spec;
    q.codes = unpack_u32(words, spec.bits, cols);
    q.scale = scale;
    q.zero = zero;
    q.group_index = group_index;
    return q;
  }
  int64_t param_index(int64_t r, int64_t c) const {
    if (!group_index.empty() && spec.granularity == Granularity::per_group)
      return r * spec.groups_per_row(cols) + group_index[static_cast<std::size_t>(c)];
    return quant::param_index(spec, r, c, cols);
  }
  // x̂ = s·(q − z), q = code + qmin, read straight from the words (same arithmetic as
  // QuantizedWeight::value, so the two agree bit for bit).
  float value(int64_t r, int64_t c) const {
    const int64_t p = param_index(r, c);
    const uint32_t code = extract_code(words.data() + r * words.size(1), c, spec.bits);
    const float q = static_cast<float>(code) + static_cast<float>(spec.qmin());
    return dequantize_code(q, scale[p], zero[p]);
  }
  Tensor<float> dequantize() const {
    Tensor<float> w = Tensor<float>::empty(Shape{rows, cols});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = value(r, c);
    return w;
  }
};

}  // namespace cbq::quant
