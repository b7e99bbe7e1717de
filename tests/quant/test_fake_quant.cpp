// quant::fake_quant_weight (quant/fake_quant.hpp): forward, STE / LSQ gradients, the gradcheck
// rule near clamp edges. CUDA parity: tests/gpu/test_fake_quant.cu.
#include <cbq/quant/fake_quant.hpp>

#include "quant/quant_common.hpp"

using namespace cbq;
using cbq::quant::Granularity;
using cbq::quant::GridSpec;
using cbq::testing::make_spec;
using cbq::testing::randn;
using cbq::testing::surrogate_check;

namespace {

// The surrogate of fake_quant_weight: round(v) replaced by v + δ with δ = round(v0) − v0 frozen
// at the evaluation point (w0, s0); the clamp region decided by the real rule at (w, s).
struct WeightSurrogate {
  GridSpec g;
  Tensor<double> z, delta;
  int64_t rows, cols;
  WeightSurrogate(const Tensor<double>& w0, const Tensor<double>& s0, Tensor<double> z_,
                  GridSpec g_)
      : g(g_), z(z_), rows(w0.size(0)), cols(w0.size(1)) {
    delta = Tensor<double>::empty(w0.shape());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const double v = w0(r, c) / s0[quant::param_index(g, r, c, cols)];
        delta(r, c) = std::nearbyint(v) - v;
      }
  }
  int region(double v, double zp) const {
    const double q = std::nearbyint(v) + zp;
    return q < g.qmin() ? -1 : (q > g.qmax() ? 1 : 0);
  }
  std::vector<int> regions(const std::vector<Tensor<double>>& in) const {
    std::vector<int> out;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t p = quant::param_index(g, r, c, cols);
        out.push_back(region(in[0](r, c) / in[1][p], z[p]));
      }
    return out;
  }
  // The rule written out in closed form: w_i is excluded when w_i/s + z lies within margin·eps/s
  // of a clamp edge (qmax + ½ or qmin − ½); s_p when one of its elements lies within
  // margin·eps·|v|/s of one (∂v/∂s = −v/s).
  std::pair<std::set<int64_t>, std::set<int64_t>> predicted(const Tensor<double>& w,
                                                            const Tensor<double>& s, double eps,
                                                            double margin = 4.0) const {
    std::set<int64_t> pw, ps;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t p = quant::param_index(g, r, c, cols);
        const double v = w(r, c) / s[p], a = v + z[p];
        const double d = std::min(std::abs(a - (g.qmax() + 0.5)), std::abs(a - (g.qmin() - 0.5)));
        if (d < margin * eps / s[p]) pw.insert(r * cols + c);
        if (d < margin * eps * std::abs(v) / s[p]) ps.insert(p);
      }
    return {pw, ps};
  }
  Tensor<double> forward(const std::vector<Tensor<double>>& in) const {
    Tensor<double> y = Tensor<double>::empty(in[0].shape());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t p = quant::param_index(g, r, c, cols);
        const double s = in[1][p], zp = z[p], v = in[0](r, c) / s;
        const int reg = region(v, zp);
        const double bound = reg < 0 ? g.qmin() : g.qmax();
        y(r, c) = reg == 0 ? s * (v + delta(r, c)) : s * (bound - zp);
      }
    return y;
  }
};

struct FakeQuantCase {
  Tensor<double> w, s, z;
  GridSpec g;
};
// A weight with RTN parameters shrunk by 10 % so that some codes clamp at both ends.
FakeQuantCase make_case(GridSpec g, uint64_t seed, int64_t rows = 5, int64_t cols = 40) {
  FakeQuantCase c;
  c.g = g;
  c.w = randn<double>(Shape{rows, cols}, seed, 0.1);
  quant::init_minmax(c.w, g, c.s, c.z);
  for (int64_t i = 0; i < c.s.numel(); ++i) c.s[i] *= 0.9;
  return c;
}

}  // namespace

