// scale (ops/scale.hpp): forward against alpha times the input, gradient check.
// CUDA parity: tests/gpu/test_scale.cu. Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/scale.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
const Shape kScaleShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{11}};
}  // namespace

TEST_CASE("scale: forward is alpha times the input, gradient check in double") {
  for (const Shape& shape : kScaleShapes) {
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
