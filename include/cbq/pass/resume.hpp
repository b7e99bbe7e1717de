#pragma once
// Checkpoints of the pass and resuming from one (the file format and its checks:
// pass/checkpoint.hpp). After every window the run writes what it carries to the next one
// (PassProgress); a resumed run restores it and continues with the window after the checkpoint's
// last, so that a run killed at any point ends with the same bits as one that never stopped
// (tests/test_pass_resume.cpp).
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cbq/pass/checkpoint.hpp"
#include "cbq/pass/checks_and_timing.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/units.hpp"
#include "cbq/pass/window_schedule.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

// A hardened layer's entry in the result.
template <class T>
LayerResult layer_result(const QuantLinear<T>& q) {
  LayerResult r{q.name(),           q.result(),         q.act_scale(),
                q.act_zero(),       q.act_clip_logit(), q.step_change(),
                q.rounding_flips(), q.codes_changed(),  q.output_error_start(),
                q.output_error()};
  return r;
}

// What the run over the schedule carries from window to window: the unit inputs of both paths,
// the installed quantizers per unit (pass/units.hpp), the learned norms (parameter, the value it
// does not hold now), the layers whose static activation steps were set, and the result so far.
template <class T>
struct PassProgress {
  std::vector<Tensor<T>>& x_fp;
  std::vector<Tensor<T>>& x_q;
  std::vector<std::vector<std::shared_ptr<QuantLinear<T>>>>& qlayers;
  std::vector<std::pair<Parameter<T>*, Tensor<T>>>& fp_norms;
  std::set<std::string>& initialised;
  QuantizationResult& result;
};

// Writes the state after window `windows_done`, whose last unit is `last_unit` (atomic,
// durable; float32 models only, as the checkpoint format).
template <class T>
void save_window_checkpoint(const std::string& dir, const PassFingerprint& fingerprint,
                            int64_t windows_done, int64_t last_unit,
                            const PassProgress<T>& progress) {
  static_assert(std::is_same_v<T, float>, "pass checkpoints hold float32 models");
  PassCheckpoint<T> ck;
  ck.windows_done = windows_done;
  ck.x_fp = detail::on_host(progress.x_fp);
  ck.x_q = detail::on_host(progress.x_q);
  ck.windows = progress.result.windows;
  ck.initialised.assign(progress.initialised.begin(), progress.initialised.end());
  for (auto& [p, other] : progress.fp_norms) ck.norms[p->name] = p->value.to(Device::cpu);
  std::vector<const QuantLinear<T>*> installed;
  for (int64_t u = 0; u <= last_unit; ++u)
    for (auto& q : progress.qlayers[static_cast<std::size_t>(u)]) installed.push_back(q.get());
  save_pass_checkpoint(dir, fingerprint, ck, installed);
}

// Restores the state after the checkpoint's last window into `progress`; returns how many windows
// it covers. `install(u)` installs unit u's quantizers (the pass's own install).
template <class Model, class T, class Install>
int64_t resume_from_checkpoint(const PassOptions& o, PassUnits<Model>& units,
                               const std::vector<Window>& windows,
                               const PassFingerprint& fingerprint, PassProgress<T>& progress,
                               Install&& install) {
  PassCheckpoint<T> ck = load_pass_checkpoint<T>(o.checkpoint_dir, fingerprint);
  const std::string path = checkpoint_path(o.checkpoint_dir);
  CBQ_CHECK(ck.windows_done >= 1 && ck.windows_done <= static_cast<int64_t>(windows.size()),
            "{}: {} windows done, but this pass has {}", path, ck.windows_done, windows.size());
  CBQ_CHECK(ck.x_fp.size() == progress.x_fp.size(), "{}: {} samples, expected {}", path,
            ck.x_fp.size(), progress.x_fp.size());
  for (size_t n = 0; n < progress.x_fp.size(); ++n) {
    progress.x_fp[n].copy_from(ck.x_fp[n]);
    progress.x_q[n].copy_from(ck.x_q[n]);
  }
  progress.result.windows = ck.windows;
  progress.initialised = std::set<std::string>(ck.initialised.begin(), ck.initialised.end());
  const Window& last = windows[static_cast<size_t>(ck.windows_done - 1)];
  for (int64_t u = 0; u <= last.last; ++u) {
    if (o.learn_norms)
      for (Parameter<T>* p : units.parameters(u)) {
        auto it = ck.norms.find(p->name);
        CBQ_CHECK(it != ck.norms.end() && it->second.shape() == p->value.shape(),
                  "{}: no learned value of shape {} for the norm parameter {}", path,
                  p->value.shape(), p->name);
        progress.fp_norms.emplace_back(p, p->value);
        p->value = it->second.to(p->value.device()).clone();
      }
    auto& layers = progress.qlayers[static_cast<std::size_t>(u)];
    layers = install(u);
    for (auto& q : layers) {
      auto it = ck.layers.find(q->name());
      CBQ_CHECK(it != ck.layers.end(), "{}: no state for layer {}", path, q->name());
      q->restore(it->second);
      if (u < last.finalize) {
        CBQ_CHECK(q->hardened(), "{}: layer {} should be frozen after window {}", path, q->name(),
                  ck.windows_done);
        progress.result.layers.push_back(layer_result(*q));
      }
    }
  }
  if (o.verbose)
    fmt::print("CBQ: resumed from {} after window {}/{} ({} frozen)\n", path, ck.windows_done,
               windows.size(), units.range(0, last.finalize - 1));
  return ck.windows_done;
}

}  // namespace cbq
