// GGUF (llama.cpp's format): the low-level writer/reader (every value and tensor type, llama.cpp's
// block layouts checked against hand-computed bytes, hostile files), fp16 step snapping checked
// against a brute-force search, and the LLaMA export/import on stories260K and the Hugging Face
// tiny-llama fixture (weights tensor by tensor, logits, perplexity of quantized exports).
#include <cbq/eval/perplexity.hpp>
#include <cbq/export/gguf.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/pass.hpp>
#include <filesystem>
#include <random>

#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::models_dir;
using namespace cbq::io;
namespace fs = std::filesystem;
using cbq::testing::error_of;
using cbq::testing::read_all;
using cbq::testing::TempDir;
using cbq::testing::write_all;

namespace {

fs::path tiny_llama_dir() { return fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "tiny-llama"; }

bool have_files(const std::vector<fs::path>& paths) {
  for (const auto& p : paths)
    if (!fs::exists(p)) {
      MESSAGE("skipped: " << p.string() << " not found");
      return false;
    }
  return true;
}

// Little-endian byte builder for hand-made files.
struct Bytes {
  std::string s;
  template <class T>
  Bytes& pod(T v) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
    return *this;
  }
  Bytes& u32(uint32_t v) { return pod(v); }
  Bytes& u64(uint64_t v) { return pod(v); }
  Bytes& str(const std::string& x) {
    u64(x.size());
    s += x;
    return *this;
  }
};

template <class T>
T read_at(const std::string& s, std::size_t off) {
  T v;
  std::memcpy(&v, s.data() + off, sizeof v);
  return v;
}

std::vector<std::byte> random_bytes(std::size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xFF);
  return v;
}

// A small file with metadata of every kind and a few tensors, for the hostile-file tests.
void write_sample(const std::string& path) {
  GgufWriter w;
  w.set_string("general.architecture", "test");
  w.set_scalar<uint32_t>("n", 7);
  w.set_scalar<bool>("flag", true);
  w.set("names", GgufValue::array_of(std::vector<std::string>{"a", "bc", ""}));
  w.set("values", GgufValue::array_of(std::vector<int32_t>{1, -2, 3}));
  w.set("flags", GgufValue::array_of(std::vector<bool>{true, false}));
  std::vector<std::byte> f32(4 * 8, std::byte{0});
  w.add_tensor("a", GgmlType::f32, {8}, f32);
  w.add_tensor("b", GgmlType::q4_0, {32, 2}, random_bytes(36, 1));
  w.write(path);
}

// The model's linear layer `name` ("layers.3.q_proj").
LinearLayer<float>* find_linear(Transformer<LlamaBlock<float>>& m, const std::string& name) {
  const auto dot = name.find('.', 7);
  const int64_t b = std::stoll(name.substr(7, dot - 7));
  for (auto* l : m.blocks[static_cast<std::size_t>(b)].linears())
    if (l->name == name.substr(dot + 1)) return l;
  return nullptr;
}

// Replaces every quantized layer's weight with its dequantized (snapped) result.
void install_dequantized(Transformer<LlamaBlock<float>>& m, const QuantizationResult& r) {
  clear_quantization(m);
  for (const auto& l : r.layers) find_linear(m, l.name)->weight.value = l.weight.dequantize();
}

std::string tinystories_prefix(std::size_t n) {
  const std::string t =
      read_all(fs::path(cbq::testing::data_dir()) / "text" / "tinystories_valid_200k.txt");
  return t.substr(0, std::min(n, t.size()));
}

}  // namespace

// ---- low level ----

