// The quantization grid (quant/grid.hpp): GridSpec and the compile-time Quantizer types
// (pass/policies.hpp) that produce it, bad configurations, init_minmax's RTN round-trip error
// budgets, the short last group, QuantizedWeight agreement. CUDA parity: tests/gpu/test_grid.cu.
#include <cbq/pass/policies.hpp>
#include <cbq/quant/fake_quant.hpp>

#include "quant/quant_common.hpp"

using namespace cbq;
using cbq::quant::Granularity;
using cbq::quant::GridSpec;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

// ---- compile-time properties of valid configurations (the invalid ones are in
// docs/QUANTIZATION.md: each fails to compile with the sentence quoted there) ----
using W4G128 = Quantizer<4, PerGroup<128>>;
static_assert(W4G128::bits == 4 && !W4G128::symmetric && W4G128::group_size == 128);
static_assert(W4G128::qmin == 0 && W4G128::qmax == 15);
static_assert(W4G128::spec().bits == 4 && W4G128::spec().group_size == 128);
static_assert(W4G128::spec().granularity == quant::Granularity::per_group);
using W3C = Quantizer<3, PerChannel, true>;
static_assert(W3C::qmin == -4 && W3C::qmax == 3 && W3C::spec().symmetric);
static_assert(W3C::spec().granularity == quant::Granularity::per_channel);
static_assert(Quantizer<2, PerTensor>::spec().granularity == quant::Granularity::per_tensor);
static_assert(Quantizer<8, PerGroup<32>, true>::qmin == -128);
static_assert(Quantizer<8, PerGroup<32>>::qmax == 255);
static_assert(WeightGranularity<PerTensor> && WeightGranularity<PerChannel> &&
              WeightGranularity<PerGroup<64>>);
static_assert(GranularityTag<PerToken> && !WeightGranularity<PerToken>);
static_assert(!GranularityTag<int>);
static_assert(WeightQuantizer<W4G128> && !WeightQuantizer<int>);

TEST_CASE("quantizer: spec() of compile-time quantizers matches the runtime grid") {
  constexpr GridSpec g = Quantizer<3, PerGroup<32>>::spec();
  CHECK(g.qmin() == 0);
  CHECK(g.qmax() == 7);
  CHECK(g.param_shape(5, 172) == Shape{5, 6});  // 5 full groups of 32 and a short one of 12
  constexpr GridSpec s = Quantizer<4, PerChannel, true>::spec();
  CHECK(s.qmin() == -8);
  CHECK(s.qmax() == 7);
  CHECK(s.param_shape(5, 172) == Shape{5, 1});
}

TEST_CASE("quantizer: bad runtime configurations are clear errors") {
  Tape<double> tape;
  auto w = randn<double>(Shape{4, 8}, 1);
  for (int bits : {1, 9}) {
    GridSpec g;
    g.bits = bits;
    g.granularity = Granularity::per_channel;
    Tensor<double> s = Tensor<double>::full(Shape{4, 1}, 0.1), z(Shape{4, 1});
    CHECK_THROWS_WITH_AS(
        quant::fake_quant_weight(tape.input(w), tape.input(s), z, g),
        doctest::Contains(
            fmt::format("quant::fake_quant_weight: {} bits is unsupported", bits).c_str()),
        cbq::Error);
  }
  GridSpec g0;
  g0.group_size = 0;
  Tensor<double> s, z;
  CHECK_THROWS_WITH_AS(quant::init_minmax(w, g0, s, z),
                       doctest::Contains("group size must be positive, got 0"), cbq::Error);
  CHECK_THROWS_WITH_AS(
      quant::fake_quant_weight(tape.input(w), tape.input(Tensor<double>::full(Shape{4, 1}, 0.1)),
                               Tensor<double>(Shape{4, 1}), g0),
      doctest::Contains("quant::fake_quant_weight: group size must be positive"), cbq::Error);
  GridSpec g;
  g.granularity = Granularity::per_channel;
  CHECK_THROWS_WITH_AS(
      quant::fake_quant_weight(tape.input(w), tape.input(Tensor<double>::full(Shape{4, 2}, 0.1)),
                               Tensor<double>(Shape{4, 2}), g),
      doctest::Contains("scale has shape (4, 2), expected (4, 1)"), cbq::Error);
  Tensor<double> neg = Tensor<double>::full(Shape{4, 1}, 0.1);
  neg[2] = -0.5;
  CHECK_THROWS_WITH_AS(
      quant::fake_quant_weight(tape.input(w), tape.input(neg), Tensor<double>(Shape{4, 1}), g),
      doctest::Contains("scale[2] = -0.5 is not a positive step"), cbq::Error);
  Tensor<double> badz = Tensor<double>::full(Shape{4, 1}, 2.5);
  CHECK_THROWS_WITH_AS(
      quant::fake_quant_weight(tape.input(w), tape.input(Tensor<double>::full(Shape{4, 1}, 0.1)),
                               badz, g),
      doctest::Contains("zero[0] = 2.5 is not an integer in [0, 15]"), cbq::Error);
}

