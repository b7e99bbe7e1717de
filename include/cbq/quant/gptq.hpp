#pragma once
// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
// Pre-trained Transformers"), as the reference implementation (IST-DASLab/gptq, gptq.py) runs it:
//
//   H = 2/n Σ x xᵀ over the n calibration rows (double, running-average reweighting)
//   dead columns (H_ii = 0): H_ii := 1, W[:, i] := 0
//   act-order: columns permuted by decreasing diag H (stable), un-permuted at the end
//   H += λ·I with λ = percdamp · mean(diag H)
//   U = upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), via Cholesky of H, inversion, Cholesky
//   for each column j (in blocks of `block_size` with lazy batch updates):
//       q_j = quant(w_j);  e_j = (w_j − q_j) / U_jj;  w_k −= e_j · U_jk for k > j
//   per-group (s, z) found when a group starts, from the weights as the current block of
//   `block_size` columns began (the reference's; reference_group_params = false: from the fully
//   updated weights), or all before the loop with static_groups.
//
// The working precision is double (the reference works in float32); scales and zero-points
// are float, as QuantizedWeight stores them, and the error fed back is the exact float value
// QuantizedWeight::dequantize() returns. docs/BASELINES.md lists what matches the reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "cbq/core/blas.hpp"
#include "cbq/core/error.hpp"
#include "cbq/core/linalg.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/tensor.hpp"
#include "cbq/quant/grid.hpp"
#include "cbq/quant/rtn.hpp"

namespace cbq::quant {

// Accumulates the GPTQ Hessian H = 2/n Σ_rows x xᵀ of one linear layer's input over
// calibration batches (T, in) — or (..., in), every leading index a row — in double, with the
// reference's running-average reweighting H ← H·n/(n+t) + (2/(n+t))·XᵀX, n counting rows.
// (The reference counts sequences instead of rows; H differs by a constant factor, which GPTQ's
// result does not depend on: the dampening is relative to mean(diag H).)
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t in_features, std::string layer = "layer")
      : layer_(std::move(layer)), in_(in_features) {
    CBQ_CHECK(in_features > 0, "HessianAccumulator({}): in_features must be positive, got {}",
              layer_, in_features);
    h_.assign(static_cast<std::size_t>(in_ * in_), 0.0);
  }

  template <class T>
  void add_batch(const Tensor<T>& x) {
    CBQ_CHECK(x.is_cpu(), "HessianAccumulator({}): batch {} is not on the CPU", layer_, batches_);
    CBQ_CHECK(x.ndim() >= 1 && x.shape().cols() == in_,
              "HessianAccumulator({}): batch {} has shape {}, expected (..., {})", layer_, batches_,
              x.shape(), in_);
    const Tensor<T> c = x.contiguous();
    const int64_t t = c.shape().rows();
    CBQ_CHECK(t > 0 && c.numel() > 0, "HessianAccumulator({}): batch {} of shape {} has no rows",
              layer_, batches_, x.shape());
    buf_.resize(static_cast<std::size_t>(t * in_));
    for (int64_t k = 0; k < t * in_; ++k) {
      const double v = static_cast<double>(c[k]);
      CBQ_CHECK(std::isfinite(v),
                "HessianAccumulator({}): non-finite activation {} at row {} column {} of batch {}",
                layer_, v, k / in_, k % in_, batches_);
      buf_[static_cast<std::size_t>(k)] = v;
    }
    const double beta = static_cast<double>(rows_) / static_cast<double>(rows_ + t);
    rows_ += t;
    const double alpha = 2.0 / static_cast<double>(rows_);
    // Upper triangle of H := beta·H + alpha·XᵀX.
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(in_), static_cast<int>(t),
                alpha, buf_.data(), static_cast<int>(in_), beta, h_.data(), static_cast<int>(in_));
    ++batches_;
  }

  // Takes in another accumulator's batches of the same layer (a thread's share of the samples):
  // H becomes the mean over both sets of rows, as if one had seen them all.
  void merge(const HessianAccumulator& other) {
    CBQ_CHECK(other.in_ == in_, "HessianAccumulator({}): cannot merge {} features into {}", layer_,
              other.in_, in_);
    if (other.rows_ == 0) return;
    const double total = static_cast<double>(rows_ + other.rows_);
    const double a = static_cast<double>(rows_) / total;
    const double b = static_cast<double>(other.rows_) / total;
    for (std::size_t k = 0; k < h_.size(); ++k) h_[k] = a * h_[k] + b * other.h_[k];
    rows_ += other.rows_;
    batches_ += other.batches_;
  }

  // The full symmetric (in, in) Hessian.
  Tensor<double> hessian() const {
    Tensor<double> h = Tensor<double>::empty(Shape{in_, in_});
    for (int64_t i = 0; i < in_; ++i)
      for (int64_t j = i; j < in_; ++j)
        h[i * in_ + j] = h[j * in_ + i] = h_[static_cast<std::size_t>(i * in_ + j)];
    return h;
  }

  int64_t in_features() const { return in_; }
  int64_t rows() const { return rows_; }
  int64_t batches() const { return batches_; }
  const std::string& layer() const { return layer_; }
  void reset() {
    std::fill(h_.begin(), h_.end(), 0.0);
    rows_ = batches_ = 0;
  }

 private:
  std::string layer_;
  int64_t in_;
  std::vector<double> h_;  // upper triangle valid
  std::vector<double> buf_;
  int64_t rows_ = 0, batches_ = 0;
};

