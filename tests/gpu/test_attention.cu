// CUDA vs CPU: flash attention (ops::attention), forward and backward, causal and full,
// multi-head and grouped-query heads, sequence lengths that are not multiples of the tile.
//
// Tolerances (normwise relative error, see gpu_main.hpp):
//   double: 1e-12 for the output and every gradient (same math, other summation order)
//   float:  2e-5 for the output, 1e-4 for the gradients. Each score is a dot product over
//           head_dim ≤ 65 terms (~1e-6 relative), exp adds a few ulps, and dS = P ⊙ (dP − D)
//           subtracts two sums of T = 257 terms, which cancels a digit.
// Those fixed tolerances apply to the FP32 scalar kernels (the reference, the default mode). The
// tensor-core kernels (AttentionMode tf32 / bf16) and the LLaMA-7B shape are checked against
// bounds derived from the same data at run time, in the normwise (Frobenius) relative error
// e(x) = ‖x − exact‖ / ‖exact‖, exact = the CPU in double:
//   e_cpu  = e(CPU float): what FP32 summation order costs on these inputs;
//   e_in   = e(CPU double on inputs rounded to TF32 / BF16, as the kernel rounds them): the
//            error that the operand format alone causes.
//   scalar kernel:  e ≤ 4·e_cpu + 2⁻²⁰   (the same FP32 arithmetic in another order: tiles of
//                   32 instead of 64 keys (twice the online rescales), the device's expf (2 ulp
//                   instead of 1); 4× covers that with margin, 2⁻²⁰ = 16 ulp when e_cpu ≈ 0)
//   tensor cores, output:    e ≤ 2·e_in + 4·e_cpu + 2⁻²⁰. Besides the inputs, the kernel rounds
//                   P once before P·V: a share of the same size as V's own rounding (both are
//                   relative perturbations of the products p_j·v_j), so at most √2·e_in in
//                   quadrature; 2 leaves margin, 4·e_cpu covers the FP32 accumulation.
//   tensor cores, gradients: e ≤ 3·e_in + 4·e_cpu + 2⁻²⁰. Backward rounds P and dS before their
//                   products and D = rowsum(dO ⊙ O) uses unrounded dO: up to three more shares of
//                   the inputs' size, √4 = 2 in quadrature, × 1.5 margin.
#include <algorithm>
#include <initializer_list>
#include <vector>

#include "gpu/compare.hpp"

#include "gpu/gpu_main.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {

struct Heads {
  int64_t heads, kv_heads;
};

struct AttentionResult {
  Tensor<double> out, dq, dk, dv;
};

template <class T>
Tensor<double> as_double(const Tensor<T>& t) {
  return t.to(Device::cpu).template cast<double>();
}

// x with every element rounded as the tensor-core kernels round their operands.
Tensor<float> rounded(const Tensor<float>& x, cuda::AttentionMode mode) {
  Tensor<float> y = x.clone();
  for (int64_t i = 0; i < y.numel(); ++i)
    y[i] = mode == cuda::AttentionMode::bf16 ? gpu_testing::round_bf16(y[i])
                                             : gpu_testing::round_tf32(y[i]);
  return y;
}

// o = attention(q, k, v) seeded with do = g; all four results back on the host.
template <class T>
AttentionResult run_attention(Device device, const Tensor<T>& q, const Tensor<T>& k,
                              const Tensor<T>& v, const Tensor<T>& g, Heads heads, int64_t head_dim,
                              bool causal, std::optional<double> scale = std::nullopt) {
  Tape<T> tape(device);
  Var<T> vq = tape.input(q.to(device));
  Var<T> vk = tape.input(k.to(device));
  Var<T> vv = tape.input(v.to(device));
  Var<T> out = ops::attention(vq, vk, vv, heads.heads, heads.kv_heads, head_dim, causal, scale);
  CHECK(out.device() == device);
  out.grad().copy_from(g.to(device));
  tape.backward_from_seeded();
  return {as_double(out.value()), as_double(vq.grad()), as_double(vk.grad()), as_double(vv.grad())};
}

template <class T>
double forward_tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 2e-5;
}
template <class T>
double backward_tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-4;
}

