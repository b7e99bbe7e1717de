// Hostile and careless input at the library level (docs/RELIABILITY.md): atomic files and
// folders, the checks that keep outputs off inputs, devices and foreign folders, non-finite
// parameters and tokenizer scores at load, checkpoint checksums and validation, and the memory
// limits read from /proc and cgroup files. The command-line side is tests/cli/hostile.sh.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cbq/core/atomic_file.hpp>
#include <cbq/core/resources.hpp>
#include <cbq/formats/llama2c.hpp>
#include <cbq/formats/safetensors.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/checkpoint.hpp>
#include <cbq/tokenizer/llama2c_tokenizer.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>

#include "support/files.hpp"

namespace fs = std::filesystem;
using cbq::testing::error_of;
using cbq::testing::has_temporaries;
using cbq::testing::read_all;
using cbq::testing::TempDir;
using cbq::testing::write_all;

namespace {
bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}
void write_text(const std::string& path, const std::string& text) {
  cbq::io::write_file_atomic(path, [&](std::ofstream& out) {
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
  });
}
const std::string kData = CBQ_DATA_DIR;
}  // namespace

TEST_CASE(
    "atomic file: a failed write leaves the old file and no temporary; a good one replaces it") {
  TempDir dir("atomic_file");
  const std::string path = dir.file("out.bin");
  write_all(path, "old");
  const std::string msg = error_of([&] {
    cbq::io::write_file_atomic(path, [&](std::ofstream& out) {
      out << std::string(3 << 20, 'x');  // more than one buffer: bytes reach the temporary
      cbq::fail("disk full (test)");
    });
  });
  CHECK(contains(msg, "disk full"));
  CHECK(read_all(path) == "old");
  CHECK_FALSE(has_temporaries(dir.path));
  write_text(path, "new");
  CHECK(read_all(path) == "new");
  CHECK_FALSE(has_temporaries(dir.path));
}

TEST_CASE("atomic file: a planted symlink at a temporary's name is never followed") {
  TempDir dir("atomic_symlink");
  const std::string victim = dir.file("victim"), path = dir.file("out.bin");
  write_all(victim, "victim");
  // The old scheme's fixed name, and names this process may pick (O_EXCL skips them).
  fs::create_symlink(victim, path + ".tmp");
  for (int n = 0; n < 200; ++n)
    fs::create_symlink(victim, dir.file(fmt::format(".out.bin.cbq-tmp-{}-{}", ::getpid(), n)));
  const std::string msg = error_of([&] { write_text(path, "new"); });
  CHECK(read_all(victim) == "victim");
  CHECK(fs::is_symlink(path + ".tmp"));
  if (msg == "<no error>") {
    CHECK(!fs::is_symlink(path));
    CHECK(read_all(path) == "new");
  } else {
    CHECK_MESSAGE(contains(msg, "temporary"), msg);  // every name it tried was taken
  }
}

TEST_CASE("atomic file: temporaries of dead processes are removed, a live process's are kept") {
  TempDir dir("atomic_stale");
  const std::string path = dir.file("model.gguf");
  const std::string dead = dir.file(".model.gguf.cbq-tmp-999999999-0");
  const std::string live = dir.file(".model.gguf.cbq-tmp-1-0");  // init is always alive
  const std::string other = dir.file(".other.cbq-tmp-999999999-0");
  for (const auto& p : {dead, live, other}) write_all(p, "x");
  write_text(path, "new");
  CHECK_FALSE(fs::exists(dead));
  CHECK(fs::exists(live));
  CHECK(fs::exists(other));  // another target's temporaries are not ours to judge
}

TEST_CASE("atomic folder: replaced as a whole; a failure leaves the old folder") {
  TempDir dir("atomic_dir");
  const std::string target = dir.file("export");
  fs::create_directories(target);
  write_all(target + "/old.txt", "old");
  {
    cbq::io::AtomicDir out(target);
    write_text(out.path() + "/half.txt", "half");
    // no commit: an error or an exception left the folder half-built
  }
  CHECK(read_all(target + "/old.txt") == "old");
  CHECK_FALSE(fs::exists(target + "/half.txt"));
  CHECK_FALSE(has_temporaries(dir.path));
  {
    cbq::io::AtomicDir out(target);
    write_text(out.path() + "/model.safetensors", "new");
    out.commit();
  }
  CHECK_FALSE(fs::exists(target + "/old.txt"));
  CHECK(read_all(target + "/model.safetensors") == "new");
  CHECK_FALSE(has_temporaries(dir.path));
  // The two-rename fallback's old folder, left by a kill between its renames, comes back.
  fs::rename(target, dir.file(".export.cbq-old-999999999-3"));
  cbq::io::remove_stale_temporaries(target);
  CHECK(read_all(target + "/model.safetensors") == "new");
}

