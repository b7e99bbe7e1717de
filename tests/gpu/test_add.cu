// CUDA vs CPU: add (forward kernel) and the gradient accumulation (axpy) its backward uses.
#include "gpu/gpu_main.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {

template <class T>
struct AddResult {
  Tensor<T> out, da, db;
};

// out = (a + b) + a, seeded with dout = g, so da = 2g (two accumulations into one gradient)
// and db = g.
template <class T>
AddResult<T> run_add(Device device, const Tensor<T>& a, const Tensor<T>& b, const Tensor<T>& g) {
  Tape<T> tape(device);
  Var<T> va = tape.input(a.to(device));
  Var<T> vb = tape.input(b.to(device));
  Var<T> out = ops::add(ops::add(va, vb), va);
  CHECK(out.device() == device);
  out.grad().copy_from(g);
  tape.backward_from_seeded();
  return {out.value().to(Device::cpu), va.grad().to(Device::cpu), vb.grad().to(Device::cpu)};
}

}  // namespace

TEST_CASE_TEMPLATE("add: CUDA matches CPU forward and backward, odd shapes", T, float, double) {
  const Shape shapes[] = {Shape{1}, Shape{7}, Shape{3, 5, 7}, Shape{257, 129},
                          Shape{(1 << 21) + 3}};  // the last one needs several grid strides
  uint64_t seed = 10;
  for (const Shape& shape : shapes) {
    CAPTURE(shape.str());
    const Tensor<T> a = randn<T>(shape, seed++), b = randn<T>(shape, seed++),
                    g = randn<T>(shape, seed++);
    const AddResult<T> cpu = run_add(Device::cpu, a, b, g);
    const AddResult<T> gpu = run_add(Device::cuda, a, b, g);
    // Additions round identically on both devices, so these are exact in practice.
    CHECK(rel_error(gpu.out, cpu.out) <= tolerance<T>());
    CHECK(rel_error(gpu.da, cpu.da) <= tolerance<T>());
    CHECK(rel_error(gpu.db, cpu.db) <= tolerance<T>());
  }
}

TEST_CASE_TEMPLATE("add: axpy with alpha != 1 matches CPU accumulate", T, float, double) {
  const Shape shape{1001, 3};
  const Tensor<T> y0 = randn<T>(shape, 1), x = randn<T>(shape, 2);
  Tensor<T> cpu = y0.clone();
  ops::accumulate(cpu, x, T(-0.75));
  Tensor<T> gpu = y0.to(Device::cuda);
  ops::accumulate(gpu, x.to(Device::cuda), T(-0.75));
  CHECK(rel_error(gpu, cpu) <= tolerance<T>());
}

TEST_CASE("add: operands on different devices are rejected with a message") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> a = randn<float>(Shape{4}, 1);
  Var<float> on_cpu = tape.input(a);
  Var<float> on_gpu = tape.input(a.to(Device::cuda));
  const std::string message = gpu_testing::error_message([&] { ops::add(on_cpu, on_gpu); });
  CHECK(gpu_testing::contains(message, "different devices"));
}
