// One CBQ window step on the CPU: the step the pass repeats E·N times per window (pass.hpp,
// train_window): forward of the quantized window (2 blocks), the L2 + KLD loss against the two
// constant targets T_fp(X_fp) and T_fp(X_q), backward, Adam, the step projection. The targets
// are computed once per window and sample, outside the step. fp32, batch 1, W4 g32 weights with
// LoRA-Rounding rank 5 (AdaRound start, V0 tracking the learned step, as the pass), A16.
//
//   llama: 2 LLaMA blocks at stories15M shapes (d 288, hidden 768, 6 heads, T 256)
//   opt:   2 OPT blocks at OPT-125M shapes (d 768, hidden 3072, 12 heads, T 512)
//   smollm2: 2 LLaMA blocks at SmolLM2-135M shapes (d 576, hidden 1536, 9 / 3 heads of 64),
//          T 512 and 2048 (argument seq)
//
// Arguments: threads (cbq's pool; OpenBLAS runs single-threaded under it, core/blas.hpp),
// hard (1: hard_ste rounding in the forward, the pass's default; 0: soft), reg (1: with the
// rounding regulariser, as every step after the warm-up, computed in the weights' kernels as the
// pass does (TransformLosses); 0: without), rank (5: LoRA-Rounding rank 5; 0: full-matrix
// rounding, one logit per weight, the pass's default; both run the fused kernels).
//
// FLOPs counted from the shapes (multiply-add = 2), per block, T tokens, P = weights of the
// block's linear layers (d·in·out summed), r the LoRA rank (0 for full-matrix rounding):
//   linear layers  fwd 2·T·P, bwd 4·T·P  (dx and dW)
//   attention      fwd 2·T²·d, bwd 5·T²·d (causal half; recompute S, dV, dP, dQ, dK)
//   LoRA V = A1·A2 fwd 2·P·r, bwd 4·P·r
// Elementwise work (norms, RoPE, SwiGLU/ReLU, fake-quant, losses, regulariser, Adam) is not
// counted. BM_SgemmPeak measures the SGEMM rate at the same thread count in the same binary,
// through cbq's GEMM (the path the step takes) and through OpenBLAS's own threading; the faster
// of the two is the machine's peak that docs/PERFORMANCE.md compares against.
// Times: real (wall) time per step, and the CPU time of all threads together (on a machine
// shared with other work the wall time is the less reliable of the two).
// Counters: GFLOP/s (achieved, from the wall time), GFLOP/step, arena_MiB (the tape's reusable
// buffers), arena_allocs (arena buffers allocated after the first step: 0 in the steady state),
// heap_allocs (operator new calls per step: the tape's node and variable bookkeeping).
#include <benchmark/benchmark.h>

#include <atomic>
#include <cbq/cbq.hpp>

#include <cstdlib>
#include <new>
#include <random>
#include "bench_main.hpp"

using namespace cbq;

