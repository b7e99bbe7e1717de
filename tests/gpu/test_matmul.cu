// CUDA vs CPU: the cuBLASLt GEMM (raw contract and the matmul op, all four transposes) and the
// linear op with and without bias, forward and backward, float (fp32 and TF32) and double.
#include <string>
#include <vector>

#include "gpu/gpu_main.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {

struct Dims {
  int64_t m, k, n;
};
// Odd sizes (no multiple of a tile), a degenerate one and one that spans several tiles.
const Dims kDims[] = {{1, 1, 1}, {7, 13, 5}, {33, 65, 17}, {128, 256, 96}, {257, 300, 129}};

// Naive row-major C = alpha · op(A) · op(B) + beta · C in double.
template <class T>
void naive_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                const std::vector<T>& a, int64_t lda, const std::vector<T>& b, int64_t ldb,
                double beta, std::vector<double>& c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p)
        s += double(ta ? a[p * lda + i] : a[i * lda + p]) *
             double(tb ? b[j * ldb + p] : b[p * ldb + j]);
      double& out = c[i * ldc + j];
      out = alpha * s + (beta == 0 ? 0.0 : beta * out);
    }
}

template <class T>
struct MatmulResult {
  Tensor<T> c, da, db;
};

// C = op(A)·op(B) + op(A)·op(B) (the same product twice, so the backward GEMMs accumulate with
// beta = 1 into a gradient that already holds a value), seeded with dC = G.
template <class T>
MatmulResult<T> run_matmul(Device device, const Tensor<T>& a, const Tensor<T>& b,
                           const Tensor<T>& g, bool ta, bool tb) {
  Tape<T> tape(device);
  Var<T> va = tape.input(a.to(device));
  Var<T> vb = tape.input(b.to(device));
  Var<T> c = ops::add(ops::matmul(va, vb, ta, tb), ops::matmul(va, vb, ta, tb));
  c.grad().copy_from(g);
  tape.backward_from_seeded();
  return {c.value().to(Device::cpu), va.grad().to(Device::cpu), vb.grad().to(Device::cpu)};
}

template <class T>
void check_matmul(cuda::MathMode mode) {
  cuda::MathModeGuard guard(mode);
  const double tol = tolerance<T>(mode);
  uint64_t seed = 100;
  for (const Dims& d : kDims)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        CAPTURE(d.m);
        CAPTURE(d.k);
        CAPTURE(d.n);
        CAPTURE(ta);
        CAPTURE(tb);
        const Tensor<T> a = randn<T>(ta ? Shape{d.k, d.m} : Shape{d.m, d.k}, seed++);
        const Tensor<T> b = randn<T>(tb ? Shape{d.n, d.k} : Shape{d.k, d.n}, seed++);
        const Tensor<T> g = randn<T>(Shape{d.m, d.n}, seed++);
        const MatmulResult<T> cpu = run_matmul(Device::cpu, a, b, g, ta, tb);
        const MatmulResult<T> gpu = run_matmul(Device::cuda, a, b, g, ta, tb);
        CHECK(rel_error(gpu.c, cpu.c) <= tol);
        CHECK(rel_error(gpu.da, cpu.da) <= tol);
        CHECK(rel_error(gpu.db, cpu.db) <= tol);
      }
}

template <class T>
struct LinearResult {
  Tensor<T> y, dx, dw, db;
};

template <class T>
LinearResult<T> run_linear(Device device, const Tensor<T>& x, const Tensor<T>& w,
                           const Tensor<T>* b, const Tensor<T>& g) {
  Tape<T> tape(device);
  Var<T> vx = tape.input(x.to(device));
  Var<T> vw = tape.input(w.to(device));
  Var<T> vb = b ? tape.input(b->to(device)) : Var<T>{};
  Var<T> y = ops::linear(vx, vw, vb);
  y.grad().copy_from(g);
  tape.backward_from_seeded();
  LinearResult<T> r{y.value().to(Device::cpu), vx.grad().to(Device::cpu), vw.grad().to(Device::cpu),
                    Tensor<T>()};
  if (b) r.db = vb.grad().to(Device::cpu);
  return r;
}

