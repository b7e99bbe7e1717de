#pragma once
// matmul: C = op(A) · op(B) for 2-D tensors, op = identity or transpose (GEMM through CBLAS).
//   A is (M, K), or (K, M) when trans_a; B is (K, N), or (N, K) when trans_b; C is (M, N).
// Derivative (with G = dC):
//   d op(A) = G · op(B)ᵀ   → dA = G·op(B)ᵀ (no trans) or op(B)·Gᵀ (trans_a)
//   d op(B) = op(A)ᵀ · G   → dB = op(A)ᵀ·G (no trans) or Gᵀ·op(A) (trans_b)
#include "cbq/core/blas.hpp"
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaGemm {
  // Row-major C (m, n) = alpha · op(A) · op(B) + beta · C, as blas::gemm.
  static inline void (*gemm)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                             const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                             int64_t ldc) = nullptr;
};

template <class T>
struct CpuGemm {
  static void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
    blas::gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
};

// Device-dispatching row-major GEMM on raw pointers (all operands on `device`).
template <class T>
void gemm(Device device, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  kernel_for(device, &CpuGemm<T>::gemm, CudaGemm<T>::gemm, "gemm")(trans_a, trans_b, m, n, k, alpha,
                                                                   a, lda, b, ldb, beta, c, ldc);
}

// Independent GEMMs on `device`: side by side on the CPU (blas::gemm_batch), in turn on the GPU.
template <class T>
void gemm_batch(Device device, const blas::GemmArgs<T>* gemms, int count) {
  if (device == Device::cpu) return blas::gemm_batch(gemms, count);
  for (int i = 0; i < count; ++i) {
    const blas::GemmArgs<T>& g = gemms[i];
    gemm<T>(device, g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta,
            g.c, g.ldc);
  }
}

template <class T>
class MatmulNode;

template <class T>
Var<T> matmul(Var<T> a, Var<T> b, bool trans_a = false, bool trans_b = false) {
  const Tensor<T>& A = a.value();
  const Tensor<T>& B = b.value();
  CBQ_CHECK(A.ndim() == 2 && B.ndim() == 2, "matmul: expected 2-D operands, got {} and {}",
            A.shape(), B.shape());
  check_contiguous("matmul", "A", A);
  check_contiguous("matmul", "B", B);
  check_same_device("matmul", A, B);
  const int64_t m = trans_a ? A.size(1) : A.size(0);
  const int64_t k = trans_a ? A.size(0) : A.size(1);
  const int64_t kb = trans_b ? B.size(1) : B.size(0);
  const int64_t n = trans_b ? B.size(0) : B.size(1);
  CBQ_CHECK(k == kb, "matmul: inner dimensions differ: op(A) is ({}, {}), op(B) is ({}, {})", m, k,
            kb, n);
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a, b});
  Var<T> out = tape.output(Shape{m, n}, rg);
  Tensor<T> C = out.value();
  check_same_device("matmul", C, A);  // the tape allocates on its own device
  gemm<T>(A.device(), trans_a, trans_b, m, n, k, T(1), A.data(), A.size(1), B.data(), B.size(1),
          T(0), C.data(), n);
  if (rg) tape.template record<MatmulNode<T>>(out, a, b, trans_a, trans_b, m, n, k);
  return out;
}

template <class T>
class MatmulNode final : public Node<T> {
 public:
  MatmulNode(Var<T> a, Var<T> b, bool ta, bool tb, int64_t m, int64_t n, int64_t k)
      : a_(a), b_(b), ta_(ta), tb_(tb), m_(m), n_(n), k_(k) {}
  const char* name() const override { return "matmul"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& g = tape.grad(this->output);  // (M, N)
    const Device dev = g.device();
    const T* A = a_.value().data();
    const T* B = b_.value().data();
    const int64_t lda = ta_ ? m_ : k_, ldb = tb_ ? k_ : n_;
    if (a_.requires_grad()) {
      T* dA = a_.grad().data();
      if (!ta_)  // dA (M, K) += G (M, N) · op(B)ᵀ (N, K)
        gemm<T>(dev, false, !tb_, m_, k_, n_, T(1), g.data(), n_, B, ldb, T(1), dA, k_);
      else  // dA (K, M) += op(B) (K, N) · Gᵀ (N, M)
        gemm<T>(dev, tb_, true, k_, m_, n_, T(1), B, ldb, g.data(), n_, T(1), dA, m_);
    }
    if (b_.requires_grad()) {
      T* dB = b_.grad().data();
      if (!tb_)  // dB (K, N) += op(A)ᵀ (K, M) · G (M, N)
        gemm<T>(dev, !ta_, false, k_, n_, m_, T(1), A, lda, g.data(), n_, T(1), dB, n_);
      else  // dB (N, K) += Gᵀ (N, M) · op(A) (M, K)
        gemm<T>(dev, true, ta_, n_, k_, m_, T(1), g.data(), n_, A, lda, T(1), dB, k_);
    }
  }

 private:
  Var<T> a_, b_;
  bool ta_, tb_;
  int64_t m_, n_, k_;
};

}  // namespace cbq::ops
