// Sub-block units (ACBQ): the halves of LLaMA and OPT blocks, the pass over them, the adaptive
// groups and the attention-map term (pass/units.hpp, pass/adaptive_groups.hpp, docs/ACBQ.md).
#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <cbq/model/llama_block.hpp>
#include <cbq/model/opt_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/pass.hpp>

#include "support/files.hpp"
#include "support/fixtures.hpp"

using namespace cbq;
using cbq::testing::quiet_options;
using cbq::testing::random_hidden;

namespace {

using W3 = Quantizer<3, PerGroup<8>>;
using TinyPass = Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>>;

// A user's block that satisfies TransformerBlock but does not expose its halves.
template <class T>
class WholeOnlyBlock {
 public:
  using scalar_type = T;
  WholeOnlyBlock(const ModelConfig& c, int64_t i, const WeightMap& w) : inner_(c, i, w) {}
  Var<T> forward(Tape<T>& tape, Var<T> x, const BlockContext<T>& ctx) {
    return inner_.forward(tape, x, ctx);
  }
  std::vector<LinearLayer<T>*> linears() { return inner_.linears(); }
  std::vector<Parameter<T>*> other_parameters() { return inner_.other_parameters(); }
  std::vector<ActivationSite<T>> activation_sites() { return inner_.activation_sites(); }
  const ModelConfig& config() const { return inner_.config(); }
  int64_t index() const { return inner_.index(); }

 private:
  LlamaBlock<T> inner_;
};
static_assert(TransformerBlock<WholeOnlyBlock<float>>);
static_assert(!SplitTransformerBlock<WholeOnlyBlock<float>>);

template <class Model>
void check_halves_compose(Model& model, uint64_t seed) {
  using T = typename Model::T;
  PassUnits<Model> halves(model, UnitKind::sub_blocks);
  PassUnits<Model> blocks(model, UnitKind::blocks);
  REQUIRE(halves.count() == 2 * model.num_blocks());
  REQUIRE(blocks.count() == model.num_blocks());
  const Tensor<T> x = random_hidden(1, 9, model.config.dim, seed)[0].template cast<T>();
  BlockContext<T> fp;
  fp.full_precision = true;
  Tensor<T> a = x, b = x;
  for (int64_t u = 0; u < halves.count(); ++u) a = halves.run(u, a, fp);
  for (int64_t u = 0; u < blocks.count(); ++u) b = blocks.run(u, b, fp);
  REQUIRE(a.shape() == b.shape());
  for (int64_t i = 0; i < a.numel(); ++i) {
    REQUIRE(std::isfinite(static_cast<double>(a[i])));
    REQUIRE(a[i] == b[i]);  // the same ops in the same order: bit for bit
  }
  for (int64_t k = 0; k < model.num_blocks(); ++k) {
    auto& block = model.blocks[static_cast<size_t>(k)];
    std::vector<LinearLayer<T>*> joined = halves.linears(2 * k);
    for (auto* l : halves.linears(2 * k + 1)) joined.push_back(l);
    CHECK(joined == block.linears());
    std::vector<Parameter<T>*> params = halves.parameters(2 * k);
    for (auto* p : halves.parameters(2 * k + 1)) params.push_back(p);
    CHECK(params == block.other_parameters());
    CHECK(halves.linear_offset(2 * k) == 0);
    CHECK(halves.linear_offset(2 * k + 1) == static_cast<int64_t>(halves.linears(2 * k).size()));
    CHECK(halves.block(2 * k + 1) == k);
    CHECK(halves.is_attention(2 * k));
    CHECK_FALSE(halves.is_attention(2 * k + 1));
  }
  CHECK(halves.range(0, 3) == "units 0.attention..1.ffn");
  CHECK(blocks.range(0, 1) == "blocks 0..1");
  CHECK(blocks.range(2, 2) == "block 2");
}

// Windows of a schedule: every unit finalized exactly once, in order, by a window that holds it;
// windows start where the previous one finalized up to; none larger than max_units.
void check_schedule(const std::vector<Window>& windows, int64_t units, int64_t max_units) {
  REQUIRE_FALSE(windows.empty());
  int64_t next = 0;
  for (const Window& w : windows) {
    CHECK(w.first == next);
    CHECK(w.finalize > w.first);
    CHECK(w.finalize <= w.last + 1);
    CHECK(w.size() <= max_units);
    next = w.finalize;
  }
  CHECK(next == units);
  CHECK(windows.back().last == units - 1);
}

// Every unit exactly once, in order, no group above max_units.
void check_partition(const std::vector<Window>& groups, int64_t units, int64_t max_units) {
  REQUIRE_FALSE(groups.empty());
  int64_t next = 0;
  for (const Window& g : groups) {
    CHECK(g.first == next);
    CHECK(g.last >= g.first);
    CHECK(g.size() <= max_units);
    CHECK(g.finalize == g.last + 1);
    next = g.last + 1;
  }
  CHECK(next == units);
}

}  // namespace

