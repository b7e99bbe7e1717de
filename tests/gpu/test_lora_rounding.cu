// CUDA vs CPU: LoRA-Rounding (quant/lora_rounding.hpp, cuda/cbq/cuda/quant/lora_rounding.cuh): soft
// / hard / hard-STE weight, regulariser, AdaRound offset, harden, at small shapes and at a LLaMA-7B
// shape. CPU tests: tests/quant/test_lora_rounding.cpp, test_lora_rounding_fused.cpp.
//
// Tolerances: the soft weight's W/s, floor and clamp are exact; h(V) uses the device's exp and
// V = A1·A2 another GEMM order, so values agree to a few ulps of h and a hard code may differ only
// within those ulps of ½ (hard_mismatches). Reductions (step gradients, the regulariser) run in
// another order: double 1e-12; float 1e-5 (LoRA gradients, through two GEMMs and exp: 5e-5).
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
// LoRA-Rounding

template <class T>
struct LoraResult {
  Tensor<T> y, reg, ds, dA1, dA2;
};

template <class T>
LoraResult<T> run_lora(Device device, const Tensor<T>& w, const Tensor<T>& s, const Tensor<T>& z,
                       const Tensor<T>& a1, const Tensor<T>& a2, const Tensor<T>& v0,
                       const GridSpec& spec, quant::RoundingMode mode, const Tensor<T>& g,
                       T reg_seed) {
  Tape<T> tape(device);
  Parameter<T> scale("s", s.to(device)), A1("a1", a1.to(device)), A2("a2", a2.to(device));
  const Tensor<T> wd = w.to(device), zd = on(device, z), v0d = on(device, v0);
  const Tensor<T>* v0p = v0d.defined() ? &v0d : nullptr;
  Var<T> y = quant::lora_soft_weight(wd, tape.param(scale), zd, tape.param(A1), tape.param(A2), v0p,
                                     spec, mode, true);
  Var<T> reg = quant::lora_round_reg(tape.param(A1), tape.param(A2), v0p, T(3.5));
  y.grad().copy_from(g.to(device));
  reg.grad().copy_from(Tensor<T>::full(Shape{1}, reg_seed).to(device));
  tape.backward_from_seeded();
  return {y.value().to(Device::cpu), reg.value().to(Device::cpu), scale.grad.to(Device::cpu),
          A1.grad.to(Device::cpu), A2.grad.to(Device::cpu)};
}

// Hard codes that differ between two hard-mode weights: the count, and how many of them lie where
// h(V) (V = A1·A2 + V0 in double) is farther than 1e-5 from the threshold ½. A code may differ
// only within rounding of the threshold (V from another GEMM order, exp from another library:
// ulps of h), so the second number must be 0.
template <class T>
std::pair<int64_t, int64_t> hard_mismatches(const Tensor<T>& y_gpu, const Tensor<T>& y_cpu,
                                            const Tensor<T>& a1, const Tensor<T>& a2,
                                            const Tensor<T>& v0) {
  const int64_t rows = a1.size(0), rank = a1.size(1), cols = a2.size(1);
  const std::vector<T> x = y_gpu.to_vector(), r = y_cpu.to_vector();
  int64_t differ = 0, away = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const std::size_t at = static_cast<std::size_t>(i * cols + j);
      if (x[at] == r[at]) continue;
      ++differ;
      double v = v0.defined() ? double(v0(i, j)) : 0.0;
      for (int64_t k = 0; k < rank; ++k) v += double(a1(i, k)) * double(a2(k, j));
      const double h = std::clamp(1.2 / (1.0 + std::exp(-v)) - 0.1, 0.0, 1.0);
      away += std::abs(h - 0.5) > 1e-5;
    }
  return {differ, away};
}

}  // namespace

