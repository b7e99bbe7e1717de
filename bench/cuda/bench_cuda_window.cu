// One CBQ window at LLaMA-7B shapes on the GPU: the real pass (CbqPass::run_from_hidden, device
// cuda) on a 2-block LLaMA-7B (d 4096, hidden 11008, 32 heads, fp32 master weights) with
// T = 2048 tokens per sample, W4 g128 or g32, LoRA-Rounding rank 5, A16, one window of 2 blocks,
// 4 calibration samples × 3 epochs. The time of each optimiser step (forward of both blocks with
// soft-rounded weights, the four loss terms and the rounding regulariser, backward, Adam, step
// projection) is taken between consecutive PassOptions::on_step calls after a device
// synchronize; the benchmark's time is the median step (the first step, which builds GEMM plans
// and fills the allocator's cache, is not counted).
//
// Counters
//   ms/step            median step time
//   TFLOP/s            FLOPs per step / step time: linear layers 6·T·Σ(out·in) (forward, dX and
//                      dŴ), LoRA 12·r·Σ(out·in) (A1·A2 and its two gradients, for the soft weight
//                      and again for the regulariser), attention 7·T²·d per block (causal)
//   gemm_peak_TFLOP/s  the cuBLASLt (2048 × 11008 × 4096) forward GEMM in the same math mode,
//                      measured in this binary; of_peak = TFLOP/s / gemm_peak_TFLOP/s
//   peak_GiB           the caching allocator's peak bytes in use during the pass (2 blocks, 4
//                      samples); projected_7B_GiB replaces the 2 blocks by the whole model and
//                      the 4 samples by 128 (the activation sets in GPU memory)
//   fwd_ms             one no-grad forward of the window (2 blocks) on one sample
//   harden_s           hardening the 7 layers of one block (codes computed on the host)
//   projected_h        a full LLaMA-7B run, 128 × 2048 tokens, 3 epochs, 31 windows of 2/1:
//                        31 · 3 · 128 · step + 31 · 128 · 5 · fwd + 32 · harden
//                      (per window and sample: the two target paths, the losses before and
//                      after training, and the quantized path's advance ≈ 5 window forwards)
//
//   ./build/bench/bench_cuda_window                           # g128 and g32, fp32 and TF32
//   ./build/bench/bench_cuda_window --benchmark_filter='/128/1/'   # W4 g128 in TF32
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <vector>

#include <cbq/model/llama_block.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/pass.hpp>

#include "common.cuh"

