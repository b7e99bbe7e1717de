// CUDA vs CPU: swiglu (ops/swiglu.hpp, cuda/cbq/cuda/ops/activations.cuh), forward and backward,
// float and double, on elementwise_shapes(), with either input constant; the error for operands
// on different devices. CPU tests: tests/ops/test_swiglu.cpp; the declared cases of
// tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>() (1e-12 / 1e-5): CUDA's expf
// is within 2 ulp of glibc's, a few 1e-7 at most in float.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("swiglu: CUDA matches CPU, with and without the up gradient", T, float, double) {
  uint64_t seed = 400;
  for (const Shape& shape : elementwise_shapes()) {
    CAPTURE(shape.str());
    const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, 3.0),
                                        randn<T>(shape, seed++)};
    const GraphFn<T> f = [](std::vector<Var<T>>& v) { return ops::swiglu(v[0], v[1]); };
    check_parity<T>(inputs, f, tolerance<T>(), seed++);
    check_parity<T>(inputs, f, tolerance<T>(), seed++, {true, false});
    check_parity<T>(inputs, f, tolerance<T>(), seed++, {false, true});
  }
}

TEST_CASE("swiglu: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> a = randn<float>(Shape{4}, 1);
  Var<float> on_cpu = tape.input(a);
  Var<float> on_gpu = tape.input(a.to(Device::cuda));
  const std::string swiglu = error_message([&] { ops::swiglu(on_gpu, on_cpu); });
  CHECK(contains(swiglu, "swiglu"));
  CHECK(contains(swiglu, "different devices"));
}

TEST_CASE("swiglu: the CUDA kernel is registered for float") {
  CHECK(bool(ops::CudaSwiglu<float>::backward));
}