TEST_CASE_TEMPLATE("lora_rounding: soft, hard and hard-STE weights, regulariser and grads", T,
                   float, double) {
  // Through cuBLASLt (V = A1·A2 and its backward) and the device exp: float 1e-5 for values,
  // 5e-5 for the gradients; double 1e-12.
  const double value_tol = tolerance<T>();
  const double grad_tol = std::is_same_v<T, double> ? 1e-12 : 5e-5;
  uint64_t seed = 600;
  for (const Layout& layout : kLayouts)
    for (bool symmetric : {false, true})
      for (bool adaround : {false, true}) {
        const GridSpec spec = make_spec(3, symmetric, layout.granularity, layout.group);
        const Tensor<T> w = scaled(randn<T>(Shape{12, 40}, seed++), 0.1);
        const Tensor<T> g = randn<T>(Shape{12, 40}, seed++);
        Tensor<T> s, z;
        quant::init_minmax(w, spec, s, z);
        s = scaled(s, 0.9);  // some codes clamp
        quant::LoraInit init;
        init.start = adaround ? quant::LoraStart::adaround : quant::LoraStart::half;
        init.seed = seed++;
        const quant::LoraRoundingParams<T> p =
            quant::init_lora_rounding("l", w, s, z, spec, 3, init);
        // CUDA initialisation: A1 from the same host generator, V0 from the AdaRound kernel.
        const quant::LoraRoundingParams<T> pg = quant::init_lora_rounding(
            "l", w.to(Device::cuda), s.to(Device::cuda), z.to(Device::cuda), spec, 3, init);
        CHECK(same_bits(pg.A1.value, p.A1.value));
        CHECK(pg.A2.value.device() == Device::cuda);
        if (adaround) CHECK(rel_error(pg.V0, p.V0) <= value_tol);
        const Tensor<T> a2 = scaled(randn<T>(Shape{3, 40}, seed++), 0.7);  // h spans (0, 1)
        for (auto mode : {quant::RoundingMode::soft, quant::RoundingMode::hard,
                          quant::RoundingMode::hard_ste}) {
          CAPTURE(static_cast<int>(layout.granularity));
          CAPTURE(layout.group);
          CAPTURE(symmetric);
          CAPTURE(adaround);
          CAPTURE(static_cast<int>(mode));
          const LoraResult<T> cpu =
              run_lora(Device::cpu, w, s, z, p.A1.value, a2, p.V0, spec, mode, g, T(1.7));
          const LoraResult<T> gpu =
              run_lora(Device::cuda, w, s, z, p.A1.value, a2, p.V0, spec, mode, g, T(1.7));
          CHECK(rel_error(gpu.y, cpu.y) <= value_tol);
          CHECK(rel_error(gpu.reg, cpu.reg) <= value_tol);
          const double lsq_min = 1.0 / std::sqrt(480.0 * double(spec.qmax()));
          const double span = double(spec.qmax() - spec.qmin());
          CHECK(reduction_error(gpu.ds, cpu.ds, sum_floor(g, lsq_min * span)) <= grad_tol);
          CHECK(rel_error(gpu.dA1, cpu.dA1) <= grad_tol);
          CHECK(rel_error(gpu.dA2, cpu.dA2) <= grad_tol);
          if (mode == quant::RoundingMode::hard) {
            // Hard codes differ only where h(V) is within rounding of ½.
            const auto [differ, away] = hard_mismatches(gpu.y, cpu.y, p.A1.value, a2, p.V0);
            CAPTURE(differ);
            CHECK(away == 0);
          }
        }
      }
}

TEST_CASE_TEMPLATE("lora_rounding: harden from CUDA tensors gives the CPU's codes", T, float,
                   double) {
  const GridSpec spec = make_spec(4, false, Granularity::per_group, 16);
  const Tensor<T> w = scaled(randn<T>(Shape{6, 40}, 700), 0.1);
  const Tensor<T> v = scaled(randn<T>(Shape{6, 40}, 701), 2.0);
  Tensor<T> s, z;
  quant::init_minmax(w, spec, s, z);
  const quant::QuantizedWeight cpu = quant::harden(w, s, z, v, spec);
  const quant::QuantizedWeight gpu = quant::harden(w.to(Device::cuda), s.to(Device::cuda),
                                                   z.to(Device::cuda), v.to(Device::cuda), spec);
  CHECK(gpu.codes.to_vector() == cpu.codes.to_vector());
  CHECK(same_bits(gpu.scale, cpu.scale));
}

TEST_CASE("lora_rounding (small, for compute-sanitizer): soft weight, regulariser, grads, harden") {
  // What scripts/gpu-check.sh runs under memcheck, racecheck and initcheck: every LoRA kernel
  // (soft and hard forward, regulariser forward and backward, AdaRound offset, the step
  // quantizer's backward, hardening) on a weight with a short last group.
  const GridSpec spec = make_spec(4, false, Granularity::per_group, 16);
  const Tensor<float> w = scaled(randn<float>(Shape{9, 40}, 1200), 0.1);
  const Tensor<float> g = randn<float>(Shape{9, 40}, 1201);
  Tensor<float> s, z;
  quant::init_minmax(w, spec, s, z);
  quant::LoraInit init;
  init.start = quant::LoraStart::adaround;
  const quant::LoraRoundingParams<float> p = quant::init_lora_rounding(
      "l", w.to(Device::cuda), s.to(Device::cuda), z.to(Device::cuda), spec, 3, init);
  const Tensor<float> a2 = scaled(randn<float>(Shape{3, 40}, 1202), 0.7);
  const Tensor<float> v0 = p.V0.to(Device::cpu);
  for (auto mode : {quant::RoundingMode::soft, quant::RoundingMode::hard}) {
    const LoraResult<float> cpu =
        run_lora(Device::cpu, w, s, z, p.A1.value, a2, v0, spec, mode, g, 1.3f);
    const LoraResult<float> gpu =
        run_lora(Device::cuda, w, s, z, p.A1.value, a2, v0, spec, mode, g, 1.3f);
    CHECK(rel_error(gpu.y, cpu.y) <= 1e-4);
    CHECK(rel_error(gpu.reg, cpu.reg) <= 1e-4);
    CHECK(rel_error(gpu.dA1, cpu.dA1) <= 1e-3);
  }
  const quant::QuantizedWeight hard =
      quant::harden(w.to(Device::cuda), s.to(Device::cuda), z.to(Device::cuda), p.V0, spec);
  CHECK(hard.codes.numel() == w.numel());
}

