// The CUDA kernels of the CBQ window step, one by one, at LLaMA-7B shapes for 2048 tokens, timed
// with CUDA events on cbq's stream (manual time = GPU time of forward + backward). Each op runs
// through the tape as the pass runs it (Tape(Device::cuda), outputs and gradients from its arena).
//
// Counters (achieved, from the GPU time of each phase):
//   attention     fwd_TFLOP/s, bwd_TFLOP/s, TFLOP/s. Causal FLOPs, H·hd = d: forward QKᵀ and PV
//                 2·T²·d (half of 4·T²·d), backward 5·T²·d (S recomputed, dV, dP, dQ, dK).
//   rmsnorm       fwd_GB/s (read x, write y: 2·T·d values), bwd_GB/s (read dy, x, read-write dx:
//                 4·T·d values; the weight and per-row terms are O(T + d)).
//   fake-quant    fake_quant_weight with a learned step, (out, in) W4 g128: fwd reads W, writes
//                 ŵ and the two saved factors (4 passes), bwd reads G and the factors and
//                 updates dW (5 passes).
//   LoRA weight   lora_soft_weight (V = A1·A2 + V0, soft rounding, W4 g128, rank 5): fwd 9
//                 passes over (out, in) (A1·A2 written, + V0 read twice/written, soft weight
//                 reads W and V, writes Ŵ and two factors), bwd 11 (dV from G and the factor,
//                 the step's partial sums, the add's gradient, the two rank-5 GEMMs reading dV).
//   adam          fused update: reads p, m, v, g, lr scale, writes p, m, v: 8 values per element.
// GB/s counts those bytes once each (fp32): a lower bound of the traffic, so a fraction of the
// HBM bandwidth (H100 SXM ≈ 3.35 TB/s) says how close each kernel is to its bound.
#include <optional>

#include "common.cuh"

