// CUDA vs CPU: the quantizers (weight fake-quant with LSQ step gradients, static and per-token
// activation quantizers), LoRA-Rounding (soft / hard / hard-STE weight, regulariser, AdaRound
// offset, harden), the RTN grid (init_minmax) and the CFP statistics.
//
// Exactness: the quantizer forwards evaluate the CPU's expressions in the CPU's order with IEEE
// round-to-nearest operations and rint (ties to even), so outputs, codes and clamp decisions are
// asserted EQUAL bit for bit, including values exactly on a rounding tie or a clamp bound.
// init_minmax and every CFP statistic are exact too (order statistics, maxima, the same host
// arithmetic). Reductions (step gradients, per-token row sums, the regulariser) run in another
// order and exp/log/pow come from the device's math library:
//   double 1e-12; float 1e-5 (LoRA gradients, through two GEMMs and exp: 5e-5).
// A reduced gradient is compared at the size of its terms when its value cancelled below them
// (reduction_error with sum_floor), because its rounding error scales with the terms.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gpu/gpu_main.hpp"

using namespace cbq;
using cbq::gpu_testing::randn;
using cbq::gpu_testing::rel_error;
using cbq::gpu_testing::same_bits;
using cbq::gpu_testing::tolerance;
using quant::Granularity;
using quant::GridSpec;

namespace {

GridSpec make_spec(int bits, bool symmetric, Granularity granularity, int64_t group = 16) {
  GridSpec g;
  g.bits = bits;
  g.symmetric = symmetric;
  g.granularity = granularity;
  g.group_size = group;
  return g;
}

template <class T>
Tensor<T> scaled(Tensor<T> t, double factor) {
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(t[i] * factor);
  return t;
}

// max|gpu − cpu| / max(max|cpu|, floor). A reduced gradient (a sum of terms of random sign)
// can cancel far below the size of its terms, and its rounding error scales with the terms, so
// it is compared at `floor`, a lower bound on the size of its terms.
template <class T>
double reduction_error(const Tensor<T>& gpu, const Tensor<T>& cpu, double floor) {
  const std::vector<T> x = gpu.to_vector(), r = cpu.to_vector();
  REQUIRE(x.size() == r.size());
  return gpu_testing::max_rel_error(x, r, floor);  // NaN-aware
}

// factor·sqrt(Σ g²): with factor = LSQ scale × the largest |coefficient| (qmax − qmin; inside
// the grid |round(v) − v| ≤ ½), an upper bound on the random-walk size sqrt(Σ terms²) of a step
// gradient's sum, which is what its rounding error scales with (about ε times it). So 1e-5
// leaves a wide margin over float rounding, while a wrong or missing term is still caught.
template <class T>
double sum_floor(const Tensor<T>& g, double factor) {
  double sum = 0;
  for (int64_t i = 0; i < g.numel(); ++i) sum += static_cast<double>(g[i]) * g[i];
  return factor * std::sqrt(sum);
}

template <class T>
Tensor<T> on(Device device, const Tensor<T>& t) {
  return t.defined() ? t.to(device) : t;
}

// The granularities under test on a row of 40 columns: per-tensor, per-channel, groups of 16
// (a short last group of 8), groups of 40 (exact) and of 64 (larger than the row).
struct Layout {
  Granularity granularity;
  int64_t group;
};
const Layout kLayouts[] = {{Granularity::per_tensor, 16},
                           {Granularity::per_channel, 16},
                           {Granularity::per_group, 16},
                           {Granularity::per_group, 40},
                           {Granularity::per_group, 64}};

// ------------------------------------------------------------------------------------------
// weight fake-quant

template <class T>
struct StepResult {
  Tensor<T> y, dx, ds;
};

template <class T>
StepResult<T> run_fake_quant(Device device, const Tensor<T>& w, const Tensor<T>& s,
                             const Tensor<T>& z, const GridSpec& spec, const Tensor<T>& g,
                             bool lsq) {
  Tape<T> tape(device);
  Parameter<T> scale("s", s.to(device));
  Var<T> vw = tape.input(w.to(device));
  Var<T> y = quant::fake_quant_weight(vw, tape.param(scale), on(device, z), spec, lsq);
  y.grad().copy_from(g.to(device));
  tape.backward_from_seeded();
  return {y.value().to(Device::cpu), vw.grad().to(Device::cpu), scale.grad.to(Device::cpu)};
}

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

// ------------------------------------------------------------------------------------------
// CFP

void check_same_detection(const quant::OutlierSet& gpu, const quant::OutlierSet& cpu) {
  CHECK(gpu.n == cpu.n);
  CHECK(gpu.q1 == cpu.q1);
  CHECK(gpu.q3 == cpu.q3);
  CHECK(gpu.threshold == cpu.threshold);
  CHECK(gpu.candidates == cpu.candidates);
  CHECK(gpu.split == cpu.split);
  CHECK(gpu.score == cpu.score);
  CHECK(gpu.kept_max == cpu.kept_max);
  CHECK(gpu.outliers == cpu.outliers);
}

// |N(0,1)|·e^(N(0,1)): heavy-tailed non-negative values, n of them.
template <class T>
Tensor<T> heavy_tailed(int64_t n, uint64_t seed) {
  const Tensor<T> a = randn<T>(Shape{n}, seed), b = randn<T>(Shape{n}, seed + 1);
  Tensor<T> x = Tensor<T>::empty(Shape{n});
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(std::abs(a[i]) * std::exp(1.5 * b[i]));
  return x;
}

}  // namespace

