// LoRA-Rounding: the soft weight, its gradients, the regulariser, the β schedule, the AdaRound
// start, hard rounding.
#include <cbq/quant/beta_schedule.hpp>
#include <cbq/quant/lora_rounding.hpp>
#include <cbq/quant/pack.hpp>
#include <numbers>

#include "quant/quant_common.hpp"

using namespace cbq;
using cbq::quant::Granularity;
using cbq::quant::GridSpec;
using cbq::testing::make_spec;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;
using cbq::testing::surrogate_check;

namespace {
double rect(double v) { return std::clamp(1.2 / (1.0 + std::exp(-v)) - 0.1, 0.0, 1.0); }

Tensor<double> naive_v(const Tensor<double>& A1, const Tensor<double>& A2,
                       const Tensor<double>* V0) {
  const int64_t rows = A1.size(0), r = A1.size(1), cols = A2.size(1);
  Tensor<double> V(Shape{rows, cols});
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double acc = V0 ? (*V0)(i, j) : 0.0;
      for (int64_t k = 0; k < r; ++k) acc += A1(i, k) * A2(k, j);
      V(i, j) = acc;
    }
  return V;
}

// Surrogate of the LoRA soft weight frozen at s0: floor(v) → v + φ with φ = floor(v0) − v0;
// h live; region by the real rule; plus the rectification state of h (flat low / slope / flat
// high), whose change is a kink too.
struct LoraSurrogate {
  Tensor<double> W, z, phi;
  const Tensor<double>* V0;
  GridSpec g;
  int64_t rows, cols;
  LoraSurrogate(Tensor<double> W_, const Tensor<double>& s0, Tensor<double> z_,
                const Tensor<double>* V0_, GridSpec g_)
      : W(W_), z(z_), V0(V0_), g(g_), rows(W_.size(0)), cols(W_.size(1)) {
    phi = Tensor<double>::empty(W.shape());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const double v = W(r, c) / s0[quant::param_index(g, r, c, cols)];
        phi(r, c) = std::floor(v) - v;
      }
  }
  int region(double v, double h, double zp) const {
    const double q = std::floor(v) + h + zp;
    return q < g.qmin() ? -1 : (q > g.qmax() ? 1 : 0);
  }
  static int hstate(double V) {
    const double u = 1.2 / (1.0 + std::exp(-V)) - 0.1;
    return u <= 0 ? -1 : (u >= 1 ? 1 : 0);
  }
  std::vector<int> regions(const std::vector<Tensor<double>>& in) const {
    Tensor<double> V = naive_v(in[1], in[2], V0);
    std::vector<int> out;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t p = quant::param_index(g, r, c, cols);
        out.push_back(region(W(r, c) / in[0][p], rect(V(r, c)), z[p]));
        out.push_back(hstate(V(r, c)));
      }
    return out;
  }
  Tensor<double> forward(const std::vector<Tensor<double>>& in) const {
    Tensor<double> V = naive_v(in[1], in[2], V0);
    Tensor<double> y = Tensor<double>::empty(W.shape());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t p = quant::param_index(g, r, c, cols);
        const double s = in[0][p], v = W(r, c) / s, h = rect(V(r, c));
        const int reg = region(v, h, z[p]);
        y(r, c) = reg == 0 ? s * (v + phi(r, c) + h) : s * ((reg < 0 ? g.qmin() : g.qmax()) - z[p]);
      }
    return y;
  }
};
}  // namespace

TEST_CASE("lora_rounding: rect sigmoid is 1/2 at 0, flat outside, and its inverse round-trips") {
  CHECK(quant::rect_sigmoid(0.0) == doctest::Approx(0.5).epsilon(1e-15));
  CHECK(quant::rect_sigmoid(10.0) == 1.0);
  CHECK(quant::rect_sigmoid(-10.0) == 0.0);
  CHECK(quant::rect_sigmoid_grad(10.0) == 0.0);
  CHECK(quant::rect_sigmoid_grad(0.0) == doctest::Approx(0.3));
  for (double h : {0.01, 0.3, 0.5, 0.77, 0.999})
    CHECK(quant::rect_sigmoid(quant::rect_sigmoid_inverse(h)) == doctest::Approx(h).epsilon(1e-12));
}