template <class T>
void check_linear(cuda::MathMode mode) {
  cuda::MathModeGuard guard(mode);
  const double tol = tolerance<T>(mode);
  struct Case {
    Shape x;
    int64_t out;
  };
  // (..., in) inputs: 1-D, 3-D with odd sizes, and many rows for the bias reduction.
  const Case cases[] = {
      {Shape{7}, 3}, {Shape{2, 5, 7}, 11}, {Shape{3, 37, 64}, 96}, {Shape{1000, 16}, 40}};
  uint64_t seed = 200;
  for (const Case& c : cases)
    for (bool with_bias : {false, true}) {
      CAPTURE(c.x.str());
      CAPTURE(c.out);
      CAPTURE(with_bias);
      const int64_t in = c.x[-1];
      Shape y_shape = c.x;
      y_shape[-1] = c.out;
      const Tensor<T> x = randn<T>(c.x, seed++), w = randn<T>(Shape{c.out, in}, seed++);
      const Tensor<T> b = randn<T>(Shape{c.out}, seed++), g = randn<T>(y_shape, seed++);
      const Tensor<T>* bias = with_bias ? &b : nullptr;
      const LinearResult<T> cpu = run_linear(Device::cpu, x, w, bias, g);
      const LinearResult<T> gpu = run_linear(Device::cuda, x, w, bias, g);
      CHECK(rel_error(gpu.y, cpu.y) <= tol);
      CHECK(rel_error(gpu.dx, cpu.dx) <= tol);
      CHECK(rel_error(gpu.dw, cpu.dw) <= tol);
      if (with_bias) CHECK(rel_error(gpu.db, cpu.db) <= tol);
    }
}

}  // namespace

