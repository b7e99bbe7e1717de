// Checkpoints and resume of the CBQ pass (pass/checkpoint.hpp), NaN reporting, determinism.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cbq/model/llama_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/pass.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "support/child_process.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::same_bits;

namespace {

using ResumeQ = Quantizer<4, PerGroup<8>>;
using ResumePass = Pass<ResumeQ, ActQuant<8>, SlidingWindow<2, 1>, LoraRounding<2>>;
constexpr int64_t kKillWindow = 2, kKillStep = 3;

ModelConfig resume_config() {
  ModelConfig c = tiny_llama_config();
  c.n_layers = 4;  // windows [0,1] [1,2] [2,3]
  return c;
}
std::vector<Tensor<float>> resume_inputs(int64_t d) {
  std::vector<Tensor<float>> x;
  for (int64_t i = 0; i < 5; ++i) x.push_back(cbq::testing::randn<float>(Shape{9, d}, 40 + i));
  return x;
}
PassOptions resume_options(const std::string& dir) {
  PassOptions o;
  o.verbose = false;
  o.epochs = 2;
  o.checkpoint_dir = dir;
  o.resume = !dir.empty();
  return o;
}

struct Run {
  QuantizationResult result;
  Tensor<float> logits;  // the quantized model's output on fixed tokens
};

Run run_pass(const PassOptions& o) {
  const ModelConfig c = resume_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 11));
  ResumePass pass(o);
  Run r;
  r.result = pass.run_from_hidden(model, resume_inputs(c.dim));
  r.logits = model.logits({1, 5, 9, 2, 7}).clone();
  return r;
}

void check_identical(const Run& a, const Run& b) {
  REQUIRE(a.result.layers.size() == b.result.layers.size());
  for (size_t i = 0; i < a.result.layers.size(); ++i) {
    const LayerResult& x = a.result.layers[i];
    const LayerResult& y = b.result.layers[i];
    CAPTURE(x.name);
    CHECK(x.name == y.name);
    CHECK(std::memcmp(x.weight.codes.data(), y.weight.codes.data(),
                      static_cast<size_t>(x.weight.codes.numel())) == 0);
    CHECK(same_bits(x.weight.scale, y.weight.scale));
    CHECK(same_bits(x.weight.zero, y.weight.zero));
    CHECK(x.act_scale == y.act_scale);
    CHECK(x.act_zero == y.act_zero);
  }
  CHECK(same_bits(a.logits, b.logits));
  REQUIRE(a.result.windows.size() == b.result.windows.size());
  for (size_t i = 0; i < a.result.windows.size(); ++i) {
    const WindowStats& x = a.result.windows[i];
    const WindowStats& y = b.result.windows[i];
    CHECK(x.loss_after.total == y.loss_after.total);
    // The start-vs-trained decision and what it was based on, the balance and the curve.
    CHECK(x.kept_start == y.kept_start);
    CHECK(x.heldout == y.heldout);
    CHECK(x.heldout_start.total == y.heldout_start.total);
    CHECK(x.heldout_trained.total == y.heldout_trained.total);
    CHECK(x.loss_hard.total == y.loss_hard.total);
    CHECK(x.energy_fp == y.energy_fp);
    REQUIRE(x.curve.size() == y.curve.size());
    for (size_t k = 0; k < x.curve.size(); ++k) CHECK(x.curve[k].total == y.curve[k].total);
  }
  for (size_t i = 0; i < a.result.layers.size(); ++i) {
    CHECK(a.result.layers[i].codes_changed == b.result.layers[i].codes_changed);
    CHECK(a.result.layers[i].output_error == b.result.layers[i].output_error);
  }
}

}  // namespace

// The child: runs the pass with checkpoints and kills itself (SIGKILL: no destructor, no flush)
// in the middle of window kKillWindow.
CBQ_TEST_CHILD_PROCESS(resume_kill_child) {
  PassOptions o = resume_options(cbq::testing::child_arg());
  o.on_step = [](int64_t window, int64_t step) {
    if (window == kKillWindow && step == kKillStep) ::kill(::getpid(), SIGKILL);
  };
  run_pass(o);
  return 3;  // not reached
}

TEST_CASE("resume: a run killed with SIGKILL mid-window resumes to a bit-identical result") {
  cbq::testing::TempDir dir("resume-kill");
  const Run uninterrupted = run_pass(resume_options(""));
  const int status = cbq::testing::spawn_self("resume_kill_child", dir.path.string());
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  // The checkpoint of the last finished window is there; nothing half-written is left.
  const std::string ck = checkpoint_path(dir.path.string());
  REQUIRE(std::filesystem::exists(ck));
  CHECK_FALSE(cbq::testing::has_temporaries(dir.path));
  {
    io::SafetensorsFile f(ck);
    CHECK(f.metadata().at("windows_done") == std::to_string(kKillWindow - 1));
  }
  const Run resumed = run_pass(resume_options(dir.path.string()));
  check_identical(uninterrupted, resumed);
  // Resuming a finished run restores everything and reproduces the result again.
  const Run again = run_pass(resume_options(dir.path.string()));
  check_identical(uninterrupted, again);
}