TEST_CASE("GGUF: every metadata value type round-trips, and the header bytes are as specified") {
  TempDir dir("gguf_values");
  const std::string path = dir.file("values.gguf");
  GgufWriter w;
  w.set_scalar<uint8_t>("t.u8", 255);
  w.set_scalar<int8_t>("t.i8", -128);
  w.set_scalar<uint16_t>("t.u16", 65535);
  w.set_scalar<int16_t>("t.i16", -32768);
  w.set_scalar<uint32_t>("t.u32", 4000000000u);
  w.set_scalar<int32_t>("t.i32", -2000000000);
  w.set_scalar<float>("t.f32", 1e-5f);
  w.set_scalar<bool>("t.bool", true);
  w.set_string("t.string", std::string("caf\xC3\xA9 \xE2\x96\x81 with\0nul", 17));
  w.set_string("t.empty", "");
  w.set_scalar<uint64_t>("t.u64", UINT64_MAX);
  w.set_scalar<int64_t>("t.i64", INT64_MIN);
  w.set_scalar<double>("t.f64", 0.1);
  w.set("a.u8", GgufValue::array_of(std::vector<uint8_t>{0, 1, 255}));
  w.set("a.i8", GgufValue::array_of(std::vector<int8_t>{-1, 2}));
  w.set("a.u16", GgufValue::array_of(std::vector<uint16_t>{1, 65535}));
  w.set("a.i16", GgufValue::array_of(std::vector<int16_t>{-3}));
  w.set("a.u32", GgufValue::array_of(std::vector<uint32_t>{5, 6, 7}));
  w.set("a.i32", GgufValue::array_of(std::vector<int32_t>{}));
  w.set("a.f32", GgufValue::array_of(std::vector<float>{1.5f, -0.0f}));
  w.set("a.bool", GgufValue::array_of(std::vector<bool>{true, false, true}));
  w.set("a.string", GgufValue::array_of(std::vector<std::string>{"x", "", "\xE2\x96\x81y"}));
  w.set("a.u64", GgufValue::array_of(std::vector<uint64_t>{UINT64_MAX}));
  w.set("a.i64", GgufValue::array_of(std::vector<int64_t>{-5, 5}));
  w.set("a.f64", GgufValue::array_of(std::vector<double>{2.5, -1e300}));
  w.set("a.generic",
        GgufValue::array(GgufType::i16, {GgufValue::of<int16_t>(4), GgufValue::of<int16_t>(-4)}));
  w.set_scalar<uint32_t>("t.u32", 3000000000u);  // replacing keeps the position
  w.write(path);

  GgufFile f(path);
  REQUIRE(f.metadata().size() == w.metadata().size());
  for (std::size_t i = 0; i < w.metadata().size(); ++i) {
    CHECK(f.metadata()[i].first == w.metadata()[i].first);
    CHECK(f.metadata()[i].second == w.metadata()[i].second);
  }
  CHECK(f.version() == 3);
  CHECK(f.get<uint32_t>("t.u32") == 3000000000u);
  CHECK(f.at("t.u64").get<uint64_t>() == UINT64_MAX);
  CHECK(f.get<uint64_t>("t.u64") == UINT64_MAX);
  CHECK(f.get<int64_t>("t.i64") == INT64_MIN);
  CHECK(f.get<double>("t.f64") == 0.1);
  CHECK(f.at("t.f32").get<float>() == 1e-5f);
  CHECK(f.get<std::string>("t.string").size() == 17);
  CHECK(f.at("a.string").strings() == std::vector<std::string>{"x", "", "\xE2\x96\x81y"});
  CHECK(f.at("a.bool").array<bool>() == std::vector<bool>{true, false, true});
  CHECK(f.at("a.f64").array<double>() == std::vector<double>{2.5, -1e300});
  CHECK(f.at("a.generic").array<int16_t>() == std::vector<int16_t>{4, -4});
  CHECK(f.at("a.i32").size() == 0);
  CHECK(f.at("a.u16").item(1).get<uint16_t>() == 65535);
  // Typed access is checked.
  CHECK_THROWS_WITH_AS(f.get<uint8_t>("t.u16"), doctest::Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(f.get<std::string>("t.u8"), doctest::Contains("'t.u8'"), Error);
  CHECK_THROWS_WITH_AS(f.at("missing"), doctest::Contains("'missing' is missing"), Error);

  // The header and first key, parsed by hand: magic, version 3, 0 tensors, n_kv, then
  // "t.u8" (u64 length 4), type 0, value 255.
  const std::string raw = read_all(path);
  CHECK(raw.substr(0, 4) == "GGUF");
  CHECK(read_at<uint32_t>(raw, 4) == 3);
  CHECK(read_at<uint64_t>(raw, 8) == 0);
  CHECK(read_at<uint64_t>(raw, 16) == w.metadata().size());
  CHECK(read_at<uint64_t>(raw, 24) == 4);
  CHECK(raw.substr(32, 4) == "t.u8");
  CHECK(read_at<uint32_t>(raw, 36) == 0);
  CHECK(static_cast<uint8_t>(raw[40]) == 255);
  CHECK(raw.size() % 32 == 0);
}

TEST_CASE("GGUF: tensors of every block type round-trip at their aligned offsets") {
  TempDir dir("gguf_tensors");
  for (uint32_t alignment : {32u, 64u, 1u}) {
    const std::string path = dir.file(fmt::format("t{}.gguf", alignment));
    GgufWriter w;
    if (alignment != 32) w.set_alignment(alignment);
    std::map<std::string, std::vector<std::byte>> data;
    int k = 0;
    for (uint32_t id = 0; id < 40; ++id) {
      auto tr = ggml_type_traits(id);
      if (!tr) continue;
      const std::string name = fmt::format("t{}_{}", id, tr->name);
      const std::vector<int64_t> ne = {tr->block * 2, 3};
      data[name] = random_bytes(static_cast<std::size_t>(tr->bytes * 2 * 3), ++k);
      w.add_tensor(name, static_cast<GgmlType>(id), ne, data[name]);
    }
    w.add_tensor("scalar_like", GgmlType::f32, {1}, random_bytes(4, 99));
    data["scalar_like"] = random_bytes(4, 99);
    const uint64_t size = w.write(path);
    CHECK(size == fs::file_size(path));
    GgufFile f(path);
    CHECK(f.alignment() == alignment);
    CHECK(f.tensors().size() == data.size());
    CHECK(f.data_offset() % alignment == 0);
    for (const auto& t : f.tensors()) {
      CHECK(t.offset % alignment == 0);
      auto bytes = f.data(t);
      const auto& want = data.at(t.name);
      REQUIRE(bytes.size() == want.size());
      CHECK(std::memcmp(bytes.data(), want.data(), want.size()) == 0);
    }
    CHECK(f.tensor("t8_Q8_0").ne == std::vector<int64_t>{64, 3});
    CHECK(f.tensor("t8_Q8_0").shape() == Shape{3, 64});
    CHECK(f.tensor("t12_Q4_K").nbytes == 144 * 2 * 3);
  }
  // Float tensors and their conversions.
  const std::string path = dir.file("floats.gguf");
  Tensor<float> x = cbq::testing::randn<float>(Shape{3, 5}, 4);
  x[0] = 70000.0f;  // beyond fp16: inf
  GgufWriter w;
  w.add_float("f32", x);
  w.add_float("f16", x, GgmlType::f16);
  w.add_float("bf16", x, GgmlType::bf16);
  w.write(path);
  GgufFile f(path);
  CHECK(cbq::testing::max_abs_diff(f.to_float("f32"), x) == 0.0);
  Tensor<float> h = f.to_float("f16"), b = f.to_float("bf16");
  CHECK(h.shape() == Shape{3, 5});
  for (int64_t i = 0; i < x.numel(); ++i) {
    CHECK(h[i] == f16_to_float(float_to_f16(x[i])));
    CHECK(b[i] == bf16_to_float(float_to_bf16(x[i])));
  }
  CHECK(std::isinf(h[0]));
  CHECK_THROWS_WITH_AS(f.to_float("missing"), doctest::Contains("'missing' is missing"), Error);
}

TEST_CASE("GGUF: the writer refuses what llama.cpp cannot read and leaves no half-written file") {
  GgufWriter w;
  CHECK_THROWS_WITH_AS(w.add_tensor("q", GgmlType::q4_0, {48, 2}, std::vector<std::byte>(54)),
                       doctest::Contains("multiple of its block size 32"), Error);
  CHECK_THROWS_WITH_AS(
      w.add_tensor(std::string(64, 'n'), GgmlType::f32, {1}, std::vector<std::byte>(4)),
      doctest::Contains("at most 63"), Error);
  CHECK_THROWS_WITH_AS(w.add_tensor("x", GgmlType::f32, {1, 1, 1, 1, 1}, std::vector<std::byte>(4)),
                       doctest::Contains("5 dimensions"), Error);
  CHECK_THROWS_WITH_AS(w.add_tensor("x", GgmlType::f32, {2}, std::vector<std::byte>(4)),
                       doctest::Contains("has 4 bytes, its shape needs 8"), Error);
  CHECK_THROWS_WITH_AS(w.set_alignment(48), doctest::Contains("not a power of two"), Error);
  CHECK_THROWS_WITH_AS(w.set_scalar<uint64_t>("general.alignment", 64), doctest::Contains("u32"),
                       Error);
  w.add_tensor("x", GgmlType::f32, {1}, std::vector<std::byte>(4));
  CHECK_THROWS_WITH_AS(w.add_tensor("x", GgmlType::f32, {1}, std::vector<std::byte>(4)),
                       doctest::Contains("added twice"), Error);

  TempDir dir("gguf_atomic");
  const std::string path = dir.file("model.gguf");
  write_all(path, "previous contents");
  GgufWriter bad;
  bad.add_tensor("y", GgmlType::f32, {1}, [](std::span<std::byte>) { fail("disk full (test)"); });
  CHECK_THROWS_WITH_AS(bad.write(path), doctest::Contains("disk full"), Error);
  CHECK(read_all(path) == "previous contents");
  CHECK_FALSE(cbq::testing::has_temporaries(dir.path));
}

TEST_CASE("GGUF: truncated files fail with the file, offset and field at every cut") {
  TempDir dir("gguf_truncated");
  const std::string path = dir.file("sample.gguf");
  write_sample(path);
  const std::string full = read_all(path);
  const uint64_t end_of_data = [&] {
    GgufFile f(path);
    uint64_t e = 0;
    for (const auto& t : f.tensors()) e = std::max(e, f.data_offset() + t.offset + t.nbytes);
    return e;
  }();
  const std::string cut_path = dir.file("cut.gguf");
  int failures = 0;
  for (std::size_t n = 0; n < full.size(); ++n) {
    write_all(cut_path, full.substr(0, n));
    const std::string err = error_of([&] { GgufFile f(cut_path); });
    if (n < end_of_data) {
      CHECK_MESSAGE(err.find(cut_path) != std::string::npos, "cut at " << n << ": " << err);
      const bool names_offset = err.find("offset") != std::string::npos ||
                                err.find("shorter than the 24-byte") != std::string::npos;
      CHECK_MESSAGE(names_offset, "cut at " << n << ": " << err);
      failures += err != "<no error>";
    } else {
      CHECK_MESSAGE(err == "<no error>", "cut at " << n << " (only padding lost): " << err);
    }
  }
  CHECK(failures == static_cast<int>(end_of_data));
  // Inside the second string of "names": 24-byte header, "general.architecture" (8 + 20 + 4 +
  // 8 + 4 bytes), "n" (8 + 1 + 4 + 4), "flag" (8 + 4 + 4 + 1), then "names" (8 + 5 + 4, element
  // type 4, count 8) starts its strings at 131: "a" (8 + 1), "bc" (8 + 2), then the length of ""
  // at 150.
  const std::string e = error_of([&] {
    write_all(cut_path, full.substr(0, 155));
    GgufFile f(cut_path);
  });
  CHECK_MESSAGE(e.find("metadata 'names' value[2] length needs 8 bytes at offset 150, only 5 "
                       "left") != std::string::npos,
                e);
}

TEST_CASE("GGUF: absurd counts, lengths, types and offsets are refused without allocating") {
  TempDir dir("gguf_hostile");
  const std::string path = dir.file("h.gguf");
  auto header = [](uint64_t n_tensors, uint64_t n_kv) {
    Bytes b;
    b.s = "GGUF";
    b.u32(3).u64(n_tensors).u64(n_kv);
    return b;
  };
  auto err = [&](const Bytes& b) {
    std::string s = b.s;
    s.resize(s.size() + 64, '\0');  // room so that counts, not truncation, are the problem
    write_all(path, s);
    return error_of([&] { GgufFile f(path); });
  };
  auto expect = [&](const Bytes& b, const std::string& what) {
    const std::string e = err(b);
    CHECK_MESSAGE(e.find(what) != std::string::npos, "expected '" << what << "', got: " << e);
    CHECK_MESSAGE(e.find(path) != std::string::npos, e);
  };
  expect(header(0, uint64_t{1} << 62), "metadata count");
  expect(header(UINT64_MAX, 0), "tensor count");
  expect(header(0, 1).str("k").u32(8).u64(uint64_t{1} << 60), "has length");
  expect(header(0, 1).u64(UINT64_MAX), "has length");
  expect(header(0, 1).str("k").u32(9).u32(4).u64(uint64_t{1} << 61), "claims");
  expect(header(0, 1).str("k").u32(9).u32(8).u64(UINT64_MAX), "claims");
  expect(header(0, 1).str("k").u32(9).u32(9).u64(1), "invalid element type 9");
  expect(header(0, 1).str("k").u32(13).u32(0), "invalid value type 13");
  expect(header(0, 1).str("k").u32(7).pod<uint8_t>(7), "bool with byte value 7");
  expect(header(0, 1).str("").u32(4).u32(1), "empty key");
  expect(header(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2), "appears twice");
  expect(header(0, 1).str("general.alignment").u32(4).u32(48), "not a power of two");
  expect(header(0, 1).str("general.alignment").u32(4).u32(0), "not a power of two");
  expect(header(0, 1).str("general.alignment").u32(5).u32(64), "expected u32");
  auto tensor = [&](const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                    uint64_t offset) {
    Bytes b = header(1, 0);
    b.str(name).u32(static_cast<uint32_t>(ne.size()));
    for (uint64_t e : ne) b.u64(e);
    b.u32(type).u64(offset);
    return b;
  };
  expect(tensor("w", {1, 1, 1, 1, 1}, 0, 0), "n_dims = 5");
  expect(tensor("w", {}, 0, 0), "n_dims = 0");
  expect(tensor("w", {0}, 0, 0), "ne[0] = 0");
  expect(tensor("w", {uint64_t{1} << 63}, 0, 0), "out of range");
  expect(tensor("w", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0), "overflows");
  expect(tensor("w", {4}, 4, 0), "unknown ggml type 4");
  expect(tensor("w", {4}, 99, 0), "unknown ggml type 99");
  expect(tensor("w", {48}, 2, 0), "multiple of its block size 32");
  expect(tensor("w", {4}, 0, 7), "not a multiple of the alignment 32");
  expect(tensor("w", {4}, 0, uint64_t{1} << 62), "ends beyond the end of the file");
  expect(tensor("w", {uint64_t{1} << 30, 1024}, 0, 0), "ends beyond the end of the file");
  expect(tensor("w", {4}, 0, UINT64_MAX - 31), "ends beyond the end of the file");
  expect(tensor(std::string(64, 'n'), {4}, 0, 0), "1 to 63 allowed");
  {
    Bytes b = header(2, 0);
    for (int i = 0; i < 2; ++i) b.str("w").u32(1).u64(4).u32(0).u64(0);
    expect(b, "appears twice");
  }
  Bytes bad_magic;
  bad_magic.s = "GGUG";
  bad_magic.u32(3).u64(0).u64(0);
  expect(bad_magic, "not a GGUF file: magic");
  Bytes v1;
  v1.s = "GGUF";
  v1.u32(1).u64(0).u64(0);
  expect(v1, "version 1");
  Bytes be;
  be.s = "GGUF";
  be.u32(0x03000000).u64(0).u64(0);
  expect(be, "big-endian");
  write_all(path, "GGUF");
  CHECK(error_of([&] { GgufFile f(path); }).find("shorter than the 24-byte") != std::string::npos);
}

TEST_CASE(
    "GGUF: random corruption of a valid file gives a cbq::Error or a valid file, never a crash") {
  TempDir dir("gguf_fuzz");
  const std::string path = dir.file("sample.gguf"), bad = dir.file("bad.gguf");
  write_sample(path);
  const std::string full = read_all(path);
  std::mt19937_64 rng(5);
  int errors = 0, loaded = 0;
  for (int it = 0; it < 3000; ++it) {
    std::string s = full;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const std::size_t pos = rng() % s.size();
      s[pos] = static_cast<char>(rng() % 3 == 0 ? 0xFF : rng() & 0xFF);
    }
    write_all(bad, s);
    try {
      GgufFile f(bad);
      for (const auto& t : f.tensors()) (void)f.to_float(t.name);
      ++loaded;
    } catch (const Error& e) {
      ++errors;
      CHECK(std::string(e.what()).find(bad) != std::string::npos);
    }
  }
  MESSAGE(errors << " corrupted files refused, " << loaded << " still valid");
  CHECK(errors > 0);
}