// ============================================================================================

TEST_CASE_TEMPLATE("init_minmax: CUDA equals CPU bit for bit, every granularity", T, float,
                   double) {
  for (const Layout& layout : kLayouts)
    for (bool symmetric : {false, true})
      for (int bits : {2, 4, 8}) {
        const GridSpec spec = make_spec(bits, symmetric, layout.granularity, layout.group);
        Tensor<T> w = scaled(randn<T>(Shape{9, 40}, 100 + bits), 0.1);
        for (int64_t c = 0; c < 40; ++c) {
          w(3, c) = T(0);                // constant row: the minimum step
          w(4, c) = std::abs(w(4, c));   // all positive: lo floored at 0
          w(5, c) = -std::abs(w(5, c));  // all negative: hi floored at 0
        }
        Tensor<T> s_cpu, z_cpu, s_gpu, z_gpu;
        quant::init_minmax(w, spec, s_cpu, z_cpu);
        quant::init_minmax(w.to(Device::cuda), spec, s_gpu, z_gpu);
        CAPTURE(static_cast<int>(layout.granularity));
        CAPTURE(layout.group);
        CAPTURE(symmetric);
        CAPTURE(bits);
        CHECK(s_gpu.device() == Device::cuda);
        CHECK(same_bits(s_gpu, s_cpu));
        CHECK(same_bits(z_gpu, z_cpu));
      }
  // Large enough for many warps per row and several blocks per tensor.
  const Tensor<T> big = randn<T>(Shape{300, 3001}, 7);
  for (Granularity gr : {Granularity::per_tensor, Granularity::per_channel, Granularity::per_group})
    for (bool symmetric : {false, true}) {
      const GridSpec spec = make_spec(4, symmetric, gr, 128);
      Tensor<T> s_cpu, z_cpu, s_gpu, z_gpu;
      quant::init_minmax(big, spec, s_cpu, z_cpu);
      quant::init_minmax(big.to(Device::cuda), spec, s_gpu, z_gpu);
      CHECK(same_bits(s_gpu, s_cpu));
      CHECK(same_bits(z_gpu, z_cpu));
    }
}

