#pragma once
// Small inputs shared by several test files: random token ids and hidden states, quiet pass
// options, a bitwise tensor comparison, and the shipped models folder. (The suite is compiled
// in unity batches, so a helper needed by two files lives here rather than in each.)
#include <cbq/cbq.hpp>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "support/gradcheck.hpp"

namespace cbq::testing {

inline std::filesystem::path models_dir() { return std::filesystem::path(data_dir()) / "models"; }

// n ids uniform in [0, vocab), reproducible from seed.
inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<std::size_t>(n));
  for (auto& v : t) v = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

// n hidden-state samples of shape {L, d}, standard normal.
inline std::vector<Tensor<float>> random_hidden(int64_t n, int64_t L, int64_t d, uint64_t seed) {
  std::vector<Tensor<float>> x;
  for (int64_t i = 0; i < n; ++i) x.push_back(randn<float>(Shape{L, d}, seed + i));
  return x;
}

// Pass options that print nothing, with `epochs` epochs.
inline PassOptions quiet_options(int64_t epochs = 3) {
  PassOptions o;
  o.verbose = false;
  o.epochs = epochs;
  return o;
}

inline bool same_bits(const Tensor<float>& a, const Tensor<float>& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel()) * sizeof(float)) == 0;
}

}  // namespace cbq::testing