// ---- llama.cpp blocks ----

TEST_CASE("GGUF: Q4_0, Q4_1 and Q8_0 blocks are byte for byte llama.cpp's layout") {
  // Two rows of 40 columns (padded to 64), one group of 32 per block; a padded zero row.
  auto make = [](int bits, bool sym) {
    quant::QuantizedWeight w;
    w.spec.bits = bits;
    w.spec.symmetric = sym;
    w.spec.granularity = quant::Granularity::per_group;
    w.spec.group_size = 32;
    w.codes = Tensor<uint8_t>(Shape{2, 40});
    w.scale = Tensor<float>(Shape{2, 2});
    w.zero = Tensor<float>(Shape{2, 2});
    for (int64_t c = 0; c < 40; ++c) {
      w.codes[c] = static_cast<uint8_t>(bits == 4 ? c % 16 : (c * 7) % 256);
      w.codes[40 + c] = static_cast<uint8_t>(bits == 4 ? 15 - c % 16 : 255 - c);
    }
    return w;
  };
  auto encode = [](const quant::QuantizedWeight& w, GgmlType type) {
    io::detail::GgufMatrix m{"t", Tensor<float>(), &w, {0, 1, -1}, 64, type, false};
    const int64_t bytes = ggml_traits(type).bytes * 2 * 3;
    std::vector<std::byte> out(static_cast<std::size_t>(bytes));
    io::detail::fill_quantized(m, out);
    return out;
  };
  auto hex = [](const std::vector<std::byte>& v, std::size_t from, std::size_t n) {
    std::string s;
    for (std::size_t i = from; i < from + n; ++i)
      s += fmt::format("{:02x}", static_cast<unsigned>(v[i]));
    return s;
  };

  // Q4_0: d = 0.5 → fp16 0x3800 (little-endian 00 38); byte j = code[j] | code[j+16] << 4.
  auto q40 = make(4, true);
  q40.scale[0] = 0.5f;          // row 0, columns 0..31
  q40.scale[1] = 0.125f;        // row 0, columns 32..39: fp16 0x3000
  q40.scale[2] = 1.0f;          // row 1: 0x3C00
  q40.scale[3] = -0.0f + 2.0f;  // 0x4000
  auto b = encode(q40, GgmlType::q4_0);
  CHECK(hex(b, 0, 18) ==
        "0038"
        "00112233445566778899aabbccddeeff");
  // Block 2 of row 0: codes 0..7 then padding with q = 0 (stored 8): low nibbles 0..7 then 8,
  // high nibbles (columns 48..63) all padding 8.
  CHECK(hex(b, 18, 18) ==
        "0030"
        "8081828384858687"
        "8888888888888888");
  CHECK(hex(b, 36, 18) ==
        "003c"
        "ffeeddccbbaa99887766554433221100");
  CHECK(hex(b, 54, 18) ==
        "0040"
        "8f8e8d8c8b8a8988"
        "8888888888888888");
  // The padded row: d = 0 and every code 8 (value 0).
  CHECK(hex(b, 72, 36) == "0000" + std::string(32, '8') + "0000" + std::string(32, '8'));

  // Q4_1: d = 0.25 (0x3400), z = 3 → m = −0.75 (0xBA00); padding code = z.
  auto q41 = make(4, false);
  for (int i = 0; i < 4; ++i) {
    q41.scale[i] = 0.25f;
    q41.zero[i] = 3.0f;
  }
  b = encode(q41, GgmlType::q4_1);
  CHECK(hex(b, 0, 20) ==
        "0034"
        "00ba"
        "00112233445566778899aabbccddeeff");
  CHECK(hex(b, 20, 20) ==
        "0034"
        "00ba"
        "3031323334353637"
        "3333333333333333");
  CHECK(hex(b, 80, 20) ==
        "0000"
        "0000" +
            std::string(32, '0'));

  // Q8_0: d = 2^-7 (0x2000); qs = stored − 128 as int8; padding q = 0.
  auto q80 = make(8, true);
  for (int i = 0; i < 4; ++i) q80.scale[i] = 0.0078125f;
  b = encode(q80, GgmlType::q8_0);
  std::string want = "0020";
  for (int c = 0; c < 32; ++c)
    want += fmt::format("{:02x}", static_cast<uint8_t>((c * 7) % 256 - 128));
  CHECK(hex(b, 0, 34) == want);
  want = "0020";
  for (int c = 32; c < 40; ++c)
    want += fmt::format("{:02x}", static_cast<uint8_t>((c * 7) % 256 - 128));
  CHECK(hex(b, 34, 34) == want + std::string(48, '0'));

  // Dequantizing the blocks gives the grid's values (and 0 in the padding).
  for (auto [w, type] : {std::pair{&q40, GgmlType::q4_0}, std::pair{&q41, GgmlType::q4_1},
                         std::pair{&q80, GgmlType::q8_0}}) {
    auto bytes = encode(*w, type);
    std::vector<float> x(3 * 64);
    ggml_dequantize(type, bytes.data(), x.data(), 3 * 64, "test");
    for (int64_t r = 0; r < 3; ++r)
      for (int64_t c = 0; c < 64; ++c) {
        const float want_v = r < 2 && c < 40 ? w->value(r, c) : 0.0f;
        CHECK_MESSAGE(x[static_cast<std::size_t>(r * 64 + c)] == want_v,
                      ggml_type_name(type) << " (" << r << ", " << c << ")");
      }
  }
  // A step that is not an fp16 value is refused (the result must be snapped first).
  q40.scale[0] = 0.1f;
  CHECK_THROWS_WITH_AS(encode(q40, GgmlType::q4_0), doctest::Contains("snap_result_for_gguf"),
                       Error);
}