TEST_CASE("output checks: inputs (also through links), devices, FIFOs, foreign files and folders") {
  TempDir dir("output_checks");
  const std::string model = dir.file("model.bin");
  write_all(model, "weights");
  const std::vector<cbq::io::InputPath> inputs = {{model, "MODEL"}};
  auto out = [&](const std::string& p, bool force = false) {
    return error_of([&] { cbq::io::check_output_file(p, inputs, force, "--out"); });
  };
  CHECK(contains(out(model), "same file as the input"));
  fs::create_symlink(model, dir.file("link"));
  CHECK(contains(out(dir.file("link")), "same file as the input"));
  fs::create_hard_link(model, dir.file("hard"));
  CHECK(contains(out(dir.file("hard")), "same file as the input"));
  CHECK(contains(out("/dev/null"), "character device"));
  REQUIRE(::mkfifo(dir.file("fifo").c_str(), 0600) == 0);
  CHECK(contains(out(dir.file("fifo")), "FIFO"));
  fs::create_directories(dir.file("sub"));
  CHECK(contains(out(dir.file("sub")), "a folder"));
  CHECK(contains(out(dir.file("missing/x.bin")), "does not exist"));
  write_all(dir.file("notes.txt"), "my notes");
  CHECK(contains(out(dir.file("notes.txt")), "--force"));
  CHECK(out(dir.file("notes.txt"), true) == "<no error>");
  CHECK(out(dir.file("new.safetensors")) == "<no error>");

  auto folder = [&](const std::string& p, bool force = false) {
    return error_of([&] { cbq::io::check_output_folder(p, inputs, force, "--export gptq"); });
  };
  CHECK(contains(folder(dir.path.string()), "holds the input"));  // the model's own folder
  CHECK(contains(folder(model), "holds the input"));
  write_all(dir.file("plain.bin"), "x");
  CHECK(contains(folder(dir.file("plain.bin")), "not a folder"));
  fs::create_directories(dir.file("foreign"));
  write_all(dir.file("foreign/mine.txt"), "x");
  CHECK(contains(folder(dir.file("foreign")), "--force"));
  CHECK(folder(dir.file("foreign"), true) == "<no error>");
  fs::create_directories(dir.file("earlier"));
  write_all(dir.file("earlier/config.json"), "{}");
  write_all(dir.file("earlier/model.safetensors"), "x");
  CHECK(folder(dir.file("earlier")) == "<no error>");
}

TEST_CASE("input checks: a FIFO, a folder or an empty file is refused, never read") {
  TempDir dir("input_checks");
  REQUIRE(::mkfifo(dir.file("fifo").c_str(), 0600) == 0);
  write_all(dir.file("empty.txt"), "");
  auto in = [&](const std::string& p) {
    return error_of([&] { cbq::io::check_input_path(p, "--calib", false, false); });
  };
  CHECK(contains(in(dir.file("fifo")), "FIFO"));
  CHECK(contains(in(dir.path.string()), "is a folder"));
  CHECK(contains(in(dir.file("empty.txt")), "is empty"));
  CHECK(contains(in(dir.file("nope.txt")), "does not exist"));
  // The loaders' own reads do not block on a FIFO either (O_NONBLOCK, then refused).
  CHECK(contains(error_of([&] { cbq::io::read_text_file(dir.file("fifo")); }), "FIFO"));
}

