#pragma once
// Row-major GEMM through cuBLASLt, registered as ops::CudaGemm<float/double>::gemm.
//   C (m, n) = alpha · op(A) · op(B) + beta · C, the contract of cbq::blas::gemm:
//   A is (m, k) with leading dimension lda, or (k, m) when trans_a; B is (k, n), or (n, k) when
//   trans_b; C is (m, n) with leading dimension ldc. All pointers on the device.
//
// Row-major trick: cuBLASLt is column-major, and a row-major (r, c) matrix with leading
// dimension ld is the column-major (c, r) matrix with the same ld, i.e. its transpose. So
//   C = op(A)·op(B)  (row-major)   ⇔   Cᵀ = op(B)ᵀ·op(A)ᵀ  (column-major)
// and we call the column-major GEMM with the operands swapped: (B, A), sizes (n, m, k), the
// transpose flags unchanged.
//
// float runs in the context's MathMode (fp32 or TF32); double uses CUBLAS_COMPUTE_64F. The
// descriptors and the heuristic's algorithm are built once per shape, transposes, leading
// dimensions and pointer alignment, and cached in the context. Where the heuristic has no TF32
// algorithm (an odd alignment, say), the plan uses FP32 compute (ctx.num_gemm_fallbacks());
// where it has none at all, the error names shapes, layouts, types and compute types tried.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cbq/ops/matmul.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/context.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// C (m, n), leading dimension ldc: C = beta · C (C = 0 when beta == 0, so NaNs do not survive).
// The k == 0 case of a GEMM, which cuBLASLt does not accept.
template <class T>
__global__ void scale_matrix_kernel(T* c, T beta, int64_t m, int64_t n, int64_t ldc) {
  const int64_t total = m * n;
  for (int64_t i = detail::global_index(); i < total; i += detail::grid_stride()) {
    T& x = c[(i / n) * ldc + i % n];
    x = beta == T(0) ? T(0) : beta * x;
  }
}

// ----------------------------------------------------------------------------
// launchers

namespace detail {

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "cbq::cuda::gemm supports float and double");
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_64F;
}

template <class T>
cublasComputeType_t compute_type(MathMode mode) {
  if constexpr (std::is_same_v<T, double>) {
    return CUBLAS_COMPUTE_64F;
  } else {
    return mode == MathMode::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  }
}

// Largest power of two (at most 256) that divides the address.
inline uint32_t pointer_alignment(const void* ptr) {
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

inline const char* compute_type_name(cublasComputeType_t c) {
  switch (c) {
    case CUBLAS_COMPUTE_32F:
      return "CUBLAS_COMPUTE_32F";
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      return "CUBLAS_COMPUTE_32F_FAST_TF32";
    case CUBLAS_COMPUTE_64F:
      return "CUBLAS_COMPUTE_64F";
    default:
      return "another compute type";
  }
}

inline const char* data_type_name(cudaDataType_t t) {
  return t == CUDA_R_32F ? "CUDA_R_32F" : t == CUDA_R_64F ? "CUDA_R_64F" : "another data type";
}

// The message when cuBLASLt has no algorithm for a GEMM: the caller's row-major problem and the
// column-major call it became (see the top of this file), the layouts, types, alignments,
// workspace and what each compute type tried answered.
inline std::string no_algorithm_message(const GemmKey& key, std::size_t workspace,
                                        const std::string& attempts) {
  // The key is the column-major call: (m, n, k) = (n, m, k) of the caller, operands swapped.
  return fmt::format(
      "cuda gemm: cuBLASLt has no algorithm for the row-major GEMM C ({} x {}) = op(A) · op(B) "
      "with k = {}, A {} (lda {}, {}-byte aligned), B {} (ldb {}, {}-byte aligned), C ldc {} "
      "({}-byte aligned); as the column-major call ({}, {}, {}) trans ({}, {}), data type {}, "
      "workspace {} bytes; tried {}",
      key.n, key.m, key.k, key.trans_b ? "transposed" : "as stored", key.ldb, key.align_b,
      key.trans_a ? "transposed" : "as stored", key.lda, key.align_a, key.ldc, key.align_c, key.m,
      key.n, key.k, key.trans_a ? "T" : "N", key.trans_b ? "T" : "N", data_type_name(key.type),
      workspace, attempts);
}

// Builds the descriptors for a column-major D = op(A)·op(B) + C with D = C, then asks the
// heuristic for the best algorithm that fits the workspace and the pointers' alignment. When
// there is none (the heuristic then answers CUBLAS_STATUS_NOT_SUPPORTED itself, or finds no
// result), a TF32 request falls back to full FP32 compute (never less accurate); without any
// algorithm the error names the problem (no_algorithm_message).
inline std::unique_ptr<GemmPlan> make_gemm_plan(const Context& ctx, const GemmKey& key) {
  auto plan = std::make_unique<GemmPlan>();
  const cudaDataType_t scale_type = key.type;
  const cublasOperation_t op_a = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  // Stored (column-major) shapes: A is (m, k) or (k, m) when transposed; B is (k, n) or (n, k).
  const auto rows_a = static_cast<uint64_t>(key.trans_a ? key.k : key.m);
  const auto cols_a = static_cast<uint64_t>(key.trans_a ? key.m : key.k);
  const auto rows_b = static_cast<uint64_t>(key.trans_b ? key.n : key.k);
  const auto cols_b = static_cast<uint64_t>(key.trans_b ? key.k : key.n);
  CBQ_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, key.type, rows_a, cols_a, key.lda));
  CBQ_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, key.type, rows_b, cols_b, key.ldb));
  CBQ_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, key.type, static_cast<uint64_t>(key.m),
                                              static_cast<uint64_t>(key.n), key.ldc));

  cublasLtMatmulPreference_t pref = nullptr;
  CBQ_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  // The preference is destroyed on every path out of this function.
  std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, decltype(&cublasLtMatmulPreferenceDestroy)>
      pref_owner(pref, &cublasLtMatmulPreferenceDestroy);
  const uint64_t workspace = ctx.workspace_bytes();
  CBQ_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
  CBQ_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_a, sizeof(key.align_a)));
  CBQ_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_b, sizeof(key.align_b)));
  CBQ_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_c, sizeof(key.align_c)));
  CBQ_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_c, sizeof(key.align_c)));

  cublasComputeType_t attempts[2] = {key.compute, key.compute};
  int n_attempts = 1;
  if (key.compute == CUBLAS_COMPUTE_32F_FAST_TF32) attempts[n_attempts++] = CUBLAS_COMPUTE_32F;
  std::string tried;
  for (int i = 0; i < n_attempts; ++i) {
    if (plan->op) {
      CBQ_CUBLAS_CHECK(cublasLtMatmulDescDestroy(plan->op));
      plan->op = nullptr;
    }
    CBQ_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, attempts[i], scale_type));
    CBQ_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    CBQ_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        ctx.cublaslt(), plan->op, plan->a, plan->b, plan->c, plan->c, pref, 1, &result, &found);
    if (status == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
      plan->algo = result.algo;
      plan->workspace_bytes = result.workspaceSize;
      plan->compute = attempts[i];
      plan->fallback = i > 0;
      return plan;
    }
    // NOT_SUPPORTED is the heuristic's "no algorithm"; anything else is an error of its own.
    if (status != CUBLAS_STATUS_SUCCESS && status != CUBLAS_STATUS_NOT_SUPPORTED)
      throw_cublas_error(status, "cublasLtMatmulAlgoGetHeuristic(...)", __FILE__, __LINE__);
    tried += fmt::format("{}{} ({})", i ? ", then " : "", compute_type_name(attempts[i]),
                         status != CUBLAS_STATUS_SUCCESS ? cublasLtGetStatusName(status)
                         : found == 0                    ? "no result"
                                                         : cublasLtGetStatusName(result.state));
  }
  fail("{}", no_algorithm_message(key, workspace, tried));
}

}  // namespace detail

