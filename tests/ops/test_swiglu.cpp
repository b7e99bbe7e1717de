// swiglu (ops/swiglu.hpp): forward against silu(gate) ⊙ up, gradient checks for gate and up,
// errors. CUDA parity: tests/gpu/test_swiglu.cu. Declared case for both checks:
// tests/ops/op_cases.hpp.
#include <cbq/ops/swiglu.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
double ref_swiglu_silu(double x) { return x / (1 + std::exp(-x)); }
}  // namespace

TEST_CASE("swiglu: forward equals silu(gate) ⊙ up, float and double") {
  auto gate = randn<double>(Shape{7, 12}, 7, 2.0);
  auto up = randn<double>(Shape{7, 12}, 8);
  Tape<double> tape;
  auto y = ops::swiglu(tape.constant(gate), tape.constant(up));
  Tensor<double> ref(gate.shape());
  for (int64_t i = 0; i < gate.numel(); ++i) ref[i] = ref_swiglu_silu(gate[i]) * up[i];
  CHECK(max_abs_diff(y.value(), ref) < 1e-12);
  Tape<float> tape_f;
  auto yf = ops::swiglu(tape_f.constant(gate.cast<float>()), tape_f.constant(up.cast<float>()));
  CHECK(max_abs_diff(yf.value(), ref) < 1e-5);
}

TEST_CASE("swiglu: gradient check in double for gate and up") {
  auto gate = randn<double>(Shape{3, 5, 7}, 9, 2.0);
  auto up = randn<double>(Shape{3, 5, 7}, 10);
  auto both =
      gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::swiglu(v[0], v[1]); },
                {gate, up});
  CHECK(both.max_rel_error < 1e-6);
  auto only_gate =
      gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::swiglu(v[0], v[1]); },
                {gate, up}, {true, false});
  CHECK(only_gate.max_rel_error < 1e-6);
  auto only_up =
      gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::swiglu(v[0], v[1]); },
                {gate, up}, {false, true});
  CHECK(only_up.max_rel_error < 1e-6);
}

TEST_CASE("swiglu: gate and up of different shapes name the op and the shapes") {
  Tape<double> tape;
  auto gate = tape.constant(randn<double>(Shape{4, 6}, 1));
  auto up = tape.constant(randn<double>(Shape{4, 5}, 2));
  CHECK_THROWS_WITH_AS(ops::swiglu(gate, up),
                       doctest::Contains("swiglu: shapes (4, 6) and (4, 5) differ"), cbq::Error);
}
