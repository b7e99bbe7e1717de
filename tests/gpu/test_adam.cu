// CUDA vs CPU: Adam over parameter groups with their own learning rates and per-element
// learning-rate scales, several steps with changing gradients.
//
// The kernel evaluates the CPU's expressions in the CPU's order with IEEE round-to-nearest
// operations (no FMA contraction), so parameters and moments are asserted EQUAL bit for bit, in
// float and double (a looser normwise 1e-12 / 1e-5 check is reported first, for diagnosis).
#include <vector>

#include "gpu/gpu_main.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {

template <class T>
struct AdamRun {
  std::vector<Tensor<T>> values, m, v;
};

// Three parameters in two groups (lr 1e-2 with per-element lr scales, and lr 0.3 without), `steps`
// steps with gradients drawn per step; sizes include one that needs several grid strides.
template <class T>
AdamRun<T> run_adam(Device device, int steps) {
  const Shape shapes[] = {Shape{7, 5}, Shape{1}, Shape{(1 << 21) + 3}};
  std::vector<Parameter<T>> params;
  params.reserve(3);
  for (int i = 0; i < 3; ++i)
    params.emplace_back("p" + std::to_string(i), randn<T>(shapes[i], 10 + i).to(device));
  Tensor<T> scale = randn<T>(shapes[0], 20);
  for (int64_t i = 0; i < scale.numel(); ++i) scale[i] = std::abs(scale[i]) + T(0.01);
  optim::AdamOptions options;
  options.beta2 = 0.99;
  optim::Adam<T> adam(options);
  // The scales are given on the host: Adam keeps its own copies on the parameters' device.
  adam.add_group("steps", {&params[0], &params[1]}, 1e-2,
                 {scale, Tensor<T>::full(shapes[1], T(2.5))});
  adam.add_group("rounding", {&params[2]}, 0.3);
  for (int t = 0; t < steps; ++t) {
    adam.zero_grad();
    for (int i = 0; i < 3; ++i) {
      Tensor<T> g = randn<T>(shapes[i], 100 * t + i);
      if (t == 2) g = Tensor<T>(shapes[i]);  // a zero gradient: only the moments' decay acts
      params[static_cast<std::size_t>(i)].grad.copy_from(g.to(device));
    }
    adam.step();
  }
  AdamRun<T> run;
  for (std::size_t g = 0; g < adam.num_groups(); ++g)
    for (const auto& slot : adam.group(g).slots) {
      run.values.push_back(slot.param->value.to(Device::cpu));
      run.m.push_back(slot.m.to(Device::cpu));
      run.v.push_back(slot.v.to(Device::cpu));
    }
  return run;
}

template <class T>
bool same_values(const Tensor<T>& a, const Tensor<T>& b) {
  return a.to_vector() == b.to_vector();
}

}  // namespace

TEST_CASE_TEMPLATE("adam: CUDA steps with groups and lr scales equal the CPU's bit for bit", T,
                   float, double) {
  const AdamRun<T> cpu = run_adam<T>(Device::cpu, 5);
  const AdamRun<T> gpu = run_adam<T>(Device::cuda, 5);
  REQUIRE(cpu.values.size() == 3);
  REQUIRE(gpu.values.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CAPTURE(i);
    CHECK(rel_error(gpu.values[i], cpu.values[i]) <= tolerance<T>());
    CHECK(rel_error(gpu.m[i], cpu.m[i]) <= tolerance<T>());
    CHECK(rel_error(gpu.v[i], cpu.v[i]) <= tolerance<T>());
    CHECK(same_values(gpu.values[i], cpu.values[i]));
    CHECK(same_values(gpu.m[i], cpu.m[i]));
    CHECK(same_values(gpu.v[i], cpu.v[i]));
  }
}

TEST_CASE("adam: a CUDA parameter whose gradient lives on the CPU is rejected") {
  Parameter<float> p("p", Tensor<float>(Shape{3}).to(Device::cuda));
  p.grad = Tensor<float>(Shape{3});
  optim::Adam<float> adam;
  adam.add_group("g", {&p}, 1e-3);
  const std::string message = gpu_testing::error_message([&] { adam.step(); });
  CHECK(gpu_testing::contains(message, "gradient is on the cpu"));
}
