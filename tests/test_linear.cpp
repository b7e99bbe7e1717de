#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
// Naive C = op(A) op(B).
Tensor<double> naive_matmul(const Tensor<double>& A, const Tensor<double>& B, bool ta, bool tb) {
  int64_t m = ta ? A.size(1) : A.size(0), k = ta ? A.size(0) : A.size(1);
  int64_t n = tb ? B.size(0) : B.size(1);
  Tensor<double> C(Shape{m, n});
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += (ta ? A(p, i) : A(i, p)) * (tb ? B(j, p) : B(p, j));
      C(i, j) = s;
    }
  return C;
}
}  // namespace

TEST_CASE("matmul: forward matches the naive loop for every transpose, odd sizes") {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const int64_t m = 7, k = 13, n = 5;
      auto A = randn<double>(ta ? Shape{k, m} : Shape{m, k}, 1);
      auto B = randn<double>(tb ? Shape{n, k} : Shape{k, n}, 2);
      Tape<double> tape;
      auto C = ops::matmul(tape.constant(A), tape.constant(B), ta, tb);
      CHECK(max_abs_diff(C.value(), naive_matmul(A, B, ta, tb)) < 1e-12);
    }
}

TEST_CASE("matmul: gradient check in double for every transpose") {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const int64_t m = 4, k = 6, n = 3;
      auto A = randn<double>(ta ? Shape{k, m} : Shape{m, k}, 3);
      auto B = randn<double>(tb ? Shape{n, k} : Shape{k, n}, 4);
      auto r =
          gradcheck([&](Tape<double>&,
                        std::vector<Var<double>>& v) { return ops::matmul(v[0], v[1], ta, tb); },
                    {A, B});
      CAPTURE(ta);
      CAPTURE(tb);
      CHECK(r.max_rel_error < 1e-6);
    }
}

TEST_CASE("matmul: mismatched inner dimensions name the op and the shapes") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{2, 3}, 1));
  auto b = tape.constant(randn<double>(Shape{4, 5}, 2));
  CHECK_THROWS_WITH_AS(ops::matmul(a, b), doctest::Contains("matmul: inner dimensions differ"),
                       cbq::Error);
}

TEST_CASE("linear: forward with and without bias matches x·Wᵀ + b, gradient check") {
  auto x = randn<double>(Shape{2, 5, 7}, 5);
  auto w = randn<double>(Shape{3, 7}, 6);
  auto b = randn<double>(Shape{3}, 7);
  Tape<double> tape;
  auto y = ops::linear(tape.constant(x), tape.constant(w), tape.constant(b));
  REQUIRE(y.shape() == Shape{2, 5, 3});
  auto ref = naive_matmul(x.reshape(Shape{10, 7}), w, false, true);
  for (int64_t r = 0; r < 10; ++r)
    for (int64_t j = 0; j < 3; ++j) ref(r, j) += b[j];
  CHECK(max_abs_diff(y.value().reshape(Shape{10, 3}), ref) < 1e-12);

  auto with_bias = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) { return ops::linear(v[0], v[1], v[2]); },
      {x, w, b});
  CHECK(with_bias.max_rel_error < 1e-6);
  auto no_bias = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) { return ops::linear(v[0], v[1]); }, {x, w});
  CHECK(no_bias.max_rel_error < 1e-6);
}

TEST_CASE("linear: a weight that does not match the input is a clear error") {
  Tape<double> tape;
  auto x = tape.constant(randn<double>(Shape{4, 7}, 1));
  auto w = tape.constant(randn<double>(Shape{3, 6}, 2));
  CHECK_THROWS_WITH_AS(ops::linear(x, w),
                       doctest::Contains("linear: input (4, 7) does not match weight (3, 6)"),
                       cbq::Error);
}
