// The fused LoRA-Rounding kernels (quant/lora_rounding.hpp, lora_kernels.inc) against the
// composed ops they replace: V = ops::matmul(A1, A2) (+ V0, with V0 from adaround_offset when it
// tracks the step), soft_round_weight, rounding_reg. Values, gradients to s, A1, A2, harden's
// codes, thread-count independence; shapes that exercise the lane tails, groups that are not a
// multiple of the vector width, per-channel and per-tensor grids, ranks above the register chunk.
// Run under CBQ_SIMD=generic / avx2 / avx512 to cover every ISA's copy.
#include <doctest/doctest.h>

#include <cbq/cbq.hpp>
#include <cmath>

#include "quant/quant_common.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::make_spec;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;
using quant::Granularity;
using quant::GridSpec;
using quant::RoundingMode;

namespace {

enum class Source { none, tensor, tracked };

struct LoraCase {
  int64_t rows, cols, rank;
  GridSpec spec;
};

std::vector<LoraCase> cases() {
  return {{5, 64, 3, make_spec(4, false, Granularity::per_group, 32)},
          {7, 37, 3, make_spec(3, false, Granularity::per_group, 10)},
          {40, 45, 11, make_spec(4, true, Granularity::per_group, 16)},
          {6, 37, 2, make_spec(4, false, Granularity::per_channel)},
          {9, 50, 4, make_spec(2, true, Granularity::per_tensor)}};
}

template <class T>
struct Grads {
  Tensor<T> y, ds, da1, da2;
  double reg = 0;
  Tensor<T> rda1, rda2;
};

// Runs the fused ops (fused = true) or the composed reference, with the output gradient G.
template <class T>
Grads<T> run(bool fused, const LoraCase& c, Source src, RoundingMode mode, uint64_t seed) {
  const GridSpec& g = c.spec;
  Tensor<T> W = randn<T>(Shape{c.rows, c.cols}, seed, T(0.1));
  Tensor<T> s, z;
  quant::init_minmax(W, g, s, z);
  for (int64_t i = 0; i < s.numel(); ++i) s[i] *= T(0.9);  // some codes clamp
  Tensor<T> A1 = randn<T>(Shape{c.rows, c.rank}, seed + 1, T(0.6));
  Tensor<T> A2 = randn<T>(Shape{c.rank, c.cols}, seed + 2, T(0.6));
  Tensor<T> V0;
  if (src != Source::none) {
    V0 = Tensor<T>::empty(W.shape());
    quant::adaround_offset(W, s, g, V0);
    if (src == Source::tensor)  // a frozen offset that is not the current step's
      for (int64_t i = 0; i < V0.numel(); ++i) V0[i] += T(0.3) * std::sin(T(i));
  }
  Tensor<T> G = randn<T>(W.shape(), seed + 3);
  Grads<T> out;
  {
    Tape<T> tape;
    Parameter<T> ps("s", s.clone()), p1("a1", A1.clone()), p2("a2", A2.clone());
    Var<T> y;
    if (fused) {
      y = src == Source::tracked
              ? quant::lora_soft_weight_tracked(W, tape.param(ps), z, tape.param(p1),
                                                tape.param(p2), g, mode)
              : quant::lora_soft_weight(W, tape.param(ps), z, tape.param(p1), tape.param(p2),
                                        src == Source::none ? nullptr : &V0, g, mode);
    } else {
      Var<T> v = ops::matmul(tape.param(p1), tape.param(p2));
      if (src != Source::none) v = ops::add(v, tape.constant(V0));
      y = quant::soft_round_weight(W, tape.param(ps), z, v, g, mode);
    }
    out.y = y.value().clone();
    y.grad().copy_from(G);
    tape.backward_from_seeded();
    out.ds = ps.grad.clone();
    out.da1 = p1.grad.clone();
    out.da2 = p2.grad.clone();
  }
  {
    Tape<T> tape;
    Parameter<T> p1("a1", A1.clone()), p2("a2", A2.clone());
    const T beta = T(3.5);
    Var<T> r;
    if (fused) {
      r = src == Source::tracked
              ? quant::lora_round_reg_tracked(W, s, g, tape.param(p1), tape.param(p2), beta)
              : quant::lora_round_reg(tape.param(p1), tape.param(p2),
                                      src == Source::none ? nullptr : &V0, beta);
    } else {
      Var<T> v = ops::matmul(tape.param(p1), tape.param(p2));
      if (src != Source::none) v = ops::add(v, tape.constant(V0));
      r = quant::rounding_reg(v, beta);
    }
    out.reg = static_cast<double>(r.value()[0]);
    tape.backward(ops::scale(r, T(7)));
    out.rda1 = p1.grad.clone();
    out.rda2 = p2.grad.clone();
  }
  return out;
}

template <class T>
double rel(const Tensor<T>& a, const Tensor<T>& b) {
  double m = 0;
  for (int64_t i = 0; i < b.numel(); ++i) m = std::max(m, std::abs(static_cast<double>(b[i])));
  return max_abs_diff(a, b) / std::max(m, 1e-30);
}

}  // namespace

