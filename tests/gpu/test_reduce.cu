// CUDA vs CPU: the full reductions sum and mean (ops/reduce.hpp, cuda/cbq/cuda/ops/reduce.cuh),
// forward and backward, float and double, on elementwise_shapes() and 1031², and their
// determinism; the error for a CPU input on a CUDA tape. CPU tests: tests/ops/test_reduce.cpp;
// the declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerances (rel_error = max |gpu − cpu| / max |cpu|):
//   forward    tolerance<T>() (1e-12 / 1e-5): both sum in double, only the order differs
//              (~n · 1e-16 relative)
//   backward   tolerance<T>(): identical roundings
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("sum and mean: CUDA matches CPU and is deterministic", T, float, double) {
  uint64_t seed = 200;
  std::vector<Shape> shapes = elementwise_shapes();
  shapes.push_back(Shape{1031, 1031});  // more elements than one pass of the partial-sum grid
  for (const Shape& shape : shapes) {
    CAPTURE(shape.str());
    // An offset makes the sum large against its rounding error, as in real losses.
    const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, 1.0, 0.5)};
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::sum(v[0]); }, tolerance<T>(), seed++);
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::mean(v[0]); }, tolerance<T>(), seed++);
    // mean of a product: the reduction's gradient feeds another op's backward.
    check_parity<T>(
        {inputs[0], randn<T>(shape, seed++)},
        [](std::vector<Var<T>>& v) { return ops::mean(ops::mul(v[0], v[1])); }, tolerance<T>(),
        seed++);
  }
  // Two CUDA runs give identical bits (fixed reduction order, no atomics).
  const std::vector<Tensor<T>> big{randn<T>(Shape{(1 << 22) + 17}, seed++)};
  const GraphFn<T> f = [](std::vector<Var<T>>& v) { return ops::sum(v[0]); };
  cbq::gpu_testing::check_deterministic<T>(big, f, 1);
}

TEST_CASE("sum: CPU and CUDA operands mixed give a clear error") {
  // A CPU input on a CUDA tape: the output would live on another device than the input.
  Tape<float> tape(Device::cuda);
  Var<float> on_cpu = tape.input(randn<float>(Shape{4}, 1));
  const std::string sum = error_message([&] { ops::sum(on_cpu); });
  CHECK(contains(sum, "sum"));
  CHECK(contains(sum, "different devices"));
}

TEST_CASE("sum: the CUDA kernels are registered for float and double") {
  CHECK(bool(ops::CudaReduce<float>::sum));
  CHECK(bool(ops::CudaReduce<double>::sum_backward));
}
