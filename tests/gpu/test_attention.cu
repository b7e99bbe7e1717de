// CUDA vs CPU: flash attention (ops::attention), forward and backward, causal and full,
// multi-head and grouped-query heads, sequence lengths that are not multiples of the tile.
//
// Tolerances (normwise relative error, see gpu_main.hpp):
//   double: 1e-12 for the output and every gradient (same math, other summation order)
//   float:  2e-5 for the output, 1e-4 for the gradients. Each score is a dot product over
//           head_dim ≤ 65 terms (~1e-6 relative), exp adds a few ulps, and dS = P ⊙ (dP − D)
//           subtracts two sums of T = 257 terms, which cancels a digit.
#include <vector>

#include "gpu/gpu_main.hpp"

using namespace cbq;
using cbq::gpu_testing::randn;
using cbq::gpu_testing::rel_error;

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
  CHECK(rel_error(gpu.dq, cpu.dq) <= backward_tolerance<T>());
  CHECK(rel_error(gpu.dk, cpu.dk) <= backward_tolerance<T>());
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