TEST_CASE("fused lora: values and gradients equal the composed ops (double)") {
  for (const LoraCase& c : cases())
    for (Source src : {Source::none, Source::tensor, Source::tracked})
      for (RoundingMode mode : {RoundingMode::soft, RoundingMode::hard, RoundingMode::hard_ste}) {
        CAPTURE(c.rows);
        CAPTURE(c.cols);
        CAPTURE(static_cast<int>(src));
        CAPTURE(static_cast<int>(mode));
        const Grads<double> f = run<double>(true, c, src, mode, 21);
        const Grads<double> r = run<double>(false, c, src, mode, 21);
        CHECK(max_abs_diff(f.y, r.y) < 1e-14);
        CHECK(rel(f.ds, r.ds) < 1e-12);
        CHECK(rel(f.da1, r.da1) < 1e-12);
        CHECK(rel(f.da2, r.da2) < 1e-12);
        CHECK(f.reg == doctest::Approx(r.reg).epsilon(1e-12));
        CHECK(rel(f.rda1, r.rda1) < 1e-10);
        CHECK(rel(f.rda2, r.rda2) < 1e-10);
      }
}

TEST_CASE("fused lora: float values within rounding of the composed ops, gradients close") {
  int64_t flips = 0, total = 0;
  for (const LoraCase& c : cases())
    for (Source src : {Source::none, Source::tensor, Source::tracked})
      for (RoundingMode mode : {RoundingMode::soft, RoundingMode::hard, RoundingMode::hard_ste}) {
        CAPTURE(c.rows);
        CAPTURE(c.cols);
        CAPTURE(static_cast<int>(src));
        CAPTURE(static_cast<int>(mode));
        const Grads<float> f = run<float>(true, c, src, mode, 31);
        const Grads<float> r = run<float>(false, c, src, mode, 31);
        // soft: h within a few ulps, so Ŵ within a few ulps of s; hard: a code may flip only
        // where h(V) is within rounding of 1/2 (counted below, expected none or very few)
        for (int64_t i = 0; i < f.y.numel(); ++i) {
          const double d = std::abs(double(f.y[i]) - double(r.y[i]));
          if (mode == RoundingMode::soft) {
            CHECK(d <= 4e-7 * std::max(1.0, std::abs(double(r.y[i]))));
          } else {
            flips += d > 0;
          }
          ++total;
        }
        if (mode == RoundingMode::soft || flips == 0) {
          CHECK(rel(f.ds, r.ds) < 2e-4);
          CHECK(rel(f.da1, r.da1) < 2e-4);
          CHECK(rel(f.da2, r.da2) < 2e-4);
        }
        CHECK(f.reg == doctest::Approx(r.reg).epsilon(1e-5));
        CHECK(rel(f.rda1, r.rda1) < 2e-4);
        CHECK(rel(f.rda2, r.rda2) < 2e-4);
      }
  CHECK(total > 5000);
  CHECK(flips <= 2);
}

