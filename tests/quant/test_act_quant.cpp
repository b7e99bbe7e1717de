// Activation quantizers (quant/act_quant.hpp): static per-tensor (learnable step), dynamic
// per-token with a learnable clipping logit, the bits ≥ 16 identity path, the calibration
// observer. CUDA parity: tests/gpu/test_act_quant.cu.
#include <cbq/quant/act_quant.hpp>

#include "quant/quant_common.hpp"

using namespace cbq;
using cbq::quant::GridSpec;
using cbq::testing::randn;
using cbq::testing::surrogate_check;

namespace {
GridSpec act_spec(int bits, bool sym) {
  GridSpec g;
  g.bits = bits;
  g.symmetric = sym;
  g.granularity = quant::Granularity::per_tensor;
  return g;
}
double sigmoid(double c) { return 1.0 / (1.0 + std::exp(-c)); }

// Reference of the per-token grid for one row, in plain double (independent of the op).
struct RowGrid {
  double s, zpre, z;
};
RowGrid row_grid(const double* x, int64_t d, double alpha, const GridSpec& g) {
  const double Q = static_cast<double>(g.qmax());
  if (g.symmetric) {
    double m = 0;
    for (int64_t i = 0; i < d; ++i) m = std::max(m, std::abs(x[i]));
    return {m * alpha / Q, 0, 0};
  }
  double lo = 0, hi = 0;
  for (int64_t i = 0; i < d; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const double zpre = -lo * Q / (hi - lo);
  return {(hi - lo) * alpha / Q, zpre, std::nearbyint(zpre)};
}

// Surrogate of fake_quant_act_per_token frozen at (x0, c0): round(v) → v + δ, round(z) → z + δz.
struct TokenSurrogate {
  GridSpec g;
  int64_t rows, d;
  std::vector<double> delta, delta_z;
  TokenSurrogate(const Tensor<double>& x0, double c0, GridSpec g_)
      : g(g_), rows(x0.size(0)), d(x0.size(1)) {
    for (int64_t r = 0; r < rows; ++r) {
      RowGrid t = row_grid(x0.data() + r * d, d, sigmoid(c0), g);
      delta_z.push_back(t.z - t.zpre);
      for (int64_t i = 0; i < d; ++i) {
        const double v = x0(r, i) / t.s;
        delta.push_back(std::nearbyint(v) - v);
      }
    }
  }
  int region(double v, double z) const {
    const double q = std::nearbyint(v) + z;
    return q < g.qmin() ? -1 : (q > g.qmax() ? 1 : 0);
  }
  std::vector<int> regions(const std::vector<Tensor<double>>& in) const {
    std::vector<int> out;
    for (int64_t r = 0; r < rows; ++r) {
      RowGrid t = row_grid(in[0].data() + r * d, d, sigmoid(in[1][0]), g);
      for (int64_t i = 0; i < d; ++i) out.push_back(region(in[0](r, i) / t.s, t.z));
    }
    return out;
  }
  Tensor<double> forward(const std::vector<Tensor<double>>& in) const {
    Tensor<double> y = Tensor<double>::empty(in[0].shape());
    for (int64_t r = 0; r < rows; ++r) {
      RowGrid t = row_grid(in[0].data() + r * d, d, sigmoid(in[1][0]), g);
      const double zs = t.zpre + delta_z[static_cast<std::size_t>(r)];
      for (int64_t i = 0; i < d; ++i) {
        const double v = in[0](r, i) / t.s;
        const int reg = region(v, t.z);
        const double bound = reg < 0 ? g.qmin() : g.qmax();
        y(r, i) =
            reg == 0 ? t.s * (v + delta[static_cast<std::size_t>(r * d + i)]) : t.s * (bound - zs);
      }
    }
    return y;
  }
};
}  // namespace

TEST_CASE("act_quant: bits >= 16 is the identity, bits 9 to 15 and 1 are errors") {
  Tape<double> tape;
  auto x = tape.input(randn<double>(Shape{3, 5}, 1));
  auto s = tape.input(Tensor<double>::full(Shape{1}, 0.1));
  auto c = tape.input(Tensor<double>::full(Shape{1}, 4.0));
  CHECK(quant::fake_quant_act_static(x, s, Tensor<double>(Shape{1}), act_spec(16, false)).id() ==
        x.id());
  CHECK(quant::fake_quant_act_per_token(x, c, act_spec(32, true)).id() == x.id());
  for (int bits : {1, 9, 12})
    CHECK_THROWS_WITH_AS(
        quant::fake_quant_act_per_token(x, c, act_spec(bits, false)),
        doctest::Contains(
            fmt::format("quant::fake_quant_act_per_token: {} activation bits is unsupported", bits)
                .c_str()),
        cbq::Error);
  CHECK_THROWS_WITH_AS(
      quant::fake_quant_act_static(x, tape.input(Tensor<double>::full(Shape{2}, 0.1)),
                                   Tensor<double>(Shape{1}), act_spec(8, false)),
      doctest::Contains("scale must have shape (1,), got (2,)"), cbq::Error);
}

TEST_CASE("act_quant: observer tracks min/max, rejects NaN, and init_act_static is RTN") {
  quant::MinMaxObserver<double> obs;
  obs.name = "blk.0.q_proj.input";
  obs.observe(Tensor<double>::from({-1.0, 0.5, 2.0}, Shape{3}));
  obs.observe(Tensor<double>::from({-3.0, 1.0}, Shape{2}));
  CHECK(obs.min == -3.0);
  CHECK(obs.max == 2.0);
  CHECK(obs.count == 5);
  auto p = quant::init_act_static(obs, 8);
  CHECK(p.scale == doctest::Approx(5.0 / 255));
  CHECK(p.zero == std::nearbyint(3.0 / (5.0 / 255)));
  auto ps = quant::init_act_static(obs, 8, true);
  CHECK(ps.scale == doctest::Approx(3.0 / 127));
  CHECK(ps.zero == 0);
  auto id = quant::init_act_static(obs, 16);
  CHECK(id.scale == 1.0);
  CHECK_THROWS_WITH_AS(obs.observe(Tensor<double>::from({1.0, std::nan("")}, Shape{2})),
                       doctest::Contains("MinMaxObserver 'blk.0.q_proj.input': element 1"),
                       cbq::Error);
  quant::MinMaxObserver<double> empty;
  CHECK_THROWS_AS(quant::init_act_static(empty, 8), cbq::Error);
}

TEST_CASE("act_quant: static per-tensor forward, LSQ scale over d features, surrogate gradcheck") {
  for (bool sym : {false, true}) {
    GridSpec g = act_spec(4, sym);
    Tensor<double> x = randn<double>(Shape{2, 3, 10}, 5);
    quant::MinMaxObserver<double> obs;
    obs.observe(x);
    auto p = quant::init_act_static(obs, 4, sym);
    Tensor<double> s = Tensor<double>::full(Shape{1}, p.scale * 0.8);
    Tensor<double> z = Tensor<double>::full(Shape{1}, p.zero);
    // Reference forward and LSQ step gradient with N = d = 10.
    Tape<double> tape;
    auto sv = tape.input(s);
    auto y = quant::fake_quant_act_static(tape.input(x), sv, z, g);
    REQUIRE(y.shape() == x.shape());
    Tensor<double> G = randn<double>(x.shape(), 6);
    y.grad().copy_from(G);
    tape.backward_from_seeded();
    double ds = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double v = x[i] / s[0], rv = std::nearbyint(v), q = rv + z[0];
      const double qc = std::clamp(q, double(g.qmin()), double(g.qmax()));
      CHECK(y.value()[i] == s[0] * (qc - z[0]));
      ds += G[i] * (q == qc ? rv - v : qc - z[0]);
    }
    CHECK(sv.grad()[0] == doctest::Approx(ds / std::sqrt(10.0 * g.qmax())).epsilon(1e-12));

    // Surrogate gradcheck (LSQ scale off): round frozen, region live.
    Tensor<double> x2 = x.reshape(Shape{6, 10}).clone();
    std::vector<double> delta;
    for (int64_t i = 0; i < x2.numel(); ++i)
      delta.push_back(std::nearbyint(x2[i] / s[0]) - x2[i] / s[0]);
    auto region = [&](double v) {
      const double q = std::nearbyint(v) + z[0];
      return q < g.qmin() ? -1 : (q > g.qmax() ? 1 : 0);
    };
    auto fwd = [&](const std::vector<Tensor<double>>& in) {
      Tensor<double> o = Tensor<double>::empty(in[0].shape());
      for (int64_t i = 0; i < o.numel(); ++i) {
        const double sc = in[1][0], v = in[0][i] / sc;
        const int reg = region(v);
        o[i] = reg == 0 ? sc * (v + delta[static_cast<std::size_t>(i)])
                        : sc * ((reg < 0 ? g.qmin() : g.qmax()) - z[0]);
      }
      return o;
    };
    auto regs = [&](const std::vector<Tensor<double>>& in) {
      std::vector<int> o;
      for (int64_t i = 0; i < in[0].numel(); ++i) o.push_back(region(in[0][i] / in[1][0]));
      return o;
    };
    testing::Builder real = [&](Tape<double>&, std::vector<Var<double>>& v) {
      return quant::fake_quant_act_static(v[0], v[1], z, g, false);
    };
    auto res = surrogate_check(real, fwd, regs, {x2, s}, {true, true});
    CAPTURE(sym);
    CHECK(res.max_rel_error < 1e-7);
    CHECK(res.skipped[0].empty());
  }
}