TEST_CASE("resume: an exception mid-window, then resume, equals an uninterrupted run") {
  cbq::testing::TempDir dir("resume-throw");
  const Run uninterrupted = run_pass(resume_options(""));
  PassOptions o = resume_options(dir.path.string());
  o.on_step = [](int64_t window, int64_t step) {
    if (window == 3 && step == 1) throw std::runtime_error("simulated crash");
  };
  CHECK_THROWS_WITH(run_pass(o), "simulated crash");
  const Run resumed = run_pass(resume_options(dir.path.string()));
  check_identical(uninterrupted, resumed);
}

TEST_CASE("resume: GPTQ start, learned norms and the output loss resume bit-identically") {
  // The checkpoint keeps what these options add: the compensated weights the unfrozen layers
  // round, and the learned norm values beside the originals the full-precision path uses.
  auto with_options = [](PassOptions o) {
    o.weight_init = WeightInit::gptq;
    o.learn_norms = true;
    o.output_kld = 2;
    o.output_kld_all = true;
    return o;
  };
  cbq::testing::TempDir dir("resume-extensions");
  const Run uninterrupted = run_pass(with_options(resume_options("")));
  PassOptions o = with_options(resume_options(dir.path.string()));
  o.on_step = [](int64_t window, int64_t step) {
    if (window == 3 && step == 2) throw std::runtime_error("simulated crash");
  };
  CHECK_THROWS_WITH(run_pass(o), "simulated crash");
  const Run resumed = run_pass(with_options(resume_options(dir.path.string())));
  check_identical(uninterrupted, resumed);
  // The same checkpoint is refused by a run without the options (a different configuration).
  CHECK_THROWS_WITH_AS(run_pass(resume_options(dir.path.string())),
                       doctest::Contains("pass configuration"), Error);
}

TEST_CASE("resume: across windows that went back to their start, bit-identical") {
  // Window 1 diverges (absurd rates) and returns to its start; the crash comes in window 3, after
  // two decisions were checkpointed. The fixed grid (GPTQ start) is in the checkpoint too.
  for (bool gptq : {false, true}) {
    CAPTURE(gptq);
    auto with_options = [&](PassOptions o) {
      o.lr_weight_step = o.lr_rounding = 1e4;
      if (gptq) o.weight_init = WeightInit::gptq;
      return o;
    };
    cbq::testing::TempDir dir("resume-keep");
    const Run uninterrupted = run_pass(with_options(resume_options("")));
    CHECK(uninterrupted.result.windows_kept_start() >= 2);
    PassOptions o = with_options(resume_options(dir.path.string()));
    o.on_step = [](int64_t window, int64_t step) {
      if (window == 3 && step == 1) throw std::runtime_error("simulated crash");
    };
    CHECK_THROWS_WITH(run_pass(o), "simulated crash");
    {
      io::SafetensorsFile f(checkpoint_path(dir.path.string()));
      CHECK(f.metadata().at("windows").find("\"kept_start\":true") != std::string::npos);
    }
    const Run resumed = run_pass(with_options(resume_options(dir.path.string())));
    check_identical(uninterrupted, resumed);
  }
}

TEST_CASE("resume: a changed model, data or configuration is refused with a message") {
  cbq::testing::TempDir dir("resume-mismatch");
  PassOptions o = resume_options(dir.path.string());
  o.on_step = [](int64_t window, int64_t) {
    if (window == 2) throw std::runtime_error("stop");
  };
  CHECK_THROWS(run_pass(o));
  const ModelConfig c = resume_config();
  auto message = [&](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  // Another configuration (more epochs).
  PassOptions more = resume_options(dir.path.string());
  more.epochs = 3;
  std::string m = message([&] { run_pass(more); });
  CHECK(m.find("refusing to resume") != std::string::npos);
  CHECK(m.find("pass configuration") != std::string::npos);
  // Other weights.
  m = message([&] {
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 12));
    ResumePass(resume_options(dir.path.string())).run_from_hidden(model, resume_inputs(c.dim));
  });
  CHECK(m.find("model's weights") != std::string::npos);
  // Other calibration data.
  m = message([&] {
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 11));
    auto x = resume_inputs(c.dim);
    x[2][0] += 1.0f;
    ResumePass(resume_options(dir.path.string())).run_from_hidden(model, x);
  });
  CHECK(m.find("calibration data") != std::string::npos);
}

TEST_CASE("determinism: the same seed, data and threads give bit-identical results") {
  PassOptions o = resume_options("");
  check_identical(run_pass(o), run_pass(o));
}