TEST_CASE("fused lora: harden's codes equal the hard forward bit for bit, every V0 source") {
  for (const LoraCase& c : cases())
    for (bool tracks : {false, true}) {
      const GridSpec& g = c.spec;
      Tensor<float> W = randn<float>(Shape{c.rows, c.cols}, 41, 0.1f);
      Tensor<float> s, z;
      quant::init_minmax(W, g, s, z);
      quant::LoraInit init;
      init.start = quant::LoraStart::adaround;
      auto p = quant::init_lora_rounding("l", W, s, z, g, c.rank, init);
      p.A2.value.copy_from(randn<float>(Shape{c.rank, c.cols}, 42, 0.5f));
      for (int64_t i = 0; i < s.numel(); ++i) s[i] *= 1.05f;  // V0 no longer the step's
      const quant::QuantizedWeight qw = quant::harden(W, s, z, p, g, tracks);
      Tape<float> tape;
      NoGrad<float> off(tape);
      Var<float> y =
          tracks
              ? quant::lora_soft_weight_tracked(W, tape.constant(s), z, tape.constant(p.A1.value),
                                                tape.constant(p.A2.value), g, RoundingMode::hard)
              : quant::lora_soft_weight(W, tape.constant(s), z, tape.constant(p.A1.value),
                                        tape.constant(p.A2.value), p.v0(), g, RoundingMode::hard);
      CAPTURE(c.cols);
      CAPTURE(tracks);
      CHECK(max_abs_diff(y.value(), qw.dequantize()) == 0.0);
      // Codes against an independent evaluation: floor(W/s) + [h(V0 + A1·A2) ≥ 1/2] + z,
      // V0 = h⁻¹(frac(W/s)) with the current s when tracking.
      Tensor<float> V0 = p.V0.clone();
      if (tracks) quant::adaround_offset(W, s, g, V0);
      int64_t agree = 0;
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t col = 0; col < c.cols; ++col) {
          double v = V0(r, col);
          for (int64_t k = 0; k < c.rank; ++k) v += double(p.A1.value(r, k)) * p.A2.value(k, col);
          const int64_t pi = quant::param_index(g, r, col, c.cols);
          const double q = std::floor(double(W(r, col)) / s[pi]) + (v >= 0 ? 1 : 0) + z[pi];
          const double code = std::clamp(q, double(g.qmin()), double(g.qmax())) - g.qmin();
          agree += qw.codes(r, col) == code;
        }
      CHECK(agree >= c.rows * c.cols - 1);  // V within rounding of 0 may go either way
    }
}

TEST_CASE("fused lora: results do not depend on the thread count") {
  const int saved = num_threads();
  const LoraCase c{100, 96, 5, make_spec(4, false, Granularity::per_group, 32)};
  set_pool_threads(1);
  const Grads<float> one = run<float>(true, c, Source::tracked, RoundingMode::hard_ste, 51);
  set_pool_threads(3);
  const Grads<float> three = run<float>(true, c, Source::tracked, RoundingMode::hard_ste, 51);
  set_pool_threads(saved);
  CHECK(max_abs_diff(one.y, three.y) == 0.0);
  CHECK(max_abs_diff(one.ds, three.ds) == 0.0);
  CHECK(max_abs_diff(one.da1, three.da1) == 0.0);
  CHECK(max_abs_diff(one.da2, three.da2) == 0.0);
  CHECK(one.reg == three.reg);
  CHECK(max_abs_diff(one.rda2, three.rda2) == 0.0);
}

