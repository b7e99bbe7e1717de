// The comparisons of the CUDA-vs-CPU tests (tests/gpu/compare.hpp), run on the CPU so that they
// are checked where no GPU is: a NaN or an infinity on either side must fail a tolerance check
// (std::max(diff, NaN) returns diff, which once let a kernel that writes NaN pass).
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gpu/compare.hpp"

using namespace cbq::gpu_testing;

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
}  // namespace

TEST_CASE("gpu compare: max_rel_error is max |x - r| / max |r| on finite data") {
  const std::vector<double> r = {1.0, -4.0, 2.0}, x = {1.5, -4.0, 2.0};
  CHECK(max_rel_error(x, r) == 0.125);
  CHECK(max_rel_error(r, r) == 0.0);
  CHECK(max_rel_error(std::vector<double>{0, 0}, std::vector<double>{0, 0}) == 0.0);
  CHECK(max_rel_error(std::vector<double>{1e-3}, std::vector<double>{0}) == 1e-3);
  CHECK(max_rel_error(x, r, 10.0) == 0.05);  // compared at the floor when it is larger
  CHECK(std::isnan(max_rel_error(std::vector<double>{1}, std::vector<double>{1, 2})));
}

TEST_CASE("gpu compare: a NaN or an infinity on either side fails every tolerance") {
  const std::vector<float> r = {1.0f, 2.0f, 3.0f};
  for (std::size_t at = 0; at < r.size(); ++at)
    for (double bad : {kNaN, kInf, -kInf}) {
      CAPTURE(at);
      CAPTURE(bad);
      std::vector<float> x = r;
      x[at] = static_cast<float>(bad);
      const double e = max_rel_error(x, r);
      CHECK(std::isnan(e));
      CHECK_FALSE(e <= 1e30);  // what a test writes: CHECK(rel_error(...) <= tol)
      CHECK_FALSE(max_rel_error(r, x) <= 1e30);
      CHECK_FALSE(norm_rel_error(x, r) <= 1e30);
      CHECK_FALSE(norm_rel_error(r, x) <= 1e30);
      CHECK_FALSE(max_rel_error(x, r, 1.0) <= 1e30);
      const std::vector<double> bound(r.size(), 1e30);
      CHECK(count_outside(x.data(), r.data(), bound.data(), 3) == 1);
    }
  // The pattern that hid NaN, for the record: std::max drops a NaN second argument.
  CHECK(std::max(0.5, kNaN) == 0.5);
  CHECK(std::isnan(nan_max(0.5, kNaN)));
  CHECK(std::isnan(nan_max(kNaN, 0.5)));
  CHECK(nan_max(0.5, 2.0) == 2.0);
}

TEST_CASE("gpu compare: norm_rel_error and count_outside on finite data") {
  const std::vector<double> r = {3.0, 4.0}, x = {3.0, 4.5};
  CHECK(norm_rel_error(x, r) == doctest::Approx(0.1));  // 0.5 / 5
  CHECK(norm_rel_error(r, r) == 0.0);
  const std::vector<double> bound = {0.1, 0.4};
  CHECK(count_outside(x.data(), r.data(), bound.data(), 2) == 1);
  const std::vector<double> wide = {0.1, 0.5};
  CHECK(count_outside(x.data(), r.data(), wide.data(), 2) == 0);
}

TEST_CASE("gpu compare: TF32 and bfloat16 rounding of the tensor-core emulation") {
  // 1 + 2^-11 is a TF32 tie (10 mantissa bits): away from zero gives 1 + 2^-10, truncation 1.
  const float tie = 1.0f + std::ldexp(1.0f, -11);
  CHECK(round_tf32(tie) == 1.0f + std::ldexp(1.0f, -10));
  CHECK(round_tf32(-tie) == -(1.0f + std::ldexp(1.0f, -10)));
  CHECK(round_tf32(tie, Rounding::toward_zero) == 1.0f);
  CHECK(round_tf32(1.0f + std::ldexp(1.0f, -12)) == 1.0f);
  // bfloat16 (7 mantissa bits), ties to even: 1 + 2^-8 → 1, 1 + 3·2^-8 → 1 + 2^-6.
  CHECK(round_bf16(1.0f + std::ldexp(1.0f, -8)) == 1.0f);
  CHECK(round_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 1.0f + std::ldexp(1.0f, -6));
  CHECK(round_bf16(3.0f) == 3.0f);
  // Relative error within the unit roundoff of each format.
  for (float v : {0.1f, -3.7f, 1e-20f, 6.5e4f}) {
    CHECK(std::abs(round_tf32(v) - v) <= std::ldexp(std::abs(v), -11));
    CHECK(std::abs(round_tf32(v, Rounding::toward_zero) - v) <= std::ldexp(std::abs(v), -10));
    CHECK(std::abs(round_bf16(v) - v) <= std::ldexp(std::abs(v), -8));
  }
  CHECK(std::isnan(round_tf32(std::nanf(""))));
  CHECK(std::isinf(round_bf16(std::numeric_limits<float>::infinity())));
}
