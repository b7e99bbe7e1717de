// The fused full-matrix rounding kernels (quant/lora_rounding.hpp, "Full-matrix rounding", the
// LoRA row kernels reading ΔV instead of A1·A2) against the composed ops they replace:
// V = ops::add(V0, ΔV) (V0 from adaround_offset when it tracks the step), soft_round_weight,
// rounding_reg. Values, gradients to s and ΔV, harden's codes, thread-count independence; shapes
// that exercise the lane tails, groups that are not a multiple of the vector width, per-channel
// and per-tensor grids. Run under CBQ_SIMD=generic / avx2 / avx512 to cover every ISA's copy.
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

// Names are unique across test files (unity batches, tests/CMakeLists.txt).
enum class FullSource { none, tensor, tracked };

struct FullCase {
  int64_t rows, cols;
  GridSpec spec;
};

std::vector<FullCase> full_cases() {
  return {{5, 64, make_spec(4, false, Granularity::per_group, 32)},
          {7, 37, make_spec(3, false, Granularity::per_group, 10)},
          {40, 45, make_spec(4, true, Granularity::per_group, 16)},
          {6, 37, make_spec(4, false, Granularity::per_channel)},
          {9, 50, make_spec(2, true, Granularity::per_tensor)}};
}

// The inputs of one case: W, its grid (steps shrunk so that some codes clamp), ΔV, V0.
template <class T>
struct FullInputs {
  Tensor<T> W, s, z, dV, V0;
};

template <class T>
FullInputs<T> full_inputs(const FullCase& c, FullSource src, uint64_t seed) {
  FullInputs<T> in;
  in.W = randn<T>(Shape{c.rows, c.cols}, seed, T(0.1));
  quant::init_minmax(in.W, c.spec, in.s, in.z);
  for (int64_t i = 0; i < in.s.numel(); ++i) in.s[i] *= T(0.9);
  in.dV = randn<T>(Shape{c.rows, c.cols}, seed + 1, T(1.5));
  if (src != FullSource::none) {
    in.V0 = Tensor<T>::empty(in.W.shape());
    quant::adaround_offset(in.W, in.s, c.spec, in.V0);
    if (src == FullSource::tensor)  // a frozen offset that is not the current step's
      for (int64_t i = 0; i < in.V0.numel(); ++i) in.V0[i] += T(0.3) * std::sin(T(i));
  }
  return in;
}

// The composed reference: V = V0 + ΔV as ops (V0 recomputed from the current s when tracking).
template <class T>
Var<T> full_composed_v(Tape<T>& tape, const FullInputs<T>& in, FullSource src, Var<T> dv) {
  return src == FullSource::none ? dv : ops::add(tape.constant(in.V0), dv);
}

template <class T>
struct FullGrads {
  Tensor<T> y, ds, ddv;
  double reg = 0;
  Tensor<T> rddv;
};

// The fused ops (fused = true) or the composed reference, with the output gradient G.
template <class T>
FullGrads<T> full_run(bool fused, const FullCase& c, FullSource src, RoundingMode mode,
                      uint64_t seed) {
  const GridSpec& g = c.spec;
  const FullInputs<T> in = full_inputs<T>(c, src, seed);
  const Tensor<T>* v0 = src == FullSource::tensor ? &in.V0 : nullptr;
  Tensor<T> G = randn<T>(in.W.shape(), seed + 3);
  FullGrads<T> out;
  {
    Tape<T> tape;
    Parameter<T> ps("s", in.s.clone()), pv("dv", in.dV.clone());
    Var<T> y;
    if (fused) {
      y = src == FullSource::tracked
              ? quant::full_soft_weight_tracked(in.W, tape.param(ps), in.z, tape.param(pv), g, mode)
              : quant::full_soft_weight(in.W, tape.param(ps), in.z, tape.param(pv), v0, g, mode);
    } else {
      y = quant::soft_round_weight(in.W, tape.param(ps), in.z,
                                   full_composed_v(tape, in, src, tape.param(pv)), g, mode);
    }
    out.y = y.value().clone();
    y.grad().copy_from(G);
    tape.backward_from_seeded();
    out.ds = ps.grad.clone();
    out.ddv = pv.grad.clone();
  }
  {
    Tape<T> tape;
    Parameter<T> pv("dv", in.dV.clone());
    const T beta = T(3.5);
    Var<T> r;
    if (fused) {
      r = src == FullSource::tracked
              ? quant::full_round_reg_tracked(in.W, in.s, g, tape.param(pv), beta)
              : quant::full_round_reg(tape.param(pv), v0, beta);
    } else {
      r = quant::rounding_reg(full_composed_v(tape, in, src, tape.param(pv)), beta);
    }
    out.reg = static_cast<double>(r.value()[0]);
    tape.backward(ops::scale(r, T(7)));
    out.rddv = pv.grad.clone();
  }
  return out;
}

