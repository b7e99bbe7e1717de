#pragma once
// attention_map_kl (ops/attention_map_kl.hpp), registered as ops::CudaAttentionMapKl: the mean
// over (query row i, head h) of KL(P*_{h,i} ‖ P_{h,i}) between a target's and a model's attention
// maps. Layout as ops::attention: q*, q (T, Hq·hd), k*, k (T, Hkv·hd), saved (T, Hq, 5) =
// lse*_hi, lse*_lo, lse_hi, lse_lo, KL_i; query head h reads kv head h / (Hq/Hkv).
//
// forward   one block per (i, h), the keys strided over its threads. Three passes over the keys
//           recompute the scores (dot products over hd in double, in four lanes; the CPU's lanes
//           depend on its ISA): the row maxima, then Σ exp(s − max), then KL_i, each reduced over
//           the block in double; the mean over (i, h) is the deterministic two-pass sum_all of the
//           saved KL_i (rounded to T, as the CPU sums them).
// backward  dQ, dQ*: one block per (i, h). Tiles of blockDim keys: each thread recomputes
//           P_ij, P*_ij from the saved log-sum-exps and writes dS_ij, dS*_ij to shared memory;
//           then thread c adds Σ_j dS_ij K_jc over the tile to its column's accumulator, keys in
//           order (the CPU's order).
//           dK, dK*: one block per (key row j, kv head g), the same over the items (i, h), i
//           from j (causal) or 0 to T − 1, the heads of the group inside, in order.
// Every gradient element is owned by one thread of one block and summed in a fixed order in
// double (no atomics): deterministic. Nothing of size T² is stored.
#include <cbq/ops/attention_map_kl.hpp>
#include <cstddef>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace map_kl {

struct Dims {
  int64_t n, hq, hkv, hd;
  bool causal;
  double scale;
  __device__ int64_t group() const { return hq / hkv; }
  __device__ int64_t ldq() const { return hq * hd; }
  __device__ int64_t ldk() const { return hkv * hd; }
};

inline constexpr int64_t kSaved = ops::detail::kAttentionMapKlSaved;

// Σ_c a_c b_c in double, four lanes added in a fixed order.
template <class T>
__device__ inline double dot(const T* a, const T* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    s0 += static_cast<double>(a[c]) * static_cast<double>(b[c]);
    s1 += static_cast<double>(a[c + 1]) * static_cast<double>(b[c + 1]);
    s2 += static_cast<double>(a[c + 2]) * static_cast<double>(b[c + 2]);
    s3 += static_cast<double>(a[c + 3]) * static_cast<double>(b[c + 3]);
  }
  for (; c < n; ++c) s0 += static_cast<double>(a[c]) * static_cast<double>(b[c]);
  return (s0 + s1) + (s2 + s3);
}

template <class T>
__device__ inline double load_pair(const T* src) {
  return static_cast<double>(src[0]) + static_cast<double>(src[1]);
}

template <class T>
__device__ inline void store_pair(T* dst, double x) {
  const T hi = static_cast<T>(x);
  dst[0] = hi;
  dst[1] = static_cast<T>(x - static_cast<double>(hi));
}

// term(r) = KL_r in double
template <class T>
struct KlTerm {
  const T* saved;
  __device__ double operator()(int64_t r) const {
    return static_cast<double>(saved[kSaved * r + 4]);
  }
};

extern __shared__ __align__(16) unsigned char shared_bytes[];

}  // namespace map_kl

// ----------------------------------------------------------------------------
// kernels