// Counts heap allocations, to show what a steady-state step still allocates. (GCC cannot see
// that these replace the global operators as a pair.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
static std::atomic<int64_t> g_heap_allocs{0};
void* operator new(std::size_t n) {
  g_heap_allocs.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace {

ModelConfig llama_config() {
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

// stories260K's block (d 64, MLP 172, 8 query / 4 kv heads of 8, T 512): the default pass's
// model, where attention is half the step's FLOPs and its heads are small.
ModelConfig stories260k_config() {
  ModelConfig c;
  c.family = Family::llama;
  c.dim = 64;
  c.hidden_dim = 172;
  c.n_layers = 2;
  c.n_heads = 8;
  c.n_kv_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 32;
  c.max_seq_len = 512;
  return c;
}

ModelConfig opt_config() {
  ModelConfig c;
  c.family = Family::opt;
  c.dim = 768;
  c.hidden_dim = 3072;
  c.n_layers = 2;
  c.n_heads = 12;
  c.n_kv_heads = 12;
  c.head_dim = 64;
  c.vocab_size = 32;
  c.max_seq_len = 512;
  c.attention_bias = true;
  c.mlp_bias = true;
  return c;
}

// SmolLM2-135M's block (d 576, MLP 1536, 9 query / 3 kv heads of 64, rotate-half RoPE θ 1e5)
// at sequence length T.
ModelConfig smollm2_config(int64_t T) {
  ModelConfig c;
  c.family = Family::llama;
  c.dim = 576;
  c.hidden_dim = 1536;
  c.n_layers = 2;
  c.n_heads = 9;
  c.n_kv_heads = 3;
  c.head_dim = 64;
  c.vocab_size = 32;
  c.max_seq_len = T;
  c.rope_theta = 100000;
  c.rope_layout = RopeLayout::rotate_half;
  return c;
}

template <class Model>
double step_flops(Model& model, int64_t T, int64_t rank) {
  const ModelConfig& c = model.config;
  double total = 0;
  for (auto& b : model.blocks) {
    double P = 0;
    for (auto* l : b.linears()) P += static_cast<double>(l->weight.value.numel());
    const double t = static_cast<double>(T), d = static_cast<double>(c.dim);
    total += 6 * t * P + 7 * t * t * d + 6 * P * static_cast<double>(rank);
  }
  return total;
}

void BM_SgemmPeak(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const bool openblas_threads = state.range(2) != 0;
  if (openblas_threads && !openblas_set_num_threads) {
    state.SkipWithError("the CBLAS is not OpenBLAS");
    return;
  }
  set_num_threads(threads);
  Tensor<float> A(Shape{n, n}), B(Shape{n, n}), C(Shape{n, n});
  for (int64_t i = 0; i < A.numel(); ++i) A[i] = B[i] = static_cast<float>((i % 7) - 3) * 0.1f;
  if (openblas_threads) openblas_set_num_threads(threads);
  for (auto _ : state) {
    if (openblas_threads)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n),
                  static_cast<int>(n), static_cast<int>(n), 1.f, A.data(), static_cast<int>(n),
                  B.data(), static_cast<int>(n), 0.f, C.data(), static_cast<int>(n));
    else
      blas::gemm<float>(false, false, n, n, n, 1.f, A.data(), n, B.data(), n, 0.f, C.data(), n);
    benchmark::DoNotOptimize(C.data());
  }
  if (openblas_threads) set_num_threads(threads);  // back to cbq owning the threads
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * n * n * n / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_SgemmPeak)
    ->ArgNames({"n", "threads", "openblas_threads"})
    ->ArgsProduct({{288, 768}, {1, 2}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

template <class Block>
void run_window_step(benchmark::State& state, const ModelConfig& c) {
  const int threads = static_cast<int>(state.range(0));
  const bool hard = state.range(1) != 0, with_reg = state.range(2) != 0;
  const int64_t rank = state.range(3);
  set_num_threads(threads);
  // Subnormals flushed, as the pass computes (PassOptions::flush_denormals): without it the
  // attention's far-off keys (p ≈ e^−87) make subnormal products that cost 100+ cycles each.
  const FlushDenormals flush;
  const int64_t T = c.max_seq_len;
  Transformer<Block> model(c, random_weights(c, 2));
  QuantLinearConfig qc;
  qc.weight.bits = 4;
  qc.weight.group_size = 32;
  qc.rounding = rank > 0 ? RoundingKind::lora : RoundingKind::full;
  qc.rank = std::max<int64_t>(rank, 1);
  qc.lora_init.start = quant::LoraStart::adaround;
  qc.rounding_mode = hard ? quant::RoundingMode::hard_ste : quant::RoundingMode::soft;
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
  std::vector<int32_t> tokens(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) tokens[i] = static_cast<int32_t>((i * 7) % c.vocab_size);
  Tensor<float> x = model.embed_tensor(tokens);
  BlockContext<float> fp;
  fp.full_precision = true;
  Tensor<float> t_fp = model.run_block(1, model.run_block(0, x, fp), fp);
  Tensor<float> t_hom = t_fp.clone();
  Tape<float> tape;
  auto step = [&] {
    tape.clear();
    TransformLosses<float> losses{10.f, {}};  // from the weights' kernels, as the pass does
    BlockContext<float> ctx;
    if (with_reg) ctx.losses = &losses;
    Var<float> y = tape.constant(x);
    for (auto& b : model.blocks) y = b.forward(tape, y, ctx);
    Var<float> a = tape.constant(t_fp), h = tape.constant(t_hom);
    Var<float> loss = ops::add(ops::add(ops::row_sq_error(a, y), ops::kl_softmax(a, y)),
                               ops::add(ops::row_sq_error(h, y), ops::kl_softmax(h, y)));
    if (with_reg) {  // as train_window: γ · mean over layers of each layer's regulariser
      Var<float> reg;
      for (const auto& [layer, r] : losses.rounding) reg = reg.valid() ? ops::add(reg, r) : r;
      loss = ops::add(loss, ops::scale(reg, 0.01f / static_cast<float>(layers.size())));
    }
    tape.backward(loss);
    adam.step();
    adam.zero_grad();
    for (auto& q : layers) q->project_steps();
    benchmark::DoNotOptimize(loss.value().data());
  };
  step();  // the first step sizes the arena
  const size_t arena_after_first = tape.arena_allocations();
  const int64_t allocs_before = g_heap_allocs.load();
  int64_t steps_run = 0;
  for (auto _ : state) {
    step();
    ++steps_run;
  }
  const double flops = step_flops(model, T, rank);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/step"] = flops / 1e9;
  state.counters["arena_MiB"] = static_cast<double>(tape.arena_bytes()) / (1 << 20);
  state.counters["arena_allocs"] =
      static_cast<double>(tape.arena_allocations() - arena_after_first);
  state.counters["heap_allocs"] = static_cast<double>(g_heap_allocs.load() - allocs_before) /
                                  static_cast<double>(std::max<int64_t>(steps_run, 1));
}

void BM_CbqWindowStep(benchmark::State& state) {
  run_window_step<LlamaBlock<float>>(state, llama_config());
}
BENCHMARK(BM_CbqWindowStep)
    ->ArgNames({"threads", "hard", "reg", "rank"})
    ->ArgsProduct({{1, 2}, {1, 0}, {0, 1}, {5, 0}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

// Arguments threads, reg, rank as above (hard rounding), then attention: the CPU attention path
// (1: GEMM tiles, 2: row kernels, the default at hd 8).
void BM_CbqWindowStep260K(benchmark::State& state) {
  const ops::detail::AttentionPath paths[] = {ops::detail::AttentionPath::automatic,
                                              ops::detail::AttentionPath::tiles,
                                              ops::detail::AttentionPath::rows};
  ops::detail::attention_path = paths[state.range(4)];
  run_window_step<LlamaBlock<float>>(state, stories260k_config());
  ops::detail::attention_path = ops::detail::AttentionPath::automatic;
}
BENCHMARK(BM_CbqWindowStep260K)
    ->ArgNames({"threads", "hard", "reg", "rank", "attention"})
    ->ArgsProduct({{1, 2}, {1}, {0, 1}, {5, 0}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

// Arguments as above, then seq: the sequence length (the pass's segment length).
void BM_CbqWindowStepSmolLM2(benchmark::State& state) {
  run_window_step<LlamaBlock<float>>(state, smollm2_config(state.range(4)));
}
BENCHMARK(BM_CbqWindowStepSmolLM2)
    ->ArgNames({"threads", "hard", "reg", "rank", "seq"})
    ->ArgsProduct({{1, 2}, {1}, {0, 1}, {5, 0}, {512, 2048}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

void BM_CbqWindowStepOpt(benchmark::State& state) {
  run_window_step<OptBlock<float>>(state, opt_config());
}
BENCHMARK(BM_CbqWindowStepOpt)
    ->ArgNames({"threads", "hard", "reg", "rank"})
    ->ArgsProduct({{1, 2}, {1}, {0, 1}, {5, 0}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

// The advance's per-layer output errors (LayerOutputErrors::finish: three quadratic forms
// tr(ΔW H ΔWᵀ) per layer) for the seven linears of one SmolLM2-135M block, each from one
// 512-token input. Argument: threads.
void BM_LayerErrorsSmolLM2Block(benchmark::State& state) {
  set_num_threads(static_cast<int>(state.range(0)));
  const int64_t shapes[7][2] = {{576, 576},  {192, 576},  {192, 576}, {576, 576},
                                {1536, 576}, {1536, 576}, {576, 1536}};
  std::vector<LinearLayer<float>> layers;
  std::vector<std::shared_ptr<QuantLinear<float>>> quantizers;
  std::vector<Tensor<float>> inputs;
  layers.reserve(7);
  std::mt19937_64 rng(10);
  for (int j = 0; j < 7; ++j) {
    const Tensor<float> w = detail::random_tensor(Shape{shapes[j][0], shapes[j][1]}, rng, 0.05);
    layers.emplace_back(fmt::format("layer{}", j), w);
    QuantLinearConfig cfg;
    cfg.weight = quant::GridSpec{3, false, quant::Granularity::per_group, 64};
    cfg.rounding = RoundingKind::full;
    quantizers.push_back(std::make_shared<QuantLinear<float>>(layers.back().name, w, cfg));
    quantizers.back()->harden();
    inputs.push_back(detail::random_tensor(Shape{512, shapes[j][1]}, rng, 1.0));
  }
  for (auto _ : state) {
    for (int j = 0; j < 7; ++j) {
      LayerOutputErrors<float> errors({&layers[static_cast<size_t>(j)]},
                                      {quantizers[static_cast<size_t>(j)]});
      errors.add(layers[static_cast<size_t>(j)], inputs[static_cast<size_t>(j)]);
      errors.finish();
    }
    benchmark::DoNotOptimize(quantizers[6]->output_error());
  }
}
BENCHMARK(BM_LayerErrorsSmolLM2Block)
    ->ArgNames({"threads"})
    ->Arg(2)
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

}  // namespace

CBQ_BENCHMARK_MAIN()
