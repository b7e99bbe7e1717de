#pragma once
// Checkpoints of the CBQ pass, written after every window so that a crashed or killed run
// continues where it stopped (docs/RELIABILITY.md).
//
// A checkpoint is one safetensors file, DIR/cbq-checkpoint.safetensors, written atomically
// (temporary file, fsync, rename, fsync of the directory). It holds the state at a window
// boundary, which is everything the rest of the pass depends on:
//   x_fp.N, x_q.N          both calibration paths at the next window's first block
//   layer.<name>.<key>     every installed QuantLinear (learned steps, rounding, activation
//                          quantizers; codes/scales/zero-points once hardened)
//   metadata               format, fingerprints, windows done, window statistics, the layers whose
//                          activation steps were initialised
// The optimiser state and the RNG need no saving at a boundary: every window starts a fresh Adam
// and draws its sample order from an RNG seeded with (seed, the window's first block), so both
// are recreated exactly. A run killed inside a window resumes at that window's start.
//
// The fingerprint hashes the model's weights, the calibration inputs and the configuration
// separately; resuming with any of them changed is refused with a message naming which. Every
// tensor carries a checksum in the metadata and is validated on resume (finite; steps positive;
// codes, zero-points and group indices integers in range): an edited checkpoint is refused naming
// the tensor.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cbq/formats/safetensors.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

// 2: a checksum per tensor in the metadata ("checksum.<tensor>"), checked on resume.
inline constexpr const char* kCheckpointFormat = "cbq-checkpoint-2";
inline constexpr const char* kCheckpointFile = "cbq-checkpoint.safetensors";

// 64-bit FNV-1a over 8-byte words (and the tail bytes): a content hash, not a cryptographic one.
class Hasher {
 public:
  void bytes(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      mix(w);
    }
    for (; i < n; ++i) mix(p[i]);
    mix(n);
  }
  void text(const std::string& s) { bytes(s.data(), s.size()); }
  template <class T>
  void tensor(const Tensor<T>& t) {
    const Tensor<T> c = t.is_cpu() ? t.contiguous() : t.to(Device::cpu);
    for (int64_t d : c.shape()) mix(static_cast<uint64_t>(d));
    bytes(c.data(), static_cast<std::size_t>(c.numel()) * sizeof(T));
  }
  uint64_t value() const { return h_; }

 private:
  void mix(uint64_t w) {
    h_ ^= w;
    h_ *= 0x100000001b3ULL;
  }
  uint64_t h_ = 0xcbf29ce484222325ULL;
};

struct PassFingerprint {
  uint64_t model = 0, data = 0, config = 0;
};

// Every run-time option that changes the result, as text (verbose, checkpoint paths and the
// test hook do not). Keep in step with PassOptions.
inline std::string describe_options(const PassOptions& o) {
  // Options added later appear only when set, so that older checkpoints keep their fingerprint.
  const std::string later =
      (o.boundary_loss != 0 ? fmt::format(" boundary={:a}", o.boundary_loss) : std::string()) +
      (o.min_window_units != 0 ? fmt::format(" min_window={}", o.min_window_units) : "") +
      (o.half_block_steps != 1.0 ? fmt::format(" half_block_steps={:a}", o.half_block_steps) : "");
  return fmt::format(
      "epochs={} lr_w={:a} lr_x={:a} lr_r={:a} lr_min={:a} lsq={} l2={} kld={} hom={} fp={} "
      "tau={:a} gamma={:a} beta={:a}/{:a} warmup={:a} start={} v0_tracks={} mode={} a1_std={:a} "
      "learn_w={} learn_x={} scaling={} cfp_w={} sq_alpha={:a} seed={} max_steps={} init={} "
      "damp={:a} norms={} lr_norm={:a} out_kld={:a} out_all={} scale={} keep={} hold={:a}/{} "
      "grid={} ftz={} attn_kl={:a}/{} dep={} group_h={:a} dep_n={}{}",
      o.epochs, o.lr_weight_step, o.lr_act_step, o.lr_rounding, o.lr_min_fraction, o.lsq_grad_scale,
      o.loss_l2, o.loss_kld, o.loss_homologous, o.loss_full_precision, o.kld_temperature,
      o.gamma_round, o.beta_start, o.beta_end, o.round_warmup, static_cast<int>(o.lora_start),
      o.v0_tracks_step, static_cast<int>(o.rounding_mode), o.lora_a1_std, o.learn_weight_step,
      o.learn_act_step, static_cast<int>(o.activation_scaling), o.cfp_weights, o.smoothquant_alpha,
      o.seed, o.max_steps, static_cast<int>(o.weight_init), o.gptq_percdamp, o.learn_norms,
      o.lr_norm, o.output_kld, o.output_kld_all, static_cast<int>(o.loss_scale), o.keep_better,
      o.holdout_fraction, o.holdout_min, static_cast<int>(o.fixed_grid()), o.flush_denormals,
      o.attention_kl, o.attention_kl_homologous, static_cast<int>(o.dependency), o.group_threshold,
      o.dependency_samples, later);
}