TEST_CASE_TEMPLATE("fake_quant_weight: CUDA forward is bit-exact and LSQ grads match, all layouts",
                   T, float, double) {
  uint64_t seed = 200;
  for (const Layout& layout : kLayouts)
    for (bool symmetric : {false, true})
      for (int bits : {2, 4, 8})
        for (bool lsq : {true, false}) {
          const GridSpec spec = make_spec(bits, symmetric, layout.granularity, layout.group);
          const Tensor<T> w = scaled(randn<T>(Shape{11, 40}, seed++), 0.1);
          const Tensor<T> g = randn<T>(Shape{11, 40}, seed++);
          Tensor<T> s, z;
          quant::init_minmax(w, spec, s, z);
          s = scaled(s, 0.8);              // some codes clamp
          if (symmetric) z = Tensor<T>();  // the "all zero-points 0" path
          const StepResult<T> cpu = run_fake_quant(Device::cpu, w, s, z, spec, g, lsq);
          const StepResult<T> gpu = run_fake_quant(Device::cuda, w, s, z, spec, g, lsq);
          CAPTURE(static_cast<int>(layout.granularity));
          CAPTURE(layout.group);
          CAPTURE(symmetric);
          CAPTURE(bits);
          CAPTURE(lsq);
          CHECK(same_bits(gpu.y, cpu.y));
          CHECK(same_bits(gpu.dx, cpu.dx));  // G ⊙ pass: the same clamp decisions
          const double span = double(spec.qmax() - spec.qmin());
          const double lsq_min = lsq ? 1.0 / std::sqrt(440.0 * double(spec.qmax())) : 1.0;
          CHECK(reduction_error(gpu.ds, cpu.ds, sum_floor(g, lsq_min * span)) <= tolerance<T>());
          // The codes of the same grid, from CUDA tensors, equal the CPU's.
          const quant::QuantizedWeight qc = quant::quantize_weight(w, s, z, spec);
          const quant::QuantizedWeight qg = quant::quantize_weight(
              w.to(Device::cuda), s.to(Device::cuda), on(Device::cuda, z), spec);
          CHECK(qg.codes.to_vector() == qc.codes.to_vector());
        }
}

TEST_CASE_TEMPLATE("fake_quant_weight: ties round to even and bounds stay inside, CPU = CUDA", T,
                   float, double) {
  // s = 1/4 and z = 8 (4 bits, [0, 15]): w/s is exact, so w = (k + ½)/4 is an exact tie, and
  // w = −2 and 7/4 land exactly on qmin and qmax.
  const GridSpec spec = make_spec(4, false, Granularity::per_tensor);
  std::vector<T> values;
  for (int k = -12; k <= 12; ++k) values.push_back(static_cast<T>((k + 0.5) / 4.0));  // ties
  for (int k = -10; k <= 9; ++k) values.push_back(static_cast<T>(k / 4.0));           // on grid
  const auto n = static_cast<int64_t>(values.size());
  const Tensor<T> w = Tensor<T>::from(values, Shape{1, n});
  const Tensor<T> s = Tensor<T>::full(Shape{1, 1}, T(0.25));
  const Tensor<T> z = Tensor<T>::full(Shape{1, 1}, T(8));
  const Tensor<T> ones = Tensor<T>::full(Shape{1, n}, T(1));
  const StepResult<T> cpu = run_fake_quant(Device::cpu, w, s, z, spec, ones, true);
  const StepResult<T> gpu = run_fake_quant(Device::cuda, w, s, z, spec, ones, true);
  CHECK(same_bits(gpu.y, cpu.y));
  CHECK(same_bits(gpu.dx, cpu.dx));
  int64_t inside = 0;
  for (int64_t i = 0; i < n; ++i) {
    // Independent expectation: ties to even, then the clamp; on a bound counts as inside.
    const double v = static_cast<double>(values[static_cast<std::size_t>(i)]) * 4.0;
    const double r = std::nearbyint(v);
    const double q = std::clamp(r + 8.0, 0.0, 15.0);
    CAPTURE(v);
    CHECK(static_cast<double>(gpu.y[i]) == 0.25 * (q - 8.0));
    CHECK(static_cast<double>(gpu.dx[i]) == (r + 8.0 == q ? 1.0 : 0.0));
    inside += r + 8.0 == q;
  }
  CHECK(inside > 10);
  CHECK(inside < n);
  const double lsq_factor = 1.0 / std::sqrt(double(n) * 15.0);
  CHECK(reduction_error(gpu.ds, cpu.ds, sum_floor(ones, lsq_factor * 15.0)) <= tolerance<T>());
}

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

