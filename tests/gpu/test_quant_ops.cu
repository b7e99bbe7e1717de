// CUDA vs CPU: the quantizers (weight fake-quant with LSQ step gradients, static and per-token
// activation quantizers), the RTN grid (init_minmax) and the CFP statistics. LoRA-Rounding:
// test_lora_rounding.cu.
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
#include "gpu/quant_parity.hpp"

using namespace cbq;
using cbq::gpu_testing::kLayouts;
using cbq::gpu_testing::Layout;
using cbq::gpu_testing::make_spec;
using cbq::gpu_testing::on;
using cbq::gpu_testing::randn;
using cbq::gpu_testing::reduction_error;
using cbq::gpu_testing::rel_error;
using cbq::gpu_testing::same_bits;
using cbq::gpu_testing::scaled;
using cbq::gpu_testing::sum_floor;
using cbq::gpu_testing::tolerance;
using quant::Granularity;
using quant::GridSpec;

namespace {

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