template <TransformerBlock Block>
uint64_t model_fingerprint(Transformer<Block>& model) {
  Hasher h;
  h.text(model.config.architecture);
  auto param = [&](const auto& p) {
    if (!p.value.defined()) return;
    h.text(p.name);
    h.tensor(p.value);
  };
  param(model.embed_tokens);
  param(model.embed_positions);
  for (auto& block : model.blocks) {
    for (auto* layer : block.linears()) {
      param(layer->weight);
      param(layer->bias);
    }
    for (auto* p : block.other_parameters()) param(*p);
  }
  param(model.final_norm_weight);
  param(model.final_norm_bias);
  param(model.lm_head);
  return h.value();
}

template <class T>
uint64_t data_fingerprint(const std::vector<Tensor<T>>& block0_inputs) {
  Hasher h;
  for (const auto& x : block0_inputs) h.tensor(x);
  return h.value();
}

inline uint64_t config_fingerprint(const std::string& spec, const PassOptions& o) {
  Hasher h;
  h.text(spec);
  h.text(describe_options(o));
  return h.value();
}

namespace detail {

inline nlohmann::json to_json(const LossTerms& l) {
  return {l.total, l.l2_fp,      l.kld_fp,       l.l2_hom,  l.kld_hom,
          l.round, l.output_kld, l.attention_kl, l.boundary};
}
inline LossTerms loss_from_json(const nlohmann::json& j) {
  return {j.at(0).get<double>(),
          j.at(1).get<double>(),
          j.at(2).get<double>(),
          j.at(3).get<double>(),
          j.at(4).get<double>(),
          j.at(5).get<double>(),
          j.size() > 6 ? j.at(6).get<double>() : 0.0,
          j.size() > 7 ? j.at(7).get<double>() : 0.0,
          j.size() > 8 ? j.at(8).get<double>() : 0.0};
}

inline std::vector<WindowStats> parse_window_stats(const std::string& text) {
  std::vector<WindowStats> out;
  for (const auto& w : nlohmann::json::parse(text)) {
    WindowStats s;
    s.first_block = w.at("first").get<int64_t>();
    s.last_block = w.at("last").get<int64_t>();
    s.units = w.value("units", std::string());
    s.steps = w.at("steps").get<int64_t>();
    s.seconds = w.at("seconds").get<double>();
    s.loss_before = loss_from_json(w.at("before"));
    s.loss_after = loss_from_json(w.at("after"));
    s.first_epoch_loss = loss_from_json(w.at("first_epoch"));
    s.final_loss = loss_from_json(w.at("final"));
    // Added with the loss balance and the start-vs-trained rule (absent in older checkpoints).
    if (w.contains("hard")) s.loss_hard = loss_from_json(w.at("hard"));
    s.balance_samples = w.value("balance_samples", int64_t{0});
    if (w.contains("energy")) {
      s.energy_fp = w.at("energy").at(0).get<double>();
      s.energy_hom = w.at("energy").at(1).get<double>();
    }
    if (w.contains("judged")) {
      s.judged = w.at("judged").get<bool>();
      s.heldout = w.at("heldout").get<int64_t>();
      s.heldout_start = loss_from_json(w.at("heldout_start"));
      s.heldout_trained = loss_from_json(w.at("heldout_trained"));
      s.kept_start = w.at("kept_start").get<bool>();
      s.diverged = w.value("diverged", std::string());
    }
    if (w.contains("curve"))
      for (const auto& c : w.at("curve")) s.curve.push_back(loss_from_json(c));
    out.push_back(s);
  }
  return out;
}
inline std::vector<std::string> parse_string_list(const std::string& text) {
  return nlohmann::json::parse(text).get<std::vector<std::string>>();
}
inline std::map<std::string, std::map<std::string, double>> parse_layer_scalars(
    const std::string& text) {
  return nlohmann::json::parse(text).get<std::map<std::string, std::map<std::string, double>>>();
}

inline std::string tensor_checksum(const Tensor<float>& t) {
  Hasher h;
  h.tensor(t);
  return fmt::format("{:016x}", h.value());
}

// What a tensor of a checkpoint may hold, by its name: everything finite; steps positive;
// codes, zero-points and group indices integers in range. An edited or corrupted checkpoint is
// refused naming the tensor, the element and the value.
inline void validate_checkpoint_tensor(const std::string& path, const std::string& name,
                                       const Tensor<float>& t, int code_bits = 8) {
  const std::string key = name.substr(name.rfind('.') + 1);
  const bool positive = key == "w_scale" || key == "w_scale_init" || key == "w_scale_floor" ||
                        key == "q_scale" || key == "act_scale" || key == "act_scale_init";
  const bool integral = key == "codes" || key == "q_zero" || key == "g_idx" ||
                        (key == "w_zero" && name.rfind("layer.", 0) == 0);
  const double max_integer =
      key == "g_idx" ? 2147483647.0 : static_cast<double>((int64_t{1} << code_bits) - 1);
  const Tensor<float> c = t.contiguous();
  const float* p = c.data();
  for (int64_t i = 0; i < c.numel(); ++i) {
    const float v = p[i];
    CBQ_CHECK(std::isfinite(v),
              "{}: refusing to resume: tensor {} holds a non-finite value ({}) at element {}", path,
              name, v, i);
    CBQ_CHECK(!positive || v > 0.f,
              "{}: refusing to resume: tensor {} (a quantization step) holds {} at element {}; "
              "steps are positive",
              path, name, v, i);
    CBQ_CHECK(!integral || (v == std::nearbyint(v) && v >= 0.f && v <= max_integer),
              "{}: refusing to resume: tensor {} holds {} at element {}; it stores integers in "
              "[0, {}]",
              path, name, v, i, max_integer);
  }
}

// The format, then every tensor's checksum and range (validate_checkpoint_tensor).
inline void check_checkpoint_file(const io::SafetensorsFile& file, const std::string& path,
                                  int code_bits) {
  const auto& meta = file.metadata();
  auto it = meta.find("format");
  CBQ_CHECK(it != meta.end(), "{}: not a cbq checkpoint (metadata 'format' missing)", path);
  CBQ_CHECK(it->second == kCheckpointFormat,
            "{}: format '{}', expected '{}' (a checkpoint of another cbq version: remove it to "
            "start afresh)",
            path, it->second, kCheckpointFormat);
  for (const std::string& name : file.names()) {
    auto sum_it = meta.find("checksum." + name);
    CBQ_CHECK(sum_it != meta.end(), "{}: refusing to resume: tensor {} has no checksum", path,
              name);
    const Tensor<float> t = file.to_float(name);
    const std::string sum = tensor_checksum(t);
    CBQ_CHECK(sum == sum_it->second,
              "{}: refusing to resume: tensor {} does not match its checksum ({} stored, {} "
              "computed): the checkpoint was edited or corrupted; remove it to start afresh",
              path, name, sum_it->second, sum);
    validate_checkpoint_tensor(path, name, t, code_bits);
  }
}

}  // namespace detail

