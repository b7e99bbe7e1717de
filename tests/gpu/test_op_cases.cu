// CUDA vs CPU for every op case declared in tests/ops/op_cases.hpp (the declarations whose
// gradient check in double is tests/ops/test_op_cases.cpp): forward and every input gradient,
// float and double. Each op's own parity tests (large and awkward shapes, determinism, mixed
// devices): tests/gpu/test_<op>.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float), for every case but attention's (1e-4 in float, as tests/gpu/test_attention.cu
// explains), as in the per-op files: elementwise ops round identically, reductions
// and row statistics are double sums on both devices (only the order differs), exp/erf are
// within a few ulp, and the GEMMs run in the default fp32 math mode.
#include "gpu/parity.hpp"
#include "ops/op_cases.hpp"

using namespace cbq;

TEST_CASE_TEMPLATE("op cases: CUDA matches CPU for every declared op", T, float, double) {
  const std::vector<op_cases::OpCase>& cases = op_cases::op_cases();
  REQUIRE(cases.size() >= 20);
  uint64_t seed = 1;
  for (const op_cases::OpCase& c : cases) {
    CAPTURE(c.name);
    const double tol =
        gpu_testing::tolerance<T>() * (std::is_same_v<T, float> ? c.float_tolerance_factor : 1.0);
    gpu_testing::check_parity<T>(c.make_inputs<T>(), c.graph<T>(), tol, seed++, c.differentiable());
  }
}
