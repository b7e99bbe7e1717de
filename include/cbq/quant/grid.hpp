#pragma once
// The uniform quantization grid shared by every quantizer, RTN, GPTQ and the exporters.
//
//   asymmetric: q = clamp(round(x/s) + z, 0, 2^b − 1),            x̂ = s·(q − z)
//   symmetric:  q = clamp(round(x/s), −2^(b−1), 2^(b−1) − 1),     x̂ = s·q      (z = 0)
//
// Rounding is half-to-even (std::nearbyint in the default mode), as torch.round, so our
// results match PyTorch-based GPTQ references bit for bit.
//
// Granularity of (s, z) for a weight (rows = out, cols = in):
//   per-tensor  one pair for the whole matrix           → params shape (1, 1)
//   per-channel one pair per row                        → (rows, 1)
//   per-group G one pair per row per G consecutive cols → (rows, ceil(cols / G)); when G does not
//               divide cols the LAST group of each row is short (cols mod G columns) and gets its
//               own (s, z) from its own min/max.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::quant {

enum class Granularity { per_tensor, per_channel, per_group };

struct GridSpec {
  int bits = 4;
  bool symmetric = false;
  Granularity granularity = Granularity::per_group;
  int64_t group_size = 128;  // only for per_group

  int64_t qmin() const { return symmetric ? -(int64_t{1} << (bits - 1)) : 0; }
  int64_t qmax() const {
    return symmetric ? (int64_t{1} << (bits - 1)) - 1 : (int64_t{1} << bits) - 1;
  }
  void validate(const char* where) const {
    CBQ_CHECK(bits >= 2 && bits <= 8, "{}: {} bits is unsupported (2 to 8)", where, bits);
    CBQ_CHECK(granularity != Granularity::per_group || group_size > 0,
              "{}: group size must be positive, got {}", where, group_size);
  }
  // Columns covered by one (s, z) pair in a row of `cols` columns.
  int64_t group_cols(int64_t cols) const {
    return granularity == Granularity::per_group ? std::min(group_size, cols) : cols;
  }
  int64_t groups_per_row(int64_t cols) const {
    if (granularity != Granularity::per_group) return 1;
    return (cols + group_size - 1) / group_size;
  }
  // Shape of the scale / zero-point tensors for a (rows, cols) weight.
  Shape param_shape(int64_t rows, int64_t cols) const {
    if (granularity == Granularity::per_tensor) return Shape{1, 1};
    return Shape{rows, groups_per_row(cols)};
  }
};

// Round half to even.
template <class T>
inline T round_even(T x) {
  return std::nearbyint(x);
}

template <class T>
inline T quantize_code(T x, T s, T z, const GridSpec& g) {
  T q = round_even(x / s) + z;
  return std::clamp(q, static_cast<T>(g.qmin()), static_cast<T>(g.qmax()));
}

template <class T>
inline T dequantize_code(T q, T s, T z) {
  return s * (q - z);
}

// The smallest step used when a group is constant (max == min), so that s > 0 always holds.
template <class T>
inline T min_step() {
  return static_cast<T>(1e-8);
}

// RTN (min/max) parameters for one set of values [lo, hi] (min and max over the group).
template <class T>
inline void minmax_params(T lo, T hi, const GridSpec& g, T& scale, T& zero) {
  lo = std::min(lo, T(0));  // the grid always contains 0 exactly (zero padding, ReLU, ...)
  hi = std::max(hi, T(0));
  if (g.symmetric) {
    T amax = std::max(-lo, hi);
    scale = std::max(amax / static_cast<T>(g.qmax()), min_step<T>());
    zero = 0;
  } else {
    scale = std::max((hi - lo) / static_cast<T>(g.qmax()), min_step<T>());
    zero = std::clamp(round_even(-lo / scale), T(0), static_cast<T>(g.qmax()));
  }
}

// CUDA kernel of init_minmax (registered by the CUDA backend, cuda/cbq/cuda/quant/grid_stats.cuh):
// one warp per group (a two-stage block reduction for per-tensor) finds the group's min and max,
// and minmax_params is evaluated with the same IEEE operations, so (scale, zero) equal the CPU's.
template <class T>
struct CudaGrid {
  // scale, zero: spec.param_shape(rows, cols), from w (rows, cols)
  static inline void (*init_minmax)(T* scale, T* zero, const T* w, int64_t rows, int64_t cols,
                                    const GridSpec& spec) = nullptr;
};