TEST_CASE("GGUF: fp16 snapping picks the nearest step whose Q4_1 minimum is exact") {
  // Brute force over every positive finite fp16 value.
  auto brute = [](float s, float z) {
    int best = -1;
    float err = 0;
    for (int h = 1; h <= 0x7BFF; ++h) {
      const float d = f16_to_float(static_cast<uint16_t>(h));
      const float m = d * z;
      if (m > 65504.0f || f16_to_float(float_to_f16(m)) != m) continue;
      if (best < 0 || std::abs(d - s) < err) {
        best = h;
        err = std::abs(d - s);
      }
    }
    return f16_to_float(static_cast<uint16_t>(best));
  };
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> logs(-12, 3);
  quant::QuantizedWeight w;
  w.spec.bits = 4;
  w.spec.symmetric = false;
  w.spec.granularity = quant::Granularity::per_channel;
  w.codes = Tensor<uint8_t>(Shape{200, 32});
  w.scale = Tensor<float>::empty(Shape{200, 1});
  w.zero = Tensor<float>::empty(Shape{200, 1});
  for (int64_t i = 0; i < 200; ++i) {
    w.scale[i] = static_cast<float>(std::pow(10.0, logs(rng)));
    w.zero[i] = static_cast<float>(i % 16);
  }
  GgufSnapStats stats;
  const auto snapped = snap_weight_for_gguf(w, "layers.0.q_proj", &stats);
  double worst = 0;
  for (int64_t i = 0; i < 200; ++i) {
    const float s = w.scale[i], z = w.zero[i], d = snapped.scale[i];
    CHECK_MESSAGE(d == brute(s, z), "s " << s << " z " << z);
    CHECK(f16_to_float(float_to_f16(d)) == d);
    CHECK(f16_to_float(float_to_f16(-d * z)) == -d * z);
    if (s > 6.2e-5f) worst = std::max(worst, std::abs(static_cast<double>(d) - s) / s);
  }
  CHECK(stats.steps == 200);
  CHECK(stats.max_rel_change >= worst);
  CHECK(worst < 1.0 / 64);  // z ≤ 15 needs at most 4 fewer significand bits
  // Idempotent, codes and zero-points kept.
  const auto twice = snap_weight_for_gguf(snapped, "layers.0.q_proj");
  CHECK(cbq::testing::max_abs_diff(twice.scale, snapped.scale) == 0.0);
  CHECK(cbq::testing::max_abs_diff(snapped.zero, w.zero) == 0.0);
  // Symmetric: plain round-to-nearest fp16, tiny steps stay positive.
  w.spec.symmetric = true;
  w.zero = Tensor<float>(Shape{200, 1});
  w.scale[0] = 1e-8f;
  const auto sym = snap_weight_for_gguf(w, "layers.0.q_proj");
  for (int64_t i = 1; i < 200; ++i)
    CHECK(sym.scale[i] == std::max(f16_to_float(float_to_f16(w.scale[i])), f16_to_float(1)));
  CHECK(sym.scale[0] == f16_to_float(1));
  w.scale[5] = 1e6f;
  CHECK_THROWS_WITH_AS(snap_weight_for_gguf(w, "layers.0.q_proj"),
                       doctest::Contains("exceeds the fp16 range"), Error);
}

