// Integer packing (quant/pack.hpp): 32-bit GPTQ-style words (every width, AutoGPTQ's 3-bit
// layout), 4-bit bytes, dequantization straight from the packed form. CPU only (no CUDA kernel).
#include <cbq/quant/fake_quant.hpp>
#include <cbq/quant/pack.hpp>

#include "quant/quant_common.hpp"

using namespace cbq;
using cbq::quant::GridSpec;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
Tensor<uint8_t> random_codes(int64_t rows, int64_t cols, int bits, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(0, (1 << bits) - 1);
  Tensor<uint8_t> t = Tensor<uint8_t>::empty(Shape{rows, cols});
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<uint8_t>(dist(rng));
  return t;
}

// AutoGPTQ's QuantLinear.pack loop for one column of intweight (the input dimension), written as
// in its Python source: 2/4/8 bits word by word, 3 bits in blocks of 32 codes → 3 words.
std::vector<uint32_t> autogptq_pack(const std::vector<uint32_t>& iw, int bits) {
  std::vector<uint32_t> q(iw.size() / 32 * static_cast<std::size_t>(bits), 0u);
  std::size_t i = 0, row = 0;
  while (row < q.size()) {
    if (bits == 2 || bits == 4 || bits == 8) {
      for (std::size_t j = i; j < i + 32 / bits; ++j) q[row] |= iw[j] << (bits * (j - i));
      i += 32 / bits;
      row += 1;
    } else {  // bits == 3
      for (std::size_t j = i; j < i + 10; ++j) q[row] |= iw[j] << (3 * (j - i));
      i += 10;
      q[row] |= iw[i] << 30;
      row += 1;
      q[row] |= (iw[i] >> 2) & 1;
      i += 1;
      for (std::size_t j = i; j < i + 10; ++j) q[row] |= iw[j] << (3 * (j - i) + 1);
      i += 10;
      q[row] |= iw[i] << 31;
      row += 1;
      q[row] |= (iw[i] >> 1) & 0x3;
      i += 1;
      for (std::size_t j = i; j < i + 10; ++j) q[row] |= iw[j] << (3 * (j - i) + 2);
      i += 10;
      row += 1;
    }
  }
  return q;
}
}  // namespace

TEST_CASE("pack: u32 round trip for every width and odd column counts, zero padding") {
  for (int bits = 2; bits <= 8; ++bits)
    for (int64_t cols : {1, 7, 10, 11, 31, 32, 33, 97, 172}) {
      auto codes = random_codes(5, cols, bits, static_cast<uint64_t>(bits * 1000 + cols));
      auto words = quant::pack_u32(codes, bits);
      CAPTURE(bits);
      CAPTURE(cols);
      REQUIRE(words.shape() == Shape{5, (cols * bits + 31) / 32});
      auto back = quant::unpack_u32(words, bits, cols);
      CHECK(max_abs_diff(back, codes) == 0.0);
      const int64_t used = cols * bits % 32;
      if (used != 0)
        for (int64_t r = 0; r < 5; ++r) CHECK((words(r, words.size(1) - 1) >> used) == 0u);
    }
}

TEST_CASE("pack: words match AutoGPTQ's pack loop for 2, 3, 4 and 8 bits") {
  for (int bits : {2, 3, 4, 8}) {
    const int64_t in = 96, out = 3;
    auto codes = random_codes(out, in, bits, 77 + static_cast<uint64_t>(bits));  // (out, in)
    auto qweight = quant::pack_gptq_qweight(codes, bits);                        // (words, out)
    REQUIRE(qweight.shape() == Shape{in * bits / 32, out});
    for (int64_t o = 0; o < out; ++o) {
      std::vector<uint32_t> column;
      for (int64_t k = 0; k < in; ++k) column.push_back(codes(o, k));
      std::vector<uint32_t> ref = autogptq_pack(column, bits);
      for (int64_t w = 0; w < qweight.size(0); ++w) {
        CAPTURE(bits);
        CAPTURE(w);
        CHECK(qweight(w, o) == ref[static_cast<std::size_t>(w)]);
      }
    }
    CHECK(max_abs_diff(quant::unpack_gptq_qweight(qweight, bits, in), codes) == 0.0);
  }
  // A hand example: 4-bit codes 1..8 in one word, the first code in the lowest nibble.
  Tensor<uint8_t> c = Tensor<uint8_t>::from({1, 2, 3, 4, 5, 6, 7, 8}, Shape{1, 8});
  CHECK(quant::pack_u32(c, 4)[0] == 0x87654321u);
}

