// CUDA vs CPU: layernorm (ops/layernorm.hpp, cuda/cbq/cuda/ops/layernorm.cuh) with and without
// bias, forward and backward (dx, dw, db), float and double, on row shapes with 1, 7, 64, 257 and
// 1031 columns and 300 rows; the determinism of the weight gradients and the error for mixed
// devices. CPU tests: tests/ops/test_layernorm.cpp.
//
// Tolerances (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), i.e. 1e-12 (double) and
// 1e-5 (float). The row statistics are double sums on both devices (only the order differs) and
// the per-element formulas are the CPU's, in the same type and order. dw and db are summed over
// rows in double on the GPU and in T on the CPU: for float that is the CPU's own rounding,
// ~sqrt(rows) · 6e-8 relative for the row counts here.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("layernorm: CUDA matches CPU forward and backward, with and without bias", T,
                   float, double) {
  uint64_t seed = 100;
  for (const Shape& shape : cbq::gpu_testing::norm_shapes()) {
    CAPTURE(shape.str());
    const int64_t d = shape[-1];
    // A large mean (the two-pass variance must not cancel).
    const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, 1.5, 20.0),
                                        randn_scaled<T>(Shape{d}, seed++, 0.5, 1.0),
                                        randn<T>(Shape{d}, seed++)};
    const GraphFn<T> with_bias = [](std::vector<Var<T>>& v) {
      return ops::layernorm(v[0], v[1], v[2], 1e-5);
    };
    const GraphFn<T> without_bias = [](std::vector<Var<T>>& v) {
      return ops::layernorm(v[0], v[1], Var<T>{}, 1e-5);
    };
    check_parity<T>(inputs, with_bias, tolerance<T>(), seed++);
    check_parity<T>(inputs, with_bias, tolerance<T>(), seed++, {true, false, true});
    check_parity<T>(inputs, with_bias, tolerance<T>(), seed++, {false, false, true});
    check_parity<T>({inputs[0], inputs[1]}, without_bias, tolerance<T>(), seed++);
  }
}

TEST_CASE("layernorm: the weight and bias gradients are deterministic on CUDA") {
  const std::vector<Tensor<float>> inputs{randn<float>(Shape{1000, 257}, 1),
                                          randn<float>(Shape{257}, 2), randn<float>(Shape{257}, 3)};
  const GraphFn<float> f = [](std::vector<Var<float>>& v) {
    return ops::layernorm(v[0], v[1], v[2], 1e-6);
  };
  check_deterministic<float>(inputs, f, 7);
}

TEST_CASE("layernorm: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  Var<float> x = tape.input(randn<float>(Shape{3, 8}, 1).to(Device::cuda));
  Var<float> w_gpu = tape.input(randn<float>(Shape{8}, 2).to(Device::cuda));
  Var<float> b_cpu = tape.input(randn<float>(Shape{8}, 3));
  const std::string ln = error_message([&] { ops::layernorm(x, w_gpu, b_cpu, 1e-5); });
  CHECK(contains(ln, "layernorm"));
  CHECK(contains(ln, "different devices"));
}
