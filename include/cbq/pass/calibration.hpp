#pragma once
// Calibration data: N segments of L consecutive tokens drawn (seeded) from a tokenized text, as
// GPTQ/OmniQuant/CBQ do (random start offsets; segments may overlap). Reproducible across
// platforms: mt19937_64's output is fixed by the standard and the offsets use plain modular
// reduction rather than a library distribution.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"

namespace cbq {

struct Calibration {
  std::vector<std::vector<int32_t>> samples;  // N × L token ids
  int64_t seq_len = 0;
  uint64_t seed = 0;
  std::vector<int64_t> offsets;  // where each sample starts in the token stream

  int64_t size() const { return static_cast<int64_t>(samples.size()); }
};

inline Calibration sample_calibration(const std::vector<int32_t>& tokens, int64_t n_samples,
                                      int64_t seq_len, uint64_t seed) {
  CBQ_CHECK(n_samples >= 1 && seq_len >= 2,
            "calibration: need at least 1 sample of at least 2 tokens, got {} × {}", n_samples,
            seq_len);
  CBQ_CHECK(static_cast<int64_t>(tokens.size()) >= seq_len,
            "calibration: the text has {} tokens, fewer than one segment of {}", tokens.size(),
            seq_len);
  Calibration c;
  c.seq_len = seq_len;
  c.seed = seed;
  std::mt19937_64 rng(seed);
  const uint64_t starts = static_cast<uint64_t>(tokens.size()) - static_cast<uint64_t>(seq_len) + 1;
  for (int64_t i = 0; i < n_samples; ++i) {
    const int64_t off = static_cast<int64_t>(rng() % starts);
    c.offsets.push_back(off);
    c.samples.emplace_back(tokens.begin() + off, tokens.begin() + off + seq_len);
  }
  return c;
}

// The reference GPTQ's sampling (IST-DASLab/gptq datautils.py, get_wikitext2): Python's
// `random.seed(seed)`, then for each segment `start = random.randint(0, N - L - 1)` — so the same
// seed gives the same segments as the reference on the same tokens. Python's generator is
// MT19937 seeded by init_by_array with the seed's 32-bit words; randint draws getrandbits(k),
// k = bit length of the range, until the value is in range.
namespace detail {
class PythonRandom {
 public:
  explicit PythonRandom(uint64_t seed) {
    std::vector<uint32_t> key;
    for (uint64_t s = seed; s != 0; s >>= 32) key.push_back(static_cast<uint32_t>(s));
    if (key.empty()) key.push_back(0);
    init_genrand(19650218U);
    std::size_t i = 1, j = 0;
    for (std::size_t k = std::max<std::size_t>(kN, key.size()); k > 0; --k) {
      mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525U)) + key[j] +
               static_cast<uint32_t>(j);
      ++i;
      ++j;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
      if (j >= key.size()) j = 0;
    }
    for (std::size_t k = kN - 1; k > 0; --k) {
      mt_[i] =
          (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941U)) - static_cast<uint32_t>(i);
      ++i;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
    }
    mt_[0] = 0x80000000U;
  }
  uint32_t next() {
    if (index_ >= kN) {
      for (std::size_t k = 0; k < kN; ++k) {
        const uint32_t y = (mt_[k] & 0x80000000U) | (mt_[(k + 1) % kN] & 0x7fffffffU);
        mt_[k] = mt_[(k + 397) % kN] ^ (y >> 1) ^ ((y & 1U) ? 0x9908b0dfU : 0U);
      }
      index_ = 0;
    }
    uint32_t y = mt_[index_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= y >> 18;
    return y;
  }
  // random.randint(0, hi) for 0 <= hi < 2^32 - 1.
  uint64_t randint(uint64_t hi) {
    const uint64_t n = hi + 1;
    int k = 0;
    while ((n >> k) != 0) ++k;  // n.bit_length()
    for (;;) {
      const uint64_t r = next() >> (32 - k);
      if (r < n) return r;
    }
  }

 private:
  static constexpr std::size_t kN = 624;
  void init_genrand(uint32_t s) {
    mt_[0] = s;
    for (std::size_t i = 1; i < kN; ++i)
      mt_[i] = 1812433253U * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + static_cast<uint32_t>(i);
    index_ = kN;
  }
  uint32_t mt_[kN] = {};
  std::size_t index_ = kN;
};
}  // namespace detail

inline Calibration sample_calibration_gptq(const std::vector<int32_t>& tokens, int64_t n_samples,
                                           int64_t seq_len, uint64_t seed) {
  CBQ_CHECK(n_samples >= 1 && seq_len >= 2,
            "calibration: need at least 1 sample of at least 2 tokens, got {} × {}", n_samples,
            seq_len);
  CBQ_CHECK(static_cast<int64_t>(tokens.size()) > seq_len,
            "calibration (GPTQ sampling): the text has {} tokens, it needs more than one segment "
            "of {}",
            tokens.size(), seq_len);
  const uint64_t hi = static_cast<uint64_t>(tokens.size()) - static_cast<uint64_t>(seq_len) - 1;
  CBQ_CHECK(hi < 0xffffffffULL, "calibration (GPTQ sampling): {} tokens are too many",
            tokens.size());
  Calibration c;
  c.seq_len = seq_len;
  c.seed = seed;
  detail::PythonRandom rng(seed);
  for (int64_t i = 0; i < n_samples; ++i) {
    const auto off = static_cast<int64_t>(rng.randint(hi));
    c.offsets.push_back(off);
    c.samples.emplace_back(tokens.begin() + off, tokens.begin() + off + seq_len);
  }
  return c;
}

}  // namespace cbq
