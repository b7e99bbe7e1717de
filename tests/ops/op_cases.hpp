#pragma once
// One declaration per differentiable core op, feeding two checks (as ggml's test-backend-ops):
//   tests/ops/test_op_cases.cpp  the gradient check in double (central differences) and a finite
//                                forward in float and double, on the CPU;
//   tests/gpu/test_op_cases.cu   CUDA vs CPU, forward and every input gradient, float and double.
// A case is a name, its inputs (shape, seed, scale, offset, a margin around a kink at 0, whether
// the input is differentiable) and its graph, a generic lambda over std::vector<Var<T>>& that is
// instantiated for float and double. A new op gets both checks from one entry in op_cases(); its
// own tests/ops/test_<op>.cpp and tests/gpu/test_<op>.cu keep what a declaration cannot say
// (naive forward references, edge cases, errors, determinism, large shapes).
// Plain C++ (no doctest, no CUDA): compiled by g++ in the CPU suite and by nvcc in the GPU tests.
#include <cbq/core/tape.hpp>
#include <cbq/core/tensor.hpp>
#include <cbq/ops/activations.hpp>
#include <cbq/ops/add.hpp>
#include <cbq/ops/attention.hpp>
#include <cbq/ops/attention_map_kl.hpp>
#include <cbq/ops/cross_entropy.hpp>
#include <cbq/ops/embedding.hpp>
#include <cbq/ops/hadamard.hpp>
#include <cbq/ops/kl_softmax.hpp>
#include <cbq/ops/layernorm.hpp>
#include <cbq/ops/linear.hpp>
#include <cbq/ops/matmul.hpp>
#include <cbq/ops/mse.hpp>
#include <cbq/ops/mul.hpp>
#include <cbq/ops/reduce.hpp>
#include <cbq/ops/reshape.hpp>
#include <cbq/ops/rmsnorm.hpp>
#include <cbq/ops/rope.hpp>
#include <cbq/ops/scale.hpp>
#include <cbq/ops/softmax.hpp>
#include <cbq/ops/swiglu.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace cbq::op_cases {

template <class T>
using Graph = std::function<Var<T>(std::vector<Var<T>>&)>;

// One input: randn(shape, seed) · scale + offset (the normal draws of testing::randn and
// gpu_testing::randn). With kink_margin > 0 every value is moved away from 0 by that much
// (x + sign(x) · margin), so that no finite difference straddles a kink there (relu).
struct Input {
  Shape shape;
  uint64_t seed = 1;
  double scale = 1.0;
  double offset = 0.0;
  double kink_margin = 0.0;
  bool differentiable = true;  // false: a constant of the graph (no gradient asked)
};

struct OpCase {
  std::string name;
  std::vector<Input> inputs;
  Graph<float> graph_float;
  Graph<double> graph_double;
  // The CUDA-vs-CPU check's float tolerance, as a multiple of gpu_testing::tolerance<float>()
  // (double keeps its own): > 1 only where the op's own GPU file explains why (attention).
  double float_tolerance_factor = 1.0;

  template <class T>
  const Graph<T>& graph() const {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
    if constexpr (std::is_same_v<T, float>) {
      return graph_float;
    } else {
      return graph_double;
    }
  }

  // The inputs as CPU tensors of T (drawn in double, then rounded to T).
  template <class T>
  std::vector<Tensor<T>> make_inputs() const {
    std::vector<Tensor<T>> out;
    for (const Input& in : inputs) {
      std::mt19937_64 rng(in.seed);
      std::normal_distribution<double> dist(0.0, 1.0);
      Tensor<T> t = Tensor<T>::empty(in.shape);
      for (int64_t i = 0; i < t.numel(); ++i) {
        double x = dist(rng) * in.scale + in.offset;
        if (in.kink_margin > 0) x += std::copysign(in.kink_margin, x);
        t[i] = static_cast<T>(x);
      }
      out.push_back(std::move(t));
    }
    return out;
  }

  std::vector<bool> differentiable() const {
    std::vector<bool> d;
    for (const Input& in : inputs) d.push_back(in.differentiable);
    return d;
  }
};

// A graph's constant in the graph's type: ops::scale(v[0], scalar(v, 0.37)).
template <class T>
T scalar(const std::vector<Var<T>>&, double x) {
  return static_cast<T>(x);
}

// `graph` is a generic lambda [](auto& v) { return ops::...(v[0], ...); }.
template <class F>
OpCase op_case(std::string name, std::vector<Input> inputs, const F& graph) {
  return OpCase{std::move(name), std::move(inputs), Graph<float>(graph), Graph<double>(graph)};
}