// Checks DIR's checkpoint before a run loads anything: its format, the pass configuration
// (`config`, config_fingerprint; the model's and the data's fingerprints need the weights and
// are checked when the pass resumes), every tensor's checksum and range, codes and zero-points
// below 2^code_bits. Returns false when DIR holds no checkpoint; throws naming the tensor.
inline bool validate_pass_checkpoint(const std::string& dir, uint64_t config, int code_bits) {
  const std::string path = (std::filesystem::path(dir) / kCheckpointFile).string();
  if (!std::filesystem::exists(path)) return false;
  io::SafetensorsFile file(path);
  const auto& meta = file.metadata();
  auto it = meta.find("fingerprint.config");
  const std::string want = fmt::format("{:016x}", config);
  CBQ_CHECK(it == meta.end() || it->second == want,
            "{}: refusing to resume: the pass configuration differs from the run that wrote this "
            "checkpoint (fingerprint {} there, {} now). Resume with the same options, or remove "
            "the checkpoint to start afresh.",
            path, it->second, want);
  detail::check_checkpoint_file(file, path, code_bits);
  return true;
}

// What the pass restores from a checkpoint.
template <class T>
struct PassCheckpoint {
  int64_t windows_done = 0;
  std::vector<Tensor<T>> x_fp, x_q;
  std::vector<WindowStats> windows;
  std::vector<std::string> initialised;  // layers whose static activation steps were set
  std::map<std::string, typename QuantLinear<T>::State> layers;
  std::map<std::string, Tensor<T>> norms;  // learned norm parameters (learn_norms), by name
};

