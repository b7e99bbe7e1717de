// softmax and log_softmax (ops/softmax.hpp): against the naive formula in long double, gradient
// checks, huge logits, thread-count independence, errors. CUDA parity: tests/gpu/test_softmax.cu.
// Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/softmax.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

const Shape kSoftmaxShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{11}};

// Naive softmax over the last dimension in long double, without the max shift (long double's
// range holds exp(±1000)); `log` selects log_softmax.
Tensor<double> naive_softmax(const Tensor<double>& x, bool log) {
  const int64_t n = x.shape().cols(), rows = x.shape().rows();
  Tensor<double> y(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    long double s = 0;
    for (int64_t j = 0; j < n; ++j) s += std::exp(static_cast<long double>(x[r * n + j]));
    for (int64_t j = 0; j < n; ++j) {
      long double p = std::exp(static_cast<long double>(x[r * n + j])) / s;
      y[r * n + j] = static_cast<double>(log ? std::log(p) : p);
    }
  }
  return y;
}

}  // namespace

TEST_CASE("softmax: forward matches the naive formula on odd shapes, rows sum to 1") {
  for (const Shape& shape : kSoftmaxShapes) {
    auto x = randn<double>(shape, 18, 3.0);
    Tape<double> tape;
    auto p = ops::softmax(tape.constant(x));
    auto lp = ops::log_softmax(tape.constant(x));
    CHECK(max_abs_diff(p.value(), naive_softmax(x, false)) < 1e-14);
    CHECK(max_abs_diff(lp.value(), naive_softmax(x, true)) < 1e-13);
    const int64_t n = shape.cols();
    for (int64_t r = 0; r < shape.rows(); ++r) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += p.value()[r * n + j];
      CHECK(s == doctest::Approx(1.0).epsilon(1e-14));
    }
    Tape<float> tf;
    auto pf = ops::softmax(tf.constant(x.cast<float>()));
    CHECK(max_abs_diff(pf.value(), naive_softmax(x, false)) < 1e-6);
  }
}

TEST_CASE("softmax: gradient check in double for softmax and log_softmax") {
  for (const Shape& shape : kSoftmaxShapes) {
    auto x = randn<double>(shape, 19, 2.0);
    auto rs = gradcheck(
        [](Tape<double>&, std::vector<Var<double>>& v) { return ops::softmax(v[0]); }, {x});
    auto rl = gradcheck(
        [](Tape<double>&, std::vector<Var<double>>& v) { return ops::log_softmax(v[0]); }, {x});
    CAPTURE(shape);
    CHECK(rs.max_rel_error < 1e-6);
    CHECK(rl.max_rel_error < 1e-6);
  }
}

TEST_CASE("softmax: huge logits (around 1000) give finite rows summing to 1, in float and double") {
  auto x = randn<double>(Shape{4, 9}, 20, 5.0);
  for (int64_t i = 0; i < x.numel(); ++i) x[i] += (i % 2 ? 1000.0 : -1000.0) + (i / 9) * 1.0;
  x[0] = 1000.0;  // the row's maximum shares a row with -1000s
  const auto ref_p = naive_softmax(x, false), ref_lp = naive_softmax(x, true);
  // The float reference starts from the float-rounded logits (rounding at 1000 moves them by
  // up to 3e-5, which would otherwise dominate the comparison).
  const auto xf = x.cast<float>();
  const auto ref_pf = naive_softmax(xf.cast<double>(), false);
  const auto ref_lpf = naive_softmax(xf.cast<double>(), true);
  Tape<double> tape;
  auto p = ops::softmax(tape.constant(x));
  auto lp = ops::log_softmax(tape.constant(x));
  Tape<float> tf;
  auto pf = ops::softmax(tf.constant(xf));
  auto lpf = ops::log_softmax(tf.constant(xf));
  for (int64_t r = 0; r < 4; ++r) {
    double s = 0, sf = 0;
    for (int64_t j = 0; j < 9; ++j) {
      REQUIRE(std::isfinite(p.value()(r, j)));
      REQUIRE(std::isfinite(lp.value()(r, j)));
      REQUIRE(std::isfinite(pf.value()(r, j)));
      REQUIRE(std::isfinite(lpf.value()(r, j)));
      s += p.value()(r, j);
      sf += pf.value()(r, j);
    }
    CHECK(s == doctest::Approx(1.0).epsilon(1e-14));
    CHECK(sf == doctest::Approx(1.0).epsilon(1e-6));
  }
  CHECK(max_abs_diff(p.value(), ref_p) < 1e-15);
  CHECK(max_abs_diff(lp.value(), ref_lp) < 1e-12);
  CHECK(max_abs_diff(pf.value(), ref_pf) < 1e-7);
  CHECK(max_abs_diff(lpf.value(), ref_lpf) < 2e-4);  // float spacing at 2000 is 1.2e-4
}

TEST_CASE("softmax: a row-parallel large input matches a single-threaded run exactly") {
  auto x = randn<float>(Shape{64, 1537}, 21, 4.0f);
  const int saved_threads = num_threads();
  std::vector<std::vector<float>> values, grads;
  for (int threads : {1, 2}) {
    set_pool_threads(threads);
    Tape<float> tape;
    auto v = tape.input(x);
    auto y = ops::softmax(v);
    y.grad().copy_from(randn<float>(y.shape(), 22));
    tape.backward_from_seeded();
    values.push_back(y.value().to_vector());
    grads.push_back(v.grad().to_vector());
  }
  set_pool_threads(saved_threads);
  CHECK(values[0] == values[1]);
  CHECK(grads[0] == grads[1]);
}

TEST_CASE("softmax: a 0-dimensional input is an error naming the op") {
  Tape<double> tape;
  auto x = tape.constant(Tensor<double>(Shape{}));
  CHECK_THROWS_WITH_AS(ops::log_softmax(x),
                       doctest::Contains("log_softmax: input must have at least one dimension"),
                       cbq::Error);
}