TEST_CASE("lora_rounding: rank is checked at compile time (>= 1) and against the layer shape") {
  static_assert(LoraRounding<5>::rank == 5);
  GridSpec g = make_spec(4, false, Granularity::per_channel);
  auto W = randn<double>(Shape{8, 16}, 1);
  Tensor<double> s, z;
  quant::init_minmax(W, g, s, z);
  auto p = LoraRounding<8>::init("blk.0.q_proj", W, s, z, g);
  CHECK(p.A1.value.shape() == Shape{8, 8});
  CHECK(p.A2.value.shape() == Shape{8, 16});
  CHECK_THROWS_WITH_AS(LoraRounding<9>::init("blk.0.q_proj", W, s, z, g),
                       doctest::Contains("LoraRounding: rank 9 exceeds min(rows, cols) = 8 of "
                                         "layer 'blk.0.q_proj' with shape (8, 16)"),
                       cbq::Error);
}

TEST_CASE("lora_rounding: initialisations, V = 0 gives h = 1/2, AdaRound start gives W back") {
  for (bool sym : {false, true}) {
    GridSpec g = make_spec(3, sym, Granularity::per_group, 16);
    auto W = randn<double>(Shape{6, 40}, 2, 0.1);
    Tensor<double> s, z;
    quant::init_minmax(W, g, s, z);
    // Half start: A1 Gaussian with std 1/sqrt(r), A2 = 0.
    auto half = quant::init_lora_rounding("l", W, s, z, g, 4, {});
    double m2 = 0;
    for (int64_t i = 0; i < half.A1.value.numel(); ++i) m2 += half.A1.value[i] * half.A1.value[i];
    CHECK(std::sqrt(m2 / 24.0) == doctest::Approx(0.5).epsilon(0.35));
    for (int64_t i = 0; i < half.A2.value.numel(); ++i) CHECK(half.A2.value[i] == 0.0);
    CHECK(half.v0() == nullptr);
    Tape<double> tape;
    auto y = quant::lora_soft_weight(W, tape.constant(s), z, tape.param(half.A1),
                                     tape.param(half.A2), half.v0(), g);
    for (int64_t r = 0; r < 6; ++r)
      for (int64_t c = 0; c < 40; ++c) {
        const int64_t p = quant::param_index(g, r, c, 40);
        const double q =
            std::clamp(std::floor(W(r, c) / s[p]) + 0.5 + z[p], double(g.qmin()), double(g.qmax()));
        CHECK(y.value()(r, c) == doctest::Approx(s[p] * (q - z[p])).epsilon(1e-14));
      }
    // AdaRound start: h(V0) = W/s − floor(W/s), so Ŵ = W wherever W/s + z is inside the grid.
    quant::LoraInit ada;
    ada.start = quant::LoraStart::adaround;
    auto a = quant::init_lora_rounding("l", W, s, z, g, 4, ada);
    REQUIRE(a.v0() != nullptr);
    auto ya = quant::lora_soft_weight(W, tape.constant(s), z, tape.param(a.A1), tape.param(a.A2),
                                      a.v0(), g);
    int64_t exact = 0;
    for (int64_t r = 0; r < 6; ++r)
      for (int64_t c = 0; c < 40; ++c) {
        const int64_t p = quant::param_index(g, r, c, 40);
        const double u = W(r, c) / s[p] + z[p];
        if (u >= g.qmin() && u <= g.qmax()) {
          CHECK(std::abs(ya.value()(r, c) - W(r, c)) <= 1e-12 * std::abs(W(r, c)) + 1e-15);
          ++exact;
        } else {
          CHECK(ya.value()(r, c) == s[p] * ((u < g.qmin() ? g.qmin() : g.qmax()) - z[p]));
        }
      }
    CHECK(exact > 200);
  }
}

