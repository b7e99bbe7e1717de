#pragma once
// Trains one window of the CBQ pass: Adam over the window's active layers (weight steps,
// activation steps, rounding, optionally norms) with cosine learning rates, the regulariser's β
// schedule, a progress line per epoch, and the better of the window's start and trained state
// kept (judged on held-out samples). What it minimises is pass/window_loss.hpp's WindowLoss.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cbq/optim/adam.hpp"
#include "cbq/optim/schedule.hpp"
#include "cbq/pass/checks_and_timing.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/units.hpp"
#include "cbq/pass/window_loss.hpp"
#include "cbq/pass/window_schedule.hpp"
#include "cbq/quant/beta_schedule.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

// The window's loss terms at its start and end, the effect of hard rounding, and the decision.
inline void print_window_balance(const WindowStats& s, int64_t window_index, int64_t num_windows) {
  auto terms = [](const LossTerms& l) {
    return fmt::format("l2 {:.4g} kld {:.4g}{}{}", l.l2_fp + l.l2_hom, l.kld_fp + l.kld_hom,
                       l.attention_kl != 0 ? fmt::format(" attn {:.4g}", l.attention_kl) : "",
                       l.boundary != 0 ? fmt::format(" boundary {:.4g}", l.boundary) : "");
  };
  fmt::print(
      "  window {}/{} balance ({} samples): start {} γ·round {:.4g} | end {} γ·round {:.4g} | hard "
      "rounding {:+.4g}\n",
      window_index, num_windows, s.balance_samples, terms(s.loss_before), s.loss_before.round,
      terms(s.loss_after), s.loss_after.round,
      s.loss_hard.reconstruction() - s.loss_after.reconstruction());
  if (s.judged)
    fmt::print(
        "  window {}/{} {} ({}): start {:.6g}, trained {:.6g} -> keeps the {}\n", window_index,
        num_windows, s.heldout > 0 ? "held-out loss" : "training loss",
        s.heldout > 0 ? fmt::format("{} samples", s.heldout) : std::string("no held-out samples"),
        s.heldout_start.reconstruction(), s.heldout_trained.reconstruction(),
        s.kept_start ? "start" : "trained state");
  if (!s.diverged.empty())
    fmt::print("  window {}/{}: training diverged and stopped; the window keeps its start ({})\n",
               window_index, num_windows, s.diverged);
  std::fflush(stdout);
}