template <class T>
void check_case(int64_t seq_len, int64_t head_dim, Heads heads, bool causal, uint64_t seed,
                std::optional<double> scale = std::nullopt) {
  CAPTURE(seq_len);
  CAPTURE(head_dim);
  CAPTURE(heads.heads);
  CAPTURE(heads.kv_heads);
  CAPTURE(causal);
  const Tensor<T> q = randn<T>(Shape{seq_len, heads.heads * head_dim}, seed);
  const Tensor<T> k = randn<T>(Shape{seq_len, heads.kv_heads * head_dim}, seed + 1);
  const Tensor<T> v = randn<T>(Shape{seq_len, heads.kv_heads * head_dim}, seed + 2);
  const Tensor<T> g = randn<T>(Shape{seq_len, heads.heads * head_dim}, seed + 3);
  const AttentionResult cpu =
      run_attention(Device::cpu, q, k, v, g, heads, head_dim, causal, scale);
  const AttentionResult gpu =
      run_attention(Device::cuda, q, k, v, g, heads, head_dim, causal, scale);
  CHECK(rel_error(gpu.out, cpu.out) <= forward_tolerance<T>());
  // With one key, dq and dk are 0 in exact arithmetic (softmax over one score has no gradient)
  // and both devices return rounding noise, dP − D of two differently summed dot products:
  // compared at the size of their terms, scale·‖dO‖·‖v‖·max(|q|, |k|), instead of at the noise.
  double floor = 0;
  if (seq_len == 1) {
    auto max_abs = [](const Tensor<T>& t) {
      double m = 0;
      for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(double(t[i])));
      return m;
    };
    auto norm = [](const Tensor<T>& t) {
      double s2 = 0;
      for (int64_t i = 0; i < t.numel(); ++i) s2 += double(t[i]) * double(t[i]);
      return std::sqrt(s2);
    };
    const double sc = scale ? *scale : 1.0 / std::sqrt(double(head_dim));
    floor = sc * norm(g) * norm(v) * std::max(max_abs(q), max_abs(k));
  }
  auto grad_error = [floor](const Tensor<double>& x, const Tensor<double>& r) {
    return gpu_testing::max_rel_error(x.data(), r.data(), r.numel(), floor);
  };
  CHECK(grad_error(gpu.dq, cpu.dq) <= backward_tolerance<T>());
  CHECK(grad_error(gpu.dk, cpu.dk) <= backward_tolerance<T>());
  CHECK(rel_error(gpu.dv, cpu.dv) <= backward_tolerance<T>());
}

}  // namespace

TEST_CASE_TEMPLATE("attention: CUDA matches CPU, causal and full, MHA and GQA, odd lengths", T,
                   float, double) {
  // kv heads < heads: groups of 2 and of 3 query heads per kv head.
  const Heads head_configs[] = {{2, 2}, {4, 2}, {3, 1}};
  uint64_t seed = 1;
  for (int64_t seq_len : {1, 7, 33, 257})
    for (int64_t head_dim : {8, 64, 65})
      for (const Heads& heads : head_configs)
        for (bool causal : {true, false}) {
          check_case<T>(seq_len, head_dim, heads, causal, seed);
          seed += 4;
        }
}

TEST_CASE_TEMPLATE("attention: CUDA matches CPU with large logits (explicit scale)", T, float,
                   double) {
  // scale 2 on N(0, 1) inputs with head_dim 64: logits of ±50 and more; the online softmax must
  // rescale without overflow, as the CPU's does.
  check_case<T>(100, 64, Heads{4, 2}, true, 500, 2.0);
  check_case<T>(100, 64, Heads{4, 2}, false, 600, 2.0);
}

TEST_CASE("attention: head_dim 128 and 256 (smaller tiles for double) match CPU") {
  check_case<float>(70, 128, Heads{2, 1}, true, 700);
  check_case<double>(70, 128, Heads{2, 1}, true, 710);
  check_case<double>(40, 256, Heads{2, 2}, false, 720);
}

