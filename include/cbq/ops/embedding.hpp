#pragma once
// embedding: out[t, :] = table[ids[t], :], table (V, d), ids of length T, out (T, d).
// Derivative: d table[ids[t], :] += d out[t, :] (a scatter-add; repeated ids accumulate).
// For backward the forward pass builds the tokens grouped by id (a CSR index, tokens in order
// inside a group; uploaded for CUDA), so that one thread owns each (id, column) and adds its
// tokens in token order: no atomics, a fixed sum order, and the same additions in the same order
// on both devices (bitwise equal results). The CPU splits the columns over threads.
#include <algorithm>
#include <numeric>
#include <vector>

#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaEmbedding {
  // out (tokens, d) = table[ids[t], :]; ids (tokens,) on the device
  static inline void (*forward)(T* out, const T* table, const int32_t* ids, int64_t tokens,
                                int64_t d) = nullptr;
  // dtable[unique[u], :] += Σ g[t, :] over the tokens t with ids[t] == unique[u], in token
  // order. index (device) = [unique (U) | offsets (U + 1) | token positions grouped by id (tokens)]
  static inline void (*backward)(T* dtable, const T* g, const int32_t* index, int64_t num_unique,
                                 int64_t tokens, int64_t d) = nullptr;
};

namespace detail {
// The CSR index of CudaEmbedding::backward, on the host: [unique | offsets | positions].
inline std::vector<int32_t> embedding_token_groups(const std::vector<int32_t>& ids,
                                                   int64_t& num_unique) {
  const int64_t tokens = static_cast<int64_t>(ids.size());
  std::vector<int32_t> order(ids.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  std::vector<int32_t> unique, offsets;
  for (int64_t k = 0; k < tokens; ++k)
    if (k == 0 || ids[order[k]] != ids[order[k - 1]]) {
      unique.push_back(ids[order[k]]);
      offsets.push_back(static_cast<int32_t>(k));
    }
  offsets.push_back(static_cast<int32_t>(tokens));
  num_unique = static_cast<int64_t>(unique.size());
  std::vector<int32_t> index = std::move(unique);
  index.insert(index.end(), offsets.begin(), offsets.end());
  index.insert(index.end(), order.begin(), order.end());
  return index;
}

// A host vector as a tensor on `device` (a synchronous copy for CUDA).
inline Tensor<int32_t> to_device(const std::vector<int32_t>& values, Device device) {
  return Tensor<int32_t>::from(values, Shape{static_cast<int64_t>(values.size())}).to(device);
}
}  // namespace detail

template <class T>
struct CpuEmbedding {
  static void forward(T* out, const T* table, const int32_t* ids, int64_t tokens, int64_t d) {
    parallel_for(tokens, detail::row_grain(d), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        std::copy(table + ids[t] * d, table + (ids[t] + 1) * d, out + t * d);
    });
  }
  static void backward(T* dtable, const T* g, const int32_t* index, int64_t num_unique,
                       int64_t tokens, int64_t d) {
    const int32_t* unique = index;
    const int32_t* offsets = index + num_unique;
    const int32_t* positions = offsets + num_unique + 1;
    const int64_t column_grain = detail::row_grain(tokens);
    parallel_for(d, column_grain, [&](int64_t j0, int64_t j1) {
      for (int64_t u = 0; u < num_unique; ++u) {
        T* dst = dtable + static_cast<int64_t>(unique[u]) * d;
        for (int32_t k = offsets[u]; k < offsets[u + 1]; ++k) {
          const T* src = g + static_cast<int64_t>(positions[k]) * d;
          for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
        }
      }
    });
  }
};

template <class T>
class EmbeddingNode;

template <class T>
Var<T> embedding(Var<T> table, const std::vector<int32_t>& ids) {
  const Tensor<T>& W = table.value();
  CBQ_CHECK(W.ndim() == 2, "embedding: table must be 2-D (V, d), got {}", W.shape());
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
  Tensor<T> out_value = out.value();             // shares the output's storage
  check_same_device("embedding", out_value, W);  // the tape allocates on its own device
  const Device device = W.device();
  const auto forward =
      kernel_for(device, &CpuEmbedding<T>::forward, CudaEmbedding<T>::forward, "embedding");
  if (device == Device::cpu) {
    forward(out_value.data(), W.data(), ids.data(), tokens, d);
  } else {
    const Tensor<int32_t> device_ids = detail::to_device(ids, device);
    forward(out_value.data(), W.data(), device_ids.data(), tokens, d);
  }
  if (rg) {
    int64_t num_unique = 0;
    Tensor<int32_t> index =
        detail::to_device(detail::embedding_token_groups(ids, num_unique), device);
    tape.template record<EmbeddingNode<T>>(out, table, std::move(index), num_unique, tokens);
  }
  return out;
}

template <class T>
class EmbeddingNode final : public Node<T> {
 public:
  EmbeddingNode(Var<T> table, Tensor<int32_t> index, int64_t num_unique, int64_t tokens)
      : table_(table), index_(std::move(index)), num_unique_(num_unique), tokens_(tokens) {}
  const char* name() const override { return "embedding"; }
  void backward(Tape<T>& tape) override {
    if (!table_.requires_grad()) return;
    const Tensor<T>& grad = tape.grad(this->output);  // (tokens, d)
    kernel_for(grad.device(), &CpuEmbedding<T>::backward, CudaEmbedding<T>::backward, "embedding")(
        table_.grad().data(), grad.data(), index_.data(), num_unique_, tokens_,
        table_.value().size(1));
  }

 private:
  Var<T> table_;
  Tensor<int32_t> index_;  // the CSR index of the backward kernels, on the op's device
  int64_t num_unique_, tokens_;
};

}  // namespace cbq::ops