template <class T>
double full_rel(const Tensor<T>& a, const Tensor<T>& b) {
  double m = 0;
  for (int64_t i = 0; i < b.numel(); ++i) m = std::max(m, std::abs(static_cast<double>(b[i])));
  return max_abs_diff(a, b) / std::max(m, 1e-30);
}

// Every shape × V0 source × rounding mode, with the case captured for a failure's message.
template <class F>
void each_full_case(F&& check) {
  for (const FullCase& c : full_cases())
    for (FullSource src : {FullSource::none, FullSource::tensor, FullSource::tracked})
      for (RoundingMode mode : {RoundingMode::soft, RoundingMode::hard, RoundingMode::hard_ste}) {
        CAPTURE(c.rows);
        CAPTURE(c.cols);
        CAPTURE(static_cast<int>(src));
        CAPTURE(static_cast<int>(mode));
        check(c, src, mode);
      }
}

}  // namespace

TEST_CASE("fused full rounding: values and gradients equal the composed ops (double)") {
  each_full_case([](const FullCase& c, FullSource src, RoundingMode mode) {
    const FullGrads<double> f = full_run<double>(true, c, src, mode, 121);
    const FullGrads<double> r = full_run<double>(false, c, src, mode, 121);
    CHECK(max_abs_diff(f.y, r.y) < 1e-14);
    CHECK(full_rel(f.ds, r.ds) < 1e-12);
    CHECK(full_rel(f.ddv, r.ddv) < 1e-12);
    CHECK(f.reg == doctest::Approx(r.reg).epsilon(1e-12));
    CHECK(full_rel(f.rddv, r.rddv) < 1e-10);
    CHECK(std::isfinite(f.reg));
  });
}

TEST_CASE("fused full rounding: float values within rounding of the composed ops") {
  int64_t flips = 0, total = 0;
  each_full_case([&](const FullCase& c, FullSource src, RoundingMode mode) {
    const FullGrads<float> f = full_run<float>(true, c, src, mode, 131);
    const FullGrads<float> r = full_run<float>(false, c, src, mode, 131);
    int64_t case_flips = 0;
    for (int64_t i = 0; i < f.y.numel(); ++i) {
      const double d = std::abs(double(f.y[i]) - double(r.y[i]));
      REQUIRE(std::isfinite(double(f.y[i])));
      if (mode == RoundingMode::soft) {
        CHECK(d <= 4e-7 * std::max(1.0, std::abs(double(r.y[i]))));
      } else {
        case_flips += d > 0;
      }
      ++total;
    }
    flips += case_flips;
    if (mode == RoundingMode::soft || case_flips == 0) {
      CHECK(full_rel(f.ds, r.ds) < 2e-4);
      CHECK(full_rel(f.ddv, r.ddv) < 2e-4);
    }
    CHECK(f.reg == doctest::Approx(r.reg).epsilon(1e-5));
    CHECK(full_rel(f.rddv, r.rddv) < 2e-4);
  });
  CHECK(total > 5000);
  CHECK(flips <= 2);  // a code flips only where V is within rounding of 0
}