TEST_CASE("lora_rounding: gradients to s, A1, A2 equal the frozen-floor surrogate's (gradcheck)") {
  for (bool sym : {false, true})
    for (bool adaround : {false, true})
      for (Granularity gr : {Granularity::per_channel, Granularity::per_group}) {
        GridSpec g = make_spec(3, sym, gr, 16);
        auto W = randn<double>(Shape{5, 40}, 3, 0.1);
        Tensor<double> s, z;
        quant::init_minmax(W, g, s, z);
        for (int64_t i = 0; i < s.numel(); ++i) s[i] *= 0.9;  // some codes clamp
        quant::LoraInit init;
        init.start = adaround ? quant::LoraStart::adaround : quant::LoraStart::half;
        init.seed = 4;
        auto p = quant::init_lora_rounding("l", W, s, z, g, 3, init);
        Tensor<double> A1 = p.A1.value.clone();
        Tensor<double> A2 = randn<double>(Shape{3, 40}, 5, 0.7);  // away from 0: h spans (0, 1)
        const Tensor<double>* V0 = p.v0();
        LoraSurrogate sur(W, s, z, V0, g);
        testing::Builder real = [&](Tape<double>&, std::vector<Var<double>>& v) {
          return quant::lora_soft_weight(W, v[0], z, v[1], v[2], V0, g, quant::RoundingMode::soft,
                                         /*lsq_grad_scale=*/false);
        };
        CHECK(max_abs_diff(sur.forward({s, A1, A2}), testing::real_value(real, {s, A1, A2})) <
              1e-15);
        auto res = surrogate_check(
            real, [&](const std::vector<Tensor<double>>& in) { return sur.forward(in); },
            [&](const std::vector<Tensor<double>>& in) { return sur.regions(in); }, {s, A1, A2},
            {true, true, true});
        CAPTURE(sym);
        CAPTURE(adaround);
        CAPTURE(static_cast<int>(gr));
        CHECK(res.max_rel_error < 1e-7);
        CHECK(res.skipped[0].size() + res.skipped[1].size() + res.skipped[2].size() == 0);
      }
}

TEST_CASE("lora_rounding: dV is zero where the code clamps or h is flat, and in hard mode") {
  GridSpec g = make_spec(2, false, Granularity::per_channel);
  auto W = randn<double>(Shape{4, 30}, 6, 0.1);
  Tensor<double> s, z;
  quant::init_minmax(W, g, s, z);
  for (int64_t i = 0; i < s.numel(); ++i) s[i] *= 0.7;
  Tensor<double> V = randn<double>(Shape{4, 30}, 7, 3.0);  // many |V| > 2.4: h flat
  for (auto mode : {quant::RoundingMode::soft, quant::RoundingMode::hard}) {
    Tape<double> tape;
    auto v = tape.input(V);
    auto y = quant::soft_round_weight(W, tape.input(s), z, v, g, mode);
    y.grad().fill(1.0);
    tape.backward_from_seeded();
    int64_t flat = 0, clamped = 0;
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t c = 0; c < 30; ++c) {
        const double h = rect(V(r, c)), q = std::floor(W(r, c) / s[r]) + h + z[r];
        const bool inside = q >= 0 && q <= 3, sloped = h > 0 && h < 1;
        flat += !sloped;
        clamped += !inside;
        const double expect = mode == quant::RoundingMode::soft && inside && sloped
                                  ? s[r] * quant::rect_sigmoid_grad(V(r, c))
                                  : 0.0;
        CHECK(v.grad()(r, c) == doctest::Approx(expect).epsilon(1e-14));
      }
    CHECK(flat > 10);
    CHECK(clamped > 3);
  }
}