TEST_CASE_TEMPLATE("cfp: CUDA detection statistics equal the CPU's exactly", T, float, double) {
  std::vector<Tensor<T>> cases;
  cases.push_back(heavy_tailed<T>(1000, 800));
  cases.push_back(heavy_tailed<T>(1, 801));
  cases.push_back(heavy_tailed<T>(2, 802));
  cases.push_back(heavy_tailed<T>(5, 803));
  cases.push_back(heavy_tailed<T>(200003, 804));  // several radix-sort and select tiles
  {
    // Ties: equal candidates are flagged together, values equal to T are kept.
    std::vector<T> tied;
    for (int i = 0; i < 40; ++i) tied.push_back(static_cast<T>(i % 4));
    tied.push_back(T(100));
    tied.push_back(T(100));
    tied.push_back(T(7.5));
    cases.push_back(Tensor<T>::from(tied, Shape{static_cast<int64_t>(tied.size())}));
  }
  cases.push_back(Tensor<T>(Shape{33}));  // all zero
  for (const Tensor<T>& x : cases) {
    CAPTURE(x.numel());
    for (double lambda2 : {0.0, 1.0, 4.0}) {
      quant::CfpOptions opt;
      opt.lambda2 = lambda2;
      const quant::OutlierSet cpu = quant::detect_outliers(x, "values", opt);
      const quant::OutlierSet gpu = quant::detect_outliers(x.to(Device::cuda), "values", opt);
      check_same_detection(gpu, cpu);
    }
  }
}

TEST_CASE("cfp: CUDA rejects negative and non-finite values with the CPU's message") {
  Tensor<float> x = heavy_tailed<float>(100, 900);
  x[37] = -1.5f;
  x[60] = std::nanf("");
  auto message = [](const Tensor<float>& t) {
    return gpu_testing::error_message([&] { quant::detect_outliers(t, "layers.0.wq"); });
  };
  const std::string cpu = message(x);
  CHECK(gpu_testing::contains(cpu, "index 37"));
  CHECK(message(x.to(Device::cuda)) == cpu);
  x[37] = 1.0f;
  const std::string cpu_nan = message(x);
  CHECK(gpu_testing::contains(cpu_nan, "index 60"));
  CHECK(message(x.to(Device::cuda)) == cpu_nan);
}

TEST_CASE_TEMPLATE("cfp: CUDA weight truncation clamps the same weights to the same values", T,
                   float, double) {
  Tensor<T> w = randn<T>(Shape{64, 96}, 1000);
  w(3, 5) = T(30);
  w(10, 90) = T(-31);
  w(40, 0) = T(12);
  Tensor<T> w_cpu = w.clone();
  Tensor<T> w_gpu = w.to(Device::cuda);
  quant::OutlierSet d_cpu, d_gpu;
  const int64_t n_cpu = quant::truncate_weight_outliers(w_cpu, "w", {}, &d_cpu);
  const int64_t n_gpu = quant::truncate_weight_outliers(w_gpu, "w", {}, &d_gpu);
  CHECK(n_cpu >= 3);
  CHECK(n_gpu == n_cpu);
  check_same_detection(d_gpu, d_cpu);
  CHECK(same_bits(w_gpu, w_cpu));
}

TEST_CASE_TEMPLATE("cfp: ChannelMaxObserver on CUDA batches keeps the CPU's maxima", T, float,
                   double) {
  quant::ChannelMaxObserver<T> cpu(40, "mlp.in"), gpu(40, "mlp.in");
  const Tensor<T> batches[] = {randn<T>(Shape{2, 17, 40}, 1100), randn<T>(Shape{5, 40}, 1101),
                               scaled(randn<T>(Shape{300, 40}, 1102), 3.0)};
  for (const Tensor<T>& b : batches) {
    cpu.observe(b);
    gpu.observe(b.to(Device::cuda));
  }
  CHECK(gpu.maxima() == cpu.maxima());
  CHECK(gpu.rows() == cpu.rows());
  CHECK(gpu.batches() == cpu.batches());
  Tensor<T> bad = randn<T>(Shape{6, 40}, 1103);
  bad(3, 7) = std::numeric_limits<T>::infinity();
  bad(4, 2) = std::numeric_limits<T>::quiet_NaN();
  const std::string cpu_message = gpu_testing::error_message([&] { cpu.observe(bad); });
  const std::string gpu_message =
      gpu_testing::error_message([&] { gpu.observe(bad.to(Device::cuda)); });
  CHECK(gpu_testing::contains(cpu_message, "row 3 channel 7"));
  CHECK(gpu_message == cpu_message);
  CHECK(gpu.maxima() == cpu.maxima());  // a bad batch changes nothing
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
