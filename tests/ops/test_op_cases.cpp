// Every op case declared in tests/ops/op_cases.hpp: the gradient check in double and a finite
// forward pass in float and double. CUDA parity of the same declarations:
// tests/gpu/test_op_cases.cu. Each op's own tests: tests/ops/test_<op>.cpp.
#include "ops/op_cases.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;

namespace {
// Runs a declared case's graph on a CPU tape of T (constants only, no backward); true when every
// output element is finite.
template <class T>
bool op_case_forward_finite(const op_cases::OpCase& c) {
  Tape<T> tape;
  std::vector<Var<T>> vars;
  for (const Tensor<T>& t : c.make_inputs<T>()) vars.push_back(tape.constant(t));
  const Tensor<T> out = c.graph<T>()(vars).value();
  for (int64_t i = 0; i < out.numel(); ++i)
    if (!std::isfinite(out[i])) return false;
  return out.numel() > 0;
}
}  // namespace

TEST_CASE("op cases: gradient check in double and a finite forward, every declared op") {
  // max_rel_error (‖analytic − numeric‖ / ‖numeric‖ over each input, central differences with
  // step 1e-6) below 1e-6, as in the per-op files: on these smooth graphs the truncation error is
  // ~1e-12 and the rounding of the difference quotient ~1e-10 (relu's inputs stay 0.05 away
  // from its kink).
  const double tol = 1e-6;
  const std::vector<op_cases::OpCase>& cases = op_cases::op_cases();
  REQUIRE(cases.size() >= 20);
  for (const op_cases::OpCase& c : cases) {
    CAPTURE(c.name);
    CHECK(op_case_forward_finite<double>(c));
    CHECK(op_case_forward_finite<float>(c));
    const op_cases::Graph<double>& f = c.graph<double>();
    const testing::GradcheckResult r =
        testing::gradcheck([&f](Tape<double>&, std::vector<Var<double>>& v) { return f(v); },
                           c.make_inputs<double>(), c.differentiable());
    CHECK_MESSAGE(r.max_rel_error < tol, "worst: ", r.worst, ", rel error ", r.max_rel_error);
  }
}