namespace {

using cbq::Device;
using cbq::Shape;
using cbq::Tape;
using cbq::Tensor;
using cbq::Var;
using cbq_bench::PhaseTimer;
using cbq_bench::random_device_tensor;

constexpr int64_t kTokens = 2048, kDim = 4096, kHidden = 11008;

// Runs `iteration(timer)` (which marks phase 0 = forward and phase 1 = backward) for every
// benchmark iteration after one warm-up, and fills the time and the per-phase counters.
template <class F>
void run_phases(benchmark::State& state, F&& iteration, double fwd_units, double bwd_units,
                const char* unit) {
  try {
    {
      PhaseTimer warm(2);
      iteration(warm);  // arena, GEMM plans, allocator cache
      (void)warm.total();
    }
    double fwd = 0, bwd = 0;
    for (auto _ : state) {
      PhaseTimer t(2);
      iteration(t);
      const double f = t.seconds(0), b = t.seconds(1);
      fwd += f;
      bwd += b;
      state.SetIterationTime(f + b);
    }
    const double n = static_cast<double>(state.iterations());
    const std::string u(unit);
    state.counters["fwd_ms"] = fwd / n * 1e3;
    state.counters["bwd_ms"] = bwd / n * 1e3;
    state.counters["fwd_" + u] = fwd_units * n / fwd;
    state.counters["bwd_" + u] = bwd_units * n / bwd;
    state.counters[u] = (fwd_units + bwd_units) * n / (fwd + bwd);
  } catch (const cbq::Error& e) {
    state.SkipWithError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------

void BM_attention(benchmark::State& state) {
  const int64_t T = state.range(0), heads = state.range(1), hd = state.range(2);
  const cbq::cuda::AttentionMode mode = static_cast<cbq::cuda::AttentionMode>(state.range(3));
  cbq::cuda::AttentionModeGuard kernels(mode);
  state.SetLabel(cbq::cuda::attention_mode_name(mode));
  const int64_t d = heads * hd;
  Tape<float> tape(Device::cuda);
  const Tensor<float> q = random_device_tensor<float>(Shape{T, d}, 1);
  const Tensor<float> k = random_device_tensor<float>(Shape{T, d}, 2);
  const Tensor<float> v = random_device_tensor<float>(Shape{T, d}, 3);
  const Tensor<float> g = random_device_tensor<float>(Shape{T, d}, 4);
  auto iteration = [&](PhaseTimer& t) {
    tape.clear();
    Var<float> qv = tape.input(q), kv = tape.input(k), vv = tape.input(v);
    t.start();
    Var<float> o = cbq::ops::attention(qv, kv, vv, heads, heads, hd, true);
    t.mark(0);
    o.grad().copy_from(g);
    tape.backward_from_seeded();
    t.mark(1);
  };
  const double td = static_cast<double>(T) * static_cast<double>(T) * static_cast<double>(d);
  run_phases(state, iteration, 2 * td * 1e-12, 5 * td * 1e-12, "TFLOP/s");
}
// (T, heads, head_dim, AttentionMode: 1 fp32 scalar, 2 tf32, 3 bf16 tensor cores)
BENCHMARK(BM_attention)
    ->Args({kTokens, 32, 128, 1})  // LLaMA-7B
    ->Args({kTokens, 32, 128, 2})
    ->Args({kTokens, 32, 128, 3})
    ->Args({512, 32, 128, 1})
    ->Args({512, 32, 128, 2})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_rmsnorm(benchmark::State& state) {
  const int64_t T = state.range(0), d = state.range(1);
  Tape<float> tape(Device::cuda);
  const Tensor<float> x = random_device_tensor<float>(Shape{T, d}, 5);
  cbq::Parameter<float> w("w", random_device_tensor<float>(Shape{d}, 6, 0.1, 1.0));
  const Tensor<float> g = random_device_tensor<float>(Shape{T, d}, 7);
  auto iteration = [&](PhaseTimer& t) {
    tape.clear();
    w.zero_grad();
    Var<float> xv = tape.input(x);
    t.start();
    Var<float> y = cbq::ops::rmsnorm(xv, tape.param(w), 1e-5);
    t.mark(0);
    y.grad().copy_from(g);
    tape.backward_from_seeded();
    t.mark(1);
  };
  const double bytes = 4.0 * static_cast<double>(T * d);
  run_phases(state, iteration, 2 * bytes * 1e-9, 4 * bytes * 1e-9, "GB/s");
}
BENCHMARK(BM_rmsnorm)->Args({kTokens, kDim})->UseManualTime()->Unit(benchmark::kMillisecond);

cbq::quant::GridSpec w4(int64_t group) {
  cbq::quant::GridSpec g;
  g.bits = 4;
  g.granularity = cbq::quant::Granularity::per_group;
  g.group_size = group;
  return g;
}

void BM_fake_quant_weight(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), group = state.range(2);
  const cbq::quant::GridSpec spec = w4(group);
  Tape<float> tape(Device::cuda);
  const Tensor<float> w = random_device_tensor<float>(Shape{rows, cols}, 8, 0.02);
  Tensor<float> s, z;
  cbq::quant::init_minmax(w, spec, s, z);
  cbq::Parameter<float> scale("s", s);
  const Tensor<float> g = random_device_tensor<float>(Shape{rows, cols}, 9);
  auto iteration = [&](PhaseTimer& t) {
    tape.clear();
    scale.zero_grad();
    Var<float> wv = tape.input(w);
    t.start();
    Var<float> y = cbq::quant::fake_quant_weight(wv, tape.param(scale), z, spec);
    t.mark(0);
    y.grad().copy_from(g);
    tape.backward_from_seeded();
    t.mark(1);
  };
  const double bytes = 4.0 * static_cast<double>(rows * cols);
  run_phases(state, iteration, 4 * bytes * 1e-9, 5 * bytes * 1e-9, "GB/s");
}
BENCHMARK(BM_fake_quant_weight)
    ->Args({kHidden, kDim, 128})  // gate / up projection
    ->Args({kDim, kDim, 128})     // q, k, v, o
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_lora_soft_weight(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), group = state.range(2);
  const int64_t rank = 5;
  const cbq::quant::GridSpec spec = w4(group);
  Tape<float> tape(Device::cuda);
  const Tensor<float> w = random_device_tensor<float>(Shape{rows, cols}, 10, 0.02);
  Tensor<float> s, z;
  cbq::quant::init_minmax(w, spec, s, z);
  cbq::quant::LoraInit init;
  init.start = cbq::quant::LoraStart::adaround;
  cbq::quant::LoraRoundingParams<float> lora =
      cbq::quant::init_lora_rounding<float>("bench", w, s, z, spec, rank, init);
  cbq_bench::fill_uniform(lora.A2.value, 13, 1e-3);  // V = V0 + A1·A2 with A2 ≠ 0
  cbq::Parameter<float> scale("s", s);
  const Tensor<float> g = random_device_tensor<float>(Shape{rows, cols}, 11);
  auto iteration = [&](PhaseTimer& t) {
    tape.clear();
    scale.zero_grad();
    lora.A1.zero_grad();
    lora.A2.zero_grad();
    t.start();
    Var<float> y = cbq::quant::lora_soft_weight(w, tape.param(scale), z, tape.param(lora.A1),
                                                tape.param(lora.A2), lora.v0(), spec,
                                                cbq::quant::RoundingMode::hard_ste, true);
    t.mark(0);
    y.grad().copy_from(g);
    tape.backward_from_seeded();
    t.mark(1);
  };
  const double bytes = 4.0 * static_cast<double>(rows * cols);
  run_phases(state, iteration, 9 * bytes * 1e-9, 11 * bytes * 1e-9, "GB/s");
  state.counters["lora_GFLOP"] = 6.0 * static_cast<double>(rows * cols * rank) * 1e-9;
}
BENCHMARK(BM_lora_soft_weight)
    ->Args({kHidden, kDim, 128})
    ->Args({kHidden, kDim, 32})
    ->Args({kDim, kDim, 128})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_adam(benchmark::State& state) {
  const int64_t n = state.range(0);
  cbq::Parameter<float> p("p", random_device_tensor<float>(Shape{n}, 14));
  cbq_bench::fill_uniform(p.grad, 15);
  const Tensor<float> lr_scale = random_device_tensor<float>(Shape{n}, 16, 0.5, 1.0);
  cbq::optim::Adam<float> adam;
  adam.add_group("bench", {&p}, 1e-3, {lr_scale});
  try {
    adam.step();  // warm-up
    double seconds = 0;
    for (auto _ : state) {
      PhaseTimer t(1);
      t.start();
      adam.step();
      t.mark(0);
      const double s = t.seconds(0);
      seconds += s;
      state.SetIterationTime(s);
    }
    const double bytes = 8.0 * 4.0 * static_cast<double>(n);
    state.counters["GB/s"] = bytes * static_cast<double>(state.iterations()) / seconds * 1e-9;
  } catch (const cbq::Error& e) {
    state.SkipWithError(e.what());
  }
}
BENCHMARK(BM_adam)
    ->Arg(int64_t{1} << 26)  // 64 Mi parameters: the bandwidth bound
    ->Arg(int64_t{1} << 22)  // ≈ one 7B window's LoRA factors and g128 steps (2 blocks: 3.9 M)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) { return cbq_bench::run_benchmarks(argc, argv); }
