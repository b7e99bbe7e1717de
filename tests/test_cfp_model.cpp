#include <cbq/core/mmap.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/calibration.hpp>
#include <cbq/pass/preprocess.hpp>
#include <filesystem>

#include "support/gradcheck.hpp"

using namespace cbq;

TEST_CASE("cfp: activation scaling on stories260K keeps the logits and shrinks channel ranges") {
  namespace fs = std::filesystem;
  const fs::path data = cbq::testing::data_dir();
  if (!fs::exists(data / "models" / "stories260K.bin")) {
    MESSAGE("skipped: stories260K.bin not found under " << data.string());
    return;
  }
  for (ActivationScaling mode : {ActivationScaling::cfp, ActivationScaling::smoothquant}) {
    AnyModel any = load_model((data / "models" / "stories260K.bin").string(),
                              (data / "models" / "tok512.bin").string());
    LlamaModel& m = any.llama();
    const std::string text =
        io::read_text_file((data / "text" / "tinystories_train_excerpt.txt").string());
    auto tokens = m.tokenizer->encode(text, true, false);
    Calibration calib = sample_calibration(tokens, 8, 256, 0);
    std::vector<Tensor<float>> x0;
    for (const auto& s : calib.samples) x0.push_back(m.embed_tensor(s));
    std::vector<int32_t> probe(tokens.begin() + 1000, tokens.begin() + 1300);
    Tensor<float> before = m.logits(probe).clone();
    PreprocessStats stats = scale_activation_outliers(m, x0, mode, 0.5, false);
    Tensor<float> after = m.logits(probe).clone();
    const double diff = cbq::testing::max_abs_diff(before, after);
    CHECK(diff < 1e-4);
    int64_t scaled = 0;
    double worst_before = 0, worst_after = 0;
    for (const auto& s : stats.sites) {
      scaled += s.scaled;
      worst_before = std::max(worst_before, s.max_before);
      worst_after = std::max(worst_after, s.max_after);
      if (s.scaled > 0 && mode == ActivationScaling::cfp) CHECK(s.max_after < s.max_before);
    }
    CHECK(scaled > 0);
    CHECK(worst_after < worst_before);
    MESSAGE(stats.method << ": " << scaled << " channels scaled over " << stats.sites.size()
                         << " sites; largest per-channel max " << worst_before << " -> "
                         << worst_after << "; max logit change " << diff);
  }
}