// saved (T·Hq, 5); dynamic shared memory: q*_{i,h}, q_{i,h} (2·hd of T)
template <class T>
__global__ void attention_map_kl_forward_kernel(T* saved, const T* qt, const T* kt, const T* q,
                                                const T* k, map_kl::Dims d) {
  __shared__ double scratch[32];
  T* qs_t = reinterpret_cast<T*>(map_kl::shared_bytes);
  T* qs = qs_t + d.hd;
  const int64_t rows = d.n * d.hq, ldq = d.ldq(), ldk = d.ldk();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = r / d.hq, h = r % d.hq, kv = (h / d.group()) * d.hd;
    const int64_t nk = d.causal ? i + 1 : d.n;
    __syncthreads();  // the previous row's readers of qs are done
    for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {
      qs_t[c] = qt[i * ldq + h * d.hd + c];
      qs[c] = q[i * ldq + h * d.hd + c];
    }
    __syncthreads();
    double mt = detail::device_lowest<double>(), m = mt;
    for (int64_t j = threadIdx.x; j < nk; j += blockDim.x) {
      mt = detail::device_max(mt, d.scale * map_kl::dot(qs_t, kt + j * ldk + kv, d.hd));
      m = detail::device_max(m, d.scale * map_kl::dot(qs, k + j * ldk + kv, d.hd));
    }
    mt = detail::block_max(mt, scratch);
    m = detail::block_max(m, scratch);
    double sum_t = 0, sum = 0;
    for (int64_t j = threadIdx.x; j < nk; j += blockDim.x) {
      sum_t += detail::device_exp(d.scale * map_kl::dot(qs_t, kt + j * ldk + kv, d.hd) - mt);
      sum += detail::device_exp(d.scale * map_kl::dot(qs, k + j * ldk + kv, d.hd) - m);
    }
    const double lse_t = mt + detail::device_log(detail::block_sum(sum_t, scratch));
    const double lse = m + detail::device_log(detail::block_sum(sum, scratch));
    double kl = 0;
    for (int64_t j = threadIdx.x; j < nk; j += blockDim.x) {
      const double log_pt = d.scale * map_kl::dot(qs_t, kt + j * ldk + kv, d.hd) - lse_t;
      const double log_p = d.scale * map_kl::dot(qs, k + j * ldk + kv, d.hd) - lse;
      kl += detail::device_exp(log_pt) * (log_pt - log_p);
    }
    kl = detail::block_sum(kl, scratch);
    if (threadIdx.x == 0) {
      T* sv = saved + map_kl::kSaved * r;
      map_kl::store_pair(sv, lse_t);
      map_kl::store_pair(sv + 2, lse);
      sv[4] = static_cast<T>(kl);
    }
  }
}

// dq_t, dq (T, Hq·hd) += scale · dS* K*, scale · dS K (either may be null); one block per (i, h).
// Dynamic shared memory: acc_t, acc (2·hd doubles), ds_t, ds (2·blockDim doubles), q*_{i,h},
// q_{i,h} (2·hd of T).
template <class T>
__global__ void attention_map_kl_dq_kernel(T* dq_t, T* dq, const T* g, const T* qt, const T* kt,
                                           const T* q, const T* k, const T* saved, map_kl::Dims d) {
  double* acc_t = reinterpret_cast<double*>(map_kl::shared_bytes);
  double* acc = acc_t + d.hd;
  double* ds_t = acc + d.hd;
  double* ds = ds_t + blockDim.x;
  T* qs_t = reinterpret_cast<T*>(ds + blockDim.x);
  T* qs = qs_t + d.hd;
  const int64_t rows = d.n * d.hq, ldq = d.ldq(), ldk = d.ldk();
  const double coef = static_cast<double>(g[0]) / static_cast<double>(rows);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = r / d.hq, h = r % d.hq, kv = (h / d.group()) * d.hd;
    const int64_t nk = d.causal ? i + 1 : d.n;
    const T* sv = saved + map_kl::kSaved * r;
    const double lse_t = map_kl::load_pair(sv), lse = map_kl::load_pair(sv + 2);
    const double kl = static_cast<double>(sv[4]);
    __syncthreads();  // the previous row's readers of qs and ds are done
    for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {
      qs_t[c] = qt[i * ldq + h * d.hd + c];
      qs[c] = q[i * ldq + h * d.hd + c];
      acc_t[c] = 0;
      acc[c] = 0;
    }
    for (int64_t j0 = 0; j0 < nk; j0 += blockDim.x) {
      __syncthreads();  // qs loaded; the previous tile's ds consumed
      const int64_t j = j0 + threadIdx.x;
      if (j < nk) {
        const double log_pt = d.scale * map_kl::dot(qs_t, kt + j * ldk + kv, d.hd) - lse_t;
        const double log_p = d.scale * map_kl::dot(qs, k + j * ldk + kv, d.hd) - lse;
        const double pt = detail::device_exp(log_pt);
        ds_t[threadIdx.x] = coef * pt * (log_pt - log_p - kl);
        ds[threadIdx.x] = coef * (detail::device_exp(log_p) - pt);
      }
      __syncthreads();
      const int64_t count = nk - j0 < blockDim.x ? nk - j0 : static_cast<int64_t>(blockDim.x);
      for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {
        double a_t = acc_t[c], a = acc[c];
        for (int64_t u = 0; u < count; ++u) {
          const int64_t at = (j0 + u) * ldk + kv + c;
          if (dq_t) a_t += ds_t[u] * static_cast<double>(kt[at]);
          if (dq) a += ds[u] * static_cast<double>(k[at]);
        }
        acc_t[c] = a_t;
        acc[c] = a;
      }
    }
    for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {  // each thread its own columns
      if (dq_t) dq_t[i * ldq + h * d.hd + c] += static_cast<T>(d.scale * acc_t[c]);
      if (dq) dq[i * ldq + h * d.hd + c] += static_cast<T>(d.scale * acc[c]);
    }
  }
}