TEST_CASE("lora_rounding: the regulariser's value and gradients (gradcheck), mean vs sum") {
  auto A1 = randn<double>(Shape{6, 2}, 8);
  auto A2 = randn<double>(Shape{2, 9}, 9, 1.5);
  auto V0 = randn<double>(Shape{6, 9}, 10, 0.5);
  for (double beta : {2.0, 3.5, 20.0}) {
    Tape<double> tape;
    auto sum = quant::lora_round_reg(tape.constant(A1), tape.constant(A2), &V0, beta,
                                     quant::Normalisation::sum);
    auto mean = quant::lora_round_reg(tape.constant(A1), tape.constant(A2), &V0, beta);
    Tensor<double> V = naive_v(A1, A2, &V0);
    double ref = 0;
    for (int64_t i = 0; i < V.numel(); ++i) ref += 1 - std::pow(std::abs(2 * rect(V[i]) - 1), beta);
    CHECK(sum.value()[0] == doctest::Approx(ref).epsilon(1e-13));
    CHECK(mean.value()[0] == doctest::Approx(ref / 54).epsilon(1e-13));
    for (auto norm : {quant::Normalisation::mean, quant::Normalisation::sum}) {
      auto r = testing::gradcheck(
          [&](Tape<double>&, std::vector<Var<double>>& v) {
            return quant::lora_round_reg(v[0], v[1], &V0, beta, norm);
          },
          {A1, A2});
      CAPTURE(beta);
      CHECK(r.max_rel_error < 1e-6);
    }
  }
  Tape<double> tape;
  CHECK_THROWS_WITH_AS(quant::lora_round_reg(tape.constant(A1), tape.constant(A2), &V0, 0.5),
                       doctest::Contains("quant::rounding_reg: beta = 0.5 must be at least 1"),
                       cbq::Error);
}

TEST_CASE("lora_rounding: the float regulariser keeps counting past 2^24 terms (7B-sized layers)") {
  // 5120 × 4096 = 2^24 + 2^22 terms. A float running sum stops growing at 2^24 = 16777216 (adding
  // 1 no longer changes it), and with terms near ½ it drifts long before: the sums are in double.
  const int64_t rows = 5120, cols = 4096, n = rows * cols;
  static_assert(5120 * 4096 > (1 << 24));
  {  // V = 0: h = ½ exactly in float, every term is 1, the sum is exactly n.
    Tape<float> tape;
    const Tensor<float> zeros(Shape{rows, cols});
    const float by_sum =
        quant::rounding_reg(tape.constant(zeros), 2.0f, quant::Normalisation::sum).value()[0];
    CHECK(by_sum == static_cast<float>(n));
    const float by_mean = quant::rounding_reg(tape.constant(zeros), 2.0f).value()[0];
    CHECK(by_mean == doctest::Approx(1.0).epsilon(1e-6));
    // The fused form (V = A1·A2 = 0): float row sums added in double.
    const Tensor<float> a1(Shape{rows, 2}), a2(Shape{2, cols});
    const float fused = quant::lora_round_reg(tape.constant(a1), tape.constant(a2),
                                              static_cast<const Tensor<float>*>(nullptr), 2.0f,
                                              quant::Normalisation::sum)
                            .value()[0];
    CHECK(fused == static_cast<float>(n));
  }
  {  // Random V: against the same float terms summed in double here (terms within [0, 1]).
    const Tensor<float> v = randn<float>(Shape{rows, cols}, 77);
    double ref = 0;
    for (int64_t i = 0; i < n; ++i)
      ref += static_cast<double>(1.0f -
                                 std::pow(std::abs(2.0f * quant::rect_sigmoid(v[i]) - 1.0f), 3.0f));
    Tape<float> tape;
    const double got = static_cast<double>(
        quant::rounding_reg(tape.constant(v), 3.0f, quant::Normalisation::sum).value()[0]);
    CAPTURE(ref);
    CHECK(ref > double(1 << 24));              // where a float running sum stops growing
    CHECK(std::abs(got - ref) <= 1e-7 * ref);  // one float rounding of the total (6e-8)
  }
}

