// CUDA vs CPU: mul (ops/mul.hpp, cuda/cbq/cuda/ops/mul.cuh), forward and backward, float and
// double, on elementwise_shapes() (1 element to 2^21 + 3), including a variable multiplied by
// itself and a constant operand; the error for operands on different devices. CPU tests:
// tests/ops/test_mul.cpp; the declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>() (1e-12 / 1e-5); products
// round identically on both devices.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("mul: CUDA matches CPU, including a variable multiplied by itself", T, float,
                   double) {
  uint64_t seed = 1;
  for (const Shape& shape : elementwise_shapes()) {
    CAPTURE(shape.str());
    const std::vector<Tensor<T>> inputs{randn<T>(shape, seed++), randn<T>(shape, seed++)};
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::mul(v[0], v[1]); }, tolerance<T>(),
        seed++);
    // a ⊙ b ⊙ a: the same variable twice, so both backward terms accumulate into d a.
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::mul(ops::mul(v[0], v[1]), v[0]); },
        tolerance<T>(), seed++);
    // Only b needs a gradient.
    check_parity<T>(inputs, [](std::vector<Var<T>>& v) { return ops::mul(v[0], v[1]); },
                    tolerance<T>(), seed++, {false, true});
  }
}

TEST_CASE("mul: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> a = randn<float>(Shape{4}, 1);
  Var<float> on_cpu = tape.input(a);
  Var<float> on_gpu = tape.input(a.to(Device::cuda));
  const std::string mul = error_message([&] { ops::mul(on_cpu, on_gpu); });
  CHECK(contains(mul, "mul"));
  CHECK(contains(mul, "different devices"));
}

TEST_CASE("mul: the CUDA kernels are registered for float and double") {
  CHECK(bool(ops::CudaMul<float>::forward));
  CHECK(bool(ops::CudaMul<double>::backward));
}