TEST_CASE("GGUF export: unsupported quantization settings name the layer and the way out") {
  ModelConfig c = tiny_llama_config();
  c.dim = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.hidden_dim = 96;
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 3));
  TempDir dir("gguf_unsupported");
  struct Case {
    int bits;
    bool sym;
    quant::Granularity g;
    int64_t group;
    const char* what;
  };
  for (const Case& k : {Case{3, true, quant::Granularity::per_group, 32, "3-bit"},
                        Case{2, false, quant::Granularity::per_group, 32, "2-bit"},
                        Case{8, false, quant::Granularity::per_channel, 0, "8-bit asymmetric"},
                        Case{4, true, quant::Granularity::per_group, 16, "group size 16"},
                        Case{4, true, quant::Granularity::per_tensor, 0, "per-tensor"}}) {
    PassSpec spec;
    spec.weight.bits = k.bits;
    spec.weight.symmetric = k.sym;
    spec.weight.granularity = k.g;
    spec.weight.group_size = k.group > 0 ? k.group : 128;
    auto r = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
    clear_quantization(model);
    const std::string e = error_of([&] { export_gguf(dir.file("x.gguf"), model, nullptr, &r); });
    CHECK_MESSAGE(e.find("layers.0.q_proj") != std::string::npos, e);
    CHECK_MESSAGE(e.find(k.what) != std::string::npos, e);
    CHECK_MESSAGE(e.find("save_native") != std::string::npos, e);
    CHECK(!fs::exists(dir.file("x.gguf")));
  }
  // Act-order groups that do not follow the 32-column blocks.
  PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.symmetric = true;
  spec.weight.group_size = 32;
  auto r = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
  clear_quantization(model);
  auto& w = r.layers[2].weight;
  w.group_index.assign(static_cast<std::size_t>(w.cols()), 0);
  w.group_index[5] = 1;
  const std::string e = error_of([&] { export_gguf(dir.file("x.gguf"), model, nullptr, &r); });
  CHECK_MESSAGE(e.find("act-order") != std::string::npos, e);
  CHECK_MESSAGE(e.find(r.layers[2].name) != std::string::npos, e);
  r.layers[2].weight.group_index.clear();
  r.layers[2].name = "layers.9.q_proj";
  CHECK(error_of([&] {
          export_gguf(dir.file("x.gguf"), model, nullptr, &r);
        }).find("'layers.9.q_proj', which the model does not have") != std::string::npos);
}