TEST_CASE("attention: CUDA gradients are bitwise reproducible from run to run") {
  const int64_t n = 129, hd = 32;
  const Heads heads{4, 2};
  const Tensor<float> q = randn<float>(Shape{n, heads.heads * hd}, 1);
  const Tensor<float> k = randn<float>(Shape{n, heads.kv_heads * hd}, 2);
  const Tensor<float> v = randn<float>(Shape{n, heads.kv_heads * hd}, 3);
  const Tensor<float> g = randn<float>(Shape{n, heads.heads * hd}, 4);
  const AttentionResult a = run_attention(Device::cuda, q, k, v, g, heads, hd, true);
  const AttentionResult b = run_attention(Device::cuda, q, k, v, g, heads, hd, true);
  CHECK(a.out.to_vector() == b.out.to_vector());
  CHECK(a.dq.to_vector() == b.dq.to_vector());
  CHECK(a.dk.to_vector() == b.dk.to_vector());
  CHECK(a.dv.to_vector() == b.dv.to_vector());
}

TEST_CASE("attention: CUDA gradients of only some inputs, accumulated onto existing ones") {
  // q is a constant (no dq); k is used twice, so its gradient accumulates over two nodes.
  const int64_t n = 50, hd = 16;
  const Heads heads{2, 1};
  const Tensor<double> q = randn<double>(Shape{n, heads.heads * hd}, 11);
  const Tensor<double> k = randn<double>(Shape{n, heads.kv_heads * hd}, 12);
  const Tensor<double> v = randn<double>(Shape{n, heads.kv_heads * hd}, 13);
  const Tensor<double> g = randn<double>(Shape{n, heads.heads * hd}, 14);
  auto run = [&](Device device) {
    Tape<double> tape(device);
    Var<double> vq = tape.constant(q.to(device));
    Var<double> vk = tape.input(k.to(device));
    Var<double> vv = tape.input(v.to(device), false);
    Var<double> o1 = ops::attention(vq, vk, vv, heads.heads, heads.kv_heads, hd, true);
    Var<double> o2 = ops::attention(vq, vk, vk, heads.heads, heads.kv_heads, hd, false);
    Var<double> out = ops::add(o1, o2);
    out.grad().copy_from(g.to(device));
    tape.backward_from_seeded();
    return std::make_pair(out.value().to(Device::cpu), vk.grad().to(Device::cpu));
  };
  const auto cpu = run(Device::cpu);
  const auto gpu = run(Device::cuda);
  CHECK(rel_error(gpu.first, cpu.first) <= 1e-12);
  CHECK(rel_error(gpu.second, cpu.second) <= 1e-12);
}

TEST_CASE("attention: CUDA memory stays far below T^2 at T = 4096") {
  // One (T, T) float score matrix per head would be 64 MiB; the flash kernels need O(T) memory.
  const int64_t n = 4096, hd = 16;
  const Heads heads{2, 1};
  const Tensor<float> q = randn<float>(Shape{n, heads.heads * hd}, 21).to(Device::cuda);
  const Tensor<float> k = randn<float>(Shape{n, heads.kv_heads * hd}, 22).to(Device::cuda);
  const Tensor<float> v = randn<float>(Shape{n, heads.kv_heads * hd}, 23).to(Device::cuda);
  const Tensor<float> g = randn<float>(Shape{n, heads.heads * hd}, 24).to(Device::cuda);
  cbq::cuda::synchronize();
  const std::size_t before = cbq::cuda::allocator().stats().bytes_in_use;
  cbq::cuda::allocator().reset_peak();
  {
    Tape<float> tape(Device::cuda);
    Var<float> out = ops::attention(tape.input(q), tape.input(k), tape.input(v), heads.heads,
                                    heads.kv_heads, hd, true);
    out.grad().copy_from(g);
    tape.backward_from_seeded();
    cbq::cuda::synchronize();
  }
  const std::size_t peak = cbq::cuda::allocator().stats().peak_bytes_in_use - before;
  const std::size_t score_matrix = sizeof(float) * n * n;
  CAPTURE(peak);
  CHECK(peak < score_matrix / 4);
}

TEST_CASE("attention: CUDA and CPU operands together are rejected with a message") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> x = randn<float>(Shape{4, 8}, 1);
  Var<float> on_gpu = tape.input(x.to(Device::cuda));
  Var<float> on_cpu = tape.input(x);
  const std::string message =
      gpu_testing::error_message([&] { ops::attention(on_gpu, on_cpu, on_gpu, 2, 2, 4); });
  CHECK(gpu_testing::contains(message, "different devices"));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels and a LLaMA-7B shape, against bounds derived at run time (top of the file)

