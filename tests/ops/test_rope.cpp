// rope (ops/rope.hpp): forward against the naive rotation in both layouts, gradient checks,
// errors. CUDA parity: tests/gpu/test_rope.cu.
#include <cbq/ops/rope.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

// ---- RoPE reference: rotate each pair by (pos0 + t)·θ^(−2i/hd), pairs chosen by layout ----
Tensor<double> naive_rope(const Tensor<double>& x, int64_t n_heads, int64_t hd, RopeLayout layout,
                          double theta, int64_t pos0) {
  Tensor<double> y(x.shape());
  for (int64_t t = 0; t < x.size(0); ++t)
    for (int64_t h = 0; h < n_heads; ++h)
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double angle = double(pos0 + t) / std::pow(theta, 2.0 * i / hd);
        const int64_t a = h * hd + (layout == RopeLayout::interleaved ? 2 * i : i);
        const int64_t b = h * hd + (layout == RopeLayout::interleaved ? 2 * i + 1 : i + hd / 2);
        y(t, a) = x(t, a) * std::cos(angle) - x(t, b) * std::sin(angle);
        y(t, b) = x(t, a) * std::sin(angle) + x(t, b) * std::cos(angle);
      }
  return y;
}

}  // namespace

TEST_CASE("rope: forward matches the naive rotation for both layouts, float and double") {
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::rotate_half})
    for (int64_t pos0 : {0, 5}) {
      CAPTURE(int(layout));
      CAPTURE(pos0);
      const int64_t n = 7, heads = 3, hd = 6;
      auto x = randn<double>(Shape{n, heads * hd}, 31);
      Tape<double> tape;
      auto y = ops::rope(tape.constant(x), heads, hd, layout, 10000.0, pos0);
      CHECK(max_abs_diff(y.value(), naive_rope(x, heads, hd, layout, 10000.0, pos0)) < 1e-12);
      Tape<float> tape_f;
      auto yf = ops::rope(tape_f.constant(x.cast<float>()), heads, hd, layout, 10000.0, pos0);
      CHECK(max_abs_diff(yf.value(), naive_rope(x, heads, hd, layout, 10000.0, pos0)) < 1e-5);
    }
}

TEST_CASE("rope: position 0 is the identity and every pair keeps its norm") {
  const int64_t n = 9, heads = 2, hd = 8;
  auto x = randn<double>(Shape{n, heads * hd}, 32);
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::rotate_half}) {
    Tape<double> tape;
    auto y = ops::rope(tape.constant(x), heads, hd, layout, 500.0, 3).value();
    auto y0 = ops::rope(tape.constant(x.slice(0, 0, 1).clone()), heads, hd, layout, 500.0).value();
    CHECK(max_abs_diff(y0, x.slice(0, 0, 1).clone()) == 0.0);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const int64_t a = h * hd + (layout == RopeLayout::interleaved ? 2 * i : i);
          const int64_t b = h * hd + (layout == RopeLayout::interleaved ? 2 * i + 1 : i + hd / 2);
          const double before = std::hypot(x(t, a), x(t, b));
          const double after = std::hypot(y(t, a), y(t, b));
          CHECK(after == doctest::Approx(before).epsilon(1e-13));
        }
  }
}

TEST_CASE("rope: a sequence starting at pos0 equals the later rows of a longer sequence") {
  const int64_t n = 11, heads = 2, hd = 6, pos0 = 4;
  auto x = randn<double>(Shape{n, heads * hd}, 33);
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::rotate_half}) {
    Tape<double> tape;
    auto full = ops::rope(tape.constant(x), heads, hd, layout, 10000.0).value();
    auto tail =
        ops::rope(tape.constant(x.slice(0, pos0, n).clone()), heads, hd, layout, 10000.0, pos0)
            .value();
    CHECK(max_abs_diff(tail, full.slice(0, pos0, n).clone()) < 1e-14);
  }
}

TEST_CASE("rope: rotate_half on permuted features equals interleaved (HF vs llama2.c)") {
  // HF checkpoints permute q/k rows so that feature 2i ↦ i and 2i+1 ↦ i + hd/2.
  const int64_t n = 5, heads = 3, hd = 8;
  auto x = randn<double>(Shape{n, heads * hd}, 34);
  auto permute = [&](const Tensor<double>& t) {
    Tensor<double> p(t.shape());
    for (int64_t r = 0; r < n; ++r)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < hd / 2; ++i) {
          p(r, h * hd + i) = t(r, h * hd + 2 * i);
          p(r, h * hd + i + hd / 2) = t(r, h * hd + 2 * i + 1);
        }
    return p;
  };
  Tape<double> tape;
  auto inter = ops::rope(tape.constant(x), heads, hd, RopeLayout::interleaved, 10000.0, 2).value();
  auto half =
      ops::rope(tape.constant(permute(x)), heads, hd, RopeLayout::rotate_half, 10000.0, 2).value();
  CHECK(max_abs_diff(half, permute(inter)) < 1e-14);
}

TEST_CASE("rope: gradient check in double for both layouts") {
  auto x = randn<double>(Shape{7, 4 * 6}, 35);
  for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::rotate_half}) {
    CAPTURE(int(layout));
    auto r = gradcheck(
        [&](Tape<double>&, std::vector<Var<double>>& v) {
          return ops::rope(v[0], 4, 6, layout, 100.0, 3);
        },
        {x});
    CHECK(r.max_rel_error < 1e-6);
  }
}

TEST_CASE("rope: odd head_dim or a width that is not heads × head_dim names the op") {
  Tape<double> tape;
  auto x = tape.constant(randn<double>(Shape{4, 12}, 1));
  CHECK_THROWS_WITH_AS(ops::rope(x, 4, 3, RopeLayout::interleaved, 1e4),
                       doctest::Contains("rope: need n_heads > 0 and an even head_dim > 0"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::rope(x, 4, 4, RopeLayout::rotate_half, 1e4),
      doctest::Contains("rope: input (4, 12) does not match 4 heads of dimension 4"), cbq::Error);
  CHECK_THROWS_WITH_AS(ops::rope(x, 3, 4, RopeLayout::rotate_half, 1e4, -1),
                       doctest::Contains("rope: the first position must be non-negative, got -1"),
                       cbq::Error);
}
