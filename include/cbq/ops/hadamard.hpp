#pragma once
// hadamard: an orthogonal transform of every n-element chunk of each row, y = x·M
// (docs/ROTATION.md):
//
//   M = D · (H_P ⊗ K) ,   n = P·m,  P a power of two,
//   H_P  the Sylvester–Hadamard matrix of order P divided by √P (a fast Walsh–Hadamard transform,
//        P/2·log2 P butterflies),
//   K    an orthogonal m × m matrix: a Hadamard matrix of order m divided by √m
//        (core/hadamard.hpp: Paley I/II); when n's odd part has no such matrix within n, make()
//        refuses, or on request uses a seeded random orthogonal matrix of the odd part,
//   D    diag(±1) random signs (QuaRot's randomised Hadamard), or the identity.
// HadamardTransform::dense holds a general n × n M = K instead (P = 1, no signs, not orthogonal:
// the fitted R4 of model/rotation.hpp); the host applies it with one GEMM.
//
// Index i = a·m + b (a < P, b < m): (H_P ⊗ K)_{(a,b),(c,e)} = H_P[a][c]·K[b][e], so y = x·M is
//   t = x ⊙ d;  z_(a,e) = Σ_b t_(a,b)·K[b][e];  y_(c,e) = Σ_a H_P[a][c]·z_(a,e)
// and y = x·Mᵀ = x·(H_P ⊗ Kᵀ)·D the same with Kᵀ and the signs applied last.
//
// The op (ops::hadamard) transforms x (..., C), C a multiple of n, chunk by chunk (heads side by
// side: R3 on q/k with n = head_dim, R4 on the MLP activation with n = hidden_dim).
// Derivative: M is constant, so dx += dy·Mᵀ (the same transform, transposed).
// Kernels: CpuHadamard (this file) and CudaHadamard (cuda/cbq/cuda/ops/hadamard.cuh: one thread
// block per chunk, the FWHT in shared memory); K and D live on the tensor's device, copied there
// once per transform (HadamardTransform::apply_on).
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cbq/core/blas.hpp"
#include "cbq/core/hadamard.hpp"
#include "cbq/ops/common.hpp"

namespace cbq::ops {

// out (rows, n) = or += in (rows, n)·M, M = D·(H_P ⊗ K) with P = n/m (transpose: ·Mᵀ);
// kernel K (m × m, row-major, orthonormal), signs D (n) or null; out may equal in.
template <class T>
struct CudaHadamard {
  static inline void (*apply)(const T* in, T* out, int64_t rows, int64_t n, int64_t m,
                              const T* kernel, const T* signs, bool transpose,
                              bool accumulate) = nullptr;
};

template <class T>
struct CpuHadamard {
  // Unnormalised Walsh–Hadamard transform over z with stride m: butterflies on (i, i + h).
  static void fwht_strided(T* z, int64_t n, int64_t m) {
    for (int64_t h = m; h < n; h *= 2)
      for (int64_t base = 0; base < n; base += 2 * h)
        for (int64_t i = base; i < base + h; ++i) {
          const T u = z[i], v = z[i + h];
          z[i] = u + v;
          z[i + h] = u - v;
        }
  }
  static void apply(const T* in, T* out, int64_t rows, int64_t n, int64_t m, const T* K, const T* d,
                    bool transpose, bool accumulate) {
    const int64_t P = n / m;
    const T norm = static_cast<T>(1.0 / std::sqrt(static_cast<double>(P)));
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      std::vector<T> t(static_cast<size_t>(n)), z(static_cast<size_t>(n));
      for (int64_t r = r0; r < r1; ++r) {
        const T* x = in + r * n;
        for (int64_t i = 0; i < n; ++i) t[i] = (d && !transpose) ? x[i] * d[i] : x[i];
        if (m > 1) {  // z = t·(I_P ⊗ K) (or Kᵀ)
          for (int64_t a = 0; a < P; ++a)
            for (int64_t e = 0; e < m; ++e) {
              T s = 0;
              for (int64_t b = 0; b < m; ++b)
                s += t[a * m + b] * (transpose ? K[e * m + b] : K[b * m + e]);
              z[a * m + e] = s;
            }
        } else {
          z.swap(t);
        }
        fwht_strided(z.data(), n, m);
        T* y = out + r * n;
        for (int64_t i = 0; i < n; ++i) {
          T v = z[i] * norm;
          if (d && transpose) v *= d[i];
          y[i] = accumulate ? y[i] + v : v;
        }
      }
    });
  }
};

class HadamardTransform {
 public:
  enum class KernelKind { none, hadamard, random_orthogonal, dense };