TEST_CASE("fused full rounding: harden's codes equal the hard forward bit for bit") {
  for (const FullCase& c : full_cases())
    for (FullSource src : {FullSource::none, FullSource::tensor, FullSource::tracked}) {
      const GridSpec& g = c.spec;
      FullInputs<float> in = full_inputs<float>(c, src, 141);
      for (int64_t i = 0; i < in.s.numel(); ++i) in.s[i] *= 1.05f;  // V0 no longer the step's
      const Tensor<float>* v0 = src == FullSource::tensor ? &in.V0 : nullptr;
      const bool tracks = src == FullSource::tracked;
      const quant::QuantizedWeight qw = quant::harden_full(in.W, in.s, in.z, in.dV, v0, g, tracks);
      Tape<float> tape;
      NoGrad<float> off(tape);
      Var<float> y =
          tracks ? quant::full_soft_weight_tracked(in.W, tape.constant(in.s), in.z,
                                                   tape.constant(in.dV), g, RoundingMode::hard)
                 : quant::full_soft_weight(in.W, tape.constant(in.s), in.z, tape.constant(in.dV),
                                           v0, g, RoundingMode::hard);
      CAPTURE(c.cols);
      CAPTURE(static_cast<int>(src));
      CHECK(max_abs_diff(y.value(), qw.dequantize()) == 0.0);
      // Codes against an independent evaluation: floor(W/s) + [V0 + ΔV ≥ 0] + z, V0 =
      // h⁻¹(frac(W/s)) with the current s when tracking.
      Tensor<float> V0 = src == FullSource::none ? Tensor<float>(in.W.shape()) : in.V0.clone();
      if (tracks) quant::adaround_offset(in.W, in.s, g, V0);
      int64_t agree = 0;
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t col = 0; col < c.cols; ++col) {
          const double v = double(V0(r, col)) + double(in.dV(r, col));
          const int64_t pi = quant::param_index(g, r, col, c.cols);
          const double q =
              std::floor(double(in.W(r, col)) / in.s[pi]) + (v >= 0 ? 1 : 0) + in.z[pi];
          const double code = std::clamp(q, double(g.qmin()), double(g.qmax())) - g.qmin();
          agree += qw.codes(r, col) == code;
        }
      CHECK(agree >= c.rows * c.cols - 1);  // V within rounding of 0 may go either way
    }
}

TEST_CASE("fused full rounding: results do not depend on the thread count") {
  const int saved = num_threads();
  const FullCase c{100, 96, make_spec(4, false, Granularity::per_group, 32)};
  set_pool_threads(1);
  const FullGrads<float> one =
      full_run<float>(true, c, FullSource::tracked, RoundingMode::hard_ste, 151);
  set_pool_threads(3);
  const FullGrads<float> three =
      full_run<float>(true, c, FullSource::tracked, RoundingMode::hard_ste, 151);
  set_pool_threads(saved);
  CHECK(max_abs_diff(one.y, three.y) == 0.0);
  CHECK(max_abs_diff(one.ds, three.ds) == 0.0);
  CHECK(max_abs_diff(one.ddv, three.ddv) == 0.0);
  CHECK(one.reg == three.reg);
  CHECK(max_abs_diff(one.rddv, three.rddv) == 0.0);
}