namespace {
struct Budget {
  double rmse = 0, theory = 0;
};
// RMSE of RTN fake quantization and the uniform-noise budget sqrt(mean_i s_p(i)² / 12).
Budget rtn_budget(const Tensor<double>& w, const GridSpec& g) {
  Tensor<double> s, z;
  quant::init_minmax(w, g, s, z);
  Tensor<double> y = quant::fake_quant_weight_value(w, s, z, g);
  const int64_t rows = w.size(0), cols = w.size(1);
  double mse = 0, th = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const double e = y[r * cols + c] - w[r * cols + c];
      const double sp = s[quant::param_index(g, r, c, cols)];
      mse += e * e;
      th += sp * sp / 12.0;
    }
  return {std::sqrt(mse / w.numel()), std::sqrt(th / w.numel())};
}
}  // namespace

// Budget: RMSE ≤ 1.10 · s/√12 for every configuration. Uniform rounding noise gives s/√12; the
// 10 % covers the rounded zero-point, which shifts the asymmetric grid by up to s/2 so the
// group's extreme can be clipped by up to s/2 (measured: ≤ 1.02). Lower bounds:
//   Gaussian, b ≥ 3: ≥ 0.95 (the noise is close to uniform); b = 2: ≥ 0.75 (four levels are too
//   coarse for the high-resolution approximation: the extremes sit exactly on the grid).
//   Student-t (df = 3), b = 8: ≥ 0.95. At b ≤ 4 the heavy tail stretches the min/max step so far
//   that most weights fall into the zero bin, which is exactly representable: the RMSE drops
//   *below* s/√12 (measured 0.12–0.9), but s itself — hence the error relative to the weights'
//   spread — is several times the Gaussian one. Clipping the range instead (a smaller step)
//   trades that for a clamp error Σ(|w| − bound)² that the far tail makes large: the budget
//   above only holds for unclipped min/max steps.
TEST_CASE(
    "quantizer: RTN round-trip RMSE is within the s/sqrt(12) budget per bits and granularity") {
  const Shape shape{64, 172};
  for (int dist = 0; dist < 2; ++dist)
    for (int bits : {2, 3, 4, 8})
      for (int gi = 0; gi < 4; ++gi)
        for (bool sym : {false, true}) {
          GridSpec g;
          g.bits = bits;
          g.symmetric = sym;
          g.granularity = gi == 0   ? Granularity::per_tensor
                          : gi == 1 ? Granularity::per_channel
                                    : Granularity::per_group;
          g.group_size = gi == 2 ? 32 : 128;
          const uint64_t seed = 100 + bits;
          Tensor<double> w = dist == 0 ? randn<double>(shape, seed, 0.02)
                                       : cbq::testing::student_t(shape, seed, 3.0, 0.02);
          Budget b = rtn_budget(w, g);
          const double ratio = b.rmse / b.theory;
          CAPTURE(dist);
          CAPTURE(bits);
          CAPTURE(gi);
          CAPTURE(sym);
          CAPTURE(ratio);
          CHECK(ratio <= 1.10);
          if (dist == 0) CHECK(ratio >= (bits == 2 ? 0.75 : 0.95));
          if (dist == 1 && bits == 8) CHECK(ratio >= 0.95);
        }
  // The heavy tail's cost shows relative to the weights' spread: at 4 bits per channel the
  // Student-t step is several times the Gaussian one for the same scale parameter.
  GridSpec g;
  g.granularity = Granularity::per_channel;
  Budget gauss = rtn_budget(randn<double>(shape, 5, 0.02), g);
  Budget heavy = rtn_budget(cbq::testing::student_t(shape, 5, 3.0, 0.02), g);
  CHECK(heavy.theory > 1.5 * gauss.theory);
}