namespace {

using cbq::Device;
using cbq::Shape;
using cbq::Tensor;
using Model = cbq::Transformer<cbq::LlamaBlock<float>>;

constexpr int64_t kSamples = 4, kEpochs = 3, kRank = 5;
// The full run the projection is for.
constexpr int64_t kFullSamples = 128, kFullEpochs = 3, kFullBlocks = 32;
constexpr int64_t kFullWindows = kFullBlocks - 1;  // windows of 2 blocks, overlap 1
constexpr double kForwardsPerSample = 5;

cbq::ModelConfig llama7b_config(int64_t layers, int64_t max_seq_len) {
  cbq::ModelConfig c;
  c.family = cbq::Family::llama;
  c.architecture = "llama-7b-shapes";
  c.dim = 4096;
  c.hidden_dim = 11008;
  c.n_layers = layers;
  c.n_heads = 32;
  c.n_kv_heads = 32;
  c.head_dim = 128;
  c.vocab_size = 32000;
  c.max_seq_len = max_seq_len;
  c.norm_eps = 1e-6;
  return c;
}

// A 2-block LLaMA-7B on the GPU with random weights drawn there (linear N(0, 1/in)-like uniform,
// norms 1 ± 0.1); the vocabulary is cut to 256 entries, which the window step never reads.
Model& window_model() {
  static std::unique_ptr<Model> model = [] {
    cbq::ModelConfig c = llama7b_config(2, 4096);
    c.vocab_size = 256;
    c.tied_embeddings = true;
    cbq::WeightMap w;  // uninitialised host tensors: the values are drawn on the device below
    const int64_t d = c.dim, f = c.hidden_dim;
    w["model.embed_tokens.weight"] = Tensor<float>::empty(Shape{c.vocab_size, d});
    w["model.norm.weight"] = Tensor<float>::empty(Shape{d});
    for (int64_t i = 0; i < c.n_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      for (const char* n : {"input_layernorm", "post_attention_layernorm"})
        w[p + n + ".weight"] = Tensor<float>::empty(Shape{d});
      for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"})
        w[p + "self_attn." + n + ".weight"] = Tensor<float>::empty(Shape{d, d});
      w[p + "mlp.gate_proj.weight"] = Tensor<float>::empty(Shape{f, d});
      w[p + "mlp.up_proj.weight"] = Tensor<float>::empty(Shape{f, d});
      w[p + "mlp.down_proj.weight"] = Tensor<float>::empty(Shape{d, f});
    }
    auto m = std::make_unique<Model>(c, w);
    m->to(Device::cuda);
    uint64_t seed = 100;
    cbq_bench::fill_uniform(m->embed_tokens.value, seed++);
    cbq_bench::fill_uniform(m->final_norm_weight.value, seed++, 0.17, 1.0);
    for (auto& b : m->blocks) {
      for (auto* l : b.linears())  // uniform ±sqrt(3/in): standard deviation 1/sqrt(in)
        cbq_bench::fill_uniform(l->weight.value, seed++,
                                std::sqrt(3.0 / static_cast<double>(l->in_features())));
      for (auto* p : b.other_parameters()) cbq_bench::fill_uniform(p->value, seed++, 0.17, 1.0);
    }
    cbq::cuda::synchronize();
    return m;
  }();
  return *model;
}

int64_t linear_weights(Model& model) {
  int64_t n = 0;
  for (auto* l : model.blocks[0].linears()) n += l->weight.value.numel();
  return n;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void BM_cbq_window_step(benchmark::State& state) {
  const int64_t group = state.range(0), T = state.range(2);
  const bool tf32 = state.range(1) != 0;
  const cbq::cuda::MathMode mode = tf32 ? cbq::cuda::MathMode::tf32 : cbq::cuda::MathMode::fp32;
  cbq::cuda::MathModeGuard math(mode);
  try {
    Model& model = window_model();
    cbq::clear_quantization(model);  // the FP model again (a previous configuration's pass)
    const int64_t d = model.config.dim;
    std::vector<Tensor<float>> inputs;
    for (int64_t n = 0; n < kSamples; ++n)
      inputs.push_back(cbq_bench::random_device_tensor<float>(Shape{T, d}, 1000 + n));

    cbq::PassSpec spec;
    spec.weight.bits = 4;
    spec.weight.granularity = cbq::quant::Granularity::per_group;
    spec.weight.group_size = group;
    spec.rank = kRank;
    cbq::PassOptions options;
    options.device = Device::cuda;
    options.epochs = kEpochs;
    options.verbose = false;

    // One FP forward of the window on one sample (no gradients), median of 5.
    std::vector<double> fwd;
    cbq::BlockContext<float> fp;
    fp.full_precision = true;
    for (int r = 0; r < 6; ++r) {
      cbq::cuda::synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      const Tensor<float> y = model.run_block(1, model.run_block(0, inputs[0], fp), fp);
      cbq::cuda::synchronize();
      const auto t1 = std::chrono::steady_clock::now();
      if (r > 0) fwd.push_back(std::chrono::duration<double>(t1 - t0).count());  // r = 0: warm-up
    }
    const double t_fwd = median(fwd);
    const double peak_gemm = cbq_bench::gemm_peak_tflops(2048, 11008, 4096);

    double t_step = 0, peak_bytes = 0, pass_seconds = 0;
    for (auto _ : state) {
      std::vector<std::chrono::steady_clock::time_point> marks;
      options.on_step = [&](int64_t, int64_t) {
        cbq::cuda::synchronize();
        marks.push_back(std::chrono::steady_clock::now());
      };
      cbq::clear_quantization(model);
      cbq::cuda::allocator().reset_peak();
      const cbq::QuantizationResult result =
          cbq::CbqPass(spec, options).run_from_hidden(model, inputs);
      peak_bytes = static_cast<double>(cbq::cuda::allocator().stats().peak_bytes_in_use);
      pass_seconds = result.seconds;
      std::vector<double> steps;
      for (size_t i = 1; i < marks.size(); ++i)
        steps.push_back(std::chrono::duration<double>(marks[i] - marks[i - 1]).count());
      if (steps.empty()) {
        state.SkipWithError("the pass made fewer than two steps");
        return;
      }
      t_step = median(steps);
      state.SetIterationTime(t_step);
    }

    // Hardening one block's 7 layers (the pass hardens one block per window).
    double t_harden = 0;
    {
      std::vector<std::shared_ptr<cbq::QuantLinear<float>>> layers;
      for (auto* l : model.blocks[0].linears()) {
        cbq::QuantLinearConfig qc = spec.layer_config(l->name);
        qc.lora_init.start = options.lora_start;
        qc.rounding_mode = options.rounding_mode;
        layers.push_back(
            std::make_shared<cbq::QuantLinear<float>>("bench." + l->name, l->weight.value, qc));
      }
      cbq::cuda::synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      for (auto& q : layers) q->harden();
      t_harden = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }

    const double P = static_cast<double>(linear_weights(model));  // Σ out·in of one block
    const double Td = static_cast<double>(T), dd = static_cast<double>(d);
    const double flop = 2 * (6 * Td * P + 12 * kRank * P + 7 * Td * Td * dd);
    const double projected =
        static_cast<double>(kFullWindows * kFullEpochs * kFullSamples) * t_step +
        static_cast<double>(kFullWindows * kFullSamples) * kForwardsPerSample * t_fwd +
        static_cast<double>(kFullBlocks) * t_harden;
    // Memory of the full run: the whole model (32 blocks, embedding and head, fp32) instead of 2
    // blocks, and 128 samples instead of 4 in each of the 4 activation sets.
    const cbq::ModelConfig full = llama7b_config(kFullBlocks, 4096);
    const double block_bytes = 4.0 * (P + 2 * dd);
    const double full_model_bytes =
        4.0 * (2.0 * static_cast<double>(full.vocab_size) * dd + dd) + kFullBlocks * block_bytes;
    const double set_bytes = 4.0 * 4.0 * Td * dd;  // one sample in each of the 4 sets
    const double projected_memory = peak_bytes - 2 * block_bytes - kSamples * set_bytes +
                                    full_model_bytes + kFullSamples * set_bytes;

    state.counters["ms/step"] = t_step * 1e3;
    state.counters["TFLOP/s"] = flop / t_step * 1e-12;
    state.counters["gemm_peak_TFLOP/s"] = peak_gemm;
    state.counters["of_peak"] = flop / t_step * 1e-12 / peak_gemm;
    state.counters["peak_GiB"] = peak_bytes / (1 << 30);
    state.counters["projected_7B_GiB"] = projected_memory / (1 << 30);
    state.counters["fwd_ms"] = t_fwd * 1e3;
    state.counters["harden_s"] = t_harden;
    state.counters["pass_s"] = pass_seconds;
    state.counters["projected_h"] = projected / 3600;
    state.SetLabel(
        fmt::format("W4 g{} r{} {} T={}", group, kRank, cbq::cuda::math_mode_name(mode), T));
    std::printf(
        "window step W4 g%lld %s T=%lld: %.1f ms/step, %.1f TFLOP/s (%.0f %% of the %.1f TFLOP/s "
        "GEMM), peak %.2f GiB; full LLaMA-7B run (128 x 2048, 3 epochs, 31 windows): %.2f h "
        "(steps %.2f h, forwards %.2f h, hardening %.2f h), about %.1f GiB\n",
        static_cast<long long>(group), cbq::cuda::math_mode_name(mode), static_cast<long long>(T),
        t_step * 1e3, flop / t_step * 1e-12, 100 * flop / t_step * 1e-12 / peak_gemm, peak_gemm,
        peak_bytes / (1 << 30), projected / 3600,
        static_cast<double>(kFullWindows * kFullEpochs * kFullSamples) * t_step / 3600,
        static_cast<double>(kFullWindows * kFullSamples) * kForwardsPerSample * t_fwd / 3600,
        static_cast<double>(kFullBlocks) * t_harden / 3600, projected_memory / (1 << 30));
  } catch (const cbq::Error& e) {
    state.SkipWithError(e.what());
  }
}
// (group size, TF32 on, tokens per sample)
BENCHMARK(BM_cbq_window_step)
    ->Args({128, 0, 2048})
    ->Args({128, 1, 2048})
    ->Args({32, 0, 2048})
    ->Args({32, 1, 2048})
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) { return cbq_bench::run_benchmarks(argc, argv); }
