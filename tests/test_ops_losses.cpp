#include <cbq/ops/cross_entropy.hpp>
#include <cbq/ops/kl_softmax.hpp>
#include <cbq/ops/mse.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

const Shape kLossShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{1, 4}};

// Naive log softmax of one row in long double without the max shift (long double's range
// holds exp(±1000)).
std::vector<long double> naive_log_softmax_row(const double* x, int64_t n, double scale = 1.0) {
  long double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(static_cast<long double>(x[j]) * scale);
  std::vector<long double> out(n);
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<long double>(x[j]) * scale - std::log(s);
  return out;
}

double naive_cross_entropy(const Tensor<double>& x, const std::vector<int32_t>& targets) {
  const int64_t n = x.shape().cols(), rows = x.shape().rows();
  long double total = 0;
  for (int64_t r = 0; r < rows; ++r)
    total -= naive_log_softmax_row(x.data() + r * n, n)[targets[r]];
  return static_cast<double>(total / rows);
}

double naive_kl(const Tensor<double>& a, const Tensor<double>& b, double tau) {
  const int64_t n = a.shape().cols(), rows = a.shape().rows();
  long double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    auto lp = naive_log_softmax_row(a.data() + r * n, n, 1.0 / tau);
    auto lq = naive_log_softmax_row(b.data() + r * n, n, 1.0 / tau);
    for (int64_t j = 0; j < n; ++j) total += std::exp(lp[j]) * (lp[j] - lq[j]);
  }
  return static_cast<double>(total / rows);
}

std::vector<int32_t> random_targets(int64_t rows, int64_t classes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(rows);
  for (auto& v : t) v = static_cast<int32_t>(rng() % classes);
  return t;
}

// Logits centred on `offset` with O(spread) differences: a non-degenerate softmax at huge values.
Tensor<double> offset_logits(const Shape& shape, uint64_t seed, double offset, double spread) {
  auto x = randn<double>(shape, seed, spread);
  for (int64_t i = 0; i < x.numel(); ++i) x[i] += offset;
  return x;
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

// ---------------------------------------------------------------- mse, row_sq_error

TEST_CASE("mse: forward and row_sq_error match naive sums on odd shapes") {
  for (const Shape& shape : kLossShapes) {
    auto a = randn<double>(shape, 12), b = randn<double>(shape, 13);
    long double total = 0;
    for (int64_t i = 0; i < a.numel(); ++i) total += (a[i] - b[i]) * (a[i] - b[i]);
    Tape<double> tape;
    auto m = ops::mse(tape.constant(a), tape.constant(b));
    auto rs = ops::row_sq_error(tape.constant(a), tape.constant(b));
    REQUIRE(m.shape() == Shape{1});
    REQUIRE(rs.shape() == Shape{1});
    CHECK(m.value()[0] == doctest::Approx(static_cast<double>(total / a.numel())).epsilon(1e-13));
    CHECK(rs.value()[0] ==
          doctest::Approx(static_cast<double>(total / shape.rows())).epsilon(1e-13));
    Tape<float> tf;
    auto rf = ops::row_sq_error(tf.constant(a.cast<float>()), tf.constant(b.cast<float>()));
    CHECK(rf.value()[0] ==
          doctest::Approx(static_cast<double>(total / shape.rows())).epsilon(1e-5));
  }
}

TEST_CASE("mse: gradient check in double for both inputs and with either one constant") {
  for (const Shape& shape : kLossShapes) {
    auto a = randn<double>(shape, 14), b = randn<double>(shape, 15);
    auto both_mse = gradcheck(
        [](Tape<double>&, std::vector<Var<double>>& v) { return ops::mse(v[0], v[1]); }, {a, b});
    auto both_rows = gradcheck(
        [](Tape<double>&, std::vector<Var<double>>& v) { return ops::row_sq_error(v[0], v[1]); },
        {a, b});
    auto only_b = gradcheck(
        [](Tape<double>&, std::vector<Var<double>>& v) { return ops::row_sq_error(v[0], v[1]); },
        {a, b}, {false, true});
    auto only_a =
        gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::mse(v[0], v[1]); },
                  {a, b}, {true, false});
    CAPTURE(shape);
    CHECK(both_mse.max_rel_error < 1e-6);
    CHECK(both_rows.max_rel_error < 1e-6);
    CHECK(only_b.max_rel_error < 1e-6);
    CHECK(only_a.max_rel_error < 1e-6);
  }
  // Explicit: d/da of mean_t ‖a_t − b_t‖² is 2 (a − b) / R.
  auto a = randn<double>(Shape{3, 7}, 16), b = randn<double>(Shape{3, 7}, 17);
  Tape<double> tape;
  auto va = tape.input(a);
  auto vb = tape.input(b);
  tape.backward(ops::row_sq_error(va, vb));
  for (int64_t i = 0; i < a.numel(); ++i) {
    CHECK(va.grad()[i] == doctest::Approx(2 * (a[i] - b[i]) / 3).epsilon(1e-14));
    CHECK(vb.grad()[i] == doctest::Approx(-2 * (a[i] - b[i]) / 3).epsilon(1e-14));
  }
}