TEST_CASE_TEMPLATE("gemm: the raw CudaGemm contract against a double reference", T, float, double) {
  // alpha/beta not in {0, 1}, leading dimensions wider than the matrices, and k = 0
  // (C = beta · C, which cuBLASLt itself does not accept).
  uint64_t seed = 1;
  for (Dims d : {Dims{7, 13, 5}, Dims{33, 65, 17}, Dims{4, 0, 3}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        CAPTURE(d.m);
        CAPTURE(d.k);
        CAPTURE(d.n);
        CAPTURE(ta);
        CAPTURE(tb);
        const int64_t pad = 3;
        const int64_t a_rows = ta ? d.k : d.m, a_cols = ta ? d.m : d.k;
        const int64_t b_rows = tb ? d.n : d.k, b_cols = tb ? d.k : d.n;
        const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = d.n + pad;
        const Tensor<T> a = randn<T>(Shape{std::max<int64_t>(a_rows, 1), lda}, seed++);
        const Tensor<T> b = randn<T>(Shape{std::max<int64_t>(b_rows, 1), ldb}, seed++);
        const Tensor<T> c0 = randn<T>(Shape{d.m, ldc}, seed++);
        const T alpha = T(0.5), beta = T(-1.25);

        std::vector<double> expected(c0.numel());
        for (int64_t i = 0; i < c0.numel(); ++i) expected[i] = double(c0[i]);
        naive_gemm<T>(ta, tb, d.m, d.n, d.k, alpha, a.to_vector(), lda, b.to_vector(), ldb, beta,
                      expected, ldc);

        const Tensor<T> da = a.to(Device::cuda), db = b.to(Device::cuda);
        Tensor<T> dc = c0.to(Device::cuda);
        ops::gemm<T>(Device::cuda, ta, tb, d.m, d.n, d.k, alpha, da.data(), lda, db.data(), ldb,
                     beta, dc.data(), ldc);
        const std::vector<T> got = dc.to_vector();
        std::vector<T> got_c;
        std::vector<double> expected_c;
        for (int64_t i = 0; i < d.m; ++i)
          for (int64_t j = 0; j < ldc; ++j) {
            const int64_t idx = i * ldc + j;
            if (j >= d.n) {  // padding columns are never written
              CHECK(got[idx] == c0[idx]);
              continue;
            }
            got_c.push_back(got[idx]);
            expected_c.push_back(expected[idx]);
          }
        CHECK(gpu_testing::max_rel_error(got_c, expected_c) <= tolerance<T>());  // NaN-aware
      }
}

TEST_CASE("gemm: 4-byte-aligned operands with odd leading dimensions, fp32 and TF32") {
  // Views one float into their buffers (4-byte alignment) with odd leading dimensions: the
  // heuristic is asked for an algorithm that accepts them; in TF32 mode, where none fits, the plan
  // falls back to FP32 compute (counted by num_gemm_fallbacks). Either way the result is right.
  const int64_t m = 37, n = 29, k = 45, lda = k + 2, ldb = n + 2, ldc = n + 4;
  for (cuda::MathMode mode : {cuda::MathMode::fp32, cuda::MathMode::tf32}) {
    CAPTURE(cuda::math_mode_name(mode));
    cuda::MathModeGuard guard(mode);
    const Tensor<float> a = randn<float>(Shape{m * lda + 1}, 31);
    const Tensor<float> b = randn<float>(Shape{k * ldb + 1}, 32);
    const Tensor<float> c0 = randn<float>(Shape{m * ldc + 1}, 33);
    const std::vector<float> a_all = a.to_vector(), b_all = b.to_vector();
    const std::vector<float> a_view(a_all.begin() + 1, a_all.end());
    const std::vector<float> b_view(b_all.begin() + 1, b_all.end());
    std::vector<double> expected(static_cast<size_t>(m * ldc));
    for (int64_t i = 0; i < m * ldc; ++i) expected[i] = double(c0[i + 1]);
    naive_gemm<float>(false, false, m, n, k, 1.0, a_view, lda, b_view, ldb, 0.5, expected, ldc);
    const Tensor<float> da = a.to(Device::cuda), db = b.to(Device::cuda);
    Tensor<float> dc = c0.to(Device::cuda);
    ops::gemm<float>(Device::cuda, false, false, m, n, k, 1.0f, da.data() + 1, lda, db.data() + 1,
                     ldb, 0.5f, dc.data() + 1, ldc);
    const std::vector<float> got = dc.to_vector();
    std::vector<float> got_c;
    std::vector<double> expected_c;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        got_c.push_back(got[static_cast<size_t>(i * ldc + j + 1)]);
        expected_c.push_back(expected[static_cast<size_t>(i * ldc + j)]);
      }
    CHECK(gpu_testing::max_rel_error(got_c, expected_c) <= tolerance<float>(mode));
    MESSAGE(cuda::math_mode_name(mode), ": ", cuda::default_context().num_gemm_fallbacks(),
            " plan(s) fell back from TF32 to FP32 compute so far");
  }
}

TEST_CASE("gemm: without an algorithm the error names shapes, layouts, types and attempts") {
  // The message alone (no GPU work): the key is the column-major call of the row-major GEMM
  // C (7 x 5) = Aᵀ · B with A stored (3, 7) and B (3, 5) — see gemm.cuh.
  const cuda::detail::GemmKey key{
      CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, false, true, 5, 7, 3, 9, 11, 13, 4, 8, 16};
  const std::string m = cuda::detail::no_algorithm_message(
      key, 1024, "CUBLAS_COMPUTE_32F_FAST_TF32 (CUBLAS_STATUS_NOT_SUPPORTED)");
  CAPTURE(m);
  CHECK(gpu_testing::contains(m, "C (7 x 5)"));
  CHECK(gpu_testing::contains(m, "k = 3"));
  CHECK(gpu_testing::contains(m, "A transposed (lda 11, 8-byte aligned)"));
  CHECK(gpu_testing::contains(m, "B as stored (ldb 9, 4-byte aligned)"));
  CHECK(gpu_testing::contains(m, "C ldc 13 (16-byte aligned)"));
  CHECK(gpu_testing::contains(m, "column-major call (5, 7, 3) trans (N, T)"));
  CHECK(gpu_testing::contains(m, "CUDA_R_32F"));
  CHECK(gpu_testing::contains(m, "workspace 1024 bytes"));
  CHECK(gpu_testing::contains(m, "CUBLAS_COMPUTE_32F_FAST_TF32 (CUBLAS_STATUS_NOT_SUPPORTED)"));
}