TEST_CASE("units: LLaMA and OPT halves compose to the block, bit for bit, and split its layers") {
  {
    ModelConfig c = tiny_llama_config();
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 3));
    check_halves_compose(model, 5);
  }
  {
    ModelConfig c = tiny_opt_config();
    Transformer<OptBlock<float>> model(c, random_weights(c, 4));
    check_halves_compose(model, 6);
  }
}

TEST_CASE("units: a block without halves is refused for sub-block units, with the reason") {
  ModelConfig c = tiny_llama_config();
  Transformer<WholeOnlyBlock<float>> model(c, random_weights(c, 3));
  CHECK_THROWS_WITH_AS(PassUnits<decltype(model)>(model, UnitKind::sub_blocks),
                       doctest::Contains("does not expose its attention and FFN halves"), Error);
  PassSpec spec = Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>>::make_spec();
  spec.units = UnitKind::sub_blocks;
  CbqPass pass(spec, quiet_options(1));
  CHECK_THROWS_WITH_AS(pass.run_from_hidden(model, random_hidden(2, 6, c.dim, 1)),
                       doctest::Contains("SplitTransformerBlock"), Error);
  // Whole-block units still work for it.
  spec.units = UnitKind::blocks;
  CbqPass whole(spec, quiet_options(1));
  CHECK(whole.run_from_hidden(model, random_hidden(2, 6, c.dim, 1)).layers.size() ==
        static_cast<size_t>(7 * c.n_layers));
}

