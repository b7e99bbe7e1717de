// CUDA vs CPU: kl_softmax (ops/kl_softmax.hpp, cuda/cbq/cuda/ops/kl_softmax.cuh), forward and
// backward, float and double, temperatures 1 and 2.5, on row shapes with 1, 7, 64, 257 and 1031
// columns, with either input constant; determinism and the error for operands on different devices.
// CPU tests: tests/ops/test_kl_softmax.cpp; the declared cases of tests/ops/op_cases.hpp:
// test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float): the row maxima are exact, the log-sum-exp, the KL terms and the mean are double sums
// on both devices (only the order differs), and the per-element formulas are the CPU's.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("kl_softmax: CUDA matches CPU, temperatures 1 and 2.5", T, float, double) {
  uint64_t seed = 200;
  for (const Shape& shape : row_shapes()) {
    CAPTURE(shape.str());
    const Tensor<T> a = randn_scaled<T>(shape, seed++, 2.0);
    // b near a (as a quantized model's logits near the full-precision ones), with an offset
    // that the softmax must ignore.
    Tensor<T> b = randn_scaled<T>(shape, seed++, 0.3, 50.0);
    for (int64_t i = 0; i < b.numel(); ++i) b[i] += a[i];
    for (T tau : {T(1), T(2.5)}) {
      CAPTURE(tau);
      const GraphFn<T> f = [tau](std::vector<Var<T>>& v) {
        return ops::kl_softmax(v[0], v[1], tau);
      };
      check_parity<T>({a, b}, f, tolerance<T>(), seed++);
      check_parity<T>({a, b}, f, tolerance<T>(), seed++, {false, true});  // target constant
      check_parity<T>({a, b}, f, tolerance<T>(), seed++, {true, false});
    }
  }
}

TEST_CASE("kl_softmax: two CUDA runs give identical bits") {
  const Shape shape{513, 1031};
  const std::vector<Tensor<float>> inputs{randn<float>(shape, 1), randn<float>(shape, 2)};
  const GraphFn<float> f = [](std::vector<Var<float>>& v) {
    return ops::kl_softmax(v[0], v[1], 1.0f);
  };
  cbq::gpu_testing::check_deterministic<float>(inputs, f, 5);
}

TEST_CASE("kl_softmax: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> host = randn<float>(Shape{3, 8}, 1);
  Var<float> on_cpu = tape.input(host);
  Var<float> on_gpu = tape.input(host.to(Device::cuda));
  const std::string message = error_message([&] { ops::kl_softmax(on_gpu, on_cpu); });
  CHECK(contains(message, "kl_softmax"));
  CHECK(contains(message, "different devices"));
}