// dk_t, dk (T, Hkv·hd) += scale · Σ_h dS*ᵀ Q*_h, scale · Σ_h dSᵀ Q_h (either may be null); one
// block per (key row j, kv head g) over the items u = (i − i0)·group + (h − g·group). Dynamic
// shared memory as attention_map_kl_dq_kernel, with k*_{j,g}, k_{j,g} in place of the q rows.
template <class T>
__global__ void attention_map_kl_dk_kernel(T* dk_t, T* dk, const T* g, const T* qt, const T* kt,
                                           const T* q, const T* k, const T* saved, map_kl::Dims d) {
  double* acc_t = reinterpret_cast<double*>(map_kl::shared_bytes);
  double* acc = acc_t + d.hd;
  double* ds_t = acc + d.hd;
  double* ds = ds_t + blockDim.x;
  T* ks_t = reinterpret_cast<T*>(ds + blockDim.x);
  T* ks = ks_t + d.hd;
  const int64_t group = d.group(), ldq = d.ldq(), ldk = d.ldk();
  const double coef = static_cast<double>(g[0]) / static_cast<double>(d.n * d.hq);
  for (int64_t r = blockIdx.x; r < d.n * d.hkv; r += gridDim.x) {
    const int64_t j = r / d.hkv, gk = r % d.hkv, kv = gk * d.hd;
    const int64_t i0 = d.causal ? j : 0, items = (d.n - i0) * group;
    __syncthreads();  // the previous row's readers of ks and ds are done
    for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {
      ks_t[c] = kt[j * ldk + kv + c];
      ks[c] = k[j * ldk + kv + c];
      acc_t[c] = 0;
      acc[c] = 0;
    }
    for (int64_t u0 = 0; u0 < items; u0 += blockDim.x) {
      __syncthreads();  // ks loaded; the previous tile's ds consumed
      const int64_t u = u0 + threadIdx.x;
      if (u < items) {
        const int64_t i = i0 + u / group, h = gk * group + u % group;
        const T* sv = saved + map_kl::kSaved * (i * d.hq + h);
        const double log_pt =
            d.scale * map_kl::dot(qt + i * ldq + h * d.hd, ks_t, d.hd) - map_kl::load_pair(sv);
        const double log_p =
            d.scale * map_kl::dot(q + i * ldq + h * d.hd, ks, d.hd) - map_kl::load_pair(sv + 2);
        const double pt = detail::device_exp(log_pt);
        ds_t[threadIdx.x] = coef * pt * (log_pt - log_p - static_cast<double>(sv[4]));
        ds[threadIdx.x] = coef * (detail::device_exp(log_p) - pt);
      }
      __syncthreads();
      const int64_t count = items - u0 < blockDim.x ? items - u0 : static_cast<int64_t>(blockDim.x);
      for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {
        double a_t = acc_t[c], a = acc[c];
        for (int64_t v = 0; v < count; ++v) {
          const int64_t i = i0 + (u0 + v) / group, h = gk * group + (u0 + v) % group;
          const int64_t at = i * ldq + h * d.hd + c;
          if (dk_t) a_t += ds_t[v] * static_cast<double>(qt[at]);
          if (dk) a += ds[v] * static_cast<double>(q[at]);
        }
        acc_t[c] = a_t;
        acc[c] = a;
      }
    }
    for (int64_t c = threadIdx.x; c < d.hd; c += blockDim.x) {  // each thread its own columns
      if (dk_t) dk_t[j * ldk + kv + c] += static_cast<T>(d.scale * acc_t[c]);
      if (dk) dk[j * ldk + kv + c] += static_cast<T>(d.scale * acc[c]);
    }
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void attention_map_kl_forward(T* out, T* saved, const T* q_target, const T* k_target, const T* q,
                              const T* k, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                              int64_t head_dim, bool causal, double scale) {
  const int64_t rows = seq_len * n_heads;
  if (rows <= 0) return;
  const map_kl::Dims d{seq_len, n_heads, n_kv_heads, head_dim, causal, scale};
  const std::size_t bytes = 2 * static_cast<std::size_t>(head_dim) * sizeof(T);
  detail::allow_shared(attention_map_kl_forward_kernel<T>, bytes);
  attention_map_kl_forward_kernel<T>
      <<<detail::row_grid_size(rows), detail::kRowBlockSize, bytes, detail::current_stream()>>>(
          saved, q_target, k_target, q, k, d);
  CBQ_CUDA_CHECK_LAUNCH("attention_map_kl_forward_kernel");
  detail::sum_all(out, map_kl::KlTerm<T>{saved}, rows, static_cast<double>(rows));
}

template <class T>
void attention_map_kl_backward(T* dq_target, T* dk_target, T* dq, T* dk, const T* g,
                               const T* q_target, const T* k_target, const T* q, const T* k,
                               const T* saved, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                               int64_t head_dim, bool causal, double scale) {
  if (seq_len <= 0) return;
  const map_kl::Dims d{seq_len, n_heads, n_kv_heads, head_dim, causal, scale};
  const std::size_t bytes =
      (2 * static_cast<std::size_t>(head_dim) + 2 * detail::kRowBlockSize) * sizeof(double) +
      2 * static_cast<std::size_t>(head_dim) * sizeof(T);
  cudaStream_t stream = detail::current_stream();
  if (dq_target || dq) {
    detail::allow_shared(attention_map_kl_dq_kernel<T>, bytes);
    attention_map_kl_dq_kernel<T>
        <<<detail::row_grid_size(seq_len * n_heads), detail::kRowBlockSize, bytes, stream>>>(
            dq_target, dq, g, q_target, k_target, q, k, saved, d);
    CBQ_CUDA_CHECK_LAUNCH("attention_map_kl_dq_kernel");
  }
  if (dk_target || dk) {
    detail::allow_shared(attention_map_kl_dk_kernel<T>, bytes);
    attention_map_kl_dk_kernel<T>
        <<<detail::row_grid_size(seq_len * n_kv_heads), detail::kRowBlockSize, bytes, stream>>>(
            dk_target, dk, g, q_target, k_target, q, k, saved, d);
    CBQ_CUDA_CHECK_LAUNCH("attention_map_kl_dk_kernel");
  }
}

namespace detail {
inline const bool attention_map_kl_registered = [] {
  ops::CudaAttentionMapKl<float>::forward = &attention_map_kl_forward<float>;
  ops::CudaAttentionMapKl<float>::backward = &attention_map_kl_backward<float>;
  ops::CudaAttentionMapKl<double>::forward = &attention_map_kl_forward<double>;
  ops::CudaAttentionMapKl<double>::backward = &attention_map_kl_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
