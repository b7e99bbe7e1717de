// RTN weight quantization on every grid configuration.
#include <cbq/quant/rtn.hpp>
#include <cmath>
#include <vector>

#include "support/gradcheck.hpp"

using namespace cbq;
using namespace cbq::quant;
using cbq::testing::randn;

namespace {
std::vector<GridSpec> all_specs(int bits) {
  std::vector<GridSpec> specs;
  for (bool sym : {false, true}) {
    specs.push_back({bits, sym, Granularity::per_tensor, 0});
    specs.push_back({bits, sym, Granularity::per_channel, 0});
    specs.push_back({bits, sym, Granularity::per_group, 32});   // 100 = 3·32 + 4: short last group
    specs.push_back({bits, sym, Granularity::per_group, 128});  // one group longer than the row
  }
  return specs;
}
}  // namespace

TEST_CASE("rtn: codes on the grid, error at most s/2 inside the range, every configuration") {
  Tensor<float> w = randn<float>(Shape{12, 100}, 21, 0.05f);
  w(2, 99) = 0.4f;  // the short last group of row 2 gets its own, larger step
  w(5, 10) = 0.0f;
  for (int bits = 2; bits <= 8; ++bits)
    for (const GridSpec& g : all_specs(bits)) {
      CAPTURE(bits);
      CAPTURE(g.symmetric);
      CAPTURE(static_cast<int>(g.granularity));
      CAPTURE(g.group_size);
      QuantizedWeight q = rtn_quantize(w, g, "fc");
      REQUIRE(q.scale.shape() == g.param_shape(12, 100));
      Tensor<float> wq = q.dequantize();
      const int64_t levels = int64_t{1} << bits;
      int64_t violations = 0, inside = 0;
      for (int64_t r = 0; r < 12; ++r)
        for (int64_t c = 0; c < 100; ++c) {
          CHECK(q.codes(r, c) < levels);
          const int64_t p = q.param_index(r, c);
          const float s = q.scale[p], z = q.zero[p];
          const float lo = s * (static_cast<float>(g.qmin()) - z);
          const float hi = s * (static_cast<float>(g.qmax()) - z);
          const float x = w(r, c);
          // The rounded zero-point moves the grid by at most s/2, so min/max parameters leave
          // every value within s/2 of the representable range [lo, hi].
          if (x < lo - 0.5f * s * (1 + 1e-5f) || x > hi + 0.5f * s * (1 + 1e-5f)) ++violations;
          if (x >= lo && x <= hi) ++inside;
          // s/2, plus float rounding of x/s and of s·(q − z) (relative 2^-24 of |x| / s steps).
          // Inside the range and (by the above) also just outside it.
          if (std::abs(x - wq(r, c)) > 0.5f * s + 4e-7f * (std::abs(x) + s)) ++violations;
        }
      CHECK(violations == 0);
      CHECK(inside > 12 * 100 * 9 / 10);
      CHECK(wq(5, 10) == 0.0f);  // zero is exactly representable
    }
}

TEST_CASE(
    "rtn: parameters equal init_minmax per group, the short last group from its own min/max") {
  Tensor<float> w = randn<float>(Shape{4, 70}, 22);
  GridSpec g{4, false, Granularity::per_group, 32};  // groups of 32, 32, 6
  QuantizedWeight q = rtn_quantize(w, g);
  Tensor<float> s, z;
  init_minmax(w, g, s, z);
  CHECK(cbq::testing::max_abs_diff(q.scale, s) == 0);
  CHECK(cbq::testing::max_abs_diff(q.zero, z) == 0);
  for (int64_t r = 0; r < 4; ++r) {
    float lo = 0, hi = 0;
    for (int64_t c = 64; c < 70; ++c) {
      lo = std::min(lo, w(r, c));
      hi = std::max(hi, w(r, c));
    }
    CHECK(q.scale(r, 2) == doctest::Approx((hi - lo) / 15.0f));
  }
  // Per-element: code = clamp(round(w/s) + z) − qmin.
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 70; ++c) {
      const int64_t p = q.param_index(r, c);
      const float code = std::clamp(std::nearbyint(w(r, c) / q.scale[p]) + q.zero[p], 0.0f, 15.0f);
      CHECK(static_cast<float>(q.codes(r, c)) == code);
    }
}

TEST_CASE("rtn: the mean squared error shrinks about 4x per extra bit") {
  Tensor<float> w = randn<float>(Shape{64, 256}, 23);
  double prev = 1e300;
  for (int bits = 2; bits <= 8; ++bits) {
    Tensor<float> wq = rtn_quantize(w, {bits, false, Granularity::per_group, 64}).dequantize();
    double mse = 0;
    for (int64_t k = 0; k < w.numel(); ++k) mse += (w[k] - wq[k]) * (w[k] - wq[k]);
    mse /= static_cast<double>(w.numel());
    CAPTURE(bits);
    CHECK(mse < prev);
    if (bits >= 4) CHECK(mse < prev / 3);
    prev = mse;
  }
}

TEST_CASE("rtn: bad weights and grids are errors naming the layer and the numbers") {
  CHECK_THROWS_WITH_AS(rtn_quantize(Tensor<float>(Shape{8}), GridSpec{}, "wq"),
                       doctest::Contains("rtn(wq): weight must be 2-D (out, in), got shape (8,)"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(rtn_quantize(Tensor<float>(Shape{0, 8}), GridSpec{}, "wq"),
                       doctest::Contains("rtn(wq): empty weight of shape (0, 8)"), cbq::Error);
  CHECK_THROWS_WITH_AS(rtn_quantize(Tensor<float>(Shape{2, 8}), GridSpec{9}, "wq"),
                       doctest::Contains("9 bits is unsupported"), cbq::Error);
  CHECK_THROWS_WITH_AS(
      rtn_quantize(Tensor<float>(Shape{2, 8}), GridSpec{4, false, Granularity::per_group, 0}),
      doctest::Contains("group size must be positive, got 0"), cbq::Error);
  Tensor<float> w(Shape{2, 8});
  w(1, 3) = NAN;
  CHECK_THROWS_WITH_AS(rtn_quantize(w, GridSpec{}, "wq"),
                       doctest::Contains("rtn(wq): weight element (1, 3) is nan"), cbq::Error);
}