template <class Model, class Q, class T>
WindowStats train_window(PassUnits<Model>& units, const Window& w, Q& qlayers,
                         const std::vector<Tensor<T>>& x_q, const std::vector<Tensor<T>>& t_fp,
                         const std::vector<Tensor<T>>& t_hom, const std::vector<Tensor<T>>& t_out,
                         const LossScaling<T>& scaling, const PassOptions& o, int64_t window_index,
                         int64_t num_windows, std::chrono::steady_clock::time_point pass_start,
                         const AttentionTargets<T>* attention = nullptr,
                         const BoundaryTargets<T>* boundary = nullptr) {
  const int64_t N = static_cast<int64_t>(x_q.size());
  // The last `heldout` samples judge start vs trained and do not train (calibration segments
  // start at random offsets, so they are a random subset).
  const int64_t heldout = o.holdout_samples(N), n_train = N - heldout;
  const int64_t total_steps =
      o.window_steps(n_train, units.sub_blocks() && w.finalize - w.first == 1);

  // Parameter groups over the window's (not yet frozen) layers.
  std::vector<Parameter<T>*> steps, acts, rounds;
  std::vector<Tensor<T>> step_scales, act_scales;
  std::vector<QuantLinear<T>*> active;
  for (int64_t u = w.first; u <= w.last; ++u)
    for (auto& q : qlayers[u]) {
      if (q->hardened()) continue;
      active.push_back(q.get());
      if (o.learn_weight_step) {
        for (auto* p : q->weight_step_params()) steps.push_back(p);
        for (auto& t : q->weight_step_lr_scales()) step_scales.push_back(t);
      }
      if (o.learn_act_step) {
        for (auto* p : q->act_params()) acts.push_back(p);
        for (auto& t : q->act_lr_scales()) act_scales.push_back(t);
      }
      for (auto* p : q->rounding_params()) rounds.push_back(p);
    }
  optim::Adam<T> adam;
  // (group, its cosine-annealed learning rate over the window's steps)
  std::vector<std::pair<int, optim::CosineSchedule>> groups;
  auto add_group = [&](const char* name, const std::vector<Parameter<T>*>& params, double lr,
                       const std::vector<Tensor<T>>& scales) {
    if (params.empty()) return;
    groups.emplace_back(adam.add_group(name, params, lr, scales),
                        optim::CosineSchedule(lr, total_steps, lr * o.lr_min_fraction));
  };
  add_group("weight steps", steps, o.lr_weight_step, step_scales);
  add_group("activation steps", acts, o.lr_act_step, act_scales);
  add_group("rounding", rounds, o.lr_rounding, {});
  std::vector<Parameter<T>*> norms;
  if (o.learn_norms)
    for (int64_t u = w.first; u <= w.last; ++u)
      for (Parameter<T>* p : units.parameters(u)) {
        p->trainable = true;
        if (!p->grad.defined()) p->grad = Tensor<T>(p->value.shape(), p->value.device());
        norms.push_back(p);
      }
  add_group("norms", norms, o.lr_norm, {});
  adam.zero_grad();
  quant::BetaSchedule beta{total_steps, o.round_warmup, o.beta_start, o.beta_end};

  WindowStats stats;
  stats.first_block = w.first;
  stats.last_block = w.last;
  stats.units = units.range(w.first, w.last);
  stats.energy_fp = scaling.energy_fp;
  stats.energy_hom = scaling.energy_hom;
  const Device device = units.model().device();
  Tape<T> tape(device);
  std::mt19937_64 rng(o.seed * 7919ULL + static_cast<uint64_t>(w.first));
  std::vector<int64_t> order(static_cast<size_t>(n_train));
  std::iota(order.begin(), order.end(), 0);
  const auto wstart = std::chrono::steady_clock::now();
  WindowLoss<Model, T> window_loss(units, w, o, active, x_q, t_fp, t_hom, t_out, scaling, attention,
                                   boundary);
  const bool output_loss = window_loss.has_output_loss();
  auto mean = [](const std::vector<LossTerms>& v, int64_t begin, int64_t end) {
    LossTerms sum;
    for (int64_t i = begin; i < end; ++i) sum += v[static_cast<size_t>(i)];
    return sum / static_cast<double>(std::max<int64_t>(end - begin, 1));
  };
  // The start vs trained decision compares what harden() deploys (hard rounding); the training
  // forward is that already unless it is soft.
  const bool trains_hard = o.rounding_mode != quant::RoundingMode::soft;
  const int64_t judge_begin = heldout > 0 ? n_train : 0;
  struct Start {
    std::vector<typename QuantLinear<T>::State> layers;
    std::vector<Tensor<T>> norms;
  } start;
  if (o.keep_better) {
    for (QuantLinear<T>* q : active) start.layers.push_back(q->state());
    for (Parameter<T>* p : norms) start.norms.push_back(p->value.clone());
  }

  // The balance is measured on the samples [balance_begin, N); judge_begin >= balance_begin.
  stats.balance_samples = o.balance_samples(N);
  const int64_t balance_begin = N - stats.balance_samples;
  auto evaluations_start = std::chrono::steady_clock::now();
  const std::vector<LossTerms> before = window_loss.evaluate(balance_begin, N, std::nullopt);
  stats.loss_before = mean(before, 0, N - balance_begin);
  stats.loss_before.round = window_loss.regularizer_value(o.beta_start);
  if (o.keep_better)
    stats.heldout_start =
        trains_hard ? mean(before, judge_begin - balance_begin, N - balance_begin)
                    : mean(window_loss.evaluate(judge_begin, N, quant::RoundingMode::hard), 0,
                           N - judge_begin);
  stats.times.evaluations = detail::seconds_since(evaluations_start);
  const auto steps_start = std::chrono::steady_clock::now();
  int64_t step = 0;
  LossTerms epoch_sum;
  // Training that turns non-finite stops there. With keep_better the window goes back to its
  // start (the same rule as a trained state that is worse; its start was finite, measured above)
  // and the reason is recorded; without it, or at the first step, it is an error.
  // `from_start`: the start itself gave it (the first step's loss), never a divergence.
  std::string diverged;
  auto diverge = [&](std::string why, bool from_start) {
    if (!o.keep_better || from_start) fail("{}", why);
    diverged = std::move(why);
  };
  for (int64_t epoch = 0; epoch < o.epochs && step < total_steps && diverged.empty(); ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    epoch_sum = {};
    int64_t epoch_steps = 0;
    for (int64_t i = 0; i < n_train && step < total_steps; ++i, ++step) {
      const int64_t n = order[static_cast<size_t>(i)];
      for (const auto& [g, schedule] : groups)
        adam.set_lr(static_cast<size_t>(g), schedule.at(step));
      Var<T> loss;
      LossTerms terms;
      const T reg_beta =
          o.gamma_round > 0 && beta.active(step) ? static_cast<T>(beta.beta(step)) : T(0);
      try {
        std::tie(loss, terms) = window_loss(tape, n, reg_beta);
      } catch (const Error& e) {
        diverge(fmt::format("{} (window {}, {}, epoch {}, step {}, calibration sample {}; first "
                            "non-finite value: {})",
                            e.what(), window_index, stats.units, epoch + 1, step, n,
                            locate_non_finite(units, w, x_q[n], active)),
                step == 0);
        break;
      }
      if (!std::isfinite(terms.total)) {
        diverge(fmt::format("CBQ: the loss is {} in window {} ({}), epoch {}, step {}, calibration "
                            "sample {} (l2 {}, kld {}, homologous l2 {}, kld {}, rounding {}); "
                            "first non-finite value: {}",
                            terms.total, window_index, stats.units, epoch + 1, step, n, terms.l2_fp,
                            terms.kld_fp, terms.l2_hom, terms.kld_hom, terms.round,
                            locate_non_finite(units, w, x_q[n], active)),
                step == 0);
        break;
      }
      tape.backward(loss);
      adam.step();
      adam.zero_grad();
      for (QuantLinear<T>* q : active) q->project_steps();
      if (o.on_step) o.on_step(window_index, step);
      epoch_sum += terms;
      stats.curve.push_back(terms);
      ++epoch_steps;
      // A learned value that turned non-finite need not show in the loss (hard rounding compares
      // it), so the parameters are checked after every update.
      if (std::string bad = first_non_finite_parameter(active, norms); !bad.empty()) {
        diverge(fmt::format("CBQ: {} is not finite after an update (window {}, {}, epoch {}, step "
                            "{}, calibration sample {})",
                            bad, window_index, stats.units, epoch + 1, step, n),
                false);
        ++step;  // this step's update happened
        break;
      }
    }
    stats.final_loss = epoch_sum / static_cast<double>(std::max<int64_t>(epoch_steps, 1));
    if (epoch == 0) stats.first_epoch_loss = stats.final_loss;
    if (o.verbose) {
      const double el = detail::seconds_since(wstart);
      const double frac = static_cast<double>(step) / static_cast<double>(total_steps);
      const double done_windows = static_cast<double>(window_index - 1) + frac;
      const double pass_el = detail::seconds_since(pass_start);
      const double eta = pass_el / done_windows * (static_cast<double>(num_windows) - done_windows);
      const LossTerms& m = stats.final_loss;
      fmt::print(
          "  window {}/{} [{}] epoch {}/{}: loss {:.5f} (l2 {:.5f} kld {:.5f} | hom "
          "l2 {:.5f} kld {:.5f} | round {:.5f}{})  {} elapsed, ETA {}\n",
          window_index, num_windows, stats.units, epoch + 1, o.epochs, m.total, m.l2_fp, m.kld_fp,
          m.l2_hom, m.kld_hom, m.round,
          (output_loss ? fmt::format(" | output kld {:.5f}", m.output_kld) : std::string()) +
              (o.attention_kl > 0 ? fmt::format(" | attn kld {:.5f}", m.attention_kl)
                                  : std::string()) +
              (m.boundary != 0 ? fmt::format(" | boundary {:.5f}", m.boundary) : std::string()),
          detail::format_duration(el), detail::format_duration(eta));
      std::fflush(stdout);
    }
  }
  stats.times.steps = detail::seconds_since(steps_start);
  evaluations_start = std::chrono::steady_clock::now();
  auto restore_start = [&] {
    for (size_t i = 0; i < active.size(); ++i) active[i]->restore(start.layers[i]);
    for (size_t i = 0; i < norms.size(); ++i) norms[i]->value.copy_from(start.norms[i]);
  };
  // The trained state's terms; an evaluation that fails or is not finite (the last step's update
  // diverged) is a divergence too.
  std::vector<LossTerms> after, hard;
  auto evaluate_end = [&] {
    after = window_loss.evaluate(balance_begin, N, std::nullopt);
    hard = trains_hard ? after : window_loss.evaluate(balance_begin, N, quant::RoundingMode::hard);
  };
  if (diverged.empty()) {
    try {
      evaluate_end();
    } catch (const Error& e) {
      diverge(e.what(), false);
    }
    for (const std::vector<LossTerms>* v : {&after, &hard})
      for (const LossTerms& t : *v)
        if (diverged.empty() && !std::isfinite(t.total))
          diverge(fmt::format("CBQ: the trained state's loss is {} in window {} ({}) after {} "
                              "steps",
                              t.total, window_index, stats.units, step),
                  false);
  }
  if (!diverged.empty()) {  // back to the start, whose terms are what the window keeps
    restore_start();
    evaluate_end();
  }
  stats.loss_after = mean(after, 0, N - balance_begin);
  stats.loss_after.round = window_loss.regularizer_value(o.beta_end);
  stats.loss_hard = mean(hard, 0, N - balance_begin);
  stats.diverged = diverged;
  if (o.keep_better) {
    stats.judged = true;
    stats.heldout = heldout;
    stats.heldout_trained = mean(hard, judge_begin - balance_begin, N - balance_begin);
    // Ties keep the trained state; only a strictly better start wins (or any start, when the
    // training diverged).
    stats.kept_start = !diverged.empty() || stats.heldout_start.reconstruction() <
                                                stats.heldout_trained.reconstruction();
    if (stats.kept_start && diverged.empty()) restore_start();
  }
  stats.times.evaluations += detail::seconds_since(evaluations_start);
  stats.steps = step;
  stats.seconds = detail::seconds_since(wstart);
  if (o.verbose) print_window_balance(stats, window_index, num_windows);
  return stats;
}

}  // namespace cbq