TEST_CASE("act_quant: per-token forward uses each token's range times sigmoid(c)") {
  for (bool sym : {false, true}) {
    GridSpec g = act_spec(4, sym);
    Tensor<double> x = randn<double>(Shape{4, 9}, 9);
    for (int64_t i = 0; i < 9; ++i) x(2, i) = std::abs(x(2, i)) + 0.1;  // all-positive token
    for (int64_t i = 0; i < 9; ++i) x(3, i) = 0.0;                      // constant token
    const double c = 1.3, alpha = sigmoid(c);
    Tape<double> tape;
    auto y = quant::fake_quant_act_per_token(tape.constant(x),
                                             tape.constant(Tensor<double>::full(Shape{1}, c)), g);
    for (int64_t r = 0; r < 3; ++r) {
      RowGrid t = row_grid(x.data() + r * 9, 9, alpha, g);
      if (!sym && r == 2) CHECK(t.z == 0);  // the grid holds 0: lo = 0 for an all-positive token
      for (int64_t i = 0; i < 9; ++i) {
        const double q =
            std::clamp(std::nearbyint(x(r, i) / t.s) + t.z, double(g.qmin()), double(g.qmax()));
        CHECK(y.value()(r, i) == doctest::Approx(t.s * (q - t.z)).epsilon(1e-14));
      }
    }
    for (int64_t i = 0; i < 9; ++i) CHECK(y.value()(3, i) == 0.0);
  }
}

