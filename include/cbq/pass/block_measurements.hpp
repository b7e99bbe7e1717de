#pragma once
// Two measurements of a unit (a block or a half of one: pass/units.hpp) that the pass takes on the
// calibration samples, also timed by the pass estimate (pass/estimate.hpp): the GPTQ start's
// Hessians of a block's linear inputs, and each hardened layer's output error before and after the
// window trained it.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/blas.hpp"
#include "cbq/model/block.hpp"
#include "cbq/ops/linear.hpp"
#include "cbq/ops/mse.hpp"
#include "cbq/pass/device_support.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/units.hpp"
#include "cbq/pass/window_schedule.hpp"
#include "cbq/quant/gptq.hpp"

namespace cbq {

// GPTQ Hessians of unit u's linear inputs: the calibration samples on the quantized path
// (x_q enters window w; the window's earlier units compute with their current quantizers),
// then unit u in full precision, every layer from the same unit input (as the baseline). The
// samples may run side by side (sample_chunks), each chunk into its own accumulators, merged in
// chunk order.
template <class Model, class T>
std::vector<quant::HessianAccumulator> unit_hessians(PassUnits<Model>& units, const Window& w,
                                                     int64_t u, const std::vector<Tensor<T>>& x_q) {
  auto linears = units.linears(u);
  const int64_t samples = static_cast<int64_t>(x_q.size());
  const int chunks = sample_chunks(samples, units.model().device(), units.model().config.dim);
  std::vector<std::vector<quant::HessianAccumulator>> acc(static_cast<size_t>(chunks));
  for (auto& a : acc)
    for (auto* l : linears)
      a.emplace_back(l->in_features(), fmt::format("layers.{}.{}", units.block(u), l->name));
  for_sample_chunks<T>(samples, chunks, units.model().device(),
                       [&](int chunk, int64_t begin, int64_t end, Tape<T>& tape) {
                         auto& mine = acc[static_cast<size_t>(chunk)];
                         BlockContext<T> ctx;
                         ctx.full_precision = true;
                         ctx.on_linear_input = [&](const LinearLayer<T>& layer,
                                                   const Tensor<T>& in) {
                           for (size_t j = 0; j < linears.size(); ++j)
                             if (linears[j] == &layer)
                               mine[j].add_batch(in.is_cpu() ? in : in.to(Device::cpu));
                         };
                         for (int64_t n = begin; n < end; ++n) {
                           Tensor<T> h = x_q[static_cast<size_t>(n)];
                           for (int64_t c = w.first; c < u; ++c) h = units.run(tape, c, h);
                           units.run(tape, u, h, ctx);
                         }
                       });
  for (size_t c = 1; c < acc.size(); ++c)
    for (size_t j = 0; j < linears.size(); ++j) acc[0][j].merge(acc[c][j]);
  return std::move(acc[0]);
}

// Each hardened layer's relative output error ‖x(Ŵ − W)ᵀ‖² / ‖xWᵀ‖² for its start's weight and
// its final one, summed over the calibration inputs the quantized path gives it (W is the
// model's full-precision weight). On the CPU each layer accumulates its inputs' Gram matrix
// H = Σ xᵀx (in double) and the errors are tr(ΔW H ΔWᵀ) at the end: one rank-k update per input
// instead of three products with the layer's weights; on a device, the products per input.
template <class T>
struct LayerOutputErrors {
  struct Layer {
    const LinearLayer<T>* layer;
    QuantLinear<T>* q;
    Tensor<T> start, final_weight;
    double err_start = 0, err_final = 0, energy = 0;
    std::vector<std::unique_ptr<quant::HessianAccumulator>> grams;  // CPU inputs, per chunk
  };
  std::vector<Layer> layers;
  static constexpr int64_t kGramRows = 256;  // rows per dgemm in finish (2 × 256 × in doubles)
  // The layers of one unit (its linears() and their quantizers, in the same order), with
  // `chunks` accumulators per layer, one per chunk of samples (sample_chunks): add() names its
  // chunk, finish() merges them in chunk order.
  LayerOutputErrors(const std::vector<LinearLayer<T>*>& linears,
                    const std::vector<std::shared_ptr<QuantLinear<T>>>& qlayers, int chunks = 1) {
    for (size_t j = 0; j < linears.size() && j < qlayers.size(); ++j) {
      layers.push_back({linears[j],
                        qlayers[j].get(),
                        qlayers[j]->start_weight(),
                        qlayers[j]->current_weight(),
                        0,
                        0,
                        0,
                        {}});
      layers.back().grams.resize(static_cast<size_t>(std::max(chunks, 1)));
    }
  }
  void add(const LinearLayer<T>& layer, const Tensor<T>& in, int chunk = 0) {
    for (Layer& l : layers) {
      if (l.layer != &layer) continue;
      if (in.is_cpu()) {
        CBQ_CHECK(chunk >= 0 && static_cast<size_t>(chunk) < l.grams.size(),
                  "LayerOutputErrors({}): chunk {} of {}", layer.name, chunk, l.grams.size());
        auto& gram = l.grams[static_cast<size_t>(chunk)];
        if (!gram)
          gram = std::make_unique<quant::HessianAccumulator>(in.shape().cols(), layer.name);
        gram->add_batch(in);
        continue;
      }
      Tape<T> tape(in.device());
      NoGrad<T> off(tape);
      Var<T> x = tape.constant(in);
      Var<T> exact = ops::linear(x, tape.constant(layer.weight.value));
      const Tensor<T> zero(exact.value().shape(), in.device());
      auto error = [&](const Tensor<T>& w) {
        return static_cast<double>(detail::element_at(
            ops::row_sq_error(ops::linear(x, tape.constant(w)), exact).value(), 0));
      };
      l.err_start += error(l.start);
      l.err_final += error(l.final_weight);
      l.energy += static_cast<double>(
          detail::element_at(ops::row_sq_error(exact, tape.constant(zero)).value(), 0));
    }
  }
  void finish() {
    std::vector<double> scratch;  // gram_form's buffers, shared by every layer
    for (Layer& l : layers) {
      std::unique_ptr<quant::HessianAccumulator> gram;
      for (auto& g : l.grams) {
        if (!g) continue;
        if (gram)
          gram->merge(*g);
        else
          gram = std::move(g);
      }
      if (gram) {
        const Tensor<double> h = gram->hessian();
        const Tensor<T> w = host(l.layer->weight.value);
        l.err_start = gram_form(h, host(l.start), &w, scratch);
        l.err_final = gram_form(h, host(l.final_weight), &w, scratch);
        l.energy = gram_form(h, w, nullptr, scratch);
      }
      if (l.energy > 0) l.q->set_output_errors(l.err_start / l.energy, l.err_final / l.energy);
    }
  }