TEST_CASE("adaptive groups: a partition for any dependencies, threshold and size; deterministic") {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> uni(0.0, 3.0);
  for (int64_t units : {1, 2, 5, 12, 60}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<double> dep(static_cast<size_t>(units - 1));
      for (double& d : dep) d = uni(rng);
      if (trial == 0) std::fill(dep.begin(), dep.end(), 0.0);  // no information at all
      const int64_t max_units = 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(units));
      const double threshold = uni(rng);
      CAPTURE(units);
      CAPTURE(max_units);
      CAPTURE(threshold);
      const auto groups = adaptive_groups(dep, threshold, max_units);
      check_partition(groups, units, max_units);
      const auto again = adaptive_groups(dep, threshold, max_units);
      REQUIRE(again.size() == groups.size());
      for (size_t g = 0; g < groups.size(); ++g) CHECK(again[g].last == groups[g].last);
      // Windows over the groups: each group and the next `overlap` ones.
      for (int64_t overlap : {0, 1, 2}) {
        CAPTURE(overlap);
        const auto windows = adaptive_schedule(dep, threshold, max_units, overlap);
        check_schedule(windows, units, (overlap + 1) * max_units);
        for (size_t w = 0; w + 1 < windows.size(); ++w) {
          // Window w finalizes exactly group w.
          CHECK(windows[w].first == groups[w].first);
          CHECK(windows[w].finalize == groups[w].last + 1);
        }
        if (overlap == 0) CHECK(windows.size() == groups.size());
        // Extended to a minimum span: the same groups finalized, every window but the last of at
        // least min_units units (the last may end at the model's end) and no longer than needed.
        for (int64_t min_units : {2, 4}) {
          CAPTURE(min_units);
          const auto spans = adaptive_schedule(dep, threshold, max_units, overlap, min_units);
          check_schedule(spans, units, std::max((overlap + 1) * max_units, min_units));
          for (size_t w = 0; w < spans.size(); ++w) {
            CHECK(spans[w].first == groups[w].first);
            if (w + 1 < spans.size()) {
              CHECK(spans[w].finalize == groups[w].last + 1);
              CHECK(spans[w].size() >= min_units);
            }
            CHECK(spans[w].last >= windows[std::min(w, windows.size() - 1)].last);
            CHECK(
                spans[w].last ==
                std::min(
                    units - 1,
                    std::max(
                        groups[std::min(w + static_cast<size_t>(overlap), groups.size() - 1)].last,
                        groups[w].first + min_units - 1)));
          }
        }
      }
    }
  }
  // A threshold no mean reaches: every unit alone; one every mean reaches: groups of the maximum.
  const std::vector<double> dep{1, 2, 0.5, 4, 1, 1, 3};
  CHECK(adaptive_groups(dep, 1e9, 3).size() == 8);
  const auto full = adaptive_groups(dep, -1.0, 3);
  REQUIRE(full.size() == 3);
  CHECK(full[0].last == 2);
  CHECK(full[2].last == 7);
  // Normalised by the mean (12.5 / 7): the pair (0, 1) is below it, (2, 3) above.
  const auto cut = adaptive_groups({0.5, 3.0, 0.5}, 1.0, 2);
  REQUIRE(cut.size() == 3);
  CHECK(cut[0].last == 0);
  CHECK(cut[1].last == 2);
  CHECK(cut[2].last == 3);
}

TEST_CASE("adaptive groups: configurations that cannot work are clear errors") {
  const std::vector<double> dep{1, 1, 1};  // 4 units
  CHECK_THROWS_WITH_AS(adaptive_schedule(dep, 1.0, 5), doctest::Contains("only 4"), Error);
  CHECK_THROWS_WITH_AS(adaptive_schedule(dep, 1.0, 0), doctest::Contains("must be ≥ 1"), Error);
  CHECK_THROWS_WITH_AS(adaptive_schedule({1.0, NAN, 1.0}, 1.0, 2),
                       doctest::Contains("not a finite"), Error);
  // A group larger than the model, through the pass.
  ModelConfig c = tiny_llama_config();  // 3 blocks: 6 sub-block units
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 3));
  Acbq<W3, ActQuant<16>, LoraRounding<2>, 7> too_big(quiet_options(1));
  CHECK_THROWS_WITH_AS(too_big.run_from_hidden(model, random_hidden(2, 6, c.dim, 1)),
                       doctest::Contains("groups of up to 7 units, but the model has 6"), Error);
  PassSpec spec = Acbq<W3>::make_spec();
  CHECK(spec.window_overlap == 1);
  spec.window_overlap = -1;
  CHECK_THROWS_WITH_AS(CbqPass(spec, quiet_options(1)), doctest::Contains("must be ≥ 0"), Error);
  CHECK_THROWS_WITH_AS(adaptive_schedule(dep, 1.0, 2, -1), doctest::Contains("must be ≥ 0"), Error);
  CHECK_THROWS_WITH_AS(adaptive_schedule(dep, 1.0, 2, 1, -1),
                       doctest::Contains("at least -1 units (must be ≥ 0)"), Error);
}