// ---- stories260K ----

TEST_CASE("GGUF export: stories260K in F32 holds the model tensor by tensor and its logits") {
  const fs::path bin = models_dir() / "stories260K.bin", tok = models_dir() / "tok512.bin";
  if (!have_files({bin, tok})) return;
  AnyModel any = load_model(bin.string(), tok.string());
  auto& m = any.llama();
  const ModelConfig& c = m.config;
  TempDir dir("gguf_stories");
  const std::string path = dir.file("stories260K.gguf");
  const auto report = export_gguf(path, m, m.tokenizer.get(), nullptr);
  CHECK(report.ffn_length == 172);
  CHECK(report.ffn_padded == 192);
  CHECK(report.tensor_types.at("F32") == 2 + 9 * c.n_layers);  // tied: no output.weight

  GgufFile f(path);
  CHECK(f.get<std::string>("general.architecture") == "llama");
  CHECK(f.at("llama.embedding_length").get<uint32_t>() == 64);
  CHECK(f.at("llama.feed_forward_length").get<uint32_t>() == 192);
  CHECK(f.at("llama.block_count").get<uint32_t>() == 5);
  CHECK(f.at("llama.attention.head_count").get<uint32_t>() == 8);
  CHECK(f.at("llama.attention.head_count_kv").get<uint32_t>() == 4);
  CHECK(f.at("llama.rope.dimension_count").get<uint32_t>() == 8);
  CHECK(f.at("llama.context_length").get<uint32_t>() == 512);
  CHECK(f.at("llama.vocab_size").get<uint32_t>() == 512);
  CHECK(f.at("llama.attention.layer_norm_rms_epsilon").get<float>() == 1e-5f);
  CHECK(f.at("llama.rope.freq_base").get<float>() == 10000.0f);
  CHECK(f.at("tokenizer.ggml.bos_token_id").get<uint32_t>() == 1);
  CHECK(f.at("tokenizer.ggml.eos_token_id").get<uint32_t>() == 2);
  CHECK(f.at("tokenizer.ggml.unknown_token_id").get<uint32_t>() == 0);
  CHECK(f.find_tensor("output.weight") == nullptr);

  // Vocabulary as llama.cpp's llama2.c converter writes it.
  const auto tokens = f.at("tokenizer.ggml.tokens").strings();
  const auto types = f.at("tokenizer.ggml.token_type").array<int32_t>();
  const auto scores = f.at("tokenizer.ggml.scores").array<float>();
  REQUIRE(tokens.size() == 512);
  CHECK(tokens[0] == "<unk>");
  CHECK(tokens[1] == "<s>");
  CHECK(tokens[2] == "</s>");
  CHECK(tokens[3] == "<0x00>");
  CHECK(tokens[258] == "<0xFF>");
  CHECK(tokens[259] == "\xE2\x96\x81t");  // " t"
  CHECK(types[0] == 2);
  CHECK(types[1] == 3);
  CHECK(types[2] == 3);
  CHECK(types[3] == 6);
  CHECK(types[258] == 6);
  CHECK(types[259] == 1);
  for (int32_t id = 3; id < 512; ++id)
    CHECK(scores[static_cast<std::size_t>(id)] == m.tokenizer->score(id));

  // Tensors, un-padded, equal the model's; the padding is zeros.
  auto same = [&](const std::string& name, const Tensor<float>& want) {
    Tensor<float> got = f.to_float(name);
    INFO(name);
    CHECK(f.tensor(name).type == GgmlType::f32);
    if (got.shape() == want.shape()) {
      CHECK(cbq::testing::max_abs_diff(got, want) == 0.0);
      return;
    }
    REQUIRE(got.ndim() == 2);
    const int64_t R = want.size(0), C = want.size(1);
    for (int64_t r = 0; r < got.size(0); ++r)
      for (int64_t k = 0; k < got.size(1); ++k) {
        const float v = got[r * got.size(1) + k];
        if (r < R && k < C)
          CHECK(v == want[r * C + k]);
        else
          CHECK(v == 0.0f);
      }
  };
  same("token_embd.weight", m.embed_tokens.value);
  same("output_norm.weight", m.final_norm_weight.value);
  for (int64_t b = 0; b < c.n_layers; ++b) {
    auto& blk = m.blocks[static_cast<std::size_t>(b)];
    const std::string p = fmt::format("blk.{}.", b);
    same(p + "attn_norm.weight", blk.input_layernorm.value);
    same(p + "ffn_norm.weight", blk.post_attention_layernorm.value);
    same(p + "attn_q.weight", blk.q_proj.weight.value);  // llama2.c: already interleaved
    same(p + "attn_k.weight", blk.k_proj.weight.value);
    same(p + "attn_v.weight", blk.v_proj.weight.value);
    same(p + "attn_output.weight", blk.o_proj.weight.value);
    same(p + "ffn_gate.weight", blk.gate_proj.weight.value);
    same(p + "ffn_up.weight", blk.up_proj.weight.value);
    same(p + "ffn_down.weight", blk.down_proj.weight.value);
    CHECK(f.tensor(p + "ffn_down.weight").ne == std::vector<int64_t>{192, 64});
    CHECK(f.tensor(p + "ffn_gate.weight").ne == std::vector<int64_t>{64, 192});
  }

  // Loaded back: the padding removed, the same config, tokenizer and logits.
  auto back = load_gguf_llama(path);
  CHECK(back.config.hidden_dim == 172);
  CHECK(back.config.architecture == "llama2.c");
  CHECK(back.config.norm_eps == c.norm_eps);
  CHECK(back.config.rope_layout == RopeLayout::interleaved);
  CHECK(back.config.tied_embeddings);
  REQUIRE(back.tokenizer);
  const std::string text = "Once upon a time, there was a little girl named Lily. \xC3\xA9\n";
  const auto ids = m.tokenizer->encode(text, true, false);
  CHECK(back.tokenizer->encode(text, true, false) == ids);
  CHECK(back.tokenizer->decode(ids) == m.tokenizer->decode(ids));
  const Tensor<float> want = m.logits(ids).clone();
  CHECK(cbq::testing::max_abs_diff(back.logits(ids), want) == 0.0);

  // Without padding (F32 needs none) and with F16 matrices.
  GgufExportOptions o;
  o.pad_ffn_to = 0;
  o.float_type = GgmlType::f16;
  o.name = "stories";
  export_gguf(path, m, m.tokenizer.get(), nullptr, o);
  GgufFile h(path);
  CHECK(h.get<std::string>("general.name") == "stories");
  CHECK(h.at("llama.feed_forward_length").get<uint32_t>() == 172);
  CHECK(h.tensor("blk.0.ffn_down.weight").type == GgmlType::f16);
  CHECK(h.tensor("blk.0.attn_norm.weight").type == GgmlType::f32);
  const Tensor<float> gate = h.to_float("blk.1.ffn_gate.weight");
  const Tensor<float>& gate0 = m.blocks[1].gate_proj.weight.value;
  for (int64_t i = 0; i < gate.numel(); ++i) CHECK(gate[i] == f16_to_float(float_to_f16(gate0[i])));
}

