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

TEST_CASE("blas::gemm_batch: each GEMM equals the naive product, 1 to 3 threads, every transpose") {
  const int saved = num_threads();
  struct Dims {
    int64_t m, n, k;
  };
  // Above and below the split threshold, odd sizes, k = 0 (C = β·C), M > N and N > M.
  const std::vector<Dims> dims = {{100, 90, 70}, {37, 130, 80}, {5, 3, 4},
                                  {64, 64, 64},  {90, 17, 0},   {200, 48, 33}};
  for (int threads : {1, 2, 3})
    for (std::size_t count : {std::size_t{2}, std::size_t{3}, std::size_t{6}})
      for (double beta : {0.0, 0.5}) {
        set_num_threads(threads);
        std::vector<Tensor<double>> A, B, C, ref;
        std::vector<blas::GemmArgs<double>> gemms;
        for (std::size_t i = 0; i < count; ++i) {
          const Dims d = dims[i];
          const bool ta = i % 2 == 1, tb = i % 3 == 0;
          A.push_back(randn<double>(ta ? Shape{d.k, d.m} : Shape{d.m, d.k}, 10 + i));
          B.push_back(randn<double>(tb ? Shape{d.n, d.k} : Shape{d.k, d.n}, 20 + i));
          C.push_back(randn<double>(Shape{d.m, d.n}, 30 + i));
          Tensor<double> r = C.back().clone();
          Tensor<double> prod = naive_matmul(A.back(), B.back(), ta, tb);
          for (int64_t e = 0; e < r.numel(); ++e) r[e] = 1.5 * prod[e] + beta * r[e];
          ref.push_back(r);
        }
        for (std::size_t i = 0; i < count; ++i) {
          const Dims d = dims[i];
          const bool ta = i % 2 == 1, tb = i % 3 == 0;
          gemms.push_back(blas::gemm_args(ta, tb, d.m, d.n, d.k, 1.5, A[i].data(), A[i].size(1),
                                          B[i].data(), B[i].size(1), beta, C[i].data(), d.n));
        }
        blas::gemm_batch(gemms.data(), static_cast<int>(count));
        for (std::size_t i = 0; i < count; ++i) {
          CAPTURE(threads);
          CAPTURE(i);
          CAPTURE(beta);
          CHECK(max_abs_diff(C[i], ref[i]) < 1e-11);
        }
      }
  set_num_threads(saved);
}

TEST_CASE("linear_batch: the values and gradients of linear on each in turn (gradient check)") {
  const int saved = num_threads();
  auto x = randn<double>(Shape{70, 40}, 1);
  const std::vector<Tensor<double>> w = {randn<double>(Shape{90, 40}, 2),
                                         randn<double>(Shape{33, 40}, 3),
                                         randn<double>(Shape{90, 40}, 4)};
  auto b = randn<double>(Shape{33}, 5);
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    Tensor<double> y_one[3], y_batch[3], dx[2], dw[2][3], db[2];
    for (int batched = 0; batched < 2; ++batched) {
      Tape<double> tape;
      Parameter<double> px("x", x.clone()), pb("b", b.clone());
      std::vector<Parameter<double>> pw;
      for (int i = 0; i < 3; ++i) pw.emplace_back("w", w[i].clone());
      Var<double> vx = tape.param(px);
      Var<double> y[3];
      if (batched) {
        ops::LinearArgs<double> args[3] = {{vx, tape.param(pw[0]), Var<double>{}},
                                           {vx, tape.param(pw[1]), tape.param(pb)},
                                           {vx, tape.param(pw[2]), Var<double>{}}};
        ops::linear_batch(args, 3, y);
      } else {
        y[0] = ops::linear(vx, tape.param(pw[0]));
        y[1] = ops::linear(vx, tape.param(pw[1]), tape.param(pb));
        y[2] = ops::linear(vx, tape.param(pw[2]));
      }
      Var<double> loss = ops::add(ops::add(ops::sum(y[0]), ops::sum(ops::mul(y[1], y[1]))),
                                  ops::sum(ops::scale(y[2], 3.0)));
      tape.backward(loss);
      for (int i = 0; i < 3; ++i) (batched ? y_batch : y_one)[i] = y[i].value().clone();
      dx[batched] = px.grad.clone();
      for (int i = 0; i < 3; ++i) dw[batched][i] = pw[static_cast<std::size_t>(i)].grad.clone();
      db[batched] = pb.grad.clone();
    }
    CAPTURE(threads);
    for (int i = 0; i < 3; ++i) {
      CHECK(max_abs_diff(y_one[i], y_batch[i]) < 1e-12);
      CHECK(max_abs_diff(dw[0][i], dw[1][i]) < 1e-10);
    }
    CHECK(max_abs_diff(dx[0], dx[1]) < 1e-10);
    CHECK(max_abs_diff(db[0], db[1]) < 1e-10);
  }
  set_num_threads(saved);
  auto check = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) {
        ops::LinearArgs<double> args[2] = {{v[0], v[1], v[3]}, {v[0], v[2], Var<double>{}}};
        Var<double> y[2];
        ops::linear_batch(args, 2, y);
        return ops::add(ops::sum(ops::mul(y[0], y[0])), ops::sum(y[1]));
      },
      {randn<double>(Shape{6, 5}, 6), randn<double>(Shape{4, 5}, 7), randn<double>(Shape{3, 5}, 8),
       randn<double>(Shape{4}, 9)});
  CHECK(check.max_rel_error < 1e-6);
}