// Every declared case. Shapes are small and odd (the gradient check costs two forward passes per
// input element); the per-op files cover the large and the awkward ones.
inline const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> cases = [] {
    // Repeated ids / targets, fixed so that both checks see the same graph.
    const std::vector<int32_t> ids = {3, 0, 6, 3, 3, 1, 0};
    const std::vector<int32_t> targets = {4, 0, 8, 8, 2};
    std::vector<OpCase> c;
    // ---- elementwise
    c.push_back(op_case("add", {{Shape{3, 7}, 1}, {Shape{3, 7}, 2}},
                        [](auto& v) { return ops::add(v[0], v[1]); }));
    c.push_back(op_case("mul", {{Shape{3, 7}, 3}, {Shape{3, 7}, 4}},
                        [](auto& v) { return ops::mul(v[0], v[1]); }));
    c.push_back(
        op_case("mul(x, x)", {{Shape{2, 5, 9}, 5}}, [](auto& v) { return ops::mul(v[0], v[0]); }));
    c.push_back(op_case("mul, b constant",
                        {{Shape{11}, 6}, {Shape{11}, 7, 1.0, 0.0, 0.0, /*differentiable=*/false}},
                        [](auto& v) { return ops::mul(v[0], v[1]); }));
    c.push_back(op_case("scale", {{Shape{2, 5, 9}, 8}},
                        [](auto& v) { return ops::scale(v[0], scalar(v, -1.75)); }));
    c.push_back(
        op_case("reshape, then mul", {{Shape{2, 5, 9}, 9}, {Shape{9, 10}, 10}}, [](auto& v) {
          return ops::mul(ops::reshape(v[0], Shape{9, 10}), v[1]);
        }));
    // ---- reductions (an offset: the sums are large against their rounding, as in real losses)
    c.push_back(
        op_case("sum", {{Shape{3, 7}, 11, 1.0, 0.5}}, [](auto& v) { return ops::sum(v[0]); }));
    c.push_back(
        op_case("mean", {{Shape{2, 5, 9}, 12, 1.0, 0.5}}, [](auto& v) { return ops::mean(v[0]); }));
    c.push_back(op_case("mean of a product", {{Shape{3, 7}, 13}, {Shape{3, 7}, 14}},
                        [](auto& v) { return ops::mean(ops::mul(v[0], v[1])); }));
    // ---- activations (scale 3: the tails of the sigmoid and of erf)
    c.push_back(
        op_case("silu", {{Shape{3, 5, 7}, 15, 3.0}}, [](auto& v) { return ops::silu(v[0]); }));
    c.push_back(op_case("relu", {{Shape{4, 11}, 16, 1.0, 0.0, /*kink_margin=*/0.05}},
                        [](auto& v) { return ops::relu(v[0]); }));
    c.push_back(
        op_case("gelu", {{Shape{3, 5, 7}, 17, 3.0}}, [](auto& v) { return ops::gelu(v[0]); }));
    c.push_back(op_case("swiglu", {{Shape{3, 5, 7}, 18, 2.0}, {Shape{3, 5, 7}, 19}},
                        [](auto& v) { return ops::swiglu(v[0], v[1]); }));
    // ---- rows: softmax and the norms (1, 7 and 33 columns)
    c.push_back(
        op_case("softmax", {{Shape{3, 7}, 20, 3.0}}, [](auto& v) { return ops::softmax(v[0]); }));
    c.push_back(op_case("softmax, one column", {{Shape{4, 1}, 21, 3.0}},
                        [](auto& v) { return ops::softmax(v[0]); }));
    c.push_back(op_case("log_softmax", {{Shape{2, 3, 33}, 22, 3.0}},
                        [](auto& v) { return ops::log_softmax(v[0]); }));
    c.push_back(op_case("rmsnorm", {{Shape{3, 5, 7}, 23, 2.0, 0.3}, {Shape{7}, 24, 0.5, 1.0}},
                        [](auto& v) { return ops::rmsnorm(v[0], v[1], 1e-5); }));
    c.push_back(op_case("layernorm",
                        {{Shape{5, 33}, 25, 1.5, 2.0}, {Shape{33}, 26, 0.5, 1.0}, {Shape{33}, 27}},
                        [](auto& v) { return ops::layernorm(v[0], v[1], v[2], 1e-5); }));
    c.push_back(op_case("layernorm without bias",
                        {{Shape{3, 7}, 28, 1.5}, {Shape{7}, 29, 0.5, 1.0}}, [](auto& v) {
                          using V = std::remove_cvref_t<decltype(v[0])>;
                          return ops::layernorm(v[0], v[1], V{}, 1e-5);
                        }));
    // ---- rope (both pair layouts, a later first position) and attention (grouped-query heads,
    // causal and not; 5 rows so that a key tile is partly masked)
    c.push_back(op_case("rope, interleaved", {{Shape{5, 2 * 6}, 46}}, [](auto& v) {
      return ops::rope(v[0], 2, 6, RopeLayout::interleaved, 10000.0, 3);
    }));
    c.push_back(op_case("rope, rotate_half", {{Shape{5, 3 * 4}, 47}}, [](auto& v) {
      return ops::rope(v[0], 3, 4, RopeLayout::rotate_half, 500.0);
    }));
    c.push_back(op_case("attention, causal, 4 query heads on 2 kv heads",
                        {{Shape{5, 4 * 3}, 48}, {Shape{5, 2 * 3}, 49}, {Shape{5, 2 * 3}, 50}},
                        [](auto& v) { return ops::attention(v[0], v[1], v[2], 4, 2, 3, true); }));
    c.back().float_tolerance_factor = 10;  // 1e-4: dS = P ⊙ (dP − D) cancels (test_attention.cu)
    c.push_back(op_case("attention, not causal",
                        {{Shape{6, 2 * 4}, 51}, {Shape{6, 2 * 4}, 52}, {Shape{6, 2 * 4}, 53}},
                        [](auto& v) { return ops::attention(v[0], v[1], v[2], 2, 2, 4, false); }));
    c.back().float_tolerance_factor = 10;
    // ---- the attention-map KL (target q*, k*, then model q, k): grouped-query and causal with
    // every input differentiable; multi-head without the mask, targets constant (ACBQ's use)
    c.push_back(op_case(
        "attention_map_kl, causal, 4 query heads on 2 kv heads",
        {{Shape{5, 4 * 3}, 54, 1.5},
         {Shape{5, 2 * 3}, 55, 1.5},
         {Shape{5, 4 * 3}, 56, 1.5},
         {Shape{5, 2 * 3}, 57, 1.5}},
        [](auto& v) { return ops::attention_map_kl(v[0], v[1], v[2], v[3], 4, 2, 3, true); }));
    c.push_back(op_case(
        "attention_map_kl, not causal, targets constant",
        {{Shape{6, 2 * 4}, 58, 1.0, 0.0, 0.0, /*differentiable=*/false},
         {Shape{6, 2 * 4}, 59, 1.0, 0.0, 0.0, /*differentiable=*/false},
         {Shape{6, 2 * 4}, 60},
         {Shape{6, 2 * 4}, 61}},
        [](auto& v) { return ops::attention_map_kl(v[0], v[1], v[2], v[3], 2, 2, 4, false); }));
    // ---- losses
    c.push_back(op_case("mse", {{Shape{3, 7}, 30}, {Shape{3, 7}, 31}},
                        [](auto& v) { return ops::mse(v[0], v[1]); }));
    c.push_back(op_case("row_sq_error", {{Shape{2, 5, 9}, 32}, {Shape{2, 5, 9}, 33}},
                        [](auto& v) { return ops::row_sq_error(v[0], v[1]); }));
    c.push_back(op_case("cross_entropy", {{Shape{5, 9}, 34, 3.0}},
                        [targets](auto& v) { return ops::cross_entropy(v[0], targets); }));
    c.push_back(op_case(
        "cross_entropy after log_softmax", {{Shape{5, 9}, 35, 3.0}},
        [targets](auto& v) { return ops::cross_entropy(ops::log_softmax(v[0]), targets); }));
    c.push_back(op_case("kl_softmax, temperature 2.5",
                        {{Shape{3, 7}, 36, 2.0}, {Shape{3, 7}, 37, 2.0}},
                        [](auto& v) { return ops::kl_softmax(v[0], v[1], scalar(v, 2.5)); }));
    // ---- lookups and GEMMs
    c.push_back(op_case("embedding", {{Shape{7, 5}, 38}},
                        [ids](auto& v) { return ops::embedding(v[0], ids); }));
    c.push_back(op_case("matmul", {{Shape{5, 7}, 39}, {Shape{7, 3}, 40}},
                        [](auto& v) { return ops::matmul(v[0], v[1]); }));
    c.push_back(op_case("matmul, b transposed", {{Shape{5, 7}, 41}, {Shape{3, 7}, 42}},
                        [](auto& v) { return ops::matmul(v[0], v[1], false, true); }));
    c.push_back(op_case("linear", {{Shape{2, 3, 9}, 43}, {Shape{5, 9}, 44}, {Shape{5}, 45}},
                        [](auto& v) { return ops::linear(v[0], v[1], v[2]); }));
    // ---- the Hadamard rotation: H_2 ⊗ Paley I (q = 11) with signs, two chunks per row, and its
    // transpose after silu (so the gradient reaching it is not constant)
    auto h24 =
        std::make_shared<const ops::HadamardTransform>(ops::HadamardTransform::make(24, 5, true));
    c.push_back(op_case("hadamard, 2 chunks of 24", {{Shape{3, 48}, 48}},
                        [h24](auto& v) { return ops::hadamard(v[0], h24); }));
    c.push_back(op_case("hadamard transposed after silu", {{Shape{2, 24}, 49}},
                        [h24](auto& v) { return ops::hadamard(ops::silu(v[0]), h24, true); }));
    return c;
  }();
  return cases;
}

}  // namespace cbq::op_cases