TEST_CASE("adaptive groups: both dependency measures are finite, in range and deterministic") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 8));
  PassUnits<decltype(model)> units(model, UnitKind::sub_blocks);
  const auto x = random_hidden(3, 10, c.dim, 2);
  const auto entropy = unit_dependencies(units, x, DependencyMeasure::entropy, 3, {});
  REQUIRE(entropy.size() == static_cast<size_t>(units.count() - 1));
  for (double d : entropy) {
    CHECK(std::isfinite(d));
    CHECK(d >= 0.0);
    CHECK(d <= 1.0);
  }
  CHECK(unit_dependencies(units, x, DependencyMeasure::entropy, 3, {}) == entropy);
  // error_gain through the pass (its round-to-nearest quantizers), on the result.
  Acbq<W3, ActQuant<16>, LoraRounding<2>, 2> pass(quiet_options(1));
  const QuantizationResult r = pass.run_from_hidden(model, x);
  REQUIRE(r.dependencies.size() == static_cast<size_t>(units.count() - 1));
  for (double d : r.dependencies) {
    CHECK(std::isfinite(d));
    CHECK(d > 0.0);
  }
  // The windows the pass ran are the schedule of its dependencies (groups ≤ 2, overlap 1).
  const auto expected = adaptive_schedule(r.dependencies, 1.0, 2, 1);
  REQUIRE(r.windows.size() == expected.size());
  for (size_t w = 0; w < expected.size(); ++w) {
    CHECK(r.windows[w].first_block == expected[w].first);
    CHECK(r.windows[w].last_block == expected[w].last);
  }
  check_schedule(expected, units.count(), 4);
  // The groups it recorded are those of its dependencies (a partition: the first test case).
  const auto groups = adaptive_groups(r.dependencies, 1.0, 2);
  REQUIRE(r.groups.size() == groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    CHECK(r.groups[g].first == groups[g].first);
    CHECK(r.groups[g].last == groups[g].last);
    CHECK(r.groups[g].label == units.range(groups[g].first, groups[g].last));
  }
}

TEST_CASE("sub-block pass: every layer quantized once, each window's loss goes down") {
  for (bool opt : {false, true}) {
    CAPTURE(opt);
    auto run = [&](auto& model) {
      // Sliding windows of two halves (overlap 1) and adaptive groups.
      PassOptions o = quiet_options(4);
      o.balance_all_samples = true;  // the loss over every sample, the 3 it trains on included
      Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>, SubBlockUnits> sliding(o);
      const QuantizationResult r =
          sliding.run_from_hidden(model, random_hidden(6, 12, model.config.dim, 7));
      CHECK(r.windows.size() == static_cast<size_t>(2 * model.num_blocks() - 1));
      std::set<std::string> names;
      for (const LayerResult& l : r.layers) names.insert(l.name);
      CHECK(names.size() == r.layers.size());
      CHECK(r.layers.size() ==
            static_cast<size_t>(model.num_blocks()) * model.blocks[0].linears().size());
      for (const WindowStats& w : r.windows) {
        CAPTURE(w.units);
        CHECK(w.units.rfind("units ", 0) == 0);
        CHECK(w.loss_after.reconstruction() < w.loss_before.reconstruction());
        CHECK(std::isfinite(w.loss_after.total));
      }
    };
    if (opt) {
      ModelConfig c = tiny_opt_config();
      Transformer<OptBlock<float>> model(c, random_weights(c, 5));
      run(model);
    } else {
      ModelConfig c = tiny_llama_config();
      Transformer<LlamaBlock<float>> model(c, random_weights(c, 5));
      run(model);
    }
  }
}