namespace {

constexpr double kFloorError = 0x1p-20;  // 16 float ulps: the bound when e_cpu is ~0

double norm_error(const Tensor<double>& x, const Tensor<double>& exact) {
  return gpu_testing::norm_rel_error(x.data(), exact.data(), exact.numel());
}

struct Inputs {
  Tensor<float> q, k, v, g;
};

Inputs make_inputs(int64_t seq_len, int64_t head_dim, Heads heads, uint64_t seed) {
  return {randn<float>(Shape{seq_len, heads.heads * head_dim}, seed),
          randn<float>(Shape{seq_len, heads.kv_heads * head_dim}, seed + 1),
          randn<float>(Shape{seq_len, heads.kv_heads * head_dim}, seed + 2),
          randn<float>(Shape{seq_len, heads.heads * head_dim}, seed + 3)};
}

AttentionResult run_double(const Inputs& in, Heads heads, int64_t head_dim, bool causal) {
  return run_attention(Device::cpu, in.q.cast<double>(), in.k.cast<double>(), in.v.cast<double>(),
                       in.g.cast<double>(), heads, head_dim, causal);
}

AttentionResult run_gpu(const Inputs& in, Heads heads, int64_t head_dim, bool causal,
                        cuda::AttentionMode mode) {
  cuda::AttentionModeGuard guard(mode);
  return run_attention(Device::cuda, in.q, in.k, in.v, in.g, heads, head_dim, causal);
}

// The four results of `got` against `exact` within `bound_out` (output) and `bound_grad`.
void check_within(const char* what, const AttentionResult& got, const AttentionResult& exact,
                  double bound_out, double bound_grad) {
  const double e[4] = {norm_error(got.out, exact.out), norm_error(got.dq, exact.dq),
                       norm_error(got.dk, exact.dk), norm_error(got.dv, exact.dv)};
  MESSAGE(what, ": e(out) ", e[0], " (bound ", bound_out, "), e(dq, dk, dv) ", e[1], ", ", e[2],
          ", ", e[3], " (bound ", bound_grad, ")");
  CHECK(e[0] <= bound_out);
  CHECK(e[1] <= bound_grad);
  CHECK(e[2] <= bound_grad);
  CHECK(e[3] <= bound_grad);
}

// CPU float / double / double-on-rounded-inputs references, then the given GPU modes.
void check_modes(const Inputs& in, Heads heads, int64_t head_dim, bool causal,
                 std::initializer_list<cuda::AttentionMode> modes) {
  const AttentionResult exact = run_double(in, heads, head_dim, causal);
  const AttentionResult cpu =
      run_attention(Device::cpu, in.q, in.k, in.v, in.g, heads, head_dim, causal);
  const double e_cpu = std::max({norm_error(cpu.out, exact.out), norm_error(cpu.dq, exact.dq),
                                 norm_error(cpu.dk, exact.dk), norm_error(cpu.dv, exact.dv)});
  for (cuda::AttentionMode mode : modes) {
    CAPTURE(cuda::attention_mode_name(mode));
    const AttentionResult gpu = run_gpu(in, heads, head_dim, causal, mode);
    if (mode == cuda::AttentionMode::fp32) {
      check_within("scalar fp32", gpu, exact, 4 * e_cpu + kFloorError, 4 * e_cpu + kFloorError);
      continue;
    }
    const Inputs r{rounded(in.q, mode), rounded(in.k, mode), rounded(in.v, mode),
                   rounded(in.g, mode)};
    const AttentionResult emulated = run_double(r, heads, head_dim, causal);
    const double e_in_out = norm_error(emulated.out, exact.out);
    const double e_in =
        std::max({e_in_out, norm_error(emulated.dq, exact.dq), norm_error(emulated.dk, exact.dk),
                  norm_error(emulated.dv, exact.dv)});
    MESSAGE(cuda::attention_mode_name(mode), ": e_cpu ", e_cpu, ", e_in ", e_in);
    check_within(cuda::attention_mode_name(mode), gpu, exact,
                 2 * e_in_out + 4 * e_cpu + kFloorError, 3 * e_in + 4 * e_cpu + kFloorError);
  }
}

}  // namespace