 private:
  static Tensor<T> host(const Tensor<T>& t) {
    return t.is_cpu() ? t.contiguous() : t.to(Device::cpu).contiguous();
  }
  // Σ_o (a_o − b_o) H (a_o − b_o)ᵀ over the rows of the (out, in) matrix a (b null: 0): the
  // differences of a block of rows times H by one dgemm, then their dot products with the
  // differences (a scalar triple loop took 8 s per SmolLM2 block).
  // scratch: the row blocks' differences and products, reused across calls.
  static double gram_form(const Tensor<double>& h, const Tensor<T>& a, const Tensor<T>* b,
                          std::vector<double>& scratch) {
    const int64_t out = a.shape().rows(), in = a.shape().cols();
    CBQ_CHECK(h.shape().rows() == in && (!b || b->shape() == a.shape()),
              "LayerOutputErrors: a weight of shape {} does not match its inputs' {} features",
              a.shape(), h.shape().rows());
    const int64_t block = std::min<int64_t>(out, kGramRows);
    scratch.resize(static_cast<std::size_t>(2 * block * in));
    double* diff = scratch.data();
    double* product = diff + block * in;
    double total = 0;
    for (int64_t o0 = 0; o0 < out; o0 += block) {
      const int64_t rows = std::min(block, out - o0);
      for (int64_t k = 0; k < rows * in; ++k)
        diff[k] = static_cast<double>(a[o0 * in + k]) -
                  (b ? static_cast<double>((*b)[o0 * in + k]) : 0.0);
      blas::gemm<double>(false, false, rows, in, in, 1.0, diff, in, h.data(), in, 0.0, product,
                         in);  // h: LayerOutputErrors' own contiguous hessian()
      for (int64_t k = 0; k < rows * in; ++k) total += diff[k] * product[k];
    }
    return total;
  }
};

}  // namespace cbq