TEST_CASE("attention-map term: in the loss of attention units only, and it trains down") {
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 12));
  PassOptions o = quiet_options(4);
  o.attention_kl = 10.0;
  Pass<W3, ActQuant<16>, SlidingWindow<1, 0>, LoraRounding<2>, SubBlockUnits> pass(o);
  const QuantizationResult r = pass.run_from_hidden(model, random_hidden(6, 12, c.dim, 3));
  REQUIRE(r.windows.size() == static_cast<size_t>(2 * c.n_layers));
  for (size_t w = 0; w < r.windows.size(); ++w) {
    const WindowStats& s = r.windows[w];
    CAPTURE(s.units);
    if (w % 2 == 0) {  // an attention half: its quantized maps differ from the FP ones
      CHECK(s.loss_before.attention_kl > 0);
      CHECK(s.loss_after.attention_kl < s.loss_before.attention_kl);
    } else {
      CHECK(s.loss_before.attention_kl == 0);
    }
    CHECK(std::isfinite(s.loss_after.attention_kl));
  }
}

TEST_CASE("acbq: windows extended to a minimum span still finalize one group each") {
  ModelConfig c = tiny_llama_config();  // 3 blocks: 6 sub-block units
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 14));
  PassOptions o = quiet_options(1);
  o.min_window_units = 4;
  Acbq<W3, ActQuant<16>, LoraRounding<2>> pass(o);
  const QuantizationResult r = pass.run_from_hidden(model, random_hidden(6, 12, c.dim, 3));
  REQUIRE(r.windows.size() >= 2);
  REQUIRE(r.windows.size() <= r.groups.size());
  for (size_t w = 0; w < r.windows.size(); ++w) {
    const WindowStats& s = r.windows[w];
    CAPTURE(s.units);
    CHECK(s.first_block == r.groups[w].first);
    CHECK(s.last_block - s.first_block + 1 >= (w + 1 < r.windows.size() ? 4 : 1));
  }
  CHECK(r.windows.back().last_block == 5);
  CHECK(r.layers.size() == static_cast<size_t>(c.n_layers) * model.blocks[0].linears().size());
}

TEST_CASE("half-block steps: a window that freezes half a block trains that fraction") {
  ModelConfig c = tiny_llama_config();
  const int64_t N = 8;
  for (bool sub_blocks : {true, false}) {
    CAPTURE(sub_blocks);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 9));
    PassOptions o = quiet_options(2);
    o.half_block_steps = 0.75;
    const int64_t full = o.epochs * (N - o.holdout_samples(N));
    QuantizationResult r;
    if (sub_blocks) {
      Pass<W3, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>, SubBlockUnits> pass(o);
      r = pass.run_from_hidden(model, random_hidden(N, 8, c.dim, 4));
      CHECK(r.config.find("+ half-block windows x0.75 steps") != std::string::npos);
    } else {
      TinyPass pass(o);
      r = pass.run_from_hidden(model, random_hidden(N, 8, c.dim, 4));
      CHECK(r.config.find("half-block") == std::string::npos);
    }
    REQUIRE(r.windows.size() >= 2);
    for (size_t w = 0; w < r.windows.size(); ++w) {
      CAPTURE(w);
      // Sub-block windows of 2 units with overlap 1 freeze one half, the last one both of its
      // halves; block windows always freeze a whole block.
      const bool half = sub_blocks && w + 1 < r.windows.size();
      CHECK(r.windows[w].steps == (half ? (3 * full + 2) / 4 : full));
    }
  }
  PassOptions bad = quiet_options(1);
  for (double f : {0.0, 1.5}) {
    bad.half_block_steps = f;
    CHECK_THROWS_WITH_AS(TinyPass{bad}, doctest::Contains("must be in (0, 1]"), Error);
  }
}

