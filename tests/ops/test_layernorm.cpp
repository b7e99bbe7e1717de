// layernorm (ops/layernorm.hpp): forward against a naive loop, gradient checks, errors.
// CUDA parity: tests/gpu/test_layernorm.cu. Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/layernorm.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
// Naive per-row LayerNorm (biased variance); `b` may be empty.
Tensor<double> naive_layernorm(const Tensor<double>& x, const Tensor<double>& w,
                               const Tensor<double>* b, double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  Tensor<double> y(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int64_t j = 0; j < d; ++j) mean += x[r * d + j];
    mean /= d;
    for (int64_t j = 0; j < d; ++j) var += (x[r * d + j] - mean) * (x[r * d + j] - mean);
    var /= d;
    for (int64_t j = 0; j < d; ++j)
      y[r * d + j] = (x[r * d + j] - mean) / std::sqrt(var + eps) * w[j] + (b ? (*b)[j] : 0.0);
  }
  return y;
}
}  // namespace

TEST_CASE("layernorm: forward matches the naive loop with and without bias, float and double") {
  for (Shape shape : {Shape{7, 13}, Shape{2, 3, 5}, Shape{1, 2}}) {
    CAPTURE(shape.str());
    // A large common offset checks the variance is computed without cancellation.
    auto x = randn<double>(shape, 21, 2.0);
    for (int64_t i = 0; i < x.numel(); ++i) x[i] += 100.0;
    auto w = randn<double>(Shape{shape[-1]}, 22);
    auto b = randn<double>(Shape{shape[-1]}, 23);
    Tape<double> tape;
    auto y = ops::layernorm(tape.constant(x), tape.constant(w), tape.constant(b), 1e-5);
    CHECK(max_abs_diff(y.value(), naive_layernorm(x, w, &b, 1e-5)) < 1e-10);
    auto y_nb = ops::layernorm(tape.constant(x), tape.constant(w), Var<double>{}, 1e-5);
    CHECK(max_abs_diff(y_nb.value(), naive_layernorm(x, w, nullptr, 1e-5)) < 1e-10);

    Tape<float> tape_f;
    auto yf = ops::layernorm(tape_f.constant(x.cast<float>()), tape_f.constant(w.cast<float>()),
                             tape_f.constant(b.cast<float>()), 1e-5);
    CHECK(max_abs_diff(yf.value(), naive_layernorm(x, w, &b, 1e-5)) < 1e-3);
  }
}

TEST_CASE("layernorm: each row of the normalised output has mean 0 and variance 1") {
  auto x = randn<double>(Shape{5, 9}, 24, 3.0);
  Tape<double> tape;
  auto y = ops::layernorm(tape.constant(x), tape.constant(Tensor<double>::full(Shape{9}, 1.0)),
                          Var<double>{}, 0.0);
  for (int r = 0; r < 5; ++r) {
    double mean = 0, var = 0;
    for (int j = 0; j < 9; ++j) mean += y.value()(r, j) / 9;
    for (int j = 0; j < 9; ++j) var += (y.value()(r, j) - mean) * (y.value()(r, j) - mean) / 9;
    CHECK(std::abs(mean) < 1e-12);
    CHECK(var == doctest::Approx(1.0).epsilon(1e-12));
  }
}

TEST_CASE("layernorm: gradient check in double for input, weight and bias") {
  auto x = randn<double>(Shape{3, 5, 7}, 25);
  auto w = randn<double>(Shape{7}, 26);
  auto b = randn<double>(Shape{7}, 27);
  auto r =
      gradcheck([](Tape<double>&,
                   std::vector<Var<double>>& v) { return ops::layernorm(v[0], v[1], v[2], 1e-5); },
                {x, w, b});
  CHECK(r.max_rel_error < 1e-6);
  auto no_bias = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) {
        return ops::layernorm(v[0], v[1], Var<double>{}, 1e-5);
      },
      {x, w});
  CHECK(no_bias.max_rel_error < 1e-6);
  auto only_b =
      gradcheck([](Tape<double>&,
                   std::vector<Var<double>>& v) { return ops::layernorm(v[0], v[1], v[2], 1e-5); },
                {x, w, b}, {false, false, true});
  CHECK(only_b.max_rel_error < 1e-6);
}

TEST_CASE("layernorm: weight or bias whose size is not d names the op and the shapes") {
  Tape<double> tape;
  auto x = tape.constant(randn<double>(Shape{4, 7}, 1));
  auto w = tape.constant(randn<double>(Shape{7}, 2));
  auto bad = tape.constant(randn<double>(Shape{5}, 3));
  CHECK_THROWS_WITH_AS(ops::layernorm(x, bad, Var<double>{}, 1e-5),
                       doctest::Contains("layernorm: weight (5,) does not match input (4, 7)"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(ops::layernorm(x, w, bad, 1e-5),
                       doctest::Contains("layernorm: bias (5,) does not match input (4, 7)"),
                       cbq::Error);
}