TEST_CASE("fake_quant: forward matches s*(clamp(round(w/s)+z)-z) with half-to-even rounding") {
  GridSpec g = make_spec(2, false, Granularity::per_tensor);
  Tensor<double> w = Tensor<double>::from({0.25, 0.75, -0.25, 1.25, 9.0, -9.0}, Shape{1, 6});
  Tensor<double> s = Tensor<double>::full(Shape{1, 1}, 0.5),
                 z = Tensor<double>::full(Shape{1, 1}, 1);
  // v = 0.5 → 0 (even), 1.5 → 2, −0.5 → −0 → q 1, 2.5 → 2 → q 3, 18 → clamp 3, −18 → clamp 0
  Tensor<double> y = quant::fake_quant_weight_value(w, s, z, g);
  const std::vector<double> expect{0.0, 1.0, 0.0, 1.0, 1.0, -0.5};
  for (int64_t i = 0; i < 6; ++i) CHECK(y[i] == expect[static_cast<std::size_t>(i)]);
}

TEST_CASE("fake_quant: gradient to w is straight-through (1 inside the clamp range, 0 outside)") {
  FakeQuantCase c = make_case(make_spec(3, false, Granularity::per_group), 3);
  Tape<double> tape;
  auto w = tape.input(c.w);
  auto out = quant::fake_quant_weight(w, tape.input(c.s), c.z, c.g);
  out.grad().fill(1.0);
  tape.backward_from_seeded();
  int64_t inside = 0, outside = 0;
  for (int64_t r = 0; r < 5; ++r)
    for (int64_t k = 0; k < 40; ++k) {
      const int64_t p = quant::param_index(c.g, r, k, 40);
      const double q = std::nearbyint(c.w(r, k) / c.s[p]) + c.z[p];
      const bool in = q >= 0 && q <= 7;
      CHECK(w.grad()(r, k) == (in ? 1.0 : 0.0));
      (in ? inside : outside)++;
    }
  CHECK(outside > 0);
  CHECK(inside > outside);
}

TEST_CASE("fake_quant: STE and LSQ gradients equal the frozen-residual surrogate's (gradcheck)") {
  for (bool sym : {false, true})
    for (Granularity gr :
         {Granularity::per_tensor, Granularity::per_channel, Granularity::per_group}) {
      FakeQuantCase c = make_case(make_spec(3, sym, gr), 17 + static_cast<int>(gr));
      WeightSurrogate sur(c.w, c.s, c.z, c.g);
      testing::Builder real = [&](Tape<double>&, std::vector<Var<double>>& v) {
        return quant::fake_quant_weight(v[0], v[1], c.z, c.g, /*lsq_grad_scale=*/false);
      };
      // The surrogate is anchored: it equals the real op at the evaluation point.
      CHECK(testing::max_abs_diff(sur.forward({c.w, c.s}), testing::real_value(real, {c.w, c.s})) <
            1e-15);
      auto res = surrogate_check(
          real, [&](const std::vector<Tensor<double>>& in) { return sur.forward(in); },
          [&](const std::vector<Tensor<double>>& in) { return sur.regions(in); }, {c.w, c.s},
          {true, true});
      CAPTURE(sym);
      CAPTURE(static_cast<int>(gr));
      CHECK(res.max_rel_error < 1e-7);
      // What was excluded is exactly what the closed-form rule predicts (moving a step moves all
      // its elements, so one element near an edge excludes the step: with seed 7 the per-tensor
      // step is excluded because one element sits 2.2e-4 from qmax + 1/2).
      auto [pw, ps] = sur.predicted(c.w, c.s, 1e-6);
      CHECK(res.skipped[0] == pw);
      CHECK(res.skipped[1] == ps);
      CHECK(ps.size() < static_cast<std::size_t>(c.s.numel()));  // some step is checked
    }
}

