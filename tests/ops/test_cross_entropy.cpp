// cross_entropy and token_nll (ops/cross_entropy.hpp): against the naive log softmax, gradient
// checks, huge logits, errors. CUDA parity: tests/gpu/test_cross_entropy.cu.
// Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/cross_entropy.hpp>

#include "ops/loss_reference.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::kLossShapes;
using cbq::testing::max_abs_diff;
using cbq::testing::naive_log_softmax_row;
using cbq::testing::offset_logits;
using cbq::testing::randn;

namespace {

double naive_cross_entropy(const Tensor<double>& x, const std::vector<int32_t>& targets) {
  const int64_t n = x.shape().cols(), rows = x.shape().rows();
  long double total = 0;
  for (int64_t r = 0; r < rows; ++r)
    total -= naive_log_softmax_row(x.data() + r * n, n)[targets[r]];
  return static_cast<double>(total / rows);
}

std::vector<int32_t> random_targets(int64_t rows, int64_t classes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(rows);
  for (auto& v : t) v = static_cast<int32_t>(rng() % classes);
  return t;
}

}  // namespace

// ---------------------------------------------------------------- cross_entropy, token_nll

TEST_CASE("cross_entropy: equals minus the mean naive log softmax at the targets, odd shapes") {
  for (const Shape& shape : kLossShapes) {
    auto x = randn<double>(shape, 1, 2.0);
    auto targets = random_targets(shape.rows(), shape.cols(), 2);
    Tape<double> tape;
    auto loss = ops::cross_entropy(tape.constant(x), targets);
    REQUIRE(loss.shape() == Shape{1});
    CHECK(loss.value()[0] == doctest::Approx(naive_cross_entropy(x, targets)).epsilon(1e-13));
    Tape<float> tf;
    auto lf = ops::cross_entropy(tf.constant(x.cast<float>()), targets);
    CHECK(lf.value()[0] == doctest::Approx(naive_cross_entropy(x, targets)).epsilon(1e-5));
  }
}

TEST_CASE("cross_entropy: gradient check in double and gradient rows of softmax minus onehot") {
  for (const Shape& shape : kLossShapes) {
    auto x = randn<double>(shape, 3, 2.0);
    auto targets = random_targets(shape.rows(), shape.cols(), 4);
    auto r =
        gradcheck([&](Tape<double>&,
                      std::vector<Var<double>>& v) { return ops::cross_entropy(v[0], targets); },
                  {x});
    CAPTURE(shape);
    CHECK(r.max_rel_error < 1e-6);
  }
  // Each gradient row sums to zero (softmax sums to 1, minus one onehot).
  Tape<double> tape;
  auto x = tape.input(randn<double>(Shape{5, 11}, 5));
  tape.backward(ops::cross_entropy(x, random_targets(5, 11, 6)));
  for (int64_t r = 0; r < 5; ++r) {
    double s = 0;
    for (int64_t j = 0; j < 11; ++j) s += x.grad()(r, j);
    CHECK(std::abs(s) < 1e-15);
  }
}

TEST_CASE(
    "cross_entropy: logits around +-500 give the exact loss and gradient in float and double") {
  for (double offset : {500.0, -500.0}) {
    const int64_t rows = 4, classes = 13;
    auto x = offset_logits(Shape{rows, classes}, 7, offset, 3.0);
    auto targets = random_targets(rows, classes, 8);
    // Reference gradient (softmax − onehot) / R from the naive long-double log softmax.
    Tensor<double> ref_grad(Shape{rows, classes});
    for (int64_t r = 0; r < rows; ++r) {
      auto lp = naive_log_softmax_row(x.data() + r * classes, classes);
      for (int64_t j = 0; j < classes; ++j)
        ref_grad(r, j) = static_cast<double>((std::exp(lp[j]) - (j == targets[r])) / rows);
    }
    Tape<double> tape;
    auto v = tape.input(x);
    auto loss = ops::cross_entropy(v, targets);
    tape.backward(loss);
    CAPTURE(offset);
    CHECK(loss.value()[0] == doctest::Approx(naive_cross_entropy(x, targets)).epsilon(1e-13));
    CHECK(max_abs_diff(v.grad(), ref_grad) < 1e-15);

    // Float: the reference starts from the float-rounded logits.
    const auto xf = x.cast<float>();
    Tape<float> tf;
    auto vf = tf.input(xf);
    auto lf = ops::cross_entropy(vf, targets);
    tf.backward(lf);
    REQUIRE(std::isfinite(lf.value()[0]));
    CHECK(lf.value()[0] ==
          doctest::Approx(naive_cross_entropy(xf.cast<double>(), targets)).epsilon(1e-6));
    CHECK(max_abs_diff(vf.grad(), ref_grad) < 1e-5);
  }
}

TEST_CASE("cross_entropy: token_nll gives the per-row losses whose mean is the loss") {
  auto x = randn<double>(Shape{2, 5, 9}, 9, 2.0);
  auto targets = random_targets(10, 9, 10);
  auto nll = ops::token_nll(x, targets);
  REQUIRE(nll.size() == 10);
  double mean = 0;
  for (int64_t r = 0; r < 10; ++r) {
    auto lp = naive_log_softmax_row(x.data() + r * 9, 9);
    CHECK(nll[r] == doctest::Approx(static_cast<double>(-lp[targets[r]])).epsilon(1e-13));
    CHECK(nll[r] > 0);
    mean += nll[r] / 10;
  }
  Tape<double> tape;
  CHECK(ops::cross_entropy(tape.constant(x), targets).value()[0] ==
        doctest::Approx(mean).epsilon(1e-13));
  // Float logits at +500 still produce accurate per-row values (accumulated in double).
  auto big = offset_logits(Shape{3, 6}, 11, 500.0, 2.0).cast<float>();
  auto nll_f = ops::token_nll(big, {0, 5, 2});
  for (int64_t r = 0; r < 3; ++r) {
    auto lp = naive_log_softmax_row(big.cast<double>().data() + r * 6, 6);
    CHECK(nll_f[r] ==
          doctest::Approx(static_cast<double>(-lp[std::vector<int>{0, 5, 2}[r]])).epsilon(1e-12));
  }
}

TEST_CASE("cross_entropy: wrong target counts and out-of-range targets are clear errors") {
  Tape<double> tape;
  auto x = tape.constant(randn<double>(Shape{3, 7}, 1));
  CHECK_THROWS_WITH_AS(
      ops::cross_entropy(x, {0, 1}),
      doctest::Contains("cross_entropy: 2 targets for logits of shape (3, 7) (3 rows)"),
      cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::cross_entropy(x, {0, 7, 1}),
      doctest::Contains("cross_entropy: target 7 at row 1 is out of range for 7 classes"),
      cbq::Error);
  CHECK_THROWS_WITH_AS(ops::token_nll(x.value(), {0, 1, -2}),
                       doctest::Contains("token_nll: target -2 at row 2 is out of range"),
                       cbq::Error);
}