struct GptqOptions {
  double percdamp = 0.01;      // λ = percdamp · mean(diag H)
  int64_t block_size = 128;    // columns per lazy batch update (a performance knob only)
  bool act_order = false;      // process columns by decreasing diag H
  bool static_groups = false;  // per-group (s, z) from the unmodified weight, before the loop
  // Where a dynamic group's (s, z) come from when the group starts inside a lazy-batch block:
  // true (the reference, gptq.py): from its outer W, whose columns inside the current block
  //       lack this block's updates so far (the result depends on block_size);
  // false: from the fully updated current weights (the unblocked algorithm; independent of
  //       block_size). The reference's choice is the default: it is what the published GPTQ
  //       numbers use, and on stories260K it is not worse (docs/BASELINES.md).
  bool reference_group_params = true;
};

struct GptqResult {
  QuantizedWeight weight;     // codes (original column order), scales, zero-points, g_idx
  Tensor<float> dequantized;  // (rows, cols), == weight.dequantize() exactly
  // (rows, cols): the error-compensated weight each column was rounded from (round-to-nearest of
  // it under weight's grid gives weight's codes); a starting point for learned rounding.
  Tensor<float> updated;
  double loss = 0;            // Σ (w − q)² / U_jj² / 2, the reference's "error"
  double damp = 0;            // λ added to the diagonal
  int64_t dead_columns = 0;   // columns with H_ii = 0 (zeroed)
  std::vector<int64_t> perm;  // act-order: perm[k] = original column processed k-th
};

