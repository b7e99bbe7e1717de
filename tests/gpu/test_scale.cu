// CUDA vs CPU: scale (ops/scale.hpp, cuda/cbq/cuda/ops/scale.cuh) and reshape (ops/reshape.hpp: a
// view, its backward an axpy), forward and backward, float and double, on elementwise_shapes();
// the error for a CUDA input on a CPU tape. CPU tests: tests/ops/test_scale.cpp,
// tests/ops/test_reshape.cpp; the declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>() (1e-12 / 1e-5); identical
// roundings on both devices.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("scale and reshape: CUDA matches CPU", T, float, double) {
  uint64_t seed = 100;
  for (const Shape& shape : elementwise_shapes()) {
    CAPTURE(shape.str());
    const std::vector<Tensor<T>> inputs{randn<T>(shape, seed++)};
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::scale(v[0], T(-1.75)); }, tolerance<T>(),
        seed++);
  }
  // reshape (a view; backward through axpy) followed by mul, so that the view is consumed.
  const Tensor<T> a = randn<T>(Shape{6, 35}, seed++), b = randn<T>(Shape{5, 7, 6}, seed++);
  check_parity<T>(
      {a, b},
      [](std::vector<Var<T>>& v) {
        return ops::mul(ops::reshape(v[0], Shape{5, 7, 6}), v[1]);
      },
      tolerance<T>(), seed++);
}

TEST_CASE("scale: CPU and CUDA operands mixed give a clear error") {
  // A CUDA input on a CPU tape.
  const Tensor<float> a = randn<float>(Shape{4}, 1);
  Tape<float> cpu_tape(Device::cpu);
  Var<float> gpu_on_cpu_tape = cpu_tape.input(a.to(Device::cuda));
  const std::string scale = error_message([&] { ops::scale(gpu_on_cpu_tape, 2.0f); });
  CHECK(contains(scale, "scale"));
  CHECK(contains(scale, "different devices"));
}

TEST_CASE("scale: the CUDA kernels are registered for float and double") {
  CHECK(bool(ops::CudaScale<double>::forward));
}
