// mul (ops/mul.hpp): forward against the naive product, gradient checks (both inputs, mul(x, x),
// a constant side), errors. CUDA parity: tests/gpu/test_mul.cu. Declared case for both checks:
// tests/ops/op_cases.hpp.
#include <cbq/ops/mul.hpp>
#include <cbq/ops/reduce.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
const Shape kMulShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{11}};
}  // namespace

TEST_CASE("mul: forward matches the naive product on odd shapes, double and float") {
  for (const Shape& shape : kMulShapes) {
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
  for (const Shape& shape : kMulShapes) {
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
