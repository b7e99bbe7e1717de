#pragma once
// Naive references shared by the tests of the softmax losses (cross_entropy, kl_softmax):
// log softmax in long double without the max shift, and logits around a huge offset.
#include <cbq/core/tensor.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "support/gradcheck.hpp"

namespace cbq::testing {

// Odd shapes every loss test runs on.
inline const Shape kLossShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{1, 4}};

// Naive log softmax of one row in long double without the max shift (long double's range
// holds exp(±1000)).
inline std::vector<long double> naive_log_softmax_row(const double* x, int64_t n,
                                                      double scale = 1.0) {
  long double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(static_cast<long double>(x[j]) * scale);
  std::vector<long double> out(n);
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<long double>(x[j]) * scale - std::log(s);
  return out;
}

// Logits centred on `offset` with O(spread) differences: a non-degenerate softmax at huge values.
inline Tensor<double> offset_logits(const Shape& shape, uint64_t seed, double offset,
                                    double spread) {
  auto x = randn<double>(shape, seed, spread);
  for (int64_t i = 0; i < x.numel(); ++i) x[i] += offset;
  return x;
}

}  // namespace cbq::testing