TEST_CASE("mse: mismatched shapes and empty inputs name the op and the shapes") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{3, 7}, 1));
  auto b = tape.constant(randn<double>(Shape{3, 8}, 2));
  CHECK_THROWS_WITH_AS(ops::mse(a, b), doctest::Contains("mse: shapes (3, 7) and (3, 8) differ"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(ops::row_sq_error(a, b),
                       doctest::Contains("row_sq_error: shapes (3, 7) and (3, 8) differ"),
                       cbq::Error);
  auto e = tape.constant(Tensor<double>(Shape{0, 5}));
  CHECK_THROWS_WITH_AS(ops::row_sq_error(e, e),
                       doctest::Contains("row_sq_error: inputs of shape (0, 5) are empty"),
                       cbq::Error);
}

// ---------------------------------------------------------------- kl_softmax

TEST_CASE("kl_softmax: forward matches the naive KL of softmaxes, odd shapes and temperatures") {
  for (const Shape& shape : kLossShapes)
    for (double tau : {1.0, 2.5, 0.6}) {
      auto a = randn<double>(shape, 18, 2.0), b = randn<double>(shape, 19, 2.0);
      Tape<double> tape;
      auto kl = ops::kl_softmax(tape.constant(a), tape.constant(b), tau);
      REQUIRE(kl.shape() == Shape{1});
      CAPTURE(shape);
      CAPTURE(tau);
      CHECK(kl.value()[0] > 0);
      CHECK(kl.value()[0] == doctest::Approx(naive_kl(a, b, tau)).epsilon(1e-12));
      Tape<float> tf;
      auto klf = ops::kl_softmax(tf.constant(a.cast<float>()), tf.constant(b.cast<float>()),
                                 static_cast<float>(tau));
      CHECK(klf.value()[0] == doctest::Approx(naive_kl(a, b, tau)).epsilon(1e-5));
    }
}

TEST_CASE("kl_softmax: gradient check in double for both inputs, at several temperatures") {
  for (const Shape& shape : kLossShapes)
    for (double tau : {1.0, 0.7, 3.0}) {
      auto a = randn<double>(shape, 20, 1.5), b = randn<double>(shape, 21, 1.5);
      auto both =
          gradcheck([&](Tape<double>&,
                        std::vector<Var<double>>& v) { return ops::kl_softmax(v[0], v[1], tau); },
                    {a, b});
      auto only_b =
          gradcheck([&](Tape<double>&,
                        std::vector<Var<double>>& v) { return ops::kl_softmax(v[0], v[1], tau); },
                    {a, b}, {false, true});
      CAPTURE(shape);
      CAPTURE(tau);
      CHECK(both.max_rel_error < 1e-6);
      CHECK(only_b.max_rel_error < 1e-6);
    }
}

TEST_CASE("kl_softmax: identical inputs give exactly zero loss and zero gradients") {
  for (double offset : {0.0, 500.0}) {
    auto a = offset_logits(Shape{2, 5, 9}, 22, offset, 3.0);
    Tape<double> tape;
    auto va = tape.input(a);
    auto vb = tape.input(a.clone());
    auto kl = ops::kl_softmax(va, vb);
    tape.backward(kl);
    CHECK(kl.value()[0] == 0.0);
    for (int64_t i = 0; i < a.numel(); ++i) {
      CHECK(va.grad()[i] == 0.0);
      CHECK(vb.grad()[i] == 0.0);
    }
  }
}

TEST_CASE("kl_softmax: logits around +-500 give the exact loss and gradients in float and double") {
  const int64_t rows = 3, n = 11;
  for (double offset : {500.0, -500.0}) {
    auto a = offset_logits(Shape{rows, n}, 23, offset, 3.0);
    auto b =
        offset_logits(Shape{rows, n}, 24, -offset, 3.0);  // opposite side: maxima differ by 1000
    // Reference gradients from the naive long-double log softmaxes (see kl_softmax.hpp).
    Tensor<double> ref_da(Shape{rows, n}), ref_db(Shape{rows, n});
    for (int64_t r = 0; r < rows; ++r) {
      auto lp = naive_log_softmax_row(a.data() + r * n, n);
      auto lq = naive_log_softmax_row(b.data() + r * n, n);
      long double kl = 0;
      for (int64_t j = 0; j < n; ++j) kl += std::exp(lp[j]) * (lp[j] - lq[j]);
      for (int64_t j = 0; j < n; ++j) {
        ref_da(r, j) = static_cast<double>(std::exp(lp[j]) * (lp[j] - lq[j] - kl) / rows);
        ref_db(r, j) = static_cast<double>((std::exp(lq[j]) - std::exp(lp[j])) / rows);
      }
    }
    Tape<double> tape;
    auto va = tape.input(a);
    auto vb = tape.input(b);
    auto kl = ops::kl_softmax(va, vb);
    tape.backward(kl);
    CAPTURE(offset);
    CHECK(kl.value()[0] == doctest::Approx(naive_kl(a, b, 1.0)).epsilon(1e-13));
    CHECK(max_abs_diff(va.grad(), ref_da) < 1e-13);
    CHECK(max_abs_diff(vb.grad(), ref_db) < 1e-15);

    const auto af = a.cast<float>(), bf = b.cast<float>();
    Tape<float> tf;
    auto vaf = tf.input(af);
    auto vbf = tf.input(bf);
    auto klf = ops::kl_softmax(vaf, vbf);
    tf.backward(klf);
    REQUIRE(std::isfinite(klf.value()[0]));
    CHECK(klf.value()[0] ==
          doctest::Approx(naive_kl(af.cast<double>(), bf.cast<double>(), 1.0)).epsilon(1e-6));
    // Against the double reference: rounding the inputs to float at 500 (3e-5) dominates.
    CHECK(max_abs_diff(vaf.grad(), ref_da) < 1e-5);
    CHECK(max_abs_diff(vbf.grad(), ref_db) < 1e-5);
  }
}

TEST_CASE("kl_softmax: bad shapes and temperatures are clear errors") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{3, 7}, 1));
  auto b = tape.constant(randn<double>(Shape{3, 6}, 2));
  CHECK_THROWS_WITH_AS(ops::kl_softmax(a, b),
                       doctest::Contains("kl_softmax: shapes (3, 7) and (3, 6) differ"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::kl_softmax(a, a, 0.0),
      doctest::Contains("kl_softmax: temperature must be positive and finite, got 0"), cbq::Error);
  CHECK_THROWS_WITH_AS(ops::kl_softmax(a, a, -1.0), doctest::Contains("got -1"), cbq::Error);
}