// GPTQ-quantizes W (out, in) given the Hessian H (in, in) of its input. Only the lower triangle
// of H is read (it must be symmetric). `layer` names the layer in errors.
inline GptqResult gptq_quantize(const Tensor<float>& w_in, const Tensor<double>& h_in,
                                const GridSpec& spec, const GptqOptions& opt = {},
                                std::string_view layer = "layer") {
  detail::check_weight(w_in, "gptq", layer);
  {
    const std::string where = fmt::format("gptq({})", layer);
    spec.validate(where.c_str());
  }
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  CBQ_CHECK(h_in.defined() && h_in.ndim() == 2 && h_in.size(0) == cols && h_in.size(1) == cols,
            "gptq({}): Hessian of shape {} does not match the weight's {} input columns (shape {})",
            layer, h_in.shape(), cols, w_in.shape());
  CBQ_CHECK(h_in.is_cpu(), "gptq({}): Hessian must be on the CPU", layer);
  CBQ_CHECK(opt.block_size > 0, "gptq({}): block size must be positive, got {}", layer,
            opt.block_size);
  CBQ_CHECK(std::isfinite(opt.percdamp) && opt.percdamp >= 0,
            "gptq({}): percdamp must be finite and non-negative, got {}", layer, opt.percdamp);
  const Tensor<float> wf = w_in.contiguous();
  detail::check_finite_weight(wf, "gptq", layer);
  const Tensor<double> hc = h_in.contiguous();
  {
    double dmax = 0;
    for (int64_t i = 0; i < cols; ++i) dmax = std::max(dmax, std::abs(hc[i * cols + i]));
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        const double a = hc[i * cols + j], b = hc[j * cols + i];
        CBQ_CHECK(std::isfinite(a), "gptq({}): Hessian entry ({}, {}) is {}", layer, i, j, a);
        CBQ_CHECK(std::abs(a - b) <= 1e-6 * dmax,
                  "gptq({}): Hessian is not symmetric: H({}, {}) = {} but H({}, {}) = {}", layer, i,
                  j, a, j, i, b);
      }
  }

  const bool grouped = spec.granularity == Granularity::per_group;
  const int64_t G = grouped ? spec.group_size : cols;
  const int64_t ng = spec.groups_per_row(cols);
  GptqResult res;
  QuantizedWeight& qw = res.weight;
  qw.spec = spec;
  qw.scale = Tensor<float>(spec.param_shape(rows, cols));
  qw.zero = Tensor<float>(spec.param_shape(rows, cols));
  qw.codes = Tensor<uint8_t>::empty(Shape{rows, cols});

  // Per-tensor / per-channel parameters come from the original W (the reference calls
  // find_params before zeroing dead columns).
  if (!grouped) init_minmax(wf, spec, qw.scale, qw.zero);

  std::vector<double> w(static_cast<std::size_t>(rows * cols));
  for (int64_t k = 0; k < rows * cols; ++k) w[static_cast<std::size_t>(k)] = wf[k];
  std::vector<double> h(hc.data(), hc.data() + cols * cols);

  for (int64_t i = 0; i < cols; ++i) {
    if (h[static_cast<std::size_t>(i * cols + i)] == 0) {
      h[static_cast<std::size_t>(i * cols + i)] = 1;
      for (int64_t r = 0; r < rows; ++r) w[static_cast<std::size_t>(r * cols + i)] = 0;
      ++res.dead_columns;
    }
  }

  // Static groups: (s, z) of every natural group from W after dead-column zeroing.
  if (grouped && opt.static_groups) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < ng; ++g) {
        double lo = w[static_cast<std::size_t>(r * cols + g * G)], hi = lo;
        for (int64_t c = g * G; c < std::min(cols, (g + 1) * G); ++c) {
          lo = std::min(lo, w[static_cast<std::size_t>(r * cols + c)]);
          hi = std::max(hi, w[static_cast<std::size_t>(r * cols + c)]);
        }
        minmax_params(static_cast<float>(lo), static_cast<float>(hi), spec, qw.scale[r * ng + g],
                      qw.zero[r * ng + g]);
      }
  }

  // Act-order permutation (stable: ties keep their original order).
  std::vector<int64_t> perm(static_cast<std::size_t>(cols));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (opt.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return h[static_cast<std::size_t>(a * cols + a)] > h[static_cast<std::size_t>(b * cols + b)];
    });
    std::vector<double> wp(w.size()), hp(h.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k)
        wp[static_cast<std::size_t>(r * cols + k)] =
            w[static_cast<std::size_t>(r * cols + perm[static_cast<std::size_t>(k)])];
    for (int64_t a = 0; a < cols; ++a)
      for (int64_t b = 0; b < cols; ++b)
        hp[static_cast<std::size_t>(a * cols + b)] = h[static_cast<std::size_t>(
            perm[static_cast<std::size_t>(a)] * cols + perm[static_cast<std::size_t>(b)])];
    w.swap(wp);
    h.swap(hp);
  }

  // Dampening and the upper Cholesky factor of H⁻¹.
  double mean_diag = 0;
  for (int64_t i = 0; i < cols; ++i) mean_diag += h[static_cast<std::size_t>(i * cols + i)];
  mean_diag /= static_cast<double>(cols);
  res.damp = opt.percdamp * mean_diag;
  for (int64_t i = 0; i < cols; ++i) h[static_cast<std::size_t>(i * cols + i)] += res.damp;
  std::vector<double> u;
  {
    std::vector<double> hdiag(static_cast<std::size_t>(cols));
    for (int64_t i = 0; i < cols; ++i)
      hdiag[static_cast<std::size_t>(i)] = h[static_cast<std::size_t>(i * cols + i)];
    const linalg::InverseCholeskyStatus st = linalg::inverse_cholesky_upper(h.data(), cols, u);
    if (st.stage != 0) {
      const int64_t k = st.failure.column;
      const int64_t orig = perm[static_cast<std::size_t>(k)];
      if (st.stage == 1)
        fail(
            "gptq({}): Hessian ({} x {}) is not positive definite after dampening by {:.6g} "
            "(percdamp {} of mean diagonal {:.6g}): Cholesky pivot {:.6g} at column {} "
            "(H_ii = {:.6g}); raise percdamp or check the calibration data",
            layer, cols, cols, res.damp, opt.percdamp, mean_diag, st.failure.pivot, orig,
            hdiag[static_cast<std::size_t>(k)]);
      else
        fail(
            "gptq({}): inverse Hessian ({} x {}) lost positive definiteness numerically at "
            "column {} (pivot {:.6g}) after dampening by {:.6g}; H is too ill-conditioned, "
            "raise percdamp (now {})",
            layer, cols, cols, orig, st.failure.pivot, res.damp, opt.percdamp);
    }
  }

  // Column loop with lazy batch updates. Given U, every row is independent (its (s, z) are its
  // own), so the in-block work runs in parallel over rows; the trailing update is one GEMM.
  const int64_t B = std::min(opt.block_size, cols);
  std::vector<double> err(static_cast<std::size_t>(rows * B));
  std::vector<float> deq(static_cast<std::size_t>(rows * cols));  // permuted order
  std::vector<uint8_t> codes(static_cast<std::size_t>(rows * cols));
  std::vector<float> rounded_from(static_cast<std::size_t>(rows * cols));  // permuted order
  std::vector<double> row_loss(static_cast<std::size_t>(rows), 0.0);
  const float qmin = static_cast<float>(spec.qmin());
  const bool dynamic_groups = grouped && !opt.static_groups;
  const double* U = u.data();

  for (int64_t i1 = 0; i1 < cols; i1 += B) {
    const int64_t i2 = std::min(i1 + B, cols), count = i2 - i1;
    parallel_for(rows, 8, [&](int64_t r0, int64_t r1) {
      std::vector<double> stale;
      for (int64_t r = r0; r < r1; ++r) {
        double* wr = w.data() + r * cols;
        double* er = err.data() + r * B;
        if (dynamic_groups && opt.reference_group_params) stale.assign(wr + i1, wr + i2);
        float s = 0, z = 0;
        if (!grouped) {
          const int64_t p = spec.granularity == Granularity::per_tensor ? 0 : r;
          s = qw.scale[p];
          z = qw.zero[p];
        } else if (dynamic_groups && i1 % G != 0) {  // a group carried over from the last block
          s = qw.scale[r * ng + i1 / G];
          z = qw.zero[r * ng + i1 / G];
        }
        for (int64_t i = 0; i < count; ++i) {
          const int64_t j = i1 + i;
          if (dynamic_groups && j % G == 0) {
            const int64_t gend = std::min(j + G, cols);
            double lo = std::numeric_limits<double>::infinity(), hi = -lo;
            for (int64_t c = j; c < gend; ++c) {
              double v;
              if (c < i2) {
                v = opt.reference_group_params ? stale[static_cast<std::size_t>(c - i1)] : wr[c];
              } else {
                v = wr[c];
                if (!opt.reference_group_params)
                  for (int64_t k = 0; k < i; ++k) v -= er[k] * U[(i1 + k) * cols + c];
              }
              lo = std::min(lo, v);
              hi = std::max(hi, v);
            }
            const int64_t p = r * ng + j / G;
            minmax_params(static_cast<float>(lo), static_cast<float>(hi), spec, qw.scale[p],
                          qw.zero[p]);
            s = qw.scale[p];
            z = qw.zero[p];
          } else if (grouped && opt.static_groups) {
            const int64_t p = r * ng + perm[static_cast<std::size_t>(j)] / G;
            s = qw.scale[p];
            z = qw.zero[p];
          }
          const double x = wr[j];
          const double q = quantize_code(x, static_cast<double>(s), static_cast<double>(z), spec);
          const float qf = static_cast<float>(q);
          const float xq = dequantize_code(qf, s, z);  // == QuantizedWeight::value()
          codes[static_cast<std::size_t>(r * cols + j)] = static_cast<uint8_t>(qf - qmin);
          deq[static_cast<std::size_t>(r * cols + j)] = xq;
          rounded_from[static_cast<std::size_t>(r * cols + j)] = static_cast<float>(x);
          const double d = U[j * cols + j];
          const double e = (x - static_cast<double>(xq)) / d;
          row_loss[static_cast<std::size_t>(r)] += e * e / 2;
          er[i] = e;
          const double* uj = U + j * cols;
          for (int64_t c = j + 1; c < i2; ++c) wr[c] -= e * uj[c];
        }
      }
    });
    // W[:, i2:] -= Err (rows, count) · U[i1:i2, i2:]
    if (i2 < cols)
      blas::gemm(false, false, rows, cols - i2, count, -1.0, err.data(), B, U + i1 * cols + i2,
                 cols, 1.0, w.data() + i2, cols);
  }

  // Un-permute into the result.
  res.dequantized = Tensor<float>::empty(Shape{rows, cols});
  res.updated = Tensor<float>::empty(Shape{rows, cols});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t c = perm[static_cast<std::size_t>(k)];
      qw.codes[r * cols + c] = codes[static_cast<std::size_t>(r * cols + k)];
      res.dequantized[r * cols + c] = deq[static_cast<std::size_t>(r * cols + k)];
      res.updated[r * cols + c] = rounded_from[static_cast<std::size_t>(r * cols + k)];
    }
  if (opt.act_order && dynamic_groups) {
    qw.group_index.assign(static_cast<std::size_t>(cols), 0);
    for (int64_t k = 0; k < cols; ++k)
      qw.group_index[static_cast<std::size_t>(perm[static_cast<std::size_t>(k)])] =
          static_cast<int32_t>(k / G);
  }
  for (double l : row_loss) res.loss += l;
  if (opt.act_order) res.perm = std::move(perm);
  return res;
}

// GPTQ with the Hessian of an accumulator (named after its layer).
inline GptqResult gptq_quantize(const Tensor<float>& w, const HessianAccumulator& acc,
                                const GridSpec& spec, const GptqOptions& opt = {}) {
  CBQ_CHECK(acc.rows() > 0, "gptq({}): the Hessian accumulator has seen no calibration rows",
            acc.layer());
  return gptq_quantize(w, acc.hessian(), spec, opt, acc.layer());
}

}  // namespace cbq::quant