TEST_CASE("fake_quant: LSQ step gradient equals its closed form, scaled by 1/sqrt(N*qmax)") {
  for (bool sym : {false, true}) {
    GridSpec g = make_spec(4, sym, Granularity::per_group, 16);
    FakeQuantCase c = make_case(g, 21, 4, 40);  // groups of 16, 16 and a short one of 8
    Tensor<double> G = randn<double>(c.w.shape(), 22);
    auto grad_s = [&](bool lsq) {
      Tape<double> tape;
      auto s = tape.input(c.s);
      auto out = quant::fake_quant_weight(tape.input(c.w), s, c.z, g, lsq);
      out.grad().copy_from(G);
      tape.backward_from_seeded();
      return s.grad().clone();
    };
    Tensor<double> with = grad_s(true), without = grad_s(false);
    const double qmax = static_cast<double>(g.qmax()), qmin = static_cast<double>(g.qmin());
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t k = 0; k < 3; ++k) {
        const int64_t p = r * 3 + k, c0 = k * 16, c1 = std::min<int64_t>(40, c0 + 16);
        double acc = 0;
        for (int64_t col = c0; col < c1; ++col) {
          const double v = c.w(r, col) / c.s[p], rv = std::nearbyint(v), q = rv + c.z[p];
          acc += G(r, col) * (q < qmin ? qmin - c.z[p] : q > qmax ? qmax - c.z[p] : rv - v);
        }
        const double n = static_cast<double>(c1 - c0);
        CAPTURE(p);
        CHECK(without[p] == doctest::Approx(acc).epsilon(1e-12));
        CHECK(with[p] == doctest::Approx(acc / std::sqrt(n * qmax)).epsilon(1e-12));
      }
  }
}

// The gradcheck rule: an input element is excluded iff moving it by ±eps or ±4·eps changes the
// clamp region of some output. For the weight op that is |w/s + z − (qmax + ½)| or
// |w/s + z − (qmin − ½)| below 4·eps/s for w, and, for s, a group holding such an element
// (∂v/∂s = −v/s moves every element of the group). Plant elements just inside both edges and
// check that (a) the excluded set is exactly them and their groups, (b) excluding them is
// necessary: without the rule the check fails, (c) with it the rest matches to 1e-7.
TEST_CASE("fake_quant: clamp-edge points are excluded by the gradcheck rule, exactly those") {
  GridSpec g = make_spec(3, false, Granularity::per_channel);
  FakeQuantCase c = make_case(g, 31, 4, 24);
  const double eps = 1e-6;
  struct Plant {
    int64_t r, k;
    bool top;
  };
  const std::vector<Plant> plants{{0, 3, true}, {2, 10, false}, {2, 17, true}};
  for (const Plant& pl : plants) {
    const double s = c.s[pl.r], z = c.z[pl.r];
    // 0.3·eps/s inside the edge in v units: a step of eps in w crosses it.
    const double v =
        pl.top ? (g.qmax() - z + 0.5) - 0.3 * eps / s : (g.qmin() - z - 0.5) + 0.3 * eps / s;
    c.w(pl.r, pl.k) = v * s;
  }
  WeightSurrogate sur(c.w, c.s, c.z, c.g);
  testing::Builder real = [&](Tape<double>&, std::vector<Var<double>>& v) {
    return quant::fake_quant_weight(v[0], v[1], c.z, c.g, false);
  };
  auto fwd = [&](const std::vector<Tensor<double>>& in) { return sur.forward(in); };
  auto regs = [&](const std::vector<Tensor<double>>& in) { return sur.regions(in); };
  auto with_rule = surrogate_check(real, fwd, regs, {c.w, c.s}, {true, true}, true, eps);
  std::set<int64_t> expect_w, expect_s;
  for (const Plant& pl : plants) {
    expect_w.insert(pl.r * 24 + pl.k);
    expect_s.insert(pl.r);
  }
  // The rule's prediction, written out independently of the region-change test.
  std::set<int64_t> predicted_w;
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t k = 0; k < 24; ++k) {
      const double a = c.w(r, k) / c.s[r] + c.z[r];
      const double m = 4 * eps / c.s[r];
      if (std::abs(a - (g.qmax() + 0.5)) < m || std::abs(a - (g.qmin() - 0.5)) < m)
        predicted_w.insert(r * 24 + k);
    }
  CHECK(with_rule.skipped[0] == expect_w);
  CHECK(predicted_w == expect_w);
  CHECK(with_rule.skipped[1] == expect_s);
  CHECK(with_rule.max_rel_error < 1e-7);
  auto without_rule = surrogate_check(real, fwd, regs, {c.w, c.s}, {true, true}, false, eps);
  CHECK(without_rule.max_rel_error > 1e-2);
}