  // The transform of size n: K from the smallest m = odd(n)·2^j (j ≥ 0, m | n) that has a
  // Hadamard matrix (core/hadamard.hpp). When none does (e.g. n = 172 = 4·43), a cbq::Error
  // naming n, unless allow_random_orthogonal: then K is a seeded random orthogonal matrix of
  // order odd(n) (still orthogonal, but dense and without the Hadamard's flat spectrum).
  // Random ±1 signs when asked. Deterministic in (n, seed, random_signs, the fallback).
  static HadamardTransform make(int64_t n, uint64_t seed = 0, bool random_signs = false,
                                bool allow_random_orthogonal = false) {
    CBQ_CHECK(n >= 1, "hadamard: transform size {} must be positive", n);
    HadamardTransform h;
    h.n_ = n;
    int64_t odd = n, pow2 = 1;
    while (odd % 2 == 0) {
      odd /= 2;
      pow2 *= 2;
    }
    h.m_ = odd;
    if (odd > 1) {
      std::optional<HadamardMatrix> found;
      for (int64_t m = odd; m <= n && !found; m *= 2) found = hadamard_matrix(m);
      if (found) {
        h.m_ = found->order;
        h.kind_ = KernelKind::hadamard;
        const double scale = 1.0 / std::sqrt(static_cast<double>(h.m_));
        h.kernel_.resize(found->entries.size());
        for (size_t i = 0; i < found->entries.size(); ++i) h.kernel_[i] = found->entries[i] * scale;
        h.description_ = fmt::format("H_{} ⊗ {} [order {}]", n / h.m_, found->construction, h.m_);
      } else {
        CBQ_CHECK(allow_random_orthogonal,
                  "hadamard: no Hadamard transform of size {} = {}·{}: cbq knows no Hadamard "
                  "matrix of order {}·2^j ≤ {} (it builds Sylvester and Paley I/II orders; "
                  "docs/ROTATION.md lists the supported sizes)",
                  n, pow2, odd, odd, n);
        h.kind_ = KernelKind::random_orthogonal;
        h.kernel_ = random_orthogonal(odd, seed ^ 0x9e3779b97f4a7c15ull);
        h.description_ = fmt::format("H_{} ⊗ random orthogonal {}", n / odd, odd);
      }
    } else {
      h.kernel_ = {1.0};
      h.description_ = fmt::format("H_{}", n);
    }
    h.pow2_ = n / h.m_;
    if (random_signs) {
      PortableNormal rng(seed);
      h.signs_.resize(static_cast<size_t>(n));
      for (double& s : h.signs_) s = (rng.bits() >> 63) ? -1.0 : 1.0;
      h.description_ += " with random signs";
    }
    h.kernel_f_.assign(h.kernel_.begin(), h.kernel_.end());
    h.signs_f_.assign(h.signs_.begin(), h.signs_.end());
    return h;
  }

  // A general n × n M (row-major `m`), e.g. a rotation times a fitted scaling; described as given.
  static HadamardTransform dense(int64_t n, std::vector<double> m, std::string description) {
    CBQ_CHECK(n >= 1 && static_cast<int64_t>(m.size()) == n * n,
              "hadamard: a dense transform of size {} needs {} entries, got {}", n, n * n,
              m.size());
    for (double v : m)
      CBQ_CHECK(std::isfinite(v), "hadamard: the dense transform '{}' has a non-finite entry",
                description);
    HadamardTransform h;
    h.n_ = h.m_ = n;
    h.pow2_ = 1;
    h.kind_ = KernelKind::dense;
    h.kernel_ = std::move(m);
    h.kernel_f_.assign(h.kernel_.begin(), h.kernel_.end());
    h.description_ = std::move(description);
    return h;
  }

  int64_t size() const { return n_; }
  int64_t pow2() const { return pow2_; }      // P
  int64_t kernel_size() const { return m_; }  // m
  KernelKind kernel_kind() const { return kind_; }
  bool has_signs() const { return !signs_.empty(); }
  const std::string& description() const { return description_; }
  template <class T>
  const std::vector<T>& kernel() const {
    if constexpr (std::is_same_v<T, float>)
      return kernel_f_;
    else
      return kernel_;
  }
  template <class T>
  const std::vector<T>& signs() const {
    if constexpr (std::is_same_v<T, float>)
      return signs_f_;
    else
      return signs_;
  }

