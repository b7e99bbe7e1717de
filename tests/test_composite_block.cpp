// Two LLaMA-style decoder blocks built by hand from ops, checked end to end: the gradient with
// respect to the input and every weight must match finite differences in double.
#include <cbq/ops/activations.hpp>
#include <cbq/ops/add.hpp>
#include <cbq/ops/attention.hpp>
#include <cbq/ops/linear.hpp>
#include <cbq/ops/rmsnorm.hpp>
#include <cbq/ops/rope.hpp>
#include <cbq/ops/swiglu.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::randn;
using cbq::testing::uniform;

namespace {

constexpr int64_t kSeq = 5, kDim = 8, kHeads = 4, kKvHeads = 2, kHeadDim = kDim / kHeads,
                  kHidden = 12;
constexpr double kEps = 1e-5, kTheta = 10000.0;

// Weights of one block, in this order.
enum BlockWeight { attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down, kBlockWeights };

std::vector<Tensor<double>> random_block(uint64_t seed) {
  auto w = [&](Shape s, double scale) { return randn<double>(s, seed++, scale); };
  std::vector<Tensor<double>> b(kBlockWeights);
  b[attn_norm] = uniform<double>(Shape{kDim}, seed++, 0.5, 1.5);
  b[wq] = w(Shape{kHeads * kHeadDim, kDim}, 0.5);
  b[wk] = w(Shape{kKvHeads * kHeadDim, kDim}, 0.5);
  b[wv] = w(Shape{kKvHeads * kHeadDim, kDim}, 0.5);
  b[wo] = w(Shape{kDim, kHeads * kHeadDim}, 0.3);
  b[ffn_norm] = uniform<double>(Shape{kDim}, seed++, 0.5, 1.5);
  b[w_gate] = w(Shape{kHidden, kDim}, 0.4);
  b[w_up] = w(Shape{kHidden, kDim}, 0.4);
  b[w_down] = w(Shape{kDim, kHidden}, 0.3);
  return b;
}

// h = x + Wo · attn(rope(Wq·n), rope(Wk·n), Wv·n),  n = rmsnorm(x)
// y = h + Wdown · swiglu(Wgate·m, Wup·m),            m = rmsnorm(h)
template <class T>
Var<T> llama_block(Var<T> x, const Var<T>* w, RopeLayout layout) {
  Var<T> n = ops::rmsnorm(x, w[attn_norm], kEps);                                   // (T, d)
  Var<T> q = ops::rope(ops::linear(n, w[wq]), kHeads, kHeadDim, layout, kTheta);    // (T, Hq·hd)
  Var<T> k = ops::rope(ops::linear(n, w[wk]), kKvHeads, kHeadDim, layout, kTheta);  // (T, Hkv·hd)
  Var<T> v = ops::linear(n, w[wv]);                                                 // (T, Hkv·hd)
  Var<T> attn = ops::attention(q, k, v, kHeads, kKvHeads, kHeadDim);                // (T, Hq·hd)
  Var<T> h = ops::add(x, ops::linear(attn, w[wo]));                                 // (T, d)
  Var<T> m = ops::rmsnorm(h, w[ffn_norm], kEps);                                    // (T, d)
  Var<T> mlp = ops::swiglu(ops::linear(m, w[w_gate]), ops::linear(m, w[w_up]));     // (T, hidden)
  return ops::add(h, ops::linear(mlp, w[w_down]));                                  // (T, d)
}

// inputs = {x, block 0 weights..., block 1 weights...}
template <class T>
Var<T> two_blocks(std::vector<Var<T>>& inputs, RopeLayout layout) {
  Var<T> h = llama_block(inputs[0], &inputs[1], layout);
  return llama_block(h, &inputs[1 + kBlockWeights], layout);
}

std::vector<Tensor<double>> all_inputs() {
  std::vector<Tensor<double>> in{randn<double>(Shape{kSeq, kDim}, 100)};
  for (uint64_t blk = 0; blk < 2; ++blk)
    for (auto& t : random_block(200 + 50 * blk)) in.push_back(t);
  return in;
}

}  // namespace

TEST_CASE("composite: two LLaMA blocks pass gradcheck for the input and every weight") {
  for (RopeLayout layout : {RopeLayout::rotate_half, RopeLayout::interleaved}) {
    CAPTURE(int(layout));
    auto inputs = all_inputs();
    REQUIRE(inputs.size() == 1 + 2 * kBlockWeights);
    // One input at a time so a failure names the tensor; each check differentiates only it.
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      std::vector<bool> only(inputs.size(), false);
      only[i] = true;
      auto r = gradcheck(
          [&](Tape<double>&, std::vector<Var<double>>& v) { return two_blocks(v, layout); }, inputs,
          only);
      CAPTURE(i);
      CHECK(r.max_rel_error < 1e-6);
    }
    // And all at once: gradients reaching shared intermediates from several paths accumulate.
    auto all = gradcheck(
        [&](Tape<double>&, std::vector<Var<double>>& v) { return two_blocks(v, layout); }, inputs);
    CHECK(all.max_rel_error < 1e-6);
  }
}

TEST_CASE("composite: the blocks change the input and training steps reuse the tape's buffers") {
  auto inputs = all_inputs();
  std::vector<Parameter<double>> params;
  for (std::size_t i = 1; i < inputs.size(); ++i)
    params.emplace_back("w" + std::to_string(i), inputs[i]);
  Tape<double> tape;
  std::size_t allocations_after_first = 0;
  std::vector<Tensor<double>> first_grads;
  for (int step = 0; step < 3; ++step) {
    tape.clear();
    for (auto& p : params) p.zero_grad();
    std::vector<Var<double>> vars{tape.constant(inputs[0])};
    for (auto& p : params) vars.push_back(tape.param(p));
    Var<double> y = two_blocks(vars, RopeLayout::rotate_half);
    REQUIRE(y.shape() == Shape({kSeq, kDim}));
    CHECK(cbq::testing::max_abs_diff(y.value(), inputs[0]) > 1e-3);
    y.grad().fill(1.0);
    tape.backward_from_seeded();
    if (step == 0) {
      allocations_after_first = tape.arena_allocations();
      for (auto& p : params) first_grads.push_back(p.grad.clone());
    } else {
      // Same step, same buffers: identical gradients and no new arena allocation.
      for (std::size_t i = 0; i < params.size(); ++i)
        CHECK(cbq::testing::max_abs_diff(params[i].grad, first_grads[i]) == 0.0);
    }
  }
  CHECK(tape.arena_allocations() == allocations_after_first);
  for (auto& g : first_grads) {
    double norm = 0;
    for (int64_t k = 0; k < g.numel(); ++k) norm += g[k] * g[k];
    CHECK(norm > 0);
  }
}
