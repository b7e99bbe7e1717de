// CUDA vs CPU: rmsnorm (ops/rmsnorm.hpp, cuda/cbq/cuda/ops/rmsnorm.cuh), forward and backward (dx,
// dw), float and double, on row shapes with 1, 7, 64, 257 and 1031 columns, 300 rows and 2^20 + 3
// rows (the rows loop); the determinism of the weight gradient and the error for mixed devices.
// CPU tests: tests/ops/test_rmsnorm.cpp; the declared cases of tests/ops/op_cases.hpp:
// test_op_cases.cu.
//
// Tolerances (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), i.e. 1e-12 (double) and
// 1e-5 (float). The row statistics are double sums on both devices (only the order differs) and
// the per-element formulas are the CPU's, in the same type and order. dw and db are summed over
// rows in double on the GPU and in T on the CPU: for float that is the CPU's own rounding,
// ~sqrt(rows) · 6e-8 relative for the row counts here.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("rmsnorm: CUDA matches CPU forward and backward", T, float, double) {
  uint64_t seed = 1;
  for (const Shape& shape : cbq::gpu_testing::norm_shapes()) {
    CAPTURE(shape.str());
    const int64_t d = shape[-1];
    // A row offset, so that mean(x²) is not ~1 everywhere. With one column,
    // dx = r·g·w·eps / (x² + eps) cancels to ~1e-6 of its terms for x ~ 1, so that float FMA
    // contraction (nvcc's default, not x86-64's) and rounding order would dominate the comparison:
    // that row gets x² ~ eps instead, where dx is of the size of its terms.
    const double x_scale = d == 1 ? 3e-3 : 2.0, x_offset = d == 1 ? 0.0 : 0.3;
    const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, x_scale, x_offset),
                                        randn_scaled<T>(Shape{d}, seed++, 0.5, 1.0)};
    const GraphFn<T> f = [](std::vector<Var<T>>& v) { return ops::rmsnorm(v[0], v[1], 1e-5); };
    check_parity<T>(inputs, f, tolerance<T>(), seed++);
    check_parity<T>(inputs, f, tolerance<T>(), seed++, {true, false});  // frozen weight
    check_parity<T>(inputs, f, tolerance<T>(), seed++, {false, true});  // weight only
  }
}

TEST_CASE("rmsnorm: the weight gradient is deterministic on CUDA") {
  const std::vector<Tensor<float>> inputs{randn<float>(Shape{1000, 257}, 1),
                                          randn<float>(Shape{257}, 2)};
  const GraphFn<float> f = [](std::vector<Var<float>>& v) {
    return ops::rmsnorm(v[0], v[1], 1e-6);
  };
  check_deterministic<float>(inputs, f, 7);
}

TEST_CASE("rmsnorm: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  Var<float> x = tape.input(randn<float>(Shape{3, 8}, 1).to(Device::cuda));
  Var<float> w_cpu = tape.input(randn<float>(Shape{8}, 2));
  const std::string rms = error_message([&] { ops::rmsnorm(x, w_cpu, 1e-5); });
  CHECK(contains(rms, "rmsnorm"));
  CHECK(contains(rms, "different devices"));
}

TEST_CASE_TEMPLATE("rmsnorm: more rows than the row grid (the rows loop)", T, float, double) {
  // 2^20 + 3 rows: the row kernels launch at most 2^20 blocks and loop over the rest.
  const Shape shape{(int64_t(1) << 20) + 3, 2};
  const std::vector<Tensor<T>> inputs{randn<T>(shape, 1), randn<T>(Shape{2}, 2)};
  // Weight frozen: a float dw summed over 2^20 rows differs from the CPU's float sum by the
  // CPU's own rounding (~2e-5 relative), which is not what this test is about.
  check_parity<T>(inputs, [](std::vector<Var<T>>& v) { return ops::rmsnorm(v[0], v[1], 1e-5); },
                  tolerance<T>(), 4, {true, false});
}
