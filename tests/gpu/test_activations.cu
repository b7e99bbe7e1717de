// CUDA vs CPU: the activations silu, relu and gelu (ops/activations.hpp,
// cuda/cbq/cuda/ops/activations.cuh), forward and backward, float and double, on
// elementwise_shapes() and extreme inputs; the error for a CPU input on a CUDA tape. CPU tests:
// tests/ops/test_activations.cpp; the declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>() (1e-12 / 1e-5): CUDA's
// expf/erff are within 2 ulp of glibc's, a few 1e-7 at most in float.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("silu, relu, gelu: CUDA matches CPU", T, float, double) {
  uint64_t seed = 300;
  for (const Shape& shape : elementwise_shapes()) {
    CAPTURE(shape.str());
    // Scale 4: the tails of the sigmoid and of erf are exercised too.
    const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, 4.0)};
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::silu(v[0]); }, tolerance<T>(), seed++);
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::relu(v[0]); }, tolerance<T>(), seed++);
    check_parity<T>(
        inputs, [](std::vector<Var<T>>& v) { return ops::gelu(v[0]); }, tolerance<T>(), seed++);
  }
  // Extreme inputs: large magnitudes (σ saturates to 0 or 1) and exact zeros (relu' = 0 at 0).
  const Tensor<T> extreme =
      Tensor<T>::from({T(-120), T(-30), T(-1e-3), T(0), T(1e-3), T(30), T(120)}, Shape{7});
  for (const GraphFn<T>& f : {GraphFn<T>([](std::vector<Var<T>>& v) { return ops::silu(v[0]); }),
                              GraphFn<T>([](std::vector<Var<T>>& v) { return ops::relu(v[0]); }),
                              GraphFn<T>([](std::vector<Var<T>>& v) { return ops::gelu(v[0]); })})
    check_parity<T>({extreme}, f, tolerance<T>(), seed++);
}

TEST_CASE("silu: CPU and CUDA operands mixed give a clear error") {
  // A CPU input on a CUDA tape: the output would live on another device than the input.
  Tape<float> tape(Device::cuda);
  Var<float> on_cpu = tape.input(randn<float>(Shape{4}, 1));
  const std::string silu = error_message([&] { ops::silu(on_cpu); });
  CHECK(contains(silu, "silu"));
  CHECK(contains(silu, "different devices"));
}

TEST_CASE("silu, relu, gelu: the CUDA kernels are registered for float and double") {
  CHECK(bool((ops::CudaActivation<float, ops::detail::Gelu>::forward)));
  CHECK(bool((ops::CudaActivation<double, ops::detail::Silu>::backward)));
}