TEST_CASE("attention: tensor-core kernels (TF32, BF16) within their derived bounds, hd 64 / 128") {
  // Odd lengths (partial 64-row tiles), one and three tiles, causal and full, MHA and GQA.
  uint64_t seed = 900;
  for (int64_t seq_len : {37, 130})
    for (int64_t head_dim : {64, 128})
      for (const Heads& heads : {Heads{2, 2}, Heads{4, 2}})
        for (bool causal : {true, false}) {
          CAPTURE(seq_len);
          CAPTURE(head_dim);
          CAPTURE(heads.heads);
          CAPTURE(heads.kv_heads);
          CAPTURE(causal);
          check_modes(make_inputs(seq_len, head_dim, heads, seed), heads, head_dim, causal,
                      {cuda::AttentionMode::tf32, cuda::AttentionMode::bf16});
          seed += 4;
        }
}

TEST_CASE("attention: tensor-core output at T = 1 is V rounded, and other head dims use scalar") {
  // One key: p = 1, so O = V as the kernel rounds it.
  const Heads heads{2, 1};
  const Inputs in = make_inputs(1, 64, heads, 950);
  for (cuda::AttentionMode mode : {cuda::AttentionMode::tf32, cuda::AttentionMode::bf16}) {
    const AttentionResult gpu = run_gpu(in, heads, 64, true, mode);
    const Tensor<float> v = rounded(in.v, mode);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t c = 0; c < 64; ++c) CHECK(gpu.out(0, h * 64 + c) == double(v(0, c)));
  }
  // head_dim 65 has no tensor-core kernel: the mode falls back to the scalar kernels.
  check_case<float>(33, 65, Heads{2, 1}, true, 960);
  cuda::AttentionModeGuard guard(cuda::AttentionMode::bf16);
  check_case<float>(33, 65, Heads{2, 1}, true, 960);
}

TEST_CASE("attention: tensor-core gradients are bitwise reproducible from run to run") {
  const Heads heads{4, 2};
  const Inputs in = make_inputs(150, 128, heads, 970);
  for (cuda::AttentionMode mode : {cuda::AttentionMode::tf32, cuda::AttentionMode::bf16}) {
    const AttentionResult a = run_gpu(in, heads, 128, true, mode);
    const AttentionResult b = run_gpu(in, heads, 128, true, mode);
    CHECK(a.out.to_vector() == b.out.to_vector());
    CHECK(a.dq.to_vector() == b.dq.to_vector());
    CHECK(a.dk.to_vector() == b.dk.to_vector());
    CHECK(a.dv.to_vector() == b.dv.to_vector());
  }
}

TEST_CASE("attention (small, for compute-sanitizer): scalar and tensor-core kernels, fwd + bwd") {
  // Partial tiles, GQA, causal: what scripts/gpu-check.sh runs under memcheck, racecheck and
  // initcheck (kept small: the sanitizers slow kernels down 10-100×).
  const Heads heads{4, 2};
  for (int64_t head_dim : {64, 128}) {
    const Inputs in = make_inputs(70, head_dim, heads, 980);
    for (cuda::AttentionMode mode :
         {cuda::AttentionMode::fp32, cuda::AttentionMode::tf32, cuda::AttentionMode::bf16}) {
      const AttentionResult gpu = run_gpu(in, heads, head_dim, true, mode);
      const AttentionResult cpu =
          run_attention(Device::cpu, in.q, in.k, in.v, in.g, heads, head_dim, true);
      CAPTURE(cuda::attention_mode_name(mode));
      const double tol = mode == cuda::AttentionMode::fp32 ? 1e-4 : 5e-2;  // a sanity bound
      CHECK(rel_error(gpu.out, cpu.out) <= tol);
      CHECK(rel_error(gpu.dq, cpu.dq) <= tol);
      CHECK(rel_error(gpu.dk, cpu.dk) <= tol);
      CHECK(rel_error(gpu.dv, cpu.dv) <= tol);
    }
  }
}

TEST_CASE("attention at a LLaMA-7B shape (T 2048, 32 heads of 128, causal): CPU vs every kernel") {
  // 32 MiB per (2048, 4096) float tensor; the CPU references (float, double, double on TF32- and
  // BF16-rounded inputs) take seconds on 16 cores.
  const Heads heads{32, 32};
  check_modes(make_inputs(2048, 128, heads, 990), heads, 128, true,
              {cuda::AttentionMode::fp32, cuda::AttentionMode::tf32, cuda::AttentionMode::bf16});
}