TEST_CASE(
    "GGUF export: RTN and CBQ W4 g32 (Q4_0, Q4_1) and W8 (Q8_0) re-read equal the snapped result") {
  const fs::path bin = models_dir() / "stories260K.bin", tok = models_dir() / "tok512.bin";
  if (!have_files({bin, tok})) return;
  AnyModel any = load_model(bin.string(), tok.string());
  auto& m = any.llama();
  const std::vector<int32_t> tokens = m.tokenizer->encode(tinystories_prefix(8000), true, false);
  REQUIRE(tokens.size() >= 1024);
  TempDir dir("gguf_quant");
  struct Case {
    int bits;
    bool sym;
    quant::Granularity g;
    int64_t group;
    GgmlType type;
    bool cbq = false;  // a (short) CBQ run instead of RTN
  };
  for (const Case& k : {Case{4, true, quant::Granularity::per_group, 32, GgmlType::q4_0},
                        Case{4, false, quant::Granularity::per_group, 32, GgmlType::q4_1},
                        Case{4, false, quant::Granularity::per_group, 64, GgmlType::q4_1},
                        Case{8, true, quant::Granularity::per_channel, 0, GgmlType::q8_0},
                        Case{4, false, quant::Granularity::per_group, 32, GgmlType::q4_1, true}}) {
    INFO(fmt::format("{} W{} {} {} g{}", k.cbq ? "CBQ" : "RTN", k.bits, k.sym ? "sym" : "asym",
                     ggml_type_name(k.type), k.group));
    AnyModel fresh = load_model(bin.string(), tok.string());
    auto& model = fresh.llama();
    PassSpec spec;
    spec.weight.bits = k.bits;
    spec.weight.symmetric = k.sym;
    spec.weight.granularity = k.g;
    spec.weight.group_size = k.group > 0 ? k.group : 128;
    QuantizationResult result;
    if (k.cbq) {
      PassOptions o;
      o.verbose = false;
      o.epochs = 1;
      CbqPass pass(spec, o);
      result = pass.run(model, sample_calibration(tokens, 8, 64, 0));
      CHECK(result.learning_summary().second > 0);  // the rounding really moved off nearest
    } else {
      result = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
    }
    clear_quantization(model);
    GgufSnapStats stats;
    const auto snapped = snap_result_for_gguf(result, &stats);
    const std::string path = dir.file("q.gguf");
    const auto report = export_gguf(path, model, model.tokenizer.get(), &result);
    CHECK(report.tensor_types.at(ggml_type_name(k.type)) == 7 * model.config.n_layers);
    CHECK(report.snap.steps == stats.steps);
    CHECK(stats.max_rel_change < (k.sym ? 4.9e-4 : 1.0 / 64));

    // Every block: d is the snapped step in fp16, the nibbles / int8 are the codes, m = −d·z.
    GgufFile f(path);
    CHECK(f.at("general.file_type").get<uint32_t>() == (k.type == GgmlType::q4_0   ? 2u
                                                        : k.type == GgmlType::q4_1 ? 3u
                                                                                   : 7u));
    for (const auto& l : snapped.layers) {
      const auto dot = l.name.find('.', 7);
      const std::string b = l.name.substr(7, dot - 7), lin = l.name.substr(dot + 1);
      const std::map<std::string, std::string> names = {
          {"q_proj", "attn_q"},      {"k_proj", "attn_k"},      {"v_proj", "attn_v"},
          {"o_proj", "attn_output"}, {"gate_proj", "ffn_gate"}, {"up_proj", "ffn_up"},
          {"down_proj", "ffn_down"}};
      const std::string gname = "blk." + b + "." + names.at(lin) + ".weight";
      const GgufTensorInfo& t = f.tensor(gname);
      REQUIRE(t.type == k.type);
      const auto& w = l.weight;
      const int64_t C = w.cols(), Cp = t.ne[0], R = w.rows();
      const auto bytes = f.data(t);
      const std::size_t bsize = static_cast<std::size_t>(ggml_traits(k.type).bytes);
      int bad = 0;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t blk = 0; blk < Cp / 32; ++blk) {
          const std::byte* p = bytes.data() + static_cast<std::size_t>(r * (Cp / 32) + blk) * bsize;
          uint16_t d;
          std::memcpy(&d, p, 2);
          const int64_t pi = w.param_index(r, 32 * blk);
          bad += d != float_to_f16(w.scale[pi]);
          if (k.type == GgmlType::q4_1) {
            uint16_t mm;
            std::memcpy(&mm, p + 2, 2);
            bad += f16_to_float(mm) != -w.scale[pi] * w.zero[pi];
          }
          for (int64_t j = 0; j < 32 && 32 * blk + j < C; ++j) {
            const int64_t col = 32 * blk + j;
            const uint8_t code = w.codes[r * C + col];
            int got;
            if (k.type == GgmlType::q8_0) {
              got = static_cast<int>(static_cast<int8_t>(p[2 + j])) + 128;
            } else {
              const auto byte =
                  static_cast<uint8_t>(p[(k.type == GgmlType::q4_1 ? 4 : 2) + j % 16]);
              got = j < 16 ? byte & 0x0F : byte >> 4;
            }
            bad += got != code;
          }
        }
      CHECK_MESSAGE(bad == 0, gname);
      // Dequantized file tensor == the snapped result's values (padding 0).
      const Tensor<float> x = f.to_float(gname), want = w.dequantize();
      double diff = 0;
      for (int64_t r = 0; r < x.size(0); ++r)
        for (int64_t col = 0; col < Cp; ++col) {
          const float wv = r < R && col < C ? want[r * C + col] : 0.0f;
          diff = std::max(diff, static_cast<double>(std::abs(x[r * Cp + col] - wv)));
        }
      CHECK_MESSAGE(diff == 0.0, gname);
    }

    // Perplexity of the re-loaded file == that of the in-memory snapped dequantized model.
    install_dequantized(model, snapped);
    auto back = load_gguf_llama(path);
    CHECK(back.config.hidden_dim == 172);
    const double p_mem = eval::perplexity_llamacpp(model, tokens, 512, 1).perplexity;
    const double p_file = eval::perplexity_llamacpp(back, tokens, 512, 1).perplexity;
    MESSAGE(
        fmt::format("{}: perplexity in memory {:.6f}, re-loaded GGUF {:.6f}; steps changed "
                    "by fp16 at most {:.3g} (relative)",
                    ggml_type_name(k.type), p_mem, p_file, stats.max_rel_change));
    CHECK(std::abs(p_file - p_mem) <= 1e-6 * p_mem);
  }
}

