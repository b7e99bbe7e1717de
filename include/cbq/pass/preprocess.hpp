#pragma once
// Activation outlier scaling before quantization, folded into the producing layers so that the
// full-precision model computes the same function (DESIGN §2, CFP):
//   CFP:         per-channel maxima m_j of each linear input → outlier channels by the
//                coarse-to-fine detector → s_j = sqrt(m_j / m*) (m* the largest kept maximum).
//   SmoothQuant: s_j = max|X_j|^α / max|W_:,j|^(1−α) for every channel (Xiao et al. 2023), the
//                ablation the paper compares CFP with.
// Channel j of the activation is divided by s_j (in its producer) and column j of every consumer
// weight is multiplied by s_j.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/model/transformer.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/quant/cfp.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

template <class Model, class T>
PreprocessStats scale_activation_outliers(Model& model, const std::vector<Tensor<T>>& x0,
                                          ActivationScaling mode, double alpha, bool verbose) {
  PreprocessStats stats;
  stats.method = mode == ActivationScaling::cfp ? "cfp" : "smoothquant";
  if (mode == ActivationScaling::none) return stats;
  // Per (block, site): channel maxima of the site's input over all calibration tokens.
  const int64_t K = model.num_blocks();
  // The sites of every block, built once (they point into the blocks, which do not move here).
  std::vector<std::vector<ActivationSite<T>>> sites(static_cast<size_t>(K));
  std::vector<std::vector<std::vector<double>>> maxima(static_cast<size_t>(K));
  for (int64_t b = 0; b < K; ++b) {
    sites[b] = model.blocks[b].activation_sites();
    for (auto& site : sites[b])
      maxima[b].emplace_back(static_cast<size_t>(site.consumers.front()->in_features()), 0.0);
  }
  for (const Tensor<T>& sample : x0) {
    Tensor<T> x = sample;
    for (int64_t b = 0; b < K; ++b) {
      BlockContext<T> ctx;
      ctx.full_precision = true;
      ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
        for (size_t s = 0; s < sites[b].size(); ++s) {
          if (sites[b][s].consumers.front() != &layer) continue;
          auto& m = maxima[b][s];
          const int64_t d = in.shape().cols(), rows = in.shape().rows();
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < d; ++j)
              m[j] = std::max(m[j], std::abs(static_cast<double>(in[r * d + j])));
        }
      };
      x = model.run_block(b, x, ctx);
    }
  }
  for (int64_t b = 0; b < K; ++b) {
    for (size_t s = 0; s < sites[b].size(); ++s) {
      ActivationSite<T>& site = sites[b][s];
      const auto& m = maxima[b][s];
      // Reduce consumer channels to producer channels (GQA: several query heads per value head).
      std::vector<double> mp(static_cast<size_t>(site.producer_channels), 0.0);
      for (size_t j = 0; j < m.size(); ++j)
        mp[site.producer_of(static_cast<int64_t>(j))] =
            std::max(mp[site.producer_of(static_cast<int64_t>(j))], m[j]);
      std::vector<T> scale(mp.size(), T(1));
      const std::string name = fmt::format("layers.{}.{}", b, site.name);
      if (mode == ActivationScaling::cfp) {
        scale = quant::activation_outlier_scales<T>(std::vector<T>(mp.begin(), mp.end()), name);
      } else {
        std::vector<double> wmax(mp.size(), 0.0);
        for (LinearLayer<T>* c : site.consumers) {
          const Tensor<T>& w = c->weight.value;
          const int64_t rows = w.size(0), cols = w.size(1);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j) {
              const size_t p = static_cast<size_t>(site.producer_of(j));
              wmax[p] = std::max(wmax[p], std::abs(static_cast<double>(w[r * cols + j])));
            }
        }
        for (size_t p = 0; p < mp.size(); ++p) {
          if (mp[p] <= 0 || wmax[p] <= 0) continue;
          scale[p] = static_cast<T>(std::pow(mp[p], alpha) / std::pow(wmax[p], 1.0 - alpha));
          scale[p] = std::clamp(scale[p], static_cast<T>(1e-5), static_cast<T>(1e5));
        }
      }
      SiteScaling st;
      st.name = name;
      st.channels = static_cast<int64_t>(mp.size());
      for (size_t p = 0; p < mp.size(); ++p) {
        st.max_before = std::max(st.max_before, mp[p]);
        st.max_after = std::max(st.max_after, mp[p] / static_cast<double>(scale[p]));
        if (scale[p] != T(1)) ++st.scaled;
      }
      if (st.scaled > 0) apply_channel_scale(site, scale);
      stats.sites.push_back(st);
    }
  }
  if (verbose) {
    int64_t scaled = 0;
    for (const auto& s : stats.sites) scaled += s.scaled;
    fmt::print("{}: scaled {} activation channels over {} sites\n", stats.method, scaled,
               stats.sites.size());
  }
  return stats;
}

}  // namespace cbq