TEST_CASE("nan: a non-finite weight is reported with its layer before the pass starts") {
  const ModelConfig c = resume_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 11));
  model.blocks[2].up_proj.weight.value[17] = std::numeric_limits<float>::infinity();
  ResumePass pass(resume_options(""));
  CHECK_THROWS_WITH_AS(pass.run_from_hidden(model, resume_inputs(c.dim)),
                       doctest::Contains("the weight of layers.2.up_proj (block 2)"), Error);
}

TEST_CASE("nan: a learned parameter that turns non-finite is named with the window and sample") {
  const ModelConfig c = resume_config();
  for (const bool keep_better : {false, true}) {
    CAPTURE(keep_better);
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 11));
    PassOptions o = resume_options("");
    o.weight_init = WeightInit::rtn;  // the step poisoned below is an RTN-start step
    o.keep_better = keep_better;
    o.on_step = [&](int64_t window, int64_t step) {
      if (window != 2 || step != 1) return;
      auto q = std::dynamic_pointer_cast<QuantLinear<float>>(model.blocks[2].v_proj.transform);
      REQUIRE(q);
      q->weight_step_params()[0]->value[3] = std::numeric_limits<float>::quiet_NaN();
    };
    ResumePass pass(o);
    std::string m;
    try {
      // With the keep-better rule the window keeps its start and records why (PASS.md).
      const QuantizationResult r = pass.run_from_hidden(model, resume_inputs(c.dim));
      CHECK(keep_better);
      REQUIRE(r.windows.size() >= 2);
      CHECK(r.windows[1].kept_start);
      m = r.windows[1].diverged;
    } catch (const Error& e) {
      CHECK_FALSE(keep_better);
      m = e.what();
    }
    CAPTURE(m);
    CHECK(m.find("window 2, blocks 1..2") != std::string::npos);
    CHECK(m.find("calibration sample") != std::string::npos);
    CHECK(m.find("the learned parameter layers.2.v_proj.w_scale of layer layers.2.v_proj") !=
          std::string::npos);
  }
}

TEST_CASE("nan: an overflow in the full-precision path names the block, window and sample") {
  const ModelConfig c = resume_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 11));
  // Overflow inside block 1's MLP: the weights are finite but the product is not.
  Tensor<float>& w = model.blocks[1].down_proj.weight.value;
  for (int64_t i = 0; i < w.numel(); ++i) w[i] = 3e38f;
  ResumePass pass(resume_options(""));
  std::string m;
  try {
    pass.run_from_hidden(model, resume_inputs(c.dim));
  } catch (const Error& e) {
    m = e.what();
  }
  CAPTURE(m);
  // Caught by the full-precision target pass (block 1's output) before training starts.
  CHECK(m.find("block 1") != std::string::npos);
  CHECK(m.find("window 1") != std::string::npos);
  CHECK(m.find("calibration sample 0") != std::string::npos);
}

TEST_CASE(
    "determinism: parallel loops and reductions do not depend on the thread count (shapes below "
    "the GEMM split)") {
  // Every parallel loop splits independent outputs and each reduction runs on one thread in a
  // fixed order. The tiny model's GEMMs stay below blas::gemm's split, whose per-thread OpenBLAS
  // calls can round differently from one call (RELIABILITY.md, "Determinism").
  const int before = num_threads();
  for (bool extensions : {false, true}) {
    CAPTURE(extensions);
    PassOptions o = resume_options("");
    if (extensions) {  // the options beyond the paper add GEMMs and reductions of their own
      o.weight_init = WeightInit::gptq;
      o.learn_norms = true;
      o.output_kld = 2;
      o.output_kld_all = true;
    }
    set_num_threads(1);
    const Run one = run_pass(o);
    set_num_threads(2);
    const Run two = run_pass(o);
    set_num_threads(before);
    check_identical(one, two);
  }
}

TEST_CASE("activation store: file-backed activations give the same result as host memory") {
  cbq::testing::TempDir dir("activations");
  PassOptions o = resume_options("");
  const Run host = run_pass(o);
  o.activation_dir = dir.path.string();
  const Run mapped = run_pass(o);
  check_identical(host, mapped);
  // The backing files are unlinked as soon as they are mapped: nothing is left behind.
  CHECK(std::filesystem::is_empty(dir.path));
}

TEST_CASE("activation store: samples view disjoint parts of one mapping") {
  cbq::testing::TempDir dir("activations-views");
  ActivationSet<float> set(3, 4, 5, dir.path.string(), "test");
  for (int64_t i = 0; i < 3; ++i) set[i].fill(static_cast<float>(i + 1));
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 20; ++j) REQUIRE(set[i][j] == static_cast<float>(i + 1));
  CHECK_THROWS_WITH_AS(ActivationSet<float>(1, 2, 2, "/proc/cbq-no-such-dir", "X_q"),
                       doctest::Contains("X_q"), Error);
}