namespace {

// Which outputs reach the loss: the weight (through G), the regulariser (through 7·r), or both.
enum class FullReach { weight, reg, both };

template <class T>
struct FullWeightRegRun {
  Tensor<T> y, ds, ddv;
  T reg = 0;
};

// Ŵ and the regulariser of the same V: from one kernel (fused = true, *_and_reg) or from
// full_soft_weight and full_round_reg separately; gradients seeded on the outputs that reach.
template <class T>
FullWeightRegRun<T> full_run_weight_reg(bool fused, const FullCase& c, FullSource src,
                                        RoundingMode mode, FullReach reach, uint64_t seed) {
  const GridSpec& g = c.spec;
  const FullInputs<T> in = full_inputs<T>(c, src, seed);
  const Tensor<T>* v0 = src == FullSource::tensor ? &in.V0 : nullptr;
  Tensor<T> G = randn<T>(in.W.shape(), seed + 3);
  Tape<T> tape;
  Parameter<T> ps("s", in.s.clone()), pv("dv", in.dV.clone());
  const T beta = T(3.5);
  const quant::RegularizerSpec<T> spec{beta, quant::Normalisation::mean};
  Var<T> y, r;
  if (fused) {
    const quant::SoftWeight<T> both =
        src == FullSource::tracked
            ? quant::full_soft_weight_tracked_and_reg(in.W, tape.param(ps), in.z, tape.param(pv), g,
                                                      spec, mode, true)
            : quant::full_soft_weight_and_reg(in.W, tape.param(ps), in.z, tape.param(pv), v0, g,
                                              spec, mode, true);
    y = both.weight;
    r = both.regularizer;
  } else {
    y = src == FullSource::tracked ? quant::full_soft_weight_tracked(in.W, tape.param(ps), in.z,
                                                                     tape.param(pv), g, mode, true)
                                   : quant::full_soft_weight(in.W, tape.param(ps), in.z,
                                                             tape.param(pv), v0, g, mode, true);
    r = src == FullSource::tracked
            ? quant::full_round_reg_tracked(in.W, in.s, g, tape.param(pv), beta)
            : quant::full_round_reg(tape.param(pv), v0, beta);
  }
  REQUIRE(r.valid());
  if (reach != FullReach::reg) y.grad().copy_from(G);
  if (reach != FullReach::weight) r.grad()[0] = T(7);
  tape.backward_from_seeded();
  return {y.value().clone(), ps.grad.clone(), pv.grad.clone(), r.value()[0]};
}

template <class T>
void full_check_weight_reg(double tolerance, uint64_t seed) {
  for (const FullCase& c : full_cases())
    for (FullSource src : {FullSource::none, FullSource::tensor, FullSource::tracked})
      for (RoundingMode mode : {RoundingMode::soft, RoundingMode::hard_ste})
        for (FullReach reach : {FullReach::weight, FullReach::reg, FullReach::both}) {
          CAPTURE(c.rows);
          CAPTURE(c.cols);
          CAPTURE(static_cast<int>(src));
          CAPTURE(static_cast<int>(mode));
          CAPTURE(static_cast<int>(reach));
          const FullWeightRegRun<T> f = full_run_weight_reg<T>(true, c, src, mode, reach, seed);
          const FullWeightRegRun<T> r = full_run_weight_reg<T>(false, c, src, mode, reach, seed);
          CHECK(max_abs_diff(f.y, r.y) == 0.0);  // the same kernel, the same σ
          CHECK(f.reg == r.reg);
          CHECK(std::isfinite(static_cast<double>(f.reg)));
          CHECK(full_rel(f.ddv, r.ddv) < tolerance);  // G·fac + g·local summed once
          if (reach == FullReach::reg) {              // no gradient to s from the regulariser
            CHECK(max_abs_diff(f.ds, r.ds) == 0.0);
          } else {
            CHECK(full_rel(f.ds, r.ds) < tolerance);
          }
        }
}

}  // namespace

TEST_CASE(
    "fused full rounding: the regulariser from the weight's kernel equals full_round_reg, in "
    "value and gradients, whichever outputs reach the loss") {
  full_check_weight_reg<double>(1e-12, 161);
  full_check_weight_reg<float>(2e-5, 162);
}

TEST_CASE("fused full rounding: weight and regulariser from one kernel (gradcheck in s, dV)") {
  for (FullSource src : {FullSource::none, FullSource::tensor, FullSource::tracked}) {
    const FullCase c{6, 37, make_spec(4, false, Granularity::per_group, 16)};
    const FullInputs<double> in = full_inputs<double>(c, src, 171);
    Tensor<double> R = randn<double>(in.W.shape(), 173);
    auto result = testing::gradcheck(
        [&](Tape<double>& tape, std::vector<Var<double>>& v) {
          const quant::RegularizerSpec<double> reg{2.5, quant::Normalisation::mean};
          const quant::SoftWeight<double> both =
              src == FullSource::tracked
                  ? quant::full_soft_weight_tracked_and_reg(in.W, v[0], in.z, v[1], c.spec, reg,
                                                            RoundingMode::soft, true)
                  : quant::full_soft_weight_and_reg(in.W, v[0], in.z, v[1],
                                                    src == FullSource::tensor ? &in.V0 : nullptr,
                                                    c.spec, reg, RoundingMode::soft, true);
          return ops::add(ops::sum(ops::mul(both.weight, tape.constant(R))),
                          ops::scale(both.regularizer, 5.0));
        },
        {in.s, in.dV}, {false, true});
    CAPTURE(static_cast<int>(src));
    CHECK(result.max_rel_error < 1e-6);
  }
}
