// One CBQ window step on the CPU: 2 LLaMA blocks at stories15M shapes (d 288, hidden 768, 6
// heads, T 256, batch 1, fp32), W4 g32 weights with LoRA-Rounding rank 5, A16. The step is what
// the pass repeats E·N times per window: forward of the quantized window (soft/hard weights
// computed once per step), the L2 + KLD loss against the two constant targets, backward, Adam.
// The targets T_fp(X_fp) and T_fp(X_q) are computed once per window and sample, outside the step.
//
// FLOPs counted (multiply-add = 2), per block, T tokens:
//   linear layers  fwd 2·T·P, bwd 4·T·P  (P = weights: 4·d² + 3·d·hidden)
//   attention      fwd 2·T²·d, bwd 5·T²·d (causal half; recompute S, dV, dP, dQ, dK)
//   LoRA V = A1·A2 fwd 2·P·r, bwd 4·P·r
// Elementwise work (norms, RoPE, SwiGLU, fake-quant, losses, Adam) is not counted.
// BM_SgemmPeak measures the machine's SGEMM rate in the same binary for comparison.
#include <benchmark/benchmark.h>

#include <cbq/cbq.hpp>

using namespace cbq;

namespace {

ModelConfig step_config() {
  ModelConfig c;
  c.family = Family::llama;
  c.dim = 288;
  c.hidden_dim = 768;
  c.n_layers = 2;
  c.n_heads = 6;
  c.n_kv_heads = 6;
  c.head_dim = 48;
  c.vocab_size = 32;
  c.max_seq_len = 256;
  return c;
}
constexpr int64_t kT = 256, kRank = 5;

double step_flops(const ModelConfig& c) {
  const double T = kT, d = c.dim, P = 4 * d * d + 3 * d * c.hidden_dim;
  const double per_block = 6 * T * P + 7 * T * T * d + 6 * P * kRank;
  return 2 * per_block;
}

void BM_SgemmPeak(benchmark::State& state) {
  const int64_t n = state.range(0);
  Tensor<float> A(Shape{n, n}), B(Shape{n, n}), C(Shape{n, n});
  for (int64_t i = 0; i < A.numel(); ++i) A[i] = B[i] = static_cast<float>((i % 7) - 3) * 0.1f;
  for (auto _ : state) {
    blas::gemm<float>(false, false, n, n, n, 1.f, A.data(), n, B.data(), n, 0.f, C.data(), n);
    benchmark::DoNotOptimize(C.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * n * n * n / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_SgemmPeak)->Arg(288)->Arg(768)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_CbqWindowStep(benchmark::State& state) {
  const ModelConfig c = step_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 2));
  QuantLinearConfig qc;
  qc.weight.bits = 4;
  qc.weight.group_size = 32;
  qc.rounding = RoundingKind::lora;
  qc.rank = kRank;
  qc.lora_init.start = quant::LoraStart::adaround;
  qc.rounding_mode = state.range(0) ? quant::RoundingMode::hard_ste : quant::RoundingMode::soft;
  std::vector<std::shared_ptr<QuantLinear<float>>> layers;
  std::vector<Parameter<float>*> steps, rounds;
  std::vector<Tensor<float>> step_scales;
  for (auto& b : model.blocks)
    for (auto* l : b.linears()) {
      auto q = std::make_shared<QuantLinear<float>>(l->name, l->weight.value, qc);
      l->transform = q;
      layers.push_back(q);
      for (auto* p : q->weight_step_params()) steps.push_back(p);
      for (auto& t : q->weight_step_lr_scales()) step_scales.push_back(t);
      for (auto* p : q->rounding_params()) rounds.push_back(p);
    }
  optim::Adam<float> adam;
  adam.add_group("steps", steps, 1e-2, step_scales);  // relative, as the pass does
  adam.add_group("rounding", rounds, 1e-2);
  std::vector<int32_t> tokens(kT);
  for (int64_t i = 0; i < kT; ++i) tokens[i] = static_cast<int32_t>((i * 7) % c.vocab_size);
  Tensor<float> x = model.embed_tensor(tokens);
  BlockContext<float> fp;
  fp.full_precision = true;
  Tensor<float> t_fp = model.run_block(1, model.run_block(0, x, fp), fp);
  Tensor<float> t_hom = t_fp.clone();
  Tape<float> tape;
  for (auto _ : state) {
    tape.clear();
    Var<float> y = tape.constant(x);
    for (auto& b : model.blocks) y = b.forward(tape, y, {});
    Var<float> a = tape.constant(t_fp), h = tape.constant(t_hom);
    Var<float> loss = ops::add(ops::add(ops::row_sq_error(a, y), ops::kl_softmax(a, y)),
                               ops::add(ops::row_sq_error(h, y), ops::kl_softmax(h, y)));
    tape.backward(loss);
    adam.step();
    adam.zero_grad();
    for (auto& q : layers) q->project_steps();
    benchmark::DoNotOptimize(loss.value().data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(step_flops(c) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/step"] = step_flops(c) / 1e9;
  state.counters["arena_MiB"] = static_cast<double>(tape.arena_bytes()) / (1 << 20);
}
BENCHMARK(BM_CbqWindowStep)
    ->Arg(1)
    ->Arg(0)
    ->ArgName("hard")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
