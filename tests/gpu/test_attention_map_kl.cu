// CUDA vs CPU: attention_map_kl (ops/attention_map_kl.hpp, cuda/cbq/cuda/ops/attention_map_kl.cuh),
// forward and every input gradient, float and double: grouped-query, multi-head and multi-query
// heads, causal and not, sequences longer than a block of 256 threads (several key tiles in the
// dQ kernel, several (i, h) tiles in the dK kernel), a head dimension above 256 (threads striding
// over the columns), an explicit scale; targets constant, the model constant, or all four inputs.
// Also: identical inputs give exactly zero, determinism, and the error for operands on different
// devices. CPU tests: tests/ops/test_attention_map_kl.cpp; the declared cases of
// tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float). Both devices compute every score as a dot product in double, the log-sum-exps, KL_i
// and every gradient sum in double (the gradient sums in the same key order), and round to T once
// at the end; they differ only in the order of double additions (the lanes of the dot products,
// the block reductions, FMA contraction) and in exp within a few ulps, so double agrees to a few
// ulps of each result and float to about one float ulp (6e-8).
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {

struct MapKlGpuCase {
  int64_t seq_len, hq, hkv, hd;
  bool causal;
};

// Target q*, k* and the model q = q* + 0.3 N, k = k* + 0.3 N (near, as a quantized model).
template <class T>
std::vector<Tensor<T>> map_kl_gpu_inputs(const MapKlGpuCase& c, uint64_t seed) {
  const Shape qs{c.seq_len, c.hq * c.hd}, ks{c.seq_len, c.hkv * c.hd};
  std::vector<Tensor<T>> in{randn_scaled<T>(qs, seed, 1.5), randn_scaled<T>(ks, seed + 1, 1.5),
                            randn_scaled<T>(qs, seed + 2, 0.3), randn_scaled<T>(ks, seed + 3, 0.3)};
  for (int64_t i = 0; i < in[2].numel(); ++i) in[2][i] += in[0][i];
  for (int64_t i = 0; i < in[3].numel(); ++i) in[3][i] += in[1][i];
  return in;
}

}  // namespace

TEST_CASE_TEMPLATE("attention_map_kl: CUDA matches CPU, forward and every gradient", T, float,
                   double) {
  const MapKlGpuCase cases[] = {
      {1, 2, 1, 4, true},      // a single token: zero loss
      {7, 4, 2, 6, true},      // grouped-query
      {7, 4, 2, 6, false},     // grouped-query, no mask
      {9, 3, 3, 5, true},      // multi-head
      {33, 4, 1, 1, true},     // multi-query, head dimension 1
      {300, 6, 2, 64, true},   // more keys than threads; dK items (i, h) over several tiles
      {257, 2, 2, 33, false},  // no mask, 257 keys
      {9, 2, 1, 300, true},    // head dimension above the block size
  };
  uint64_t seed = 300;
  for (const MapKlGpuCase& c : cases) {
    CAPTURE(c.seq_len);
    CAPTURE(c.hq);
    CAPTURE(c.hkv);
    CAPTURE(c.hd);
    CAPTURE(c.causal);
    const std::vector<Tensor<T>> in = map_kl_gpu_inputs<T>(c, seed);
    seed += 4;
    for (std::optional<double> scale : {std::optional<double>{}, std::optional<double>{0.45}}) {
      const GraphFn<T> f = [c, scale](std::vector<Var<T>>& v) {
        return ops::attention_map_kl(v[0], v[1], v[2], v[3], c.hq, c.hkv, c.hd, c.causal, scale);
      };
      check_parity<T>(in, f, tolerance<T>(), seed++);
      check_parity<T>(in, f, tolerance<T>(), seed++, {false, false, true, true});  // ACBQ's use
      check_parity<T>(in, f, tolerance<T>(), seed++, {true, true, false, false});
      check_parity<T>(in, f, tolerance<T>(), seed++, {false, true, false, true});  // keys only
    }
  }
}

TEST_CASE_TEMPLATE("attention_map_kl: identical inputs give exactly zero on CUDA", T, float,
                   double) {
  const MapKlGpuCase c{130, 4, 2, 16, true};
  const std::vector<Tensor<T>> in = map_kl_gpu_inputs<T>(c, 400);
  const std::vector<Tensor<T>> same{in[0], in[1], in[0].clone(), in[1].clone()};
  const GraphResult<T> r = run_graph<T>(
      Device::cuda, same,
      [c](std::vector<Var<T>>& v) {
        return ops::attention_map_kl(v[0], v[1], v[2], v[3], c.hq, c.hkv, c.hd, c.causal);
      },
      1);
  CHECK(r.out[0] == T(0));
  for (const Tensor<T>& g : r.grads)
    for (int64_t i = 0; i < g.numel(); ++i) REQUIRE(g[i] == T(0));  // a NaN fails too
}

TEST_CASE("attention_map_kl: two CUDA runs give identical bits") {
  const MapKlGpuCase c{513, 8, 2, 64, true};
  const std::vector<Tensor<float>> inputs = map_kl_gpu_inputs<float>(c, 500);
  const GraphFn<float> f = [c](std::vector<Var<float>>& v) {
    return ops::attention_map_kl(v[0], v[1], v[2], v[3], c.hq, c.hkv, c.hd, c.causal);
  };
  cbq::gpu_testing::check_deterministic<float>(inputs, f, 5);
}

TEST_CASE("attention_map_kl: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> q = randn<float>(Shape{3, 8}, 1), k = randn<float>(Shape{3, 4}, 2);
  Var<float> q_gpu = tape.input(q.to(Device::cuda));
  Var<float> k_gpu = tape.input(k.to(Device::cuda));
  Var<float> k_cpu = tape.input(k);
  const std::string message =
      error_message([&] { ops::attention_map_kl(q_gpu, k_gpu, q_gpu, k_cpu, 2, 1, 4); });
  CHECK(contains(message, "attention_map_kl"));
  CHECK(contains(message, "different devices"));
}
