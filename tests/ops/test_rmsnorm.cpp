// rmsnorm (ops/rmsnorm.hpp): forward against a naive loop, gradient checks, errors.
// CUDA parity: tests/gpu/test_rmsnorm.cu. Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/rmsnorm.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
// Naive per-row RMSNorm over the last dimension.
Tensor<double> naive_rmsnorm(const Tensor<double>& x, const Tensor<double>& w, double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  Tensor<double> y(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x[r * d + j] * x[r * d + j];
    const double rms = std::sqrt(ss / d + eps);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] / rms * w[j];
  }
  return y;
}
}  // namespace

TEST_CASE("rmsnorm: forward matches the naive loop on odd sizes, float and double") {
  for (Shape shape : {Shape{7, 13}, Shape{2, 3, 5}, Shape{1, 1}, Shape{9}}) {
    CAPTURE(shape.str());
    auto x = randn<double>(shape, 11, 2.0);
    auto w = randn<double>(Shape{shape[-1]}, 12);
    Tape<double> tape;
    auto y = ops::rmsnorm(tape.constant(x), tape.constant(w), 1e-5);
    REQUIRE(y.shape() == shape);
    CHECK(max_abs_diff(y.value(), naive_rmsnorm(x, w, 1e-5)) < 1e-12);

    Tape<float> tape_f;
    auto yf =
        ops::rmsnorm(tape_f.constant(x.cast<float>()), tape_f.constant(w.cast<float>()), 1e-5);
    CHECK(max_abs_diff(yf.value(), naive_rmsnorm(x, w, 1e-5)) < 1e-5);
  }
}

TEST_CASE("rmsnorm: eps dominates a zero row instead of dividing by zero") {
  Tape<double> tape;
  auto x = Tensor<double>(Shape{2, 4});
  auto w = Tensor<double>::full(Shape{4}, 1.0);
  x(1, 2) = 3.0;
  auto y = ops::rmsnorm(tape.constant(x), tape.constant(w), 1e-6);
  for (int j = 0; j < 4; ++j) CHECK(y.value()(0, j) == 0.0);
  CHECK(y.value()(1, 2) == doctest::Approx(3.0 / std::sqrt(9.0 / 4 + 1e-6)));
}

TEST_CASE("rmsnorm: gradient check in double for input and weight") {
  auto x = randn<double>(Shape{3, 5, 7}, 13);
  auto w = randn<double>(Shape{7}, 14);
  auto r = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) { return ops::rmsnorm(v[0], v[1], 1e-5); },
      {x, w});
  CHECK(r.max_rel_error < 1e-6);
  // Only one side requiring a gradient still gives the right gradient for that side.
  auto only_x = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) { return ops::rmsnorm(v[0], v[1], 1e-5); },
      {x, w}, {true, false});
  CHECK(only_x.max_rel_error < 1e-6);
  auto only_w = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) { return ops::rmsnorm(v[0], v[1], 1e-5); },
      {x, w}, {false, true});
  CHECK(only_w.max_rel_error < 1e-6);
}

TEST_CASE("rmsnorm: gradients accumulate into existing gradients") {
  auto x = randn<double>(Shape{4, 6}, 15);
  auto w = randn<double>(Shape{6}, 16);
  Tape<double> tape;
  auto vx = tape.input(x);
  auto vw = tape.input(w);
  auto y1 = ops::rmsnorm(vx, vw, 1e-5);
  auto y2 = ops::rmsnorm(vx, vw, 1e-5);
  y1.grad().fill(1.0);
  y2.grad().fill(1.0);
  tape.backward_from_seeded();
  Tape<double> single;
  auto sx = single.input(x);
  auto sw = single.input(w);
  auto ys = ops::rmsnorm(sx, sw, 1e-5);
  ys.grad().fill(1.0);
  single.backward_from_seeded();
  for (int64_t i = 0; i < x.numel(); ++i) CHECK(vx.grad()[i] == doctest::Approx(2 * sx.grad()[i]));
  for (int64_t j = 0; j < w.numel(); ++j) CHECK(vw.grad()[j] == doctest::Approx(2 * sw.grad()[j]));
}

TEST_CASE("rmsnorm: a weight whose size is not d names the op and the shapes") {
  Tape<double> tape;
  auto x = tape.constant(randn<double>(Shape{4, 7}, 1));
  auto w = tape.constant(randn<double>(Shape{6}, 2));
  CHECK_THROWS_WITH_AS(ops::rmsnorm(x, w, 1e-5),
                       doctest::Contains("rmsnorm: weight (6,) does not match input (4, 7)"),
                       cbq::Error);
  auto w2 = tape.constant(randn<double>(Shape{1, 7}, 3));
  CHECK_THROWS_WITH_AS(ops::rmsnorm(x, w2, 1e-5), doctest::Contains("rmsnorm: weight (1, 7)"),
                       cbq::Error);
}