inline std::string checkpoint_path(const std::string& dir) {
  return (std::filesystem::path(dir) / kCheckpointFile).string();
}

// Writes the checkpoint for the state after `ck.windows_done` windows (atomic, durable).
template <class T>
void save_pass_checkpoint(const std::string& dir, const PassFingerprint& fp,
                          const PassCheckpoint<T>& ck,
                          const std::vector<const QuantLinear<T>*>& layers) {
  static_assert(std::is_same_v<T, float>, "checkpoints store float32 state");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  CBQ_CHECK(!ec, "CBQ checkpoint: cannot create directory {}: {}", dir, ec.message());
  std::map<std::string, io::TensorToWrite> tensors;
  for (size_t n = 0; n < ck.x_fp.size(); ++n) {
    tensors[fmt::format("x_fp.{}", n)] = io::TensorToWrite::f32(ck.x_fp[n]);
    tensors[fmt::format("x_q.{}", n)] = io::TensorToWrite::f32(ck.x_q[n]);
  }
  for (const auto& [name, t] : ck.norms)
    tensors[fmt::format("norm.{}", name)] = io::TensorToWrite::f32(t);
  nlohmann::json scalars = nlohmann::json::object();
  for (const QuantLinear<T>* q : layers) {
    const auto st = q->state();
    for (const auto& [key, t] : st.tensors)
      tensors[fmt::format("layer.{}.{}", q->name(), key)] = io::TensorToWrite::f32(t);
    scalars[q->name()] = st.scalars;
  }
  nlohmann::json windows = nlohmann::json::array();
  for (const WindowStats& w : ck.windows) {
    nlohmann::json curve = nlohmann::json::array();
    for (const LossTerms& c : w.curve) curve.push_back(detail::to_json(c));
    windows.push_back({{"first", w.first_block},
                       {"last", w.last_block},
                       {"units", w.units},
                       {"steps", w.steps},
                       {"seconds", w.seconds},
                       {"before", detail::to_json(w.loss_before)},
                       {"after", detail::to_json(w.loss_after)},
                       {"first_epoch", detail::to_json(w.first_epoch_loss)},
                       {"final", detail::to_json(w.final_loss)},
                       {"hard", detail::to_json(w.loss_hard)},
                       {"balance_samples", w.balance_samples},
                       {"energy", {w.energy_fp, w.energy_hom}},
                       {"judged", w.judged},
                       {"heldout", w.heldout},
                       {"heldout_start", detail::to_json(w.heldout_start)},
                       {"heldout_trained", detail::to_json(w.heldout_trained)},
                       {"kept_start", w.kept_start},
                       {"diverged", w.diverged},
                       {"curve", curve}});
  }
  std::map<std::string, std::string> meta;
  meta["format"] = kCheckpointFormat;
  meta["fingerprint.model"] = fmt::format("{:016x}", fp.model);
  meta["fingerprint.data"] = fmt::format("{:016x}", fp.data);
  meta["fingerprint.config"] = fmt::format("{:016x}", fp.config);
  meta["windows_done"] = std::to_string(ck.windows_done);
  meta["samples"] = std::to_string(ck.x_fp.size());
  meta["windows"] = windows.dump();
  meta["layer_scalars"] = scalars.dump();
  meta["initialised"] = nlohmann::json(ck.initialised).dump();
  meta["optimizer"] = "Adam restarts at every window (nothing to carry across a boundary)";
  meta["rng"] = "per window: mt19937_64(seed * 7919 + first block)";
  for (const auto& [name, t] : tensors)
    meta["checksum." + name] = detail::tensor_checksum(std::get<Tensor<float>>(t.source));
  io::write_safetensors(checkpoint_path(dir), tensors, meta);
}