// Row-major C = alpha · op(A) · op(B) + beta · C on `ctx`'s stream (see the top of this file).
template <class T>
void gemm(Context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  CBQ_CHECK(m >= 0 && n >= 0 && k >= 0, "cuda gemm: negative size ({}, {}, {})", m, n, k);
  if (m == 0 || n == 0) return;  // nothing to write: ldc is not looked at (as cbq::blas::gemm)
  CBQ_CHECK(ldc >= n, "cuda gemm: ldc = {} < n = {} (row-major C is ({}, {}))", ldc, n, m, n);
  if (k == 0) {  // C = beta · C
    scale_matrix_kernel<<<detail::grid_size(m * n), detail::kBlockSize, 0, ctx.stream()>>>(
        c, beta, m, n, ldc);
    CBQ_CUDA_CHECK_LAUNCH("scale_matrix_kernel");
    return;
  }
  CBQ_CHECK(lda >= (trans_a ? m : k), "cuda gemm: lda = {} < {} (row-major A is ({}, {}))", lda,
            trans_a ? m : k, trans_a ? k : m, trans_a ? m : k);
  CBQ_CHECK(ldb >= (trans_b ? k : n), "cuda gemm: ldb = {} < {} (row-major B is ({}, {}))", ldb,
            trans_b ? k : n, trans_b ? n : k, trans_b ? k : n);

  // Column-major call: Cᵀ (n, m) = op(B)ᵀ (n, k) · op(A)ᵀ (k, m).
  const detail::GemmKey key{detail::cuda_data_type<T>(),
                            detail::compute_type<T>(ctx.math_mode()),
                            trans_b,
                            trans_a,
                            n,
                            m,
                            k,
                            ldb,
                            lda,
                            ldc,
                            detail::pointer_alignment(b),
                            detail::pointer_alignment(a),
                            detail::pointer_alignment(c)};
  const detail::GemmPlan& plan =
      ctx.gemm_plan(key, [&] { return detail::make_gemm_plan(ctx, key); });
  CBQ_CUBLAS_CHECK(cublasLtMatmul(ctx.cublaslt(), plan.op, &alpha, b, plan.a, a, plan.b, &beta, c,
                                  plan.c, c, plan.c, &plan.algo, ctx.workspace(),
                                  plan.workspace_bytes, ctx.stream()));
}

// The same on the default context (the signature of ops::CudaGemm<T>::gemm).
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  gemm<T>(default_context(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

namespace detail {
inline const bool gemm_registered = [] {
  ops::CudaGemm<float>::gemm =
      static_cast<void (*)(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                           const float*, int64_t, float, float*, int64_t)>(&gemm<float>);
  ops::CudaGemm<double>::gemm =
      static_cast<void (*)(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t)>(&gemm<double>);
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