TEST_CASE("gemm: an empty C ignores ldc; a non-empty one checks it") {
  // m == 0 or n == 0 writes nothing, so ldc is not looked at (as cbq::blas::gemm).
  Tensor<float> a(Shape{4, 4}, Device::cuda), b(Shape{4, 4}, Device::cuda),
      c(Shape{4, 4}, Device::cuda);
  ops::gemm<float>(Device::cuda, false, false, 0, 4, 4, 1.0f, a.data(), 4, b.data(), 4, 0.0f,
                   c.data(), 0);
  ops::gemm<float>(Device::cuda, false, false, 4, 0, 4, 1.0f, a.data(), 4, b.data(), 4, 0.0f,
                   c.data(), 0);
  const std::string message = gpu_testing::error_message([&] {
    ops::gemm<float>(Device::cuda, false, false, 4, 4, 4, 1.0f, a.data(), 4, b.data(), 4, 0.0f,
                     c.data(), 3);
  });
  CHECK(gpu_testing::contains(message, "ldc = 3 < n = 4"));
}

TEST_CASE("gemm: plans are cached per shape") {
  const Tensor<float> a = randn<float>(Shape{19, 23}, 1).to(Device::cuda);
  const Tensor<float> b = randn<float>(Shape{23, 29}, 2).to(Device::cuda);
  Tensor<float> c(Shape{19, 29}, Device::cuda);
  cuda::Context& ctx = cuda::default_context();
  cuda::gemm<float>(ctx, false, false, 19, 29, 23, 1.0f, a.data(), 23, b.data(), 29, 0.0f, c.data(),
                    29);
  const std::size_t plans = ctx.num_gemm_plans();
  for (int i = 0; i < 3; ++i)
    cuda::gemm<float>(ctx, false, false, 19, 29, 23, 1.0f, a.data(), 23, b.data(), 29, 0.0f,
                      c.data(), 29);
  CHECK(ctx.num_gemm_plans() == plans);
  // A new transpose is a new plan: c2 (23, 29) = aᵀ (23, 19) · c (19, 29).
  Tensor<float> c2(Shape{23, 29}, Device::cuda);
  cuda::gemm<float>(ctx, true, false, 23, 29, 19, 1.0f, a.data(), 23, c.data(), 29, 0.0f, c2.data(),
                    29);
  CHECK(ctx.num_gemm_plans() == plans + 1);
  ctx.synchronize();
}

TEST_CASE_TEMPLATE("matmul: CUDA matches CPU forward and backward, all transposes", T, float,
                   double) {
  check_matmul<T>(cuda::MathMode::fp32);
}

TEST_CASE("matmul: TF32 mode stays within its looser tolerance") {
  check_matmul<float>(cuda::MathMode::tf32);
}

TEST_CASE_TEMPLATE("linear: CUDA matches CPU with and without bias", T, float, double) {
  check_linear<T>(cuda::MathMode::fp32);
}

TEST_CASE("linear: TF32 mode stays within its looser tolerance") {
  check_linear<float>(cuda::MathMode::tf32);
}