// Reads a checkpoint written by save_pass_checkpoint; refuses one whose fingerprint differs.
template <class T>
PassCheckpoint<T> load_pass_checkpoint(const std::string& dir, const PassFingerprint& fp) {
  static_assert(std::is_same_v<T, float>, "checkpoints store float32 state");
  const std::string path = checkpoint_path(dir);
  io::SafetensorsFile file(path);
  const auto& meta = file.metadata();
  auto meta_value = [&](const std::string& key) -> const std::string& {
    auto it = meta.find(key);
    CBQ_CHECK(it != meta.end(), "{}: not a cbq checkpoint (metadata '{}' missing)", path, key);
    return it->second;
  };
  // Every tensor as it was written (checksum) and within what the pass can have produced (the
  // codes' exact range is checked against the layer's bits when it is restored).
  detail::check_checkpoint_file(file, path, 8);
  const std::pair<const char*, uint64_t> parts[] = {
      {"model", fp.model}, {"data", fp.data}, {"config", fp.config}};
  for (const auto& [what, expected] : parts) {
    const std::string have = meta_value(std::string("fingerprint.") + what);
    const std::string want = fmt::format("{:016x}", expected);
    CBQ_CHECK(have == want,
              "{}: refusing to resume: the {} differs from the run that wrote this checkpoint "
              "(fingerprint {} there, {} now). Resume with the same model, calibration data and "
              "options, or remove the checkpoint to start afresh.",
              path,
              what == std::string("model")  ? "model's weights"
              : what == std::string("data") ? "calibration data"
                                            : "pass configuration",
              have, want);
  }
  PassCheckpoint<T> ck;
  try {
    ck.windows_done = std::stoll(meta_value("windows_done"));
    const int64_t samples = std::stoll(meta_value("samples"));
    for (int64_t n = 0; n < samples; ++n) {
      ck.x_fp.push_back(file.to_float(fmt::format("x_fp.{}", n)));
      ck.x_q.push_back(file.to_float(fmt::format("x_q.{}", n)));
    }
    ck.windows = detail::parse_window_stats(meta_value("windows"));
    ck.initialised = detail::parse_string_list(meta_value("initialised"));
    for (auto& [name, values] : detail::parse_layer_scalars(meta_value("layer_scalars")))
      ck.layers[name].scalars = std::move(values);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed checkpoint metadata: {}", path, e.what());
  } catch (const std::logic_error& e) {
    fail("{}: malformed checkpoint metadata: {}", path, e.what());
  }
  const std::string prefix = "layer.", norm_prefix = "norm.";
  for (const std::string& name : file.names()) {
    if (name.rfind(norm_prefix, 0) == 0) {
      ck.norms[name.substr(norm_prefix.size())] = file.to_float(name);
      continue;
    }
    if (name.rfind(prefix, 0) != 0) continue;
    const auto dot = name.rfind('.');
    const std::string layer = name.substr(prefix.size(), dot - prefix.size());
    auto it = ck.layers.find(layer);
    CBQ_CHECK(it != ck.layers.end(), "{}: tensor {} belongs to no layer in the metadata", path,
              name);
    it->second.tensors[name.substr(dot + 1)] = file.to_float(name);
  }
  return ck;
}

}  // namespace cbq
