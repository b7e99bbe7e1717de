// CUDA vs CPU: the activation quantizers (quant/act_quant.hpp, cuda/cbq/cuda/quant/act_quant.cuh):
// static per-tensor with an LSQ step, and per-token with a learnable clipping logit, float and
// double. CPU tests: tests/quant/test_act_quant.cpp.
//
// Exactness: the forwards evaluate the CPU's expressions in the CPU's order with IEEE
// round-to-nearest operations and rint (ties to even), so outputs, per-token steps and codes are
// asserted EQUAL bit for bit. Reductions (step and clip gradients, per-token row sums) run in
// another order and exp comes from the device's math library: double 1e-12, float 1e-5. A
// reduced gradient is compared at the size of its terms when its value cancelled below them
// (reduction_error with sum_floor), because its rounding error scales with the terms.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gpu/gpu_main.hpp"
#include "gpu/quant_parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;
using quant::Granularity;
using quant::GridSpec;

namespace {

// ------------------------------------------------------------------------------------------
// per-token activations

template <class T>
struct TokenResult {
  Tensor<T> y, dx, dc;
};

template <class T>
TokenResult<T> run_per_token(Device device, const Tensor<T>& x, T clip_logit, const GridSpec& spec,
                             const Tensor<T>& g) {
  Tape<T> tape(device);
  Parameter<T> clip("c", Tensor<T>::full(Shape{1}, clip_logit).to(device));
  Var<T> vx = tape.input(x.to(device));
  Var<T> y = quant::fake_quant_act_per_token(vx, tape.param(clip), spec);
  y.grad().copy_from(g.to(device));
  tape.backward_from_seeded();
  return {y.value().to(Device::cpu), vx.grad().to(Device::cpu), clip.grad.to(Device::cpu)};
}

}  // namespace

TEST_CASE_TEMPLATE("fake_quant_act_static: CUDA forward is bit-exact, grads match", T, float,
                   double) {
  uint64_t seed = 300;
  for (bool symmetric : {false, true})
    for (int bits : {4, 8})
      for (bool lsq : {true, false}) {
        GridSpec spec = make_spec(bits, symmetric, Granularity::per_tensor);
        const Tensor<T> x = randn<T>(Shape{3, 5, 24}, seed++);
        const Tensor<T> g = randn<T>(Shape{3, 5, 24}, seed++);
        T lo = x[0], hi = x[0];
        for (int64_t i = 0; i < x.numel(); ++i) {
          lo = std::min(lo, x[i]);
          hi = std::max(hi, x[i]);
        }
        const auto p = quant::init_act_static(lo, hi, bits, symmetric);
        auto run = [&](Device device) {
          Tape<T> tape(device);
          Parameter<T> scale("s", Tensor<T>::full(Shape{1}, T(p.scale * 0.7)).to(device));
          Var<T> vx = tape.input(x.to(device));
          Var<T> y = quant::fake_quant_act_static(
              vx, tape.param(scale), Tensor<T>::full(Shape{1}, p.zero).to(device), spec, lsq);
          y.grad().copy_from(g.to(device));
          tape.backward_from_seeded();
          return StepResult<T>{y.value().to(Device::cpu), vx.grad().to(Device::cpu),
                               scale.grad.to(Device::cpu)};
        };
        const StepResult<T> cpu = run(Device::cpu), gpu = run(Device::cuda);
        CAPTURE(symmetric);
        CAPTURE(bits);
        CAPTURE(lsq);
        CHECK(same_bits(gpu.y, cpu.y));
        CHECK(same_bits(gpu.dx, cpu.dx));
        const double span = double(spec.qmax() - spec.qmin());
        const double lsq_factor = lsq ? 1.0 / std::sqrt(24.0 * double(spec.qmax())) : 1.0;
        CHECK(reduction_error(gpu.ds, cpu.ds, sum_floor(g, lsq_factor * span)) <= tolerance<T>());
      }
}

TEST_CASE_TEMPLATE("fake_quant_act_per_token: CUDA steps and codes are bit-exact, grads match", T,
                   float, double) {
  for (bool symmetric : {false, true})
    for (int bits : {4, 8})
      for (int64_t d : {45, 1000}) {
        GridSpec spec = make_spec(bits, symmetric, Granularity::per_tensor);
        const int64_t rows = 37;
        Tensor<T> x = randn<T>(Shape{rows, d}, 400 + bits + d);
        const Tensor<T> g = randn<T>(Shape{rows, d}, 500 + bits + d);
        for (int64_t c = 0; c < d; ++c) {
          x(2, c) = std::abs(x(2, c)) + T(0.1);  // all positive: lo is the 0 floor
          x(3, c) = T(0);                        // constant: the minimum step
        }
        // Repeated extremes: the CPU takes the first occurrence; the gradient of the step goes
        // to that element only, so a different choice would show in dx.
        x(5, 3) = x(5, d - 5) = T(6);
        x(5, 7) = x(5, d - 4) = T(-6);
        x(6, 10) = T(-7);  // symmetric: |−7| first, then +7
        x(6, d - 3) = T(7);
        const T clip_logit = T(0.7);  // α ≈ 0.67: the extremes clamp
        const TokenResult<T> cpu = run_per_token(Device::cpu, x, clip_logit, spec, g);
        const TokenResult<T> gpu = run_per_token(Device::cuda, x, clip_logit, spec, g);
        CAPTURE(symmetric);
        CAPTURE(bits);
        CAPTURE(d);
        CHECK(same_bits(gpu.y, cpu.y));
        CHECK(rel_error(gpu.dx, cpu.dx) <= tolerance<T>());
        // dc = Σ_t ∂s_t/∂c · Σ_i g_ti·coef_ti: compared at sqrt(Σ_t (∂s_t/∂c)²·Σ_i g_ti²)·span
        // (see sum_floor), ∂s_t/∂c = range_t/qmax·α(1 − α) with the 0-including range (max|x|
        // for symmetric grids).
        const double alpha = 1.0 / (1.0 + std::exp(-double(clip_logit)));
        double floor2 = 0;
        for (int64_t r = 0; r < rows; ++r) {
          double lo = 0, hi = 0, g2 = 0;
          for (int64_t c = 0; c < d; ++c) {
            lo = std::min(lo, double(x(r, c)));
            hi = std::max(hi, double(x(r, c)));
            g2 += double(g(r, c)) * double(g(r, c));
          }
          const double range = symmetric ? std::max(-lo, hi) : hi - lo;
          const double ds_dc = range / double(spec.qmax()) * alpha * (1 - alpha);
          floor2 += ds_dc * ds_dc * g2;
        }
        const double span = double(spec.qmax() - spec.qmin());
        CHECK(reduction_error(gpu.dc, cpu.dc, std::sqrt(floor2) * span) <= tolerance<T>());
      }
}
