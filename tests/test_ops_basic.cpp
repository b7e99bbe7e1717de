#include <cbq/ops/embedding.hpp>
#include <cbq/ops/mul.hpp>
#include <cbq/ops/reduce.hpp>
#include <cbq/ops/reshape.hpp>
#include <cbq/ops/scale.hpp>
#include <cbq/ops/softmax.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

const Shape kShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{11}};

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

// ---------------------------------------------------------------- mul

TEST_CASE("mul: forward matches the naive product on odd shapes, double and float") {
  for (const Shape& shape : kShapes) {
    auto a = randn<double>(shape, 1), b = randn<double>(shape, 2);
    Tape<double> tape;
    auto y = ops::mul(tape.constant(a), tape.constant(b));
    Tensor<double> ref(shape);
    for (int64_t i = 0; i < a.numel(); ++i) ref[i] = a[i] * b[i];
    REQUIRE(y.shape() == shape);
    CHECK(max_abs_diff(y.value(), ref) == 0.0);

    Tape<float> tf;
    auto yf = ops::mul(tf.constant(a.cast<float>()), tf.constant(b.cast<float>()));
    CHECK(max_abs_diff(yf.value(), ref) < 1e-5);
  }
}

TEST_CASE("mul: gradient check in double for both inputs and for mul(x, x)") {
  for (const Shape& shape : kShapes) {
    auto r =
        gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::mul(v[0], v[1]); },
                  {randn<double>(shape, 3), randn<double>(shape, 4)});
    CHECK(r.max_rel_error < 1e-6);
  }
  // The same variable on both sides: d(x²) = 2x, both terms must accumulate.
  auto square =
      gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::mul(v[0], v[0]); },
                {randn<double>(Shape{3, 7}, 5)});
  CHECK(square.max_rel_error < 1e-6);
  // Only one input differentiable: the constant gets no gradient.
  Tape<double> tape;
  auto a = tape.input(randn<double>(Shape{2, 3}, 6));
  auto b = tape.constant(randn<double>(Shape{2, 3}, 7));
  tape.backward(ops::sum(ops::mul(a, b)));
  CHECK(max_abs_diff(a.grad(), b.value()) == 0.0);
  CHECK_FALSE(b.has_grad());
}

TEST_CASE("mul: mismatched shapes name the op and both shapes") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{3, 7}, 1));
  auto b = tape.constant(randn<double>(Shape{7, 3}, 2));
  CHECK_THROWS_WITH_AS(ops::mul(a, b), doctest::Contains("mul: shapes (3, 7) and (7, 3) differ"),
                       cbq::Error);
}

// ---------------------------------------------------------------- scale

TEST_CASE("scale: forward is alpha times the input, gradient check in double") {
  for (const Shape& shape : kShapes) {
    auto a = randn<double>(shape, 8);
    Tape<double> tape;
    auto y = ops::scale(tape.constant(a), -2.5);
    Tensor<double> ref(shape);
    for (int64_t i = 0; i < a.numel(); ++i) ref[i] = -2.5 * a[i];
    CHECK(max_abs_diff(y.value(), ref) == 0.0);
    auto r = gradcheck(
        [](Tape<double>&, std::vector<Var<double>>& v) { return ops::scale(v[0], 0.37); }, {a});
    CHECK(r.max_rel_error < 1e-6);
  }
  Tape<float> tf;
  auto yf = ops::scale(tf.constant(Tensor<float>::full(Shape{5}, 2.0f)), 3.0f);
  for (int64_t i = 0; i < 5; ++i) CHECK(yf.value()[i] == 6.0f);
}

// ---------------------------------------------------------------- sum, mean

TEST_CASE("sum: forward and mean match naive totals, output shape (1,), gradient check") {
  for (const Shape& shape : kShapes) {
    auto a = randn<double>(shape, 9);
    double ref = 0;
    for (int64_t i = 0; i < a.numel(); ++i) ref += a[i];
    Tape<double> tape;
    auto s = ops::sum(tape.constant(a));
    auto m = ops::mean(tape.constant(a));
    REQUIRE(s.shape() == Shape{1});
    REQUIRE(m.shape() == Shape{1});
    CHECK(s.value()[0] == doctest::Approx(ref).epsilon(1e-12));
    CHECK(m.value()[0] == doctest::Approx(ref / a.numel()).epsilon(1e-12));
    auto rs =
        gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::sum(v[0]); }, {a});
    auto rm =
        gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::mean(v[0]); }, {a});
    CHECK(rs.max_rel_error < 1e-6);
    CHECK(rm.max_rel_error < 1e-6);
  }
}