TEST_CASE("load: a NaN or Inf in any parameter is refused naming the tensor") {
  TempDir dir("load_nonfinite");
  const std::string src = kData + "/models/stories260K.bin";
  for (const auto& [name, index, value] :
       {std::tuple{"model.embed_tokens.weight", 70, std::numeric_limits<float>::quiet_NaN()},
        std::tuple{"model.norm.weight", 3, std::numeric_limits<float>::infinity()},
        std::tuple{"model.layers.1.post_attention_layernorm.weight", 0,
                   -std::numeric_limits<float>::infinity()}}) {
    cbq::io::Llama2cModel l = cbq::io::load_llama2c(src);
    l.weights.at(name)[index] = value;
    const std::string path = dir.file("damaged.bin");
    cbq::io::save_llama2c(path, l.config, l.weights);
    const std::string msg = error_of([&] { cbq::load_model(path); });
    CHECK_MESSAGE(contains(msg, name), msg);
    CHECK_MESSAGE(contains(msg, "non-finite"), msg);
  }
  // After loading, the first non-finite parameter of a model is found by name.
  cbq::AnyModel m = cbq::load_model(src);
  m.visit([](auto& t) {
    CHECK(cbq::find_non_finite_parameter(t).empty());
    t.final_norm_weight.value[5] = std::numeric_limits<float>::quiet_NaN();
    CHECK(contains(cbq::find_non_finite_parameter(t), "model.norm.weight: element 5"));
  });
}

TEST_CASE("probe: the config and sizes of a model come from its header alone") {
  const std::string src = kData + "/models/stories260K.bin";
  const cbq::ModelProbe p = cbq::probe_model(src);
  CHECK(p.format == "llama2.c");
  cbq::AnyModel m = cbq::load_model(src);
  CHECK(p.parameters == cbq::parameter_count(m));
  CHECK(p.config.n_layers == m.config().n_layers);
  CHECK(p.file_bytes == fs::file_size(src));
  const cbq::ModelProbe hf =
      cbq::probe_model(std::string(CBQ_SOURCE_DIR) + "/tests/fixtures/tiny-llama");
  CHECK(hf.format == "Hugging Face");
  CHECK(hf.parameters > 0);
  TempDir dir("probe");
  write_all(dir.file("cut.bin"), read_all(src).substr(0, 1000));
  CHECK(contains(error_of([&] { cbq::probe_model(dir.file("cut.bin")); }), "size mismatch"));
}

TEST_CASE("tokenizer: a llama2.c tokenizer with a non-finite score is refused") {
  TempDir dir("tok_nan");
  std::string bytes = read_all(kData + "/models/tok512.bin");
  std::size_t pos = 4;  // max_token_length, then per token: score, length, bytes
  for (int i = 0; i < 300; ++i) {
    int32_t len = 0;
    std::memcpy(&len, bytes.data() + pos + 4, 4);
    pos += 8 + static_cast<std::size_t>(len);
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bytes.data() + pos, &nan, 4);
  write_all(dir.file("tok.bin"), bytes);
  const std::string msg = error_of([&] { cbq::Llama2cTokenizer t(dir.file("tok.bin"), 512); });
  CHECK_MESSAGE(contains(msg, "token 300 has a non-finite merge score"), msg);
}

TEST_CASE("safetensors: non-finite values and values beyond F16 are never written") {
  TempDir dir("st_nonfinite");
  cbq::Tensor<float> t = cbq::Tensor<float>::full(cbq::Shape{2, 3}, 1.f);
  t[4] = std::numeric_limits<float>::quiet_NaN();
  const std::string path = dir.file("x.safetensors");
  std::string msg = error_of([&] {
    cbq::io::write_safetensors(path, {{"w", cbq::io::TensorToWrite::f32(t)}});
  });
  CHECK_MESSAGE(contains(msg, "tensor w: it holds a non-finite value (nan) at element 4"), msg);
  t[4] = 1e6f;
  msg = error_of([&] {
    cbq::io::write_safetensors(path, {{"w", cbq::io::TensorToWrite::f16(t)}});
  });
  CHECK_MESSAGE(contains(msg, "beyond the F16 range"), msg);
  CHECK_FALSE(fs::exists(path));
  CHECK_FALSE(has_temporaries(dir.path));
}