TEST_CASE("quantizer: the short last group (cols = 172, G = 32) gets its own min/max and LSQ N") {
  GridSpec g;
  g.bits = 4;
  g.group_size = 32;
  auto w = randn<double>(Shape{3, 172}, 11);
  // Make the last 12 columns of row 1 tiny: their own step must be tiny too.
  for (int64_t c = 160; c < 172; ++c) w(1, c) *= 1e-3;
  Tensor<double> s, z;
  quant::init_minmax(w, g, s, z);
  REQUIRE(s.shape() == Shape{3, 6});
  CHECK(s(1, 5) < 0.01 * s(1, 4));
  CHECK(quant::detail::elements_sharing(g, 1 * 6 + 5, 3, 172) == 12);
  CHECK(quant::detail::elements_sharing(g, 1 * 6 + 4, 3, 172) == 32);
  auto y = quant::fake_quant_weight_value(w, s, z, g);
  for (int64_t c = 160; c < 172; ++c) CHECK(std::abs(y(1, c) - w(1, c)) <= 0.5 * s(1, 5) + 1e-15);
  // LSQ gradient scale of the short group uses N = 12.
  Tape<double> tape;
  auto sv = tape.input(s);
  auto out = quant::fake_quant_weight(tape.input(w), sv, z, g, true);
  Tensor<double>& G = out.grad();
  G.fill(1.0);
  tape.backward_from_seeded();
  double acc = 0;
  for (int64_t c = 160; c < 172; ++c) {
    const double v = w(1, c) / s(1, 5), q = std::nearbyint(v) + z(1, 5);
    acc += (q >= 0 && q <= 15) ? std::nearbyint(v) - v : std::clamp(q, 0.0, 15.0) - z(1, 5);
  }
  CHECK(sv.grad()(1, 5) == doctest::Approx(acc / std::sqrt(12.0 * 15.0)).epsilon(1e-12));
}

TEST_CASE("quantizer: fake-quant output equals QuantizedWeight::dequantize bit for bit (float)") {
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {false, true})
      for (int gi = 0; gi < 3; ++gi) {
        GridSpec g;
        g.bits = bits;
        g.symmetric = sym;
        g.granularity = gi == 0 ? Granularity::per_tensor
                                : (gi == 1 ? Granularity::per_channel : Granularity::per_group);
        g.group_size = 32;
        auto w = randn<float>(Shape{7, 172}, 20 + bits, 0.05f);
        Tensor<float> s, z;
        quant::init_minmax(w, g, s, z);
        for (int64_t i = 0; i < s.numel(); ++i) s[i] *= 0.8f;  // some codes clamp
        Tensor<float> y = quant::fake_quant_weight_value(w, s, z, g);
        quant::QuantizedWeight qw = quant::quantize_weight(w, s, z, g);
        CAPTURE(bits);
        CAPTURE(sym);
        CAPTURE(gi);
        CHECK(max_abs_diff(y, qw.dequantize()) == 0.0);
        int64_t top = 0;
        for (int64_t i = 0; i < qw.codes.numel(); ++i) {
          CHECK(qw.codes[i] <= (1 << bits) - 1);
          top += qw.codes[i] == (1 << bits) - 1;
        }
        CHECK(top > 0);
      }
}