// ---- Hugging Face layout ----

TEST_CASE(
    "GGUF export: a Hugging Face model (rotate-half RoPE) is permuted to llama.cpp's layout") {
  const fs::path dir = tiny_llama_dir();
  if (!have_files({dir / "config.json", dir / "model.safetensors", dir / "tokenizer.json"})) return;
  AnyModel any = load_model(dir.string());
  auto& m = any.llama();
  REQUIRE(m.config.rope_layout == RopeLayout::rotate_half);
  REQUIRE(!m.config.tied_embeddings);
  TempDir tmp("gguf_hf");
  const std::string path = tmp.file("tiny.gguf");
  export_gguf(path, m, m.tokenizer.get(), nullptr);
  GgufFile f(path);
  // Vocabulary: the SentencePiece-style pieces, byte / control / unknown types.
  const auto tokens = f.at("tokenizer.ggml.tokens").strings();
  const auto types = f.at("tokenizer.ggml.token_type").array<int32_t>();
  REQUIRE(tokens.size() == 512);
  for (int32_t id = 0; id < 512; ++id)
    CHECK(tokens[static_cast<std::size_t>(id)] == m.tokenizer->piece(id));
  CHECK(types[0] == 2);  // <unk>
  CHECK(types[1] == 3);  // <s>
  CHECK(types[2] == 3);  // </s>
  CHECK(types[3] == 6);  // <0x00>
  CHECK(types[300] == 1);
  // <s> and </s> are the only control tokens (a lone "▁" is a normal one).
  CHECK(std::count(types.begin(), types.end(), 3) == 2);
  const int32_t space =
      m.tokenizer.get() ? static_cast<const HfTokenizer&>(*m.tokenizer).find("\xE2\x96\x81") : -1;
  if (space >= 0) CHECK(types[static_cast<std::size_t>(space)] == 1);
  CHECK(f.find_tensor("output.weight") != nullptr);
  // q rows: head h, pair i: interleaved row h·hd + 2i + p is HF row h·hd + p·hd/2 + i.
  const Tensor<float> q = f.to_float("blk.1.attn_q.weight");
  const Tensor<float>& q_hf = m.blocks[1].q_proj.weight.value;
  const int64_t hd = m.config.head_dim, d = m.config.dim;
  for (int64_t h = 0; h < m.config.n_heads; ++h)
    for (int64_t i = 0; i < hd / 2; ++i)
      for (int64_t p = 0; p < 2; ++p)
        for (int64_t col = 0; col < d; ++col)
          CHECK(q[(h * hd + 2 * i + p) * d + col] == q_hf[(h * hd + p * hd / 2 + i) * d + col]);

  auto back = load_gguf_llama(path);
  CHECK(back.config.rope_layout == RopeLayout::interleaved);
  const std::vector<int32_t> ids =
      m.tokenizer->encode("Once upon a time there was a cat.", true, false);
  const Tensor<float> want = m.logits(ids).clone();
  const double diff = cbq::testing::max_abs_diff(back.logits(ids), want);
  MESSAGE("tiny-llama logits through GGUF: max |diff| " << diff);
  CHECK(diff < 1e-4);

  // Quantized: the permuted codes and steps still compute the snapped model.
  PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.symmetric = false;
  spec.weight.group_size = 32;
  const auto result = quantize_baseline(m, Baseline::rtn, spec, {}, {}, false);
  clear_quantization(m);
  export_gguf(path, m, m.tokenizer.get(), &result);
  install_dequantized(m, snap_result_for_gguf(result));
  auto qback = load_gguf_llama(path);
  const Tensor<float> qwant = m.logits(ids).clone();
  const double qdiff = cbq::testing::max_abs_diff(qback.logits(ids), qwant);
  MESSAGE("tiny-llama W4 g32 asymmetric through GGUF: max |logit diff| " << qdiff);
  CHECK(qdiff < 1e-4);
}

TEST_CASE("GGUF import: files that are not cbq-loadable LLaMAs are refused with a reason") {
  TempDir dir("gguf_import");
  const std::string path = dir.file("m.gguf");
  GgufWriter w;
  w.set_string("general.architecture", "gpt2");
  w.write(path);
  CHECK(error_of([&] { load_gguf(path); }).find("architecture 'gpt2' is not supported") !=
        std::string::npos);
  GgufWriter w2;
  w2.set_string("general.architecture", "llama");
  w2.write(path);
  CHECK(error_of([&] { load_gguf(path); }).find("'llama.embedding_length' is missing") !=
        std::string::npos);
  ModelConfig c = tiny_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 1));
  export_gguf(path, model, nullptr, nullptr);
  auto g = load_gguf(path);
  CHECK(!g.tokenizer);
  CHECK(g.config.dim == c.dim);
  CHECK(g.config.rope_layout == RopeLayout::interleaved);

  // Copied through the reader and the writer, the file is byte for byte the same; with one more
  // tensor cbq does not know it is refused.
  GgufFile f(path);
  GgufWriter copy;
  for (const auto& [key, value] : f.metadata()) copy.set(key, value);
  for (const auto& t : f.tensors()) {
    auto bytes = f.data(t);
    copy.add_tensor(t.name, t.type, t.ne, std::vector<std::byte>(bytes.begin(), bytes.end()));
  }
  const std::string copied = dir.file("copy.gguf");
  copy.write(copied);
  CHECK(read_all(copied) == read_all(path));
  copy.add_float("rope_freqs.weight", Tensor<float>(Shape{2}));
  copy.write(copied);
  CHECK(error_of([&] {
          load_gguf(copied);
        }).find("tensor 'rope_freqs.weight' is not part of a cbq LLaMA model") !=
        std::string::npos);
}
