#pragma once
// embedding: out[t, :] = table[ids[t], :], table (V, d), ids of length T, out (T, d).
// Derivative: d table[ids[t], :] += d out[t, :] (a scatter-add; repeated ids accumulate).
// The scatter is split over the d columns, each chunk walking the tokens in order, so no two
// threads touch the same element and the sum order is fixed.
#include <algorithm>
#include <vector>

#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
class EmbeddingNode final : public Node<T> {
 public:
  EmbeddingNode(Var<T> table, std::vector<int32_t> ids) : table_(table), ids_(std::move(ids)) {}
  const char* name() const override { return "embedding"; }
  void backward(Tape<T>& tape) override {
    if (!table_.requires_grad()) return;
    const T* g = tape.grad(this->output).data();  // (T, d)
    T* dtable = table_.grad().data();             // (V, d)
    const int64_t d = table_.value().size(1);
    const int64_t tokens = static_cast<int64_t>(ids_.size());
    const int64_t column_grain =
        std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(tokens, 1));
    parallel_for(d, column_grain, [&](int64_t j0, int64_t j1) {
      for (int64_t t = 0; t < tokens; ++t) {
        T* dst = dtable + static_cast<int64_t>(ids_[t]) * d;
        const T* src = g + t * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
      }
    });
  }

 private:
  Var<T> table_;
  std::vector<int32_t> ids_;
};

template <class T>
Var<T> embedding(Var<T> table, const std::vector<int32_t>& ids) {
  const Tensor<T>& W = table.value();
  CBQ_CHECK(W.ndim() == 2, "embedding: table must be 2-D (V, d), got {}", W.shape());
  check_cpu("embedding", W);
  check_contiguous("embedding", "table", W);
  const int64_t vocab = W.size(0), d = W.size(1);
  const int64_t tokens = static_cast<int64_t>(ids.size());
  for (int64_t t = 0; t < tokens; ++t)
    CBQ_CHECK(ids[t] >= 0 && ids[t] < vocab,
              "embedding: id {} at position {} is out of range for a table of {} rows (shape {})",
              ids[t], t, vocab, W.shape());
  Tape<T>& tape = table.tape();
  const bool rg = tape.any_requires_grad({table});
  Var<T> out = tape.output(Shape{tokens, d}, rg);
  Tensor<T> out_value = out.value();  // shares the output\'s storage
  T* o = out_value.data();
  const T* w = W.data();
  parallel_for(tokens, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(d, 1)),
               [&](int64_t t0, int64_t t1) {
                 for (int64_t t = t0; t < t1; ++t)
                   std::copy(w + ids[t] * d, w + (ids[t] + 1) * d, o + t * d);
               });
  if (rg) tape.template record<EmbeddingNode<T>>(out, table, ids);
  return out;
}

}  // namespace cbq::ops