  // out (rows, n) = or += in (rows, n)·M (transpose: ·Mᵀ) with the kernel of `device`, where
  // in and out live; out may equal in.
  template <class T>
  void apply_on(Device device, const T* in, T* out, int64_t rows, bool transpose,
                bool accumulate) const {
    const auto [k, d] = constants<T>(device);
    if (kind_ == KernelKind::dense && device == Device::cpu) {  // out = in·K: one GEMM
      std::vector<T> copy;
      const T* src = in;
      if (in == out) {
        copy.assign(in, in + rows * n_);
        src = copy.data();
      }
      blas::gemm<T>(false, transpose, rows, n_, n_, T(1), src, n_, k, n_, accumulate ? T(1) : T(0),
                    out, n_);
      return;
    }
    kernel_for(device, &CpuHadamard<T>::apply, CudaHadamard<T>::apply, "hadamard")(
        in, out, rows, n_, m_, k, d, transpose, accumulate);
  }
  // The same on the host.
  template <class T>
  void apply(const T* in, T* out, int64_t rows, bool transpose, bool accumulate) const {
    apply_on<T>(Device::cpu, in, out, rows, transpose, accumulate);
  }

  // M as a dense row-major n × n matrix (tests).
  std::vector<double> dense() const {
    std::vector<double> eye(static_cast<size_t>(n_ * n_), 0.0), out(eye.size());
    for (int64_t i = 0; i < n_; ++i) eye[i * n_ + i] = 1.0;
    apply<double>(eye.data(), out.data(), n_, false, false);  // row i of I·M is row i of M
    return out;
  }

 private:
  int64_t n_ = 0, m_ = 1, pow2_ = 1;
  KernelKind kind_ = KernelKind::none;
  std::vector<double> kernel_, signs_;  // K (m × m; orthonormal unless dense), D (n or empty)
  std::vector<float> kernel_f_, signs_f_;
  std::string description_;

  // K and D (null when there are no signs) on `device`, copied there on first use and kept
  // (shared by copies of this transform; safe to call from several threads).
  template <class T>
  std::pair<const T*, const T*> constants(Device device) const {
    if (device == Device::cpu)
      return {kernel<T>().data(), has_signs() ? signs<T>().data() : nullptr};
    DeviceConstants& c = *device_constants_;
    std::lock_guard<std::mutex> lock(c.mutex);
    auto& [k, d] = c.get<T>();
    if (!k.defined()) {
      k = Tensor<T>::from(kernel<T>(), Shape{m_, m_}).to(device);
      if (has_signs()) d = Tensor<T>::from(signs<T>(), Shape{n_}).to(device);
    }
    CBQ_CHECK(k.device() == device, "hadamard: the transform's constants are on {}, not {}",
              device_name(k.device()), device_name(device));
    return {k.data(), d.defined() ? d.data() : nullptr};
  }
  // Device copies of K and D per scalar type (constants()).
  struct DeviceConstants {
    std::mutex mutex;
    std::pair<Tensor<float>, Tensor<float>> f;
    std::pair<Tensor<double>, Tensor<double>> d;
    template <class T>
    std::pair<Tensor<T>, Tensor<T>>& get() {
      if constexpr (std::is_same_v<T, float>)
        return f;
      else
        return d;
    }
  };
  std::shared_ptr<DeviceConstants> device_constants_ = std::make_shared<DeviceConstants>();
};

template <class T>
class HadamardNode final : public Node<T> {
 public:
  HadamardNode(Var<T> x, std::shared_ptr<const HadamardTransform> h, bool transpose)
      : x_(x), h_(std::move(h)), transpose_(transpose) {}
  const char* name() const override { return "hadamard"; }
  void backward(Tape<T>& tape) override {
    if (!x_.requires_grad()) return;
    const Tensor<T>& dy = tape.grad(this->output);
    // dx += dy·Mᵀ (forward ·M), or dy·M (forward ·Mᵀ)
    h_->apply_on(dy.device(), dy.data(), x_.grad().data(), dy.numel() / h_->size(), !transpose_,
                 true);
  }

 private:
  Var<T> x_;
  std::shared_ptr<const HadamardTransform> h_;
  bool transpose_;
};

// y = x·M on every n-element chunk of x (..., C), C a multiple of n = h->size(); transpose: ·Mᵀ.
template <class T>
Var<T> hadamard(Var<T> x, std::shared_ptr<const HadamardTransform> h, bool transpose = false) {
  CBQ_CHECK(h != nullptr, "hadamard: no transform given");
  const Tensor<T>& X = x.value();
  CBQ_CHECK(X.ndim() >= 1 && X.size(-1) % h->size() == 0,
            "hadamard: the last dimension of input {} is not a multiple of the transform size {}",
            X.shape(), h->size());
  check_contiguous("hadamard", "input", X);
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x});
  Var<T> out = tape.output(X.shape(), rg);
  Tensor<T> Y = out.value();
  check_same_device("hadamard", Y, X);
  h->apply_on(X.device(), X.data(), Y.data(), X.numel() / h->size(), transpose, false);
  if (rg) tape.template record<HadamardNode<T>>(out, x, std::move(h), transpose);
  return out;
}

}  // namespace cbq::ops