TEST_CASE("lora_rounding: beta schedule - off in warm-up, 20 to 2, linear and cosine") {
  quant::BetaSchedule b;
  b.total_steps = 101;  // warm-up = 20 steps (0..19); annealing over steps 20..100
  CHECK(b.warmup_steps() == 20);
  CHECK_FALSE(b.active(0));
  CHECK_FALSE(b.active(19));
  CHECK(b.active(20));
  CHECK(b.beta(20) == 20.0);
  CHECK(b.beta(60) == doctest::Approx(11.0));
  CHECK(b.beta(40) == doctest::Approx(15.5));
  CHECK(b.beta(100) == doctest::Approx(2.0));
  CHECK(b.beta(500) == doctest::Approx(2.0));
  b.anneal = quant::BetaSchedule::Anneal::cosine;
  CHECK(b.beta(20) == doctest::Approx(20.0));
  CHECK(b.beta(60) == doctest::Approx(11.0));
  CHECK(b.beta(40) == doctest::Approx(2.0 + 9.0 * (1.0 + std::cos(std::numbers::pi / 4))));
  CHECK(b.beta(100) == doctest::Approx(2.0));
  b.warmup_fraction = 0.0;
  CHECK(b.active(0));
  b.warmup_fraction = 1.0;
  CHECK_THROWS_WITH_AS(b.active(0), doctest::Contains("warmup_fraction = 1 must be in [0, 1)"),
                       cbq::Error);
  quant::BetaSchedule one;
  one.total_steps = 1;
  CHECK(one.active(0));
  CHECK(one.beta(0) == doctest::Approx(2.0));
}

TEST_CASE(
    "lora_rounding: harden gives codes whose dequantize equals the hard soft weight bit for bit") {
  for (bool sym : {false, true})
    for (int bits : {2, 3, 4, 8}) {
      GridSpec g = make_spec(bits, sym, Granularity::per_group, 32);
      auto W = randn<float>(Shape{6, 172}, 11 + bits, 0.05f);
      Tensor<float> s, z;
      quant::init_minmax(W, g, s, z);
      auto p = quant::init_lora_rounding("l", W, s, z, g, 5, {});
      p.A2.value.copy_from(randn<float>(Shape{5, 172}, 12, 1.0f));
      quant::QuantizedWeight qw = quant::harden(W, s, z, p, g);
      Tape<float> tape;
      auto y = quant::lora_soft_weight(W, tape.constant(s), z, tape.param(p.A1), tape.param(p.A2),
                                       p.v0(), g, quant::RoundingMode::hard);
      CAPTURE(sym);
      CAPTURE(bits);
      CHECK(max_abs_diff(y.value(), qw.dequantize()) == 0.0);
      // Through the packer as well.
      CHECK(max_abs_diff(quant::PackedWeight::pack(qw).dequantize(), qw.dequantize()) == 0.0);
      // Every hard weight sits on the grid: code = clamp(floor(W/s) + [h ≥ 1/2] + z).
      Tensor<float> V = quant::lora_v_value(p);
      int64_t ups = 0;
      for (int64_t r = 0; r < 6; ++r)
        for (int64_t c = 0; c < 172; ++c) {
          const int64_t pi = quant::param_index(g, r, c, 172);
          const bool up = quant::rect_sigmoid(V(r, c)) >= 0.5f;
          ups += up;
          const float q = std::clamp(std::floor(W(r, c) / s[pi]) + (up ? 1.f : 0.f) + z[pi],
                                     float(g.qmin()), float(g.qmax()));
          CHECK(float(qw.codes(r, c)) + float(g.qmin()) == q);
        }
      CHECK(ups > 100);
      CHECK(ups < 6 * 172 - 100);
    }
}
