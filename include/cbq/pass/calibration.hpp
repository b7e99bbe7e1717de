#pragma once
// Calibration data: N segments of L consecutive tokens drawn (seeded) from a tokenized text, as
// GPTQ/OmniQuant/CBQ do (random start offsets; segments may overlap). Reproducible across
// platforms: mt19937_64's output is fixed by the standard and the offsets use plain modular
// reduction rather than a library distribution.
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

}  // namespace cbq
