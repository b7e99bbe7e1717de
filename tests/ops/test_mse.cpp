// mse and row_sq_error (ops/mse.hpp): against naive sums, gradient checks, errors.
// CUDA parity: tests/gpu/test_mse.cu. Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/mse.hpp>

#include "ops/loss_reference.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::kLossShapes;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

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