template <class T>
struct CpuGrid {
  static void init_minmax(T* scale, T* zero, const T* w, int64_t rows, int64_t cols,
                          const GridSpec& spec) {
    if (spec.granularity == Granularity::per_tensor) {
      auto [lo, hi] = std::minmax_element(w, w + rows * cols);
      minmax_params(*lo, *hi, spec, scale[0], zero[0]);
      return;
    }
    const int64_t gc = spec.group_cols(cols), ng = spec.groups_per_row(cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < ng; ++k) {
        const T* begin = w + r * cols + k * gc;
        const T* end = w + r * cols + std::min(cols, (k + 1) * gc);
        auto [lo, hi] = std::minmax_element(begin, end);
        minmax_params(*lo, *hi, spec, scale[r * ng + k], zero[r * ng + k]);
      }
  }
};

// RTN initialisation of (scale, zero) for a (rows, cols) weight. Outputs have param_shape() and
// live on w's device.
template <class T>
void init_minmax(const Tensor<T>& w, const GridSpec& g, Tensor<T>& scale, Tensor<T>& zero) {
  g.validate("init_minmax");
  CBQ_CHECK(w.ndim() == 2, "init_minmax: weight must be 2-D, got {}", w.shape());
  CBQ_CHECK(w.is_contiguous(), "init_minmax: weight of shape {} must be contiguous", w.shape());
  const int64_t rows = w.size(0), cols = w.size(1);
  const Shape ps = g.param_shape(rows, cols);
  const Device dev = w.device();
  if (!(scale.defined() && scale.shape() == ps && scale.device() == dev && scale.is_contiguous()))
    scale = Tensor<T>(ps, dev);
  if (!(zero.defined() && zero.shape() == ps && zero.device() == dev && zero.is_contiguous()))
    zero = Tensor<T>(ps, dev);
  kernel_for(dev, &CpuGrid<T>::init_minmax, CudaGrid<T>::init_minmax, "init_minmax")(
      scale.data(), zero.data(), w.data(), rows, cols, g);
}

// Index into the (s, z) tensors for element (r, c) of a (rows, cols) weight.
inline int64_t param_index(const GridSpec& g, int64_t r, int64_t c, int64_t cols) {
  switch (g.granularity) {
    case Granularity::per_tensor:
      return 0;
    case Granularity::per_channel:
      return r;
    case Granularity::per_group:
    default:
      return r * g.groups_per_row(cols) + c / g.group_size;
  }
}

// A quantized (rows, cols) weight: integer codes plus scales and zero-points; the common result
// of RTN, GPTQ and CBQ and the input of the packers and exporters.
// Codes are stored offset by qmin, so every stored code lies in [0, 2^b − 1] and fits a byte:
// asymmetric stores q itself; symmetric stores q + 2^(b−1) (llama.cpp's Q4_0 nibble convention).
struct QuantizedWeight {
  GridSpec spec;
  Tensor<uint8_t> codes;  // (rows, cols), stored = q − qmin
  Tensor<float> scale;    // spec.param_shape(rows, cols)
  Tensor<float> zero;     // same shape; integer-valued; 0 for symmetric
  // Optional per-column group index (GPTQ act-order); empty means column c is in group c / G.
  std::vector<int32_t> group_index;

  int64_t rows() const { return codes.size(0); }
  int64_t cols() const { return codes.size(1); }
  int64_t param_index(int64_t r, int64_t c) const {
    if (!group_index.empty() && spec.granularity == Granularity::per_group)
      return r * spec.groups_per_row(cols()) + group_index[static_cast<std::size_t>(c)];
    return quant::param_index(spec, r, c, cols());
  }
  // x̂ = s · (q − z) with q = stored + qmin.
  float value(int64_t r, int64_t c) const {
    const int64_t p = param_index(r, c);
    const float q = static_cast<float>(codes[r * cols() + c]) + static_cast<float>(spec.qmin());
    return dequantize_code(q, scale[p], zero[p]);
  }
  Tensor<float> dequantize() const {
    Tensor<float> w = Tensor<float>::empty(codes.shape());
    for (int64_t r = 0; r < rows(); ++r)
      for (int64_t c = 0; c < cols(); ++c) w[r * cols() + c] = value(r, c);
    return w;
  }
};

}  // namespace cbq::quant
