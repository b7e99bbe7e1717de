// CUDA vs CPU: embedding forward (gather) and backward (scatter-add with repeated ids), float
// and double, odd vocabulary and embedding sizes; plus the mixed-device error. CPU tests:
// tests/ops/test_embedding.cpp; the declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance: exact (rel_error == 0). The forward pass copies values; the backward pass adds each
// id's token gradients in token order, the same additions in the same order as the CPU.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {
// `tokens` ids in [0, vocab), each drawn from the first `distinct` ids so that most repeat.
std::vector<int32_t> make_ids(int64_t tokens, int64_t vocab, int64_t distinct, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<std::size_t>(tokens));
  uint64_t state = seed;
  for (auto& id : ids) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    id = static_cast<int32_t>((state >> 33) % static_cast<uint64_t>(std::min(vocab, distinct)));
  }
  return ids;
}
}  // namespace

TEST_CASE_TEMPLATE("embedding: CUDA matches CPU exactly, repeated ids", T, float, double) {
  struct Case {
    int64_t vocab, dim, tokens, distinct;
  };
  const Case cases[] = {{1, 1, 1, 1},      {7, 7, 5, 7},        {512, 64, 257, 512},
                        {513, 257, 33, 4}, {1031, 9, 1031, 50}, {3, 1031, 4000, 3}};
  uint64_t seed = 1;
  for (const Case& c : cases) {
    CAPTURE(c.vocab);
    CAPTURE(c.dim);
    CAPTURE(c.tokens);
    const std::vector<int32_t> ids = make_ids(c.tokens, c.vocab, c.distinct, seed++);
    const std::vector<Tensor<T>> inputs{randn<T>(Shape{c.vocab, c.dim}, seed++)};
    const GraphFn<T> f = [ids](std::vector<Var<T>>& v) { return ops::embedding(v[0], ids); };
    CHECK(check_parity<T>(inputs, f, 0.0, seed++) == 0.0);
    // Two lookups of one table on a tape: the second scatter accumulates onto the first.
    const std::vector<int32_t> reversed(ids.rbegin(), ids.rend());
    const GraphFn<T> twice = [ids, reversed](std::vector<Var<T>>& v) {
      return ops::mul(ops::embedding(v[0], ids), ops::embedding(v[0], reversed));
    };
    // mul rounds identically on both devices, so this stays exact too.
    CHECK(check_parity<T>(inputs, twice, 0.0, seed++) == 0.0);
  }
}

TEST_CASE("embedding: no ids gives an empty output on CUDA") {
  Tape<float> tape(Device::cuda);
  Var<float> table = tape.input(randn<float>(Shape{5, 3}, 1).to(Device::cuda));
  Var<float> out = ops::embedding(table, {});
  CHECK(out.shape() == Shape{0, 3});
  CHECK(out.device() == Device::cuda);
}

TEST_CASE("embedding: a CPU table on a CUDA tape gives a clear error") {
  Tape<float> tape(Device::cuda);
  Var<float> table = tape.input(randn<float>(Shape{5, 3}, 1));
  const std::string message = error_message([&] { ops::embedding(table, {0, 4}); });
  CHECK(contains(message, "embedding"));
  CHECK(contains(message, "different devices"));
}