TEST_CASE("acbq: a run stopped mid-window resumes to bit-identical codes and steps") {
  const ModelConfig c = tiny_llama_config();
  auto run = [&](const std::string& dir, bool crash) {
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 21));
    PassOptions o = PassOptions::acbq();  // ACBQ's defaults: windows ≥ 4 units, 3/4 steps
    o.verbose = false;
    o.epochs = 2;
    o.checkpoint_dir = dir;
    o.resume = !dir.empty() && !crash;
    if (crash)
      o.on_step = [](int64_t window, int64_t step) {
        if (window == 2 && step == 1) throw std::runtime_error("simulated crash");
      };
    Acbq<W3, ActQuant<16>, LoraRounding<2>> pass(o);
    return pass.run_from_hidden(model, random_hidden(4, 8, c.dim, 5));
  };
  cbq::testing::TempDir dir("acbq-resume");
  const QuantizationResult whole = run("", false);
  REQUIRE(whole.windows.size() >= 2);
  CHECK_THROWS_WITH(run(dir.path.string(), true), "simulated crash");
  const QuantizationResult resumed = run(dir.path.string(), false);
  REQUIRE(resumed.layers.size() == whole.layers.size());
  CHECK(resumed.dependencies == whole.dependencies);
  REQUIRE(resumed.groups.size() == whole.groups.size());
  for (size_t g = 0; g < whole.groups.size(); ++g)
    CHECK(resumed.groups[g].label == whole.groups[g].label);
  for (size_t i = 0; i < whole.layers.size(); ++i) {
    const auto& a = whole.layers[i].weight;
    const auto& b = resumed.layers[i].weight;
    CAPTURE(whole.layers[i].name);
    CHECK(resumed.layers[i].name == whole.layers[i].name);
    REQUIRE(a.codes.numel() == b.codes.numel());
    for (int64_t k = 0; k < a.codes.numel(); ++k) REQUIRE(a.codes[k] == b.codes[k]);
    REQUIRE(a.scale.numel() == b.scale.numel());
    for (int64_t k = 0; k < a.scale.numel(); ++k) REQUIRE(a.scale[k] == b.scale[k]);
  }
}

TEST_CASE(
    "samples side by side: every sample once, in fixed contiguous chunks, on 1 or 2 threads") {
  // The policy: two chunks for a narrow model on the CPU, one otherwise.
  CHECK(sample_chunks(128, Device::cpu, 64) == kSampleChunks);
  CHECK(sample_chunks(1, Device::cpu, 64) == 1);
  CHECK(sample_chunks(128, Device::cpu, kSideBySideMaxDim) == 1);
  CHECK(sample_chunks(128, Device::cuda, 64) == 1);
  CHECK(sample_chunks(128, Device::cpu, 64, false) == 1);
  const int before = num_threads();
  for (const int threads : {1, 2, 3})
    for (const int64_t samples : {2, 5, 128})
      for (const int chunks : {1, 2}) {
        CAPTURE(threads);
        CAPTURE(samples);
        CAPTURE(chunks);
        set_num_threads(threads);
        std::vector<int> seen(static_cast<size_t>(samples), 0), chunk_of(seen.size(), -1);
        for_sample_chunks<float>(samples, chunks, Device::cpu,
                                 [&](int chunk, int64_t begin, int64_t end, Tape<float>& tape) {
                                   CHECK(tape.device() == Device::cpu);
                                   for (int64_t n = begin; n < end; ++n) {
                                     ++seen[static_cast<size_t>(n)];
                                     chunk_of[static_cast<size_t>(n)] = chunk;
                                   }
                                 });
        set_num_threads(before);
        for (int64_t n = 0; n < samples; ++n) {
          CHECK(seen[static_cast<size_t>(n)] == 1);
          int expected = 0;  // chunk c holds [samples · c / chunks, samples · (c + 1) / chunks)
          while (samples * (expected + 1) / chunks <= n) ++expected;
          CHECK(chunk_of[static_cast<size_t>(n)] == expected);
        }
      }
  // A chunk's exception reaches the caller.
  set_num_threads(2);
  CHECK_THROWS_WITH_AS(for_sample_chunks<float>(4, 2, Device::cpu,
                                                [](int chunk, int64_t, int64_t, Tape<float>&) {
                                                  CBQ_CHECK(chunk != 1, "chunk {} failed", chunk);
                                                }),
                       doctest::Contains("chunk 1 failed"), Error);
  set_num_threads(before);
}
