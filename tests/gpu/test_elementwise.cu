// CUDA vs CPU: the elementwise ops (mul, scale, reshape), the full reductions (sum, mean), the
// activations (silu, relu, gelu) and swiglu, forward and backward, float and double; plus the
// errors for operands on different devices.
//
// Tolerances (rel_error = max |gpu − cpu| / max |cpu|):
//   mul, scale, reshape, sum/mean backward   tolerance<T>() (1e-12 / 1e-5): identical roundings
//   sum, mean forward                        tolerance<T>(): both sum in double, only the order
//                                            differs (~n · 1e-16 relative)
//   silu, relu, gelu, swiglu                 tolerance<T>(): CUDA's expf/erff are within 2 ulp
//                                            of glibc's, a few 1e-7 at most in float
#include "gpu/parity.hpp"

using namespace cbq;
using cbq::gpu_testing::check_parity;
using cbq::gpu_testing::contains;
using cbq::gpu_testing::elementwise_shapes;
using cbq::gpu_testing::error_message;
using cbq::gpu_testing::GraphFn;
using cbq::gpu_testing::randn;
using cbq::gpu_testing::randn_scaled;
using cbq::gpu_testing::run_graph;
using cbq::gpu_testing::tolerance;

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

TEST_CASE("elementwise ops: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> a = randn<float>(Shape{4}, 1);
  Var<float> on_cpu = tape.input(a);
  Var<float> on_gpu = tape.input(a.to(Device::cuda));
  const std::string mul = error_message([&] { ops::mul(on_cpu, on_gpu); });
  CHECK(contains(mul, "mul"));
  CHECK(contains(mul, "different devices"));
  const std::string swiglu = error_message([&] { ops::swiglu(on_gpu, on_cpu); });
  CHECK(contains(swiglu, "swiglu"));
  CHECK(contains(swiglu, "different devices"));
  // A CPU input on a CUDA tape: the output would live on another device than the input.
  const std::string silu = error_message([&] { ops::silu(on_cpu); });
  CHECK(contains(silu, "silu"));
  CHECK(contains(silu, "different devices"));
  const std::string sum = error_message([&] { ops::sum(on_cpu); });
  CHECK(contains(sum, "sum"));
  CHECK(contains(sum, "different devices"));
  // matmul (the GEMM hook): CPU operands, CUDA tape.
  Var<float> m_cpu = tape.input(randn<float>(Shape{2, 2}, 2));
  const std::string matmul = error_message([&] { ops::matmul(m_cpu, m_cpu); });
  CHECK(contains(matmul, "matmul"));
  CHECK(contains(matmul, "different devices"));
  // And a CUDA input on a CPU tape.
  Tape<float> cpu_tape(Device::cpu);
  Var<float> gpu_on_cpu_tape = cpu_tape.input(a.to(Device::cuda));
  const std::string scale = error_message([&] { ops::scale(gpu_on_cpu_tape, 2.0f); });
  CHECK(contains(scale, "scale"));
  CHECK(contains(scale, "different devices"));
}

TEST_CASE("elementwise ops: the CUDA kernels are registered for float and double") {
  CHECK(bool(ops::CudaMul<float>::forward));
  CHECK(bool(ops::CudaMul<double>::backward));
  CHECK(bool(ops::CudaScale<double>::forward));
  CHECK(bool(ops::CudaReduce<float>::sum));
  CHECK(bool(ops::CudaReduce<double>::sum_backward));
  CHECK(bool((ops::CudaActivation<float, ops::detail::Gelu>::forward)));
  CHECK(bool((ops::CudaActivation<double, ops::detail::Silu>::backward)));
  CHECK(bool(ops::CudaSwiglu<float>::backward));
}
