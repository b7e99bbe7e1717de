// CUDA vs CPU: hadamard (ops/hadamard.hpp, cuda/cbq/cuda/ops/hadamard.cuh), forward and backward,
// float and double, for the transform sizes the rotations use: a plain power of two (64, R2 of
// SmolLM2), Sylvester ⊗ Paley kernels (12, 576 = R1 of SmolLM2, 1536 = its R4), the random
// orthogonal fallback (172, stories260K's R4), with and without signs, forward and transposed,
// several chunks per row (heads side by side); a size whose chunk needs more than 48 KiB of shared
// memory in double (11008, LLaMA-2-7B's R4); the in-place use of the tape-free path. CPU tests:
// tests/ops/test_hadamard.cpp; the declared case of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>() (1e-12 / 1e-5): the same
// products and sums in the same order per element; only fused multiply-adds round differently
// (the K product sums m terms, the butterflies log2 P levels).
#include <memory>

#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {
struct HadamardCase {
  int64_t n;
  int64_t chunks;  // per row
  bool signs, transpose, fallback;
};
}  // namespace

TEST_CASE_TEMPLATE("hadamard: CUDA matches CPU, forward and backward, every kind of size", T, float,
                   double) {
  const HadamardCase cases[] = {
      {64, 1, false, false, false}, {64, 3, true, true, false},   {12, 4, true, false, false},
      {576, 1, true, false, false}, {576, 2, false, true, false}, {1536, 1, true, false, false},
      {172, 2, true, false, true},  {172, 1, true, true, true},   {11008, 1, true, false, false}};
  uint64_t seed = 900;
  for (const HadamardCase& c : cases) {
    CAPTURE(c.n);
    CAPTURE(c.chunks);
    CAPTURE(c.signs);
    CAPTURE(c.transpose);
    auto h = std::make_shared<const ops::HadamardTransform>(
        ops::HadamardTransform::make(c.n, seed, c.signs, c.fallback));
    const std::vector<Tensor<T>> inputs{randn<T>(Shape{5, c.chunks * c.n}, seed++)};
    const GraphFn<T> f = [h, t = c.transpose](std::vector<Var<T>>& v) {
      return ops::hadamard(v[0], h, t);
    };
    const double worst = check_parity<T>(inputs, f, tolerance<T>(), seed++);
    MESSAGE(h->description() << ": worst rel error " << worst);
  }
}

TEST_CASE_TEMPLATE("hadamard: a dense (fitted) transform on CUDA matches the CPU's GEMM", T, float,
                   double) {
  uint64_t seed = 950;
  for (int64_t n : {172, 576}) {
    for (bool transpose : {false, true}) {
      CAPTURE(n);
      CAPTURE(transpose);
      const Tensor<double> m = randn<double>(Shape{n, n}, seed++);
      auto h = std::make_shared<const ops::HadamardTransform>(ops::HadamardTransform::dense(
          n, std::vector<double>(m.data(), m.data() + n * n), "random dense"));
      const std::vector<Tensor<T>> inputs{randn<T>(Shape{5, 2 * n}, seed++)};
      const GraphFn<T> f = [h, transpose](std::vector<Var<T>>& v) {
        return ops::hadamard(v[0], h, transpose);
      };
      MESSAGE("dense " << n << ": worst rel error "
                       << check_parity<T>(inputs, f, tolerance<T>(), seed++));
    }
  }
}

TEST_CASE_TEMPLATE("hadamard: the in-place launch equals the out-of-place one", T, float, double) {
  const auto h = ops::HadamardTransform::make(1536, 3, true);
  const Tensor<T> x = randn<T>(Shape{7, 1536}, 77);
  Tensor<T> a = x.to(Device::cuda), b = x.to(Device::cuda),
            y = Tensor<T>::empty(x.shape(), Device::cuda);
  h.apply_on<T>(Device::cuda, a.data(), a.data(), 7, false, false);
  h.apply_on<T>(Device::cuda, b.data(), y.data(), 7, false, false);
  CHECK(a.to(Device::cpu).to_vector() == y.to(Device::cpu).to_vector());
  // ...and the CPU's host transform within tolerance.
  std::vector<T> host = x.to_vector();
  h.apply(host.data(), host.data(), 7, false, false);
  CHECK(rel_error(y.to(Device::cpu), Tensor<T>::from(host, x.shape())) <= tolerance<T>());
}

TEST_CASE("hadamard: the CUDA kernel is registered") {
  CHECK(bool(ops::CudaHadamard<float>::apply));
  CHECK(bool(ops::CudaHadamard<double>::apply));
}
