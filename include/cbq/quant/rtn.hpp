#pragma once
// Round-to-nearest (RTN) weight quantization: (s, z) from the min/max of each group
// (grid.hpp's init_minmax, the grid always containing 0), then q = clamp(round(w/s) + z) with
// half-to-even rounding. The baseline every other method is compared with, and the result GPTQ
// reduces to when the Hessian is diagonal.
#include <cmath>
#include <cstdint>
#include <string_view>

#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/tensor.hpp"
#include "cbq/quant/grid.hpp"

namespace cbq::quant {

namespace detail {
// Shared input checks of the weight quantizers: 2-D, non-empty, CPU, finite.
inline void check_weight(const Tensor<float>& w, std::string_view op, std::string_view layer) {
  CBQ_CHECK(w.defined() && w.ndim() == 2, "{}({}): weight must be 2-D (out, in), got shape {}", op,
            layer, w.shape());
  CBQ_CHECK(w.size(0) > 0 && w.size(1) > 0, "{}({}): empty weight of shape {}", op, layer,
            w.shape());
  CBQ_CHECK(w.is_cpu(), "{}({}): weight must be on the CPU", op, layer);
}
inline void check_finite_weight(const Tensor<float>& w, std::string_view op,
                                std::string_view layer) {
  const int64_t cols = w.size(1);
  for (int64_t k = 0; k < w.numel(); ++k)
    CBQ_CHECK(std::isfinite(w[k]), "{}({}): weight element ({}, {}) is {}", op, layer, k / cols,
              k % cols, w[k]);
}
}  // namespace detail

// RTN-quantizes a (rows, cols) weight on `spec` (any bits 2–8, symmetric or asymmetric,
// per-tensor / per-channel / per-group with a short last group). `layer` names it in errors.
inline QuantizedWeight rtn_quantize(const Tensor<float>& w_in, const GridSpec& spec,
                                    std::string_view layer = "weight") {
  detail::check_weight(w_in, "rtn", layer);
  spec.validate("rtn");
  const Tensor<float> w = w_in.contiguous();
  detail::check_finite_weight(w, "rtn", layer);
  const int64_t rows = w.size(0), cols = w.size(1);

  QuantizedWeight q;
  q.spec = spec;
  init_minmax(w, spec, q.scale, q.zero);
  q.codes = Tensor<uint8_t>::empty(Shape{rows, cols});
  const float qmin = static_cast<float>(spec.qmin());
  parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t p = param_index(spec, r, c, cols);
        const float code = quantize_code(w[r * cols + c], q.scale[p], q.zero[p], spec);
        q.codes[r * cols + c] = static_cast<uint8_t>(code - qmin);
      }
  });
  return q;
}

}  // namespace cbq::quant
