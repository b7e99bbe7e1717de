// CUDA vs CPU: rope in both layouts (interleaved as llama2.c, rotate_half as Hugging Face),
// forward and backward, float and double, with odd sequence lengths, several head counts and
// head dimensions, and a non-zero first position; plus the mixed-device error.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float). The GPU computes the cos/sin tables itself with CUDA's double pow/cos/sin (within
// 2 ulp of glibc): the angle's error is ~(pos0 + t) · 4e-16, below 2e-13 for the positions here
// (it grows with the position: ~1e-12 relative near position 2000 in double; float is unaffected).
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

TEST_CASE_TEMPLATE("rope: CUDA matches CPU, both layouts", T, float, double) {
  struct Case {
    int64_t seq_len, n_heads, head_dim, pos0;
    double theta;
  };
  const Case cases[] = {{1, 1, 2, 0, 10000.0},    {7, 3, 8, 0, 10000.0},
                        {33, 4, 64, 5, 10000.0},  {257, 2, 16, 0, 500000.0},
                        {5, 8, 128, 37, 10000.0}, {13, 5, 6, 100, 1.0e6}};
  uint64_t seed = 1;
  for (const Case& c : cases)
    for (RopeLayout layout : {RopeLayout::interleaved, RopeLayout::rotate_half}) {
      CAPTURE(c.seq_len);
      CAPTURE(c.n_heads);
      CAPTURE(c.head_dim);
      CAPTURE(c.pos0);
      CAPTURE(layout == RopeLayout::interleaved);
      const std::vector<Tensor<T>> inputs{
          randn<T>(Shape{c.seq_len, c.n_heads * c.head_dim}, seed++)};
      const GraphFn<T> f = [c, layout](std::vector<Var<T>>& v) {
        return ops::rope(v[0], c.n_heads, c.head_dim, layout, c.theta, c.pos0);
      };
      check_parity<T>(inputs, f, tolerance<T>(), seed++);
      // rope applied twice (q-like and k-like calls on one tape): the second backward accumulates
      // into a gradient that already holds the first one.
      const GraphFn<T> twice = [c, layout](std::vector<Var<T>>& v) {
        return ops::add(ops::rope(v[0], c.n_heads, c.head_dim, layout, c.theta, c.pos0),
                        ops::rope(v[0], c.n_heads, c.head_dim, layout, c.theta, c.pos0 + 3));
      };
      check_parity<T>(inputs, twice, tolerance<T>(), seed++);
    }
}

TEST_CASE("rope: a CPU input on a CUDA tape gives a clear error") {
  Tape<float> tape(Device::cuda);
  Var<float> x = tape.input(randn<float>(Shape{3, 8}, 1));
  const std::string message =
      error_message([&] { ops::rope(x, 2, 4, RopeLayout::rotate_half, 10000.0); });
  CHECK(contains(message, "rope"));
  CHECK(contains(message, "different devices"));
}