TEST_CASE("linear at a LLaMA-7B shape (2048 tokens, 4096 -> 11008): CPU vs CUDA, fp32 and TF32") {
  // y = x·Wᵀ (k = 4096), dx = dy·W (k = 11008), dW = dyᵀ·x (k = 2048): the gate/up projection
  // of a 7B window step. Bounds in the normwise relative error e(x) = ‖x − exact‖ / ‖exact‖
  // against OpenBLAS in double on the same float inputs:
  //   e_cpu = e(OpenBLAS float): what FP32 summation costs on these inputs.
  //   fp32:  e ≤ 4·e_cpu + 2⁻²⁰. Each element is the same k-term dot product summed in another
  //          blocked order; rounding errors of such sums grow like √k·u with the order only
  //          changing the constant (Higham & Mary 2019), 4× covers it.
  //   TF32:  e ≤ 1.25·e_in + 4·e_cpu + 2⁻²⁰, e_in = e(double on inputs truncated to TF32). How
  //          cuBLASLt converts to TF32 is not documented: truncation errs twice as much as
  //          rounding and is biased, so the truncated emulation bounds either; the product is
  //          then exact on the tensor cores and accumulated in FP32 (the 4·e_cpu term).
  const int64_t tokens = 2048, in = 4096, out = 11008;
  const Tensor<float> x = randn<float>(Shape{tokens, in}, 4100);
  const Tensor<float> w = randn<float>(Shape{out, in}, 4101);
  const Tensor<float> g = randn<float>(Shape{tokens, out}, 4102);
  auto truncated = [](const Tensor<float>& t) {
    Tensor<float> r = t.clone();
    for (int64_t i = 0; i < r.numel(); ++i)
      r[i] = gpu_testing::round_tf32(r[i], gpu_testing::Rounding::toward_zero);
    return r;
  };
  const Tensor<double>* no_bias = nullptr;
  const LinearResult<double> exact =
      run_linear(Device::cpu, x.cast<double>(), w.cast<double>(), no_bias, g.cast<double>());
  const LinearResult<double> emulated =
      run_linear(Device::cpu, truncated(x).cast<double>(), truncated(w).cast<double>(), no_bias,
                 truncated(g).cast<double>());
  const Tensor<float>* no_bias_f = nullptr;
  const LinearResult<float> cpu = run_linear(Device::cpu, x, w, no_bias_f, g);
  auto e = [](const Tensor<float>& a, const Tensor<double>& r) {
    return gpu_testing::norm_rel_error(a.data(), r.data(), r.numel());
  };
  auto e64 = [](const Tensor<double>& a, const Tensor<double>& r) {
    return gpu_testing::norm_rel_error(a.data(), r.data(), r.numel());
  };
  const double e_cpu[3] = {e(cpu.y, exact.y), e(cpu.dx, exact.dx), e(cpu.dw, exact.dw)};
  const double e_in[3] = {e64(emulated.y, exact.y), e64(emulated.dx, exact.dx),
                          e64(emulated.dw, exact.dw)};
  const char* names[3] = {"y", "dx", "dW"};
  for (cuda::MathMode mode : {cuda::MathMode::fp32, cuda::MathMode::tf32}) {
    cuda::MathModeGuard guard(mode);
    const LinearResult<float> gpu = run_linear(Device::cuda, x, w, no_bias_f, g);
    const Tensor<float>* got[3] = {&gpu.y, &gpu.dx, &gpu.dw};
    const Tensor<double>* ex[3] = {&exact.y, &exact.dx, &exact.dw};
    for (int i = 0; i < 3; ++i) {
      const double err = e(*got[i], *ex[i]);
      const double bound =
          (mode == cuda::MathMode::tf32 ? 1.25 * e_in[i] : 0.0) + 4 * e_cpu[i] + 0x1p-20;
      MESSAGE("linear 2048 x 4096 -> 11008, ", cuda::math_mode_name(mode), " ", names[i],
              ": e_gpu ", err, ", e_cpu ", e_cpu[i], ", e_in(TF32, truncated) ", e_in[i],
              ", bound ", bound);
      CAPTURE(names[i]);
      CAPTURE(cuda::math_mode_name(mode));
      CHECK(err <= bound);
    }
  }
}

TEST_CASE("matmul: CPU operands on a CUDA tape give a clear error") {
  // matmul (the GEMM hook): CPU operands, CUDA tape.
  Tape<float> tape(Device::cuda);
  Var<float> m_cpu = tape.input(randn<float>(Shape{2, 2}, 2));
  const std::string matmul = gpu_testing::error_message([&] { ops::matmul(m_cpu, m_cpu); });
  CHECK(gpu_testing::contains(matmul, "matmul"));
  CHECK(gpu_testing::contains(matmul, "different devices"));
}