TEST_CASE("sum: large float sums accumulate in double and do not depend on the thread count") {
  const int64_t n = 300001;  // many blocks, odd tail
  auto a = randn<double>(Shape{n}, 10).cast<float>();
  long double ref = 0;
  for (int64_t i = 0; i < n; ++i) ref += a[i];
  const int saved_threads = num_threads();
  std::vector<float> results;
  for (int threads : {1, 2, 3}) {
    set_pool_threads(threads);
    Tape<float> tape;
    results.push_back(ops::sum(tape.constant(a)).value()[0]);
  }
  set_pool_threads(saved_threads);
  CHECK(results[0] == results[1]);
  CHECK(results[0] == results[2]);
  CHECK(std::abs(results[0] - static_cast<double>(ref)) < 1e-3);
}

TEST_CASE("mean: an empty input is an error naming the op and the shape") {
  Tape<double> tape;
  auto a = tape.constant(Tensor<double>(Shape{0, 4}));
  CHECK_THROWS_WITH_AS(
      ops::mean(a), doctest::Contains("mean: input of shape (0, 4) has no elements"), cbq::Error);
  CHECK(ops::sum(a).value()[0] == 0.0);
}

// ---------------------------------------------------------------- reshape

TEST_CASE("reshape: a view without a copy whose gradient flows back with the input's shape") {
  auto a = randn<double>(Shape{2, 5, 9}, 11);
  Tape<double> tape;
  auto x = tape.input(a);
  auto y = ops::reshape(x, Shape{10, 9});
  REQUIRE(y.shape() == Shape{10, 9});
  CHECK(y.value().shares_storage(x.value()));
  CHECK(y.value().data() == x.value().data());

  auto r = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) {
        // reshape between two ops so the gradient must be re-read in the input's layout
        return ops::mul(ops::reshape(v[0], Shape{9, 10}), v[1]);
      },
      {randn<double>(Shape{2, 5, 9}, 12), randn<double>(Shape{9, 10}, 13)});
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("reshape: a different element count is an error naming both shapes") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{3, 7}, 1));
  CHECK_THROWS_WITH_AS(
      ops::reshape(a, Shape{4, 5}),
      doctest::Contains("reshape: cannot view (3, 7) (21 elements) as (4, 5) (20 elements)"),
      cbq::Error);
}

// ---------------------------------------------------------------- embedding

TEST_CASE("embedding: forward gathers table rows, gradient scatter-adds repeated ids") {
  auto table = randn<double>(Shape{7, 5}, 14);
  const std::vector<int32_t> ids = {3, 0, 6, 3, 3, 1, 0};
  Tape<double> tape;
  auto w = tape.input(table);
  auto y = ops::embedding(w, ids);
  REQUIRE(y.shape() == Shape{7, 5});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < 5; ++j) CHECK(y.value()(t, j) == table(ids[t], j));

  // Seed a known output gradient and compare with a serial scatter-add.
  auto seed = randn<double>(Shape{7, 5}, 15);
  y.grad().copy_from(seed);
  tape.backward_from_seeded();
  Tensor<double> ref(Shape{7, 5});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < 5; ++j) ref(ids[t], j) += seed(t, j);
  CHECK(max_abs_diff(w.grad(), ref) < 1e-15);

  auto r = gradcheck(
      [&](Tape<double>&, std::vector<Var<double>>& v) { return ops::embedding(v[0], ids); },
      {table});
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("embedding: the threaded column split matches a serial scatter-add exactly") {
  const int64_t vocab = 5, d = 20001;  // wide enough to split over columns
  auto table = randn<float>(Shape{vocab, d}, 16);
  const std::vector<int32_t> ids = {4, 1, 4, 4, 0, 1};
  Tape<float> tape;
  auto w = tape.input(table);
  auto y = ops::embedding(w, ids);
  auto seed = randn<float>(y.shape(), 17);
  y.grad().copy_from(seed);
  tape.backward_from_seeded();
  Tensor<float> ref(Shape{vocab, d});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < d; ++j) ref(ids[t], j) += seed(t, j);
  CHECK(max_abs_diff(w.grad(), ref) == 0.0);
}

TEST_CASE("embedding: bad ids and tables name the position, the id and the shape") {
  Tape<double> tape;
  auto w = tape.constant(randn<double>(Shape{4, 3}, 1));
  CHECK_THROWS_WITH_AS(
      ops::embedding(w, {0, 2, -1}),
      doctest::Contains(
          "embedding: id -1 at position 2 is out of range for a table of 4 rows (shape (4, 3))"),
      cbq::Error);
  CHECK_THROWS_WITH_AS(ops::embedding(w, {4}),
                       doctest::Contains("embedding: id 4 at position 0 is out of range"),
                       cbq::Error);
  auto flat = tape.constant(randn<double>(Shape{12}, 2));
  CHECK_THROWS_WITH_AS(ops::embedding(flat, {0}),
                       doctest::Contains("embedding: table must be 2-D (V, d), got (12,)"),
                       cbq::Error);
}

// ---------------------------------------------------------------- softmax, log_softmax

TEST_CASE("softmax: forward matches the naive formula on odd shapes, rows sum to 1") {
  for (const Shape& shape : kShapes) {
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
  for (const Shape& shape : kShapes) {
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