TEST_CASE("act_quant: per-token gradients to x and c equal the frozen-residual surrogate's") {
  for (bool sym : {false, true})
    for (int bits : {4, 8}) {
      GridSpec g = act_spec(bits, sym);
      Tensor<double> x = randn<double>(Shape{5, 12}, 40 + bits);
      for (int64_t i = 0; i < 12; ++i) x(1, i) = std::abs(x(1, i)) + 0.05;  // lo floored at 0
      Tensor<double> c = Tensor<double>::full(Shape{1}, 0.7);  // α ≈ 0.67: the extremes clamp
      TokenSurrogate sur(x, c[0], g);
      testing::Builder real = [&](Tape<double>&, std::vector<Var<double>>& v) {
        return quant::fake_quant_act_per_token(v[0], v[1], g);
      };
      CHECK(testing::max_abs_diff(sur.forward({x, c}), testing::real_value(real, {x, c})) < 1e-14);
      auto res = surrogate_check(
          real, [&](const std::vector<Tensor<double>>& in) { return sur.forward(in); },
          [&](const std::vector<Tensor<double>>& in) { return sur.regions(in); }, {x, c},
          {true, true});
      CAPTURE(sym);
      CAPTURE(bits);
      CHECK(res.max_rel_error < 1e-7);
      CHECK(res.skipped[0].empty());
      CHECK(res.skipped[1].empty());
    }
}

TEST_CASE("act_quant: per-token with c = +large keeps the whole range and errors stay within s/2") {
  GridSpec g = act_spec(8, false);
  Tensor<double> x = randn<double>(Shape{3, 64}, 50);
  Tape<double> tape;
  auto y = quant::fake_quant_act_per_token(tape.constant(x),
                                           tape.constant(Tensor<double>::full(Shape{1}, 30.0)), g);
  for (int64_t r = 0; r < 3; ++r) {
    RowGrid t = row_grid(x.data() + r * 64, 64, 1.0, g);
    for (int64_t i = 0; i < 64; ++i)
      CHECK(std::abs(y.value()(r, i) - x(r, i)) <= 0.5 * t.s * (1 + 1e-12) + t.s * 0.5);
  }
}
