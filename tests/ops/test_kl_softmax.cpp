// kl_softmax (ops/kl_softmax.hpp): against the naive KL of softmaxes at several temperatures,
// gradient checks, huge logits, errors. CUDA parity: tests/gpu/test_kl_softmax.cu.
// Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/kl_softmax.hpp>

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

}  // namespace

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