TEST_CASE("pack: 4-bit bytes, low nibble first, odd columns padded with a zero nibble") {
  Tensor<uint8_t> c = Tensor<uint8_t>::from({0x1, 0xA, 0xF, 0x3, 0x7}, Shape{1, 5});
  auto b = quant::pack_nibbles(c);
  REQUIRE(b.shape() == Shape{1, 3});
  CHECK(b[0] == 0xA1);
  CHECK(b[1] == 0x3F);
  CHECK(b[2] == 0x07);
  for (int64_t cols : {1, 2, 33, 172}) {
    auto codes = random_codes(4, cols, 4, 5 + static_cast<uint64_t>(cols));
    CHECK(max_abs_diff(quant::unpack_nibbles(quant::pack_nibbles(codes), cols), codes) == 0.0);
  }
}

TEST_CASE("pack: codes that do not fit and mismatched shapes are clear errors") {
  Tensor<uint8_t> c = Tensor<uint8_t>::from({1, 9, 3}, Shape{1, 3});
  CHECK_THROWS_WITH_AS(quant::pack_u32(c, 3),
                       doctest::Contains("quant::pack_u32: code 9 at (0, 1) does not fit 3 bits"),
                       cbq::Error);
  Tensor<uint8_t> n = Tensor<uint8_t>::from({1, 16}, Shape{1, 2});
  CHECK_THROWS_WITH_AS(quant::pack_nibbles(n),
                       doctest::Contains("code 16 at (0, 1) does not fit 4 bits"), cbq::Error);
  for (int bits : {1, 9})
    CHECK_THROWS_WITH_AS(quant::pack_u32(c, bits),
                         doctest::Contains(fmt::format("{} bits is unsupported", bits).c_str()),
                         cbq::Error);
  auto w = quant::pack_u32(random_codes(2, 40, 4, 1), 4);  // 5 words per row
  CHECK_THROWS_WITH_AS(
      quant::unpack_u32(w, 4, 41),
      doctest::Contains("41 columns of 4 bits need 6 words per row, the tensor has 5"), cbq::Error);
}

TEST_CASE("pack: fake-quant == QuantizedWeight == pack->unpack->dequantize == packed dequantize") {
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {false, true}) {
      GridSpec g;
      g.bits = bits;
      g.symmetric = sym;
      g.group_size = 32;  // 172 columns: five groups of 32 and a short one of 12
      auto w = randn<float>(Shape{9, 172}, 60 + bits, 0.03f);
      Tensor<float> s, z;
      quant::init_minmax(w, g, s, z);
      Tensor<float> y = quant::fake_quant_weight_value(w, s, z, g);
      quant::QuantizedWeight qw = quant::quantize_weight(w, s, z, g);
      quant::PackedWeight pw = quant::PackedWeight::pack(qw);
      quant::QuantizedWeight back = pw.unpack();
      CAPTURE(bits);
      CAPTURE(sym);
      CHECK(max_abs_diff(back.codes, qw.codes) == 0.0);
      CHECK(max_abs_diff(y, qw.dequantize()) == 0.0);
      CHECK(max_abs_diff(y, back.dequantize()) == 0.0);
      CHECK(max_abs_diff(y, pw.dequantize()) == 0.0);
      if (bits == 4) {
        auto bytes = quant::pack_nibbles(qw.codes);
        CHECK(max_abs_diff(quant::unpack_nibbles(bytes, 172), qw.codes) == 0.0);
      }
    }
}