TEST_CASE("checkpoint: a checksum per tensor, and ranges, are checked on resume") {
  TempDir dir("ck_checks");
  cbq::PassCheckpoint<float> ck;
  ck.windows_done = 1;
  for (int n = 0; n < 2; ++n) {
    ck.x_fp.push_back(cbq::Tensor<float>::full(cbq::Shape{4, 8}, 0.5f + n));
    ck.x_q.push_back(cbq::Tensor<float>::full(cbq::Shape{4, 8}, -0.5f - n));
  }
  const cbq::PassFingerprint fp{1, 2, 3};
  cbq::save_pass_checkpoint<float>(dir.path.string(), fp, ck, {});
  CHECK(cbq::load_pass_checkpoint<float>(dir.path.string(), fp).x_fp.size() == 2);
  // One value changed in place: the checksum names the tensor.
  const std::string path = cbq::checkpoint_path(dir.path.string());
  std::string bytes = read_all(path);
  const std::size_t at = [&] {
    cbq::io::SafetensorsFile f(path);
    return f.data_offset() + f.info("x_q.1").begin + 8;
  }();
  const float seven = 7.f;
  std::memcpy(bytes.data() + at, &seven, 4);
  write_all(path, bytes);
  const std::string msg =
      error_of([&] { cbq::load_pass_checkpoint<float>(dir.path.string(), fp); });
  CHECK_MESSAGE(contains(msg, "x_q.1 does not match its checksum"), msg);
  // What each tensor may hold (a checksum forged along with the value does not help).
  auto check = [&](const std::string& name, float v) {
    cbq::Tensor<float> t = cbq::Tensor<float>::full(cbq::Shape{3}, 1.f);
    t[1] = v;
    return error_of([&] { cbq::detail::validate_checkpoint_tensor("ck", name, t); });
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(check("layer.layers.0.q_proj.codes", 2.f) == "<no error>");
  CHECK(contains(check("layer.layers.0.q_proj.codes", 2.5f), "integers in [0, 255]"));
  CHECK(contains(check("layer.layers.0.q_proj.codes", 300.f), "integers in [0, 255]"));
  CHECK(contains(check("layer.layers.0.q_proj.q_scale", 0.f), "steps are positive"));
  CHECK(contains(check("layer.layers.0.q_proj.w_scale", -1.f), "steps are positive"));
  CHECK(contains(check("layer.layers.0.q_proj.lora_a1", nan), "lora_a1 holds a non-finite"));
  CHECK(contains(check("x_fp.3", std::numeric_limits<float>::infinity()), "x_fp.3"));
  CHECK(check("layer.layers.0.q_proj.lora_a1", -3.f) == "<no error>");
}

TEST_CASE("resources: memory limits from /proc and cgroup files (v1 and v2, the tightest)") {
  TempDir dir("mem_limits");
  const std::string root = dir.file("sys");
  write_all(dir.file("meminfo"),
            "MemTotal: 9000 kB\nMemAvailable:    3000 kB\nSwapFree: 1000 kB\n");
  write_all(dir.file("status"), "Name: x\nVmSize:   5000 kB\n");
  // v2: the limit of an ancestor applies; page cache ("file") is reclaimable.
  fs::create_directories(root + "/a/b");
  write_all(root + "/a/b/memory.max", "max\n");
  write_all(root + "/a/b/memory.current", "100\n");
  write_all(root + "/a/memory.max", "2000000\n");
  write_all(root + "/a/memory.current", "800000\n");
  write_all(root + "/a/memory.stat", "anon 500000\nfile 300000\n");
  write_all(dir.file("cgroup"), "0::/a/b\n");
  cbq::MemoryLimitFiles files{dir.file("meminfo"), dir.file("cgroup"), dir.file("status"), root};
  cbq::MemoryLimits m = cbq::memory_limits(files);
  CHECK(m.mem_available == 4000 * 1024);
  REQUIRE(m.cgroup_available.has_value());
  CHECK(*m.cgroup_available == 2000000 - (800000 - 300000));
  CHECK(m.cgroup == root + "/a");
  CHECK(m.usable() == 1500000);
  CHECK(contains(m.describe(), "limit"));
  // v1: memory.limit_in_bytes; "no limit" is a huge number and ignored.
  fs::create_directories(root + "/memory/x");
  write_all(root + "/memory/x/memory.limit_in_bytes", "9223372036854771712\n");
  write_all(root + "/memory/x/memory.usage_in_bytes", "1000\n");
  write_all(root + "/memory/memory.limit_in_bytes", "3000000\n");
  write_all(root + "/memory/memory.usage_in_bytes", "1000000\n");
  write_all(root + "/memory/memory.stat", "total_cache 250000\n");
  write_all(dir.file("cgroup"), "4:memory:/x\n1:cpu:/\n");
  m = cbq::memory_limits(files);
  REQUIRE(m.cgroup_available.has_value());
  CHECK(*m.cgroup_available == 3000000 - (1000000 - 250000));
  CHECK(m.usable() == 2250000);
}
