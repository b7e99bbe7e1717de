#pragma once
// Evaluation without a tape: the pieces of one batched forward per window on the CPU, into
// buffers reused from window to window (no allocation after the first window of the largest
// size), and the LM head fused with the log-softmax in row blocks, so that a window's (T, V)
// logits are never held whole.
//
// The blocks' infer() (llama_block.hpp, opt_block.hpp) compute what their forward() computes on
// a tape, with the same kernels (ops::CpuRmsNorm, CpuLayerNorm, CpuRope,
// CpuAttention, CpuSwiglu) and the same GEMMs, so the values agree bit for bit with
// Transformer::logits for the same thread count; Transformer::token_nll then scores the rows
// (tests/test_inference.cpp). A linear layer with a quantization transform installed (QuantLinear
// from RTN, GPTQ or CBQ) computes through the transform's own linear_args / forward on a small
// no-grad tape kept here, so fake-quantized weights and inputs are exactly what the tape path
// uses.
//
// Memory: the tape path keeps every intermediate of every block of a window (3.4 GB for
// SmolLM2-135M at T = 2048, with 400 MB of logits); this path keeps one block's (about 9 (T, d)
// and 2 (T, hidden) matrices) and one block of logit rows (kHeadBlockBytes).
#include <algorithm>
#include <array>
#include <memory>
#include <vector>

#include "cbq/model/linear_layer.hpp"

namespace cbq {

// Logits scored per LM-head GEMM by default (InferenceWorkspace::head_block_bytes): 64 MiB is 341
// rows of SmolLM2's 49 152-token vocabulary, so a 1024-row half window takes 4 GEMMs (each packs
// the head's weight once; fewer, larger blocks pack it less often).
inline constexpr std::size_t kHeadBlockBytes = std::size_t{64} << 20;

template <class T>
class InferenceWorkspace {
 public:
  // Named buffer slots a block's infer() uses.
  enum Slot : int { kA, kB, kC, kD, kE, kHidden, kHeadIn, kLogits, kSlots };

  InferenceWorkspace() : tape_(std::make_unique<Tape<T>>()) {}

  // A contiguous (rows, cols) matrix in buffer `slot`, valid until the slot is asked for a
  // larger one. A buffer grows to the largest size asked for and is kept.
  Tensor<T> matrix(int slot, int64_t rows, int64_t cols) {
    CBQ_CHECK(slot >= 0 && slot < kSlots, "InferenceWorkspace: no slot {}", slot);
    const int64_t n = rows * cols;
    Tensor<T>& b = buffers_[static_cast<std::size_t>(slot)];
    if (!b.defined() || b.numel() < n) b = Tensor<T>::empty(Shape{std::max<int64_t>(n, 1)});
    return b.slice(0, 0, n).reshape(Shape{rows, cols});
  }

  // The no-grad tape on which installed transforms compute (cleared before each use).
  Tape<T>& transform_tape() { return *tape_; }

  // Logits computed per LM-head GEMM, in bytes (Transformer::token_nll): as many rows as fit,
  // at least 16.
  std::size_t head_block_bytes = kHeadBlockBytes;

  // Bytes held by the buffers (not counting the transform tape's arena).
  std::size_t bytes() const {
    std::size_t total = 0;
    for (const Tensor<T>& b : buffers_)
      if (b.defined()) total += sizeof(T) * static_cast<std::size_t>(b.numel());
    return total;
  }

 private:
  std::array<Tensor<T>, kSlots> buffers_;
  std::unique_ptr<Tape<T>> tape_;
};

namespace detail {
// y = x·Wᵀ + b (b may be null), the bias added after the product as ops::linear does.
template <class T>
void add_bias_rows(T* y, const T* b, int64_t rows, int64_t cols) {
  parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < cols; ++j) y[r * cols + j] += b[j];
  });
}
}  // namespace detail

// ys[i] (rows, out_i) = what layers[i] computes from x (rows, in): x·Wᵀ + b, or the installed
// transform's result. The plain products (and a transform's, when it says which product it is)
// run side by side (blas::gemm_batch), as run_linears does on a tape.
template <class T, std::size_t N>
void infer_linears(InferenceWorkspace<T>& ws, const std::array<LinearLayer<T>*, N>& layers,
                   const Tensor<T>& x, const std::array<Tensor<T>, N>& ys) {
  const int64_t rows = x.size(0);
  Tape<T>& tape = ws.transform_tape();
  bool taped = false;
  std::array<blas::GemmArgs<T>, N> gemms;
  std::array<const T*, N> biases{};
  std::array<int64_t, N> outs{};
  int count = 0;
  for (std::size_t i = 0; i < N; ++i) {
    LinearLayer<T>& layer = *layers[i];
    Tensor<T> y = ys[i];
    CBQ_CHECK(
        x.size(1) == layer.in_features() && y.size(0) == rows && y.size(1) == layer.out_features(),
        "inference: layer {} ({} → {}) got input {} and output {}", layer.name, layer.in_features(),
        layer.out_features(), x.shape(), y.shape());
    const T* a = x.data();
    const T* w = layer.weight.value.data();
    const T* b = layer.has_bias() ? layer.bias.value.data() : nullptr;
    if (layer.transform) {
      if (!taped) {
        tape.clear();
        taped = true;
      }
      NoGrad<T> no_grad(tape);
      Var<T> xv = tape.constant(x);
      if (std::optional<ops::LinearArgs<T>> args =
              layer.transform->linear_args(tape, layer, xv, nullptr)) {
        a = args->x.value().data();
        w = args->w.value().data();
        b = args->b.valid() ? args->b.value().data() : nullptr;
        CBQ_CHECK(args->x.value().is_contiguous() && args->w.value().is_contiguous() &&
                      args->w.value().shape() == layer.weight.value.shape(),
                  "inference: the transform of layer {} gave a weight {} for a layer {}",
                  layer.name, args->w.value().shape(), layer.weight.value.shape());
      } else {  // a transform that computes its own way: take its result
        const Tensor<T> out = layer.transform->forward(tape, layer, xv, nullptr).value();
        CBQ_CHECK(out.shape() == y.shape(), "inference: the transform of layer {} gave {}, not {}",
                  layer.name, out.shape(), y.shape());
        y.copy_from(out);
        continue;
      }
    }
    const int64_t in = layer.in_features(), out = layer.out_features();
    gemms[static_cast<std::size_t>(count)] =
        blas::gemm_args(false, true, rows, out, in, T(1), a, in, w, in, T(0), y.data(), out);
    biases[static_cast<std::size_t>(count)] = b;
    outs[static_cast<std::size_t>(count)] = out;
    ++count;
  }
  blas::gemm_batch(gemms.data(), count);
  for (int i = 0; i < count; ++i)
    if (const T* b = biases[static_cast<std::size_t>(i)])
      detail::add_bias_rows(gemms[static_cast<std::size_t>(i)].c, b, rows,
                            outs[static_cast<std::size_t>(i)]);
}

// x += y elementwise (the residual connection; the same sum as ops::add(x, y)).
template <class T>
void infer_add(Tensor<T>& x, const Tensor<T>& y) {
  T* xp = x.data();
  const T* yp = y.data();
  parallel_for(x.numel(), ops::kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) xp[i] = xp[i] + yp[i];
  });
}

}  // namespace cbq
