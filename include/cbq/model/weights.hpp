#pragma once
// Taking named tensors out of a WeightMap with shape checks that name the tensor.
#include <string>

#include "cbq/core/error.hpp"
#include "cbq/core/model_config.hpp"

namespace cbq {

// The tensor `name` converted to T, checked against `shape`.
template <class T>
Tensor<T> take_weight(const WeightMap& weights, const std::string& name, const Shape& shape) {
  auto it = weights.find(name);
  CBQ_CHECK(it != weights.end(), "model: tensor '{}' is missing from the checkpoint", name);
  CBQ_CHECK(it->second.shape() == shape, "model: tensor '{}' has shape {}, expected {}", name,
            it->second.shape(), shape);
  if constexpr (std::is_same_v<T, float>) {
    return it->second.clone();
  } else {
    return it->second.template cast<T>();
  }
}

template <class T>
Tensor<T> take_optional(const WeightMap& weights, const std::string& name, const Shape& shape) {
  if (weights.find(name) == weights.end()) return Tensor<T>();
  return take_weight<T>(weights, name, shape);
}

// Divides row j of `w` (out, in) — and b[j] if given — by s[j].
template <class T>
void divide_rows(Tensor<T>& w, Tensor<T>* b, const std::vector<T>& s) {
  CBQ_CHECK(static_cast<int64_t>(s.size()) == w.size(0),
            "fold: {} scales for a producer with {} output channels", s.size(), w.size(0));
  const int64_t cols = w.ndim() == 2 ? w.size(1) : 1;
  for (int64_t j = 0; j < w.size(0); ++j) {
    for (int64_t c = 0; c < cols; ++c) w[j * cols + c] /= s[static_cast<size_t>(j)];
    if (b && b->defined()) (*b)[j] /= s[static_cast<size_t>(j)];
  }
}

}  // namespace cbq