namespace {

// Which outputs reach the loss: the weight (through G), the regulariser (through 7·r), or both.
enum class Reach { weight, reg, both };

template <class T>
struct WeightRegRun {
  Tensor<T> y, ds, da1, da2;
  T reg = 0;
};

// Ŵ and the regulariser of the same V: from one kernel (fused = true, *_and_reg) or from
// lora_soft_weight and lora_round_reg separately; gradients seeded on the outputs that reach.
template <class T>
WeightRegRun<T> run_weight_reg(bool fused, const LoraCase& c, Source src, RoundingMode mode,
                               Reach reach, uint64_t seed) {
  const GridSpec& g = c.spec;
  Tensor<T> W = randn<T>(Shape{c.rows, c.cols}, seed, T(0.1));
  Tensor<T> s, z;
  quant::init_minmax(W, g, s, z);
  Tensor<T> V0 = randn<T>(W.shape(), seed + 4, T(0.8));
  Tensor<T> G = randn<T>(W.shape(), seed + 3);
  Tape<T> tape;
  Parameter<T> ps("s", s.clone()), p1("a1", randn<T>(Shape{c.rows, c.rank}, seed + 1, T(0.6))),
      p2("a2", randn<T>(Shape{c.rank, c.cols}, seed + 2, T(0.6)));
  const T beta = T(3.5);
  const quant::RegularizerSpec<T> spec{beta, quant::Normalisation::mean};
  const Tensor<T>* v0 = src == Source::tensor ? &V0 : nullptr;
  Var<T> y, r;
  if (fused) {
    const quant::SoftWeight<T> both =
        src == Source::tracked
            ? quant::lora_soft_weight_tracked_and_reg(W, tape.param(ps), z, tape.param(p1),
                                                      tape.param(p2), g, spec, mode, true)
            : quant::lora_soft_weight_and_reg(W, tape.param(ps), z, tape.param(p1), tape.param(p2),
                                              v0, g, spec, mode, true);
    y = both.weight;
    r = both.regularizer;
  } else {
    y = src == Source::tracked
            ? quant::lora_soft_weight_tracked(W, tape.param(ps), z, tape.param(p1), tape.param(p2),
                                              g, mode, true)
            : quant::lora_soft_weight(W, tape.param(ps), z, tape.param(p1), tape.param(p2), v0, g,
                                      mode, true);
    r = src == Source::tracked
            ? quant::lora_round_reg_tracked(W, s, g, tape.param(p1), tape.param(p2), beta)
            : quant::lora_round_reg(tape.param(p1), tape.param(p2), v0, beta);
  }
  REQUIRE(r.valid());
  if (reach != Reach::reg) y.grad().copy_from(G);
  if (reach != Reach::weight) r.grad()[0] = T(7);
  tape.backward_from_seeded();
  return {y.value().clone(), ps.grad.clone(), p1.grad.clone(), p2.grad.clone(), r.value()[0]};
}

template <class T>
void check_weight_reg(double tolerance, uint64_t seed) {
  for (const LoraCase& c : cases())
    for (Source src : {Source::none, Source::tensor, Source::tracked})
      for (RoundingMode mode : {RoundingMode::soft, RoundingMode::hard_ste})
        for (Reach reach : {Reach::weight, Reach::reg, Reach::both}) {
          CAPTURE(c.rows);
          CAPTURE(c.cols);
          CAPTURE(static_cast<int>(src));
          CAPTURE(static_cast<int>(mode));
          CAPTURE(static_cast<int>(reach));
          const WeightRegRun<T> f = run_weight_reg<T>(true, c, src, mode, reach, seed);
          const WeightRegRun<T> r = run_weight_reg<T>(false, c, src, mode, reach, seed);
          CHECK(max_abs_diff(f.y, r.y) == 0.0);  // the same kernel, the same σ
          CHECK(f.reg == r.reg);
          // One contraction of G·fac + g·local instead of two: rounding of the sum only
          CHECK(rel(f.da1, r.da1) < tolerance);
          CHECK(rel(f.da2, r.da2) < tolerance);
          if (reach == Reach::reg) {  // no gradient to s from the regulariser
            CHECK(max_abs_diff(f.ds, r.ds) == 0.0);
          } else {
            CHECK(rel(f.ds, r.ds) < tolerance);
          }
        }
}

}  // namespace

TEST_CASE(
    "fused lora: the regulariser from the weight's kernel equals lora_round_reg, in value "
    "and gradients, whichever outputs reach the loss") {
  check_weight_reg<double>(1e-12, 61);
  check_weight_reg<float>(2e-5, 62);
}

TEST_CASE("fused lora: weight and regulariser from one kernel (gradcheck in A1, A2)") {
  for (Source src : {Source::none, Source::tensor, Source::tracked}) {
    const LoraCase c{6, 37, 3, make_spec(4, false, Granularity::per_group, 16)};
    Tensor<double> W = randn<double>(Shape{c.rows, c.cols}, 71, 0.1);
    Tensor<double> s, z;
    quant::init_minmax(W, c.spec, s, z);
    Tensor<double> V0 = randn<double>(W.shape(), 72, 0.8);
    Tensor<double> R = randn<double>(W.shape(), 73);
    auto result = testing::gradcheck(
        [&](Tape<double>& tape, std::vector<Var<double>>& v) {
          const quant::RegularizerSpec<double> reg{2.5, quant::Normalisation::mean};
          const quant::SoftWeight<double> both =
              src == Source::tracked
                  ? quant::lora_soft_weight_tracked_and_reg(W, v[0], z, v[1], v[2], c.spec, reg,
                                                            RoundingMode::soft, true)
                  : quant::lora_soft_weight_and_reg(W, v[0], z, v[1], v[2],
                                                    src == Source::tensor ? &V0 : nullptr, c.spec,
                                                    reg, RoundingMode::soft, true);
          return ops::add(ops::sum(ops::mul(both.weight, tape.constant(R))),
                          ops::scale(both.regularizer, 5.0));
        },
        {s, randn<double>(Shape{c.rows, c.rank}, 74, 0.6),
         randn<double>(Shape{c.rank, c.cols}, 75, 0.6)},
        {false, true, true});
    CAPTURE(static_cast<int>(src));
    CHECK(result.max_rel_error < 1e-6);
  }
}