TEST_CASE("lora_rounding at a LLaMA-7B shape (11008 x 4096, W4 g128, rank 5): CPU vs CUDA") {
  // The fused CPU kernel and the composed CUDA path (V by cuBLASLt, soft weight kernel, the step
  // quantizer's backward, two rank-5 GEMMs) at the gate/up projection's shape. Bounds, in the
  // normwise relative error e(x) = ‖x − exact‖ / ‖exact‖ against the CPU in double on the same
  // (float) inputs, with e_cpu = e(CPU float) for each result:
  //   soft weight, regulariser, ds, dA1, dA2:  e ≤ 4·e_cpu + 2⁻²⁰. The same float operations in
  //     another order (V summed by a GEMM instead of in rank order, exp from the device's library
  //     (2 ulp) instead of the vectorised one (1 ulp), dA2 over 11008 rows by a GEMM instead of
  //     blocks of 32 rows added in order); 2⁻²⁰ = 16 float ulps covers an e_cpu near 0.
  //   hard weight: equal except where h(V) is within rounding of ½ (hard_mismatches).
  const int64_t rows = 11008, cols = 4096, rank = 5;
  const GridSpec spec = make_spec(4, false, Granularity::per_group, 128);
  const Tensor<float> w = scaled(randn<float>(Shape{rows, cols}, 1300), 0.02);
  const Tensor<float> g = scaled(randn<float>(Shape{rows, cols}, 1301), 1e-3);
  Tensor<float> s, z;
  quant::init_minmax(w, spec, s, z);
  Tensor<float> v0(Shape{rows, cols});
  quant::adaround_offset(w, s, spec, v0);
  const Tensor<float> a1 = scaled(randn<float>(Shape{rows, rank}, 1302), 0.3);
  const Tensor<float> a2 = scaled(randn<float>(Shape{rank, cols}, 1303), 0.3);
  auto as_double = [](const Tensor<float>& t) {
    return t.defined() ? t.cast<double>() : Tensor<double>();
  };
  const LoraResult<double> exact =
      run_lora(Device::cpu, as_double(w), as_double(s), as_double(z), as_double(a1), as_double(a2),
               as_double(v0), spec, quant::RoundingMode::soft, as_double(g), 1.7);
  const LoraResult<float> cpu =
      run_lora(Device::cpu, w, s, z, a1, a2, v0, spec, quant::RoundingMode::soft, g, 1.7f);
  const LoraResult<float> gpu =
      run_lora(Device::cuda, w, s, z, a1, a2, v0, spec, quant::RoundingMode::soft, g, 1.7f);
  const char* names[] = {"y", "reg", "ds", "dA1", "dA2"};
  const Tensor<float>* got[] = {&gpu.y, &gpu.reg, &gpu.ds, &gpu.dA1, &gpu.dA2};
  const Tensor<float>* ref[] = {&cpu.y, &cpu.reg, &cpu.ds, &cpu.dA1, &cpu.dA2};
  const Tensor<double>* ex[] = {&exact.y, &exact.reg, &exact.ds, &exact.dA1, &exact.dA2};
  for (int i = 0; i < 5; ++i) {
    const double e_cpu = gpu_testing::norm_rel_error(ref[i]->data(), ex[i]->data(), ex[i]->numel());
    const double e_gpu = gpu_testing::norm_rel_error(got[i]->data(), ex[i]->data(), ex[i]->numel());
    const double bound = 4 * e_cpu + 0x1p-20;
    MESSAGE("LoRA 11008 x 4096 ", names[i], ": e_gpu ", e_gpu, ", e_cpu ", e_cpu, ", bound ",
            bound);
    CAPTURE(names[i]);
    CHECK(e_gpu <= bound);
  }
  const LoraResult<float> cpu_hard =
      run_lora(Device::cpu, w, s, z, a1, a2, v0, spec, quant::RoundingMode::hard, g, 1.7f);
  const LoraResult<float> gpu_hard =
      run_lora(Device::cuda, w, s, z, a1, a2, v0, spec, quant::RoundingMode::hard, g, 1.7f);
  const auto [differ, away] = hard_mismatches(gpu_hard.y, cpu_hard.y, a1, a2, v0);
  MESSAGE("LoRA 11008 x 4096 hard weight: ", differ, " of ", rows * cols,
          " codes differ, all within rounding of the threshold: ", away == 0);
  CHECK(away == 0);
  CHECK(differ <= rows * cols / 100000);  // a handful: P(|h(V) − ½| ≲ 1e-7) · 45M
}
