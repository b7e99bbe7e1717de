#pragma once
// safetensors (Hugging Face) reading, memory-mapped, with full validation of the header, and
// writing (atomic: a temporary beside the file, then rename; atomic_file.hpp). Sharded checkpoints
// through model.safetensors.index.json. Format: u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data section; offsets are relative to the data section. See docs/FORMATS.md.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/half.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::io {

enum class Dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::F64:
      return "F64";
    case Dtype::F32:
      return "F32";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::I64:
      return "I64";
    case Dtype::I32:
      return "I32";
    case Dtype::I16:
      return "I16";
    case Dtype::I8:
      return "I8";
    case Dtype::U8:
      return "U8";
    case Dtype::BOOL:
      return "BOOL";
  }
  return "?";
}

inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F64:
    case Dtype::I64:
      return 8;
    case Dtype::F32:
    case Dtype::I32:
      return 4;
    case Dtype::F16:
    case Dtype::BF16:
    case Dtype::I16:
      return 2;
    case Dtype::I8:
    case Dtype::U8:
    case Dtype::BOOL:
      return 1;
  }
  return 0;
}

inline std::optional<Dtype> parse_dtype(std::string_view s) {
  for (Dtype d : {Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I64, Dtype::I32,
                  Dtype::I16, Dtype::I8, Dtype::U8, Dtype::BOOL})
    if (s == dtype_name(d)) return d;
  return std::nullopt;
}

// One tensor of a safetensors file; begin/end are byte offsets into the data section.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;
  uint64_t nbytes() const { return end - begin; }
};

namespace detail {

// Converts `n` elements of `dtype` at (possibly unaligned) `src` into floats.
inline void convert_to_float(const std::byte* src, Dtype dtype, int64_t n, float* dst,
                             const std::string& where) {
  auto load = [&]<class T>(int64_t i, T* /*tag*/) {
    T v;
    std::memcpy(&v, src + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
    return v;
  };
  switch (dtype) {
    case Dtype::F32:
      if (n) std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
      return;
    case Dtype::F16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = f16_to_float(load(i, static_cast<uint16_t*>(nullptr)));
      return;
    case Dtype::BF16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = bf16_to_float(load(i, static_cast<uint16_t*>(nullptr)));
      return;
    case Dtype::F64:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = static_cast<float>(load(i, static_cast<double*>(nullptr)));
      return;
    default:
      fail("{}: dtype {} cannot be read as floating point (F32, F16, BF16, F64)", where,
           dtype_name(dtype));
  }
}

inline uint64_t json_uint(const nlohmann::json& v, const std::string& where) {
  CBQ_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0),
            "{}: expected a non-negative integer, got {}", where, v.dump());
  return v.get<uint64_t>();
}

}  // namespace detail

// A single .safetensors file, memory-mapped. Construction validates the whole header: the
// header length fits the file, the JSON is well formed, every entry has a known dtype, a shape
// of at most 6 non-negative dimensions and offsets [begin, end) inside the data section with
// end - begin == numel * dtype size, and no two tensors overlap.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path) : file_(path) {
    const std::size_t size = file_.size();
    CBQ_CHECK(size >= 8,
              "{}: truncated safetensors file: {} bytes, the header length alone needs 8", path,
              size);
    uint64_t n = 0;
    std::memcpy(&n, file_.data(), 8);
    CBQ_CHECK(n <= size - 8,
              "{}: safetensors header length {} exceeds the file: {} bytes after the 8-byte "
              "length field",
              path, n, size - 8);
    data_offset_ = 8 + static_cast<std::size_t>(n);
    data_size_ = size - data_offset_;
    const char* begin = reinterpret_cast<const char*>(file_.data()) + 8;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(begin, begin + n);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: invalid safetensors JSON header ({} bytes): {}", path, n, e.what());
    }
    CBQ_CHECK(header.is_object(), "{}: safetensors header is not a JSON object", path);
    std::vector<const TensorInfo*> by_offset;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        CBQ_CHECK(entry.is_object() || entry.is_null(), "{}: __metadata__ is not an object", path);
        if (entry.is_null()) continue;
        for (const auto& [k, v] : entry.items()) {
          CBQ_CHECK(v.is_string(), "{}: __metadata__ value of \"{}\" is not a string", path, k);
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      tensors_.emplace(name, parse_entry(name, entry));
    }
    for (const auto& [name, t] : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo& a = *by_offset[i - 1];
      const TensorInfo& b = *by_offset[i];
      CBQ_CHECK(b.begin >= a.end, "{}: tensors {} [{}, {}) and {} [{}, {}) overlap", path, a.name,
                a.begin, a.end, b.name, b.begin, b.end);
    }
  }

  const std::string& path() const { return file_.path(); }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, t] : tensors_) out.push_back(name);
    return out;
  }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    CBQ_CHECK(it != tensors_.end(), "{}: no tensor named {}", path(), name);
    return it->second;
  }
  // The stored bytes of `name` (inside the mapping).
  std::span<const std::byte> raw(const std::string& name) const {
    const TensorInfo& t = info(name);
    return file_.bytes().subspan(data_offset_ + t.begin, t.nbytes());
  }
  // `name` converted to float32 (exact for F32/F16/BF16; F64 is rounded).
  Tensor<float> to_float(const std::string& name) const {
    const TensorInfo& t = info(name);
    Tensor<float> out = Tensor<float>::empty(t.shape);
    detail::convert_to_float(raw(name).data(), t.dtype, t.shape.numel(), out.data(),
                             fmt::format("{}: tensor {}", path(), name));
    return out;
  }
  // `name`, stored as I32, as an int32 tensor.
  Tensor<int32_t> to_int32(const std::string& name) const {
    const TensorInfo& t = info(name);
    CBQ_CHECK(t.dtype == Dtype::I32, "{}: tensor {} has dtype {}, expected I32", path(), name,
              dtype_name(t.dtype));
    Tensor<int32_t> out = Tensor<int32_t>::empty(t.shape);
    if (t.nbytes()) std::memcpy(out.data(), raw(name).data(), t.nbytes());
    return out;
  }
  std::size_t data_offset() const { return data_offset_; }

 private:
  TensorInfo parse_entry(const std::string& name, const nlohmann::json& e) const {
    const std::string where = fmt::format("{}: tensor {}", path(), name);
    CBQ_CHECK(e.is_object(), "{}: entry is not a JSON object", where);
    CBQ_CHECK(e.contains("dtype") && e["dtype"].is_string(), "{}: missing or non-string dtype",
              where);
    CBQ_CHECK(e.contains("shape") && e["shape"].is_array(), "{}: missing or non-array shape",
              where);
    CBQ_CHECK(
        e.contains("data_offsets") && e["data_offsets"].is_array() && e["data_offsets"].size() == 2,
        "{}: data_offsets must be an array of two integers", where);
    TensorInfo t;
    t.name = name;
    const std::string dt = e["dtype"].get<std::string>();
    auto dtype = parse_dtype(dt);
    CBQ_CHECK(dtype.has_value(), "{}: unsupported dtype \"{}\"", where, dt);
    t.dtype = *dtype;
    CBQ_CHECK(e["shape"].size() <= static_cast<std::size_t>(kMaxDims),
              "{}: shape has {} dimensions, at most {} are supported", where, e["shape"].size(),
              kMaxDims);
    uint64_t numel = 1, nonzero = 1;
    for (const auto& d : e["shape"]) {
      uint64_t v = detail::json_uint(d, where + " shape");
      CBQ_CHECK(v <= static_cast<uint64_t>(INT64_MAX), "{}: dimension {} too large", where, v);
      numel = checked_mul(numel, v, where);
      // Strides and element counts are int64 products of the dimensions; with a zero dimension
      // the others can still overflow them.
      nonzero = checked_mul(nonzero, std::max<uint64_t>(v, 1), where);
      CBQ_CHECK(nonzero <= static_cast<uint64_t>(INT64_MAX),
                "{}: shape dimensions multiply to more than 2^63 - 1", where);
      t.shape.push_back(static_cast<int64_t>(v));
    }
    t.begin = detail::json_uint(e["data_offsets"][0], where + " data_offsets");
    t.end = detail::json_uint(e["data_offsets"][1], where + " data_offsets");
    CBQ_CHECK(t.begin <= t.end, "{}: data_offsets [{}, {}) are reversed", where, t.begin, t.end);
    CBQ_CHECK(t.end <= data_size_,
              "{}: data_offsets [{}, {}) out of range: the data section has {} bytes", where,
              t.begin, t.end, data_size_);
    const uint64_t expected = checked_mul(numel, dtype_size(t.dtype), where);
    CBQ_CHECK(expected == t.end - t.begin,
              "{}: dtype {} and shape {} need {} bytes but data_offsets [{}, {}) hold {}", where,
              dt, t.shape, expected, t.begin, t.end, t.end - t.begin);
    return t;
  }

  MappedFile file_;
  std::size_t data_offset_ = 0, data_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorInfo> tensors_;
};

// A checkpoint of one or more safetensors files: a .safetensors file, a
// model.safetensors.index.json (its weight_map names each tensor's shard, relative to the
// index's folder), or a folder holding either (the index wins when both exist).
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& path) {
    namespace fs = std::filesystem;
    fs::path p(path);
    if (fs::is_directory(p)) {
      if (fs::exists(p / "model.safetensors.index.json"))
        p /= "model.safetensors.index.json";
      else if (fs::exists(p / "model.safetensors"))
        p /= "model.safetensors";
      else
        fail("{}: neither model.safetensors nor model.safetensors.index.json found", path);
    }
    if (p.extension() == ".json") {
      open_index(p.string());
    } else {
      files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
      for (const auto& name : files_[0]->names()) where_[name] = 0;
    }
  }

  // Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, i] : where_) out.push_back(name);
    return out;
  }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile& file_of(const std::string& name) const {
    auto it = where_.find(name);
    CBQ_CHECK(it != where_.end(), "{}: no tensor named {}", source_path(), name);
    return *files_[it->second];
  }
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  Tensor<float> to_float(const std::string& name) const { return file_of(name).to_float(name); }
  Tensor<int32_t> to_int32(const std::string& name) const { return file_of(name).to_int32(name); }
  // The index file, or the single file.
  const std::string& source_path() const {
    return index_path_.empty() ? files_[0]->path() : index_path_;
  }
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  void open_index(const std::string& index_path) {
    namespace fs = std::filesystem;
    index_path_ = index_path;
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(read_text_file(index_path));
    } catch (const nlohmann::json::exception& e) {
      fail("{}: invalid JSON: {}", index_path, e.what());
    }
    CBQ_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
              "{}: missing \"weight_map\" object", index_path);
    const fs::path dir = fs::path(index_path).parent_path();
    std::map<std::string, std::size_t> shard_index;
    for (const auto& [name, shard] : index["weight_map"].items()) {
      CBQ_CHECK(shard.is_string(), "{}: weight_map entry of {} is not a string", index_path, name);
      const std::string s = shard.get<std::string>();
      CBQ_CHECK(!s.empty() && s.find('/') == std::string::npos &&
                    s.find('\\') == std::string::npos && s != "." && s != "..",
                "{}: weight_map entry of {} names \"{}\", which is not a file name in the same "
                "folder",
                index_path, name, s);
      auto [it, inserted] = shard_index.emplace(s, files_.size());
      if (inserted) files_.push_back(std::make_unique<SafetensorsFile>((dir / s).string()));
      const SafetensorsFile& f = *files_[it->second];
      CBQ_CHECK(f.contains(name), "{}: weight_map puts {} in {}, which does not contain it",
                index_path, name, f.path());
      where_[name] = it->second;
    }
  }

  std::string index_path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::size_t> where_;
};

// A tensor to write, with the dtype to store it as. Sources are shared, not copied; conversion
// (F16/BF16 rounding to nearest even) happens while writing.
struct TensorToWrite {
  Dtype dtype = Dtype::F32;
  std::variant<Tensor<float>, Tensor<int32_t>> source;

  static TensorToWrite f32(const Tensor<float>& t) { return {Dtype::F32, t}; }
  static TensorToWrite f16(const Tensor<float>& t) { return {Dtype::F16, t}; }
  static TensorToWrite bf16(const Tensor<float>& t) { return {Dtype::BF16, t}; }
  static TensorToWrite i32(const Tensor<int32_t>& t) { return {Dtype::I32, t}; }

  const Shape& shape() const {
    return std::visit([](const auto& t) -> const Shape& { return t.shape(); }, source);
  }
};

// Writes `tensors` (sorted by name, contiguous in that order) and `metadata` as a safetensors
// file. The header is padded with spaces to a multiple of 8 bytes. Atomic: the file appears
// complete under `path` or not at all.
inline void write_safetensors(const std::string& path,
                              const std::map<std::string, TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    CBQ_CHECK(!name.empty() && name != "__metadata__", "{}: invalid tensor name \"{}\"", path,
              name);
    const bool is_float = std::holds_alternative<Tensor<float>>(t.source);
    const bool ok = t.dtype == Dtype::I32
                        ? !is_float
                        : (is_float && (t.dtype == Dtype::F32 || t.dtype == Dtype::F16 ||
                                        t.dtype == Dtype::BF16));
    CBQ_CHECK(ok,
              "{}: tensor {}: cannot store a {} tensor as {} (F32/F16/BF16 from float, I32 from "
              "int32)",
              path, name, is_float ? "float" : "int32", dtype_name(t.dtype));
    const uint64_t n =
        checked_mul(static_cast<uint64_t>(t.shape().numel()), dtype_size(t.dtype), path);
    nlohmann::json shape = nlohmann::json::array();
    for (int64_t d : t.shape()) shape.push_back(d);
    header[name] = {
        {"dtype", dtype_name(t.dtype)}, {"shape", shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  // Nothing non-finite is written: a NaN saved is a NaN result the next run trusts.
  for (const auto& [name, t] : tensors) {
    const auto* tf = std::get_if<Tensor<float>>(&t.source);
    if (!tf) continue;
    const Tensor<float> c = tf->is_cpu() ? tf->contiguous() : tf->to(Device::cpu);
    const float* p = c.data();
    for (int64_t i = 0; i < c.numel(); ++i) {
      CBQ_CHECK(std::isfinite(p[i]),
                "{}: refusing to write tensor {}: it holds a non-finite value ({}) at element {} "
                "of shape {}",
                path, name, p[i], i, c.shape());
      if (t.dtype == Dtype::F16)
        CBQ_CHECK(std::isfinite(f16_to_float(float_to_f16(p[i]))),
                  "{}: refusing to write tensor {} as F16: element {} = {} is beyond the F16 "
                  "range (65504)",
                  path, name, i, p[i]);
    }
  }
  std::string json;
  try {
    json = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail("{}: cannot encode the safetensors header (tensor names and metadata must be UTF-8): {}",
         path, e.what());
  }
  json.append((8 - json.size() % 8) % 8, ' ');
  write_file_atomic(path, [&](std::ofstream& out) {
    write_pod(out, static_cast<uint64_t>(json.size()));
    out.write(json.data(), static_cast<std::streamsize>(json.size()));
    constexpr int64_t kChunk = 1 << 16;
    std::vector<uint16_t> buf16;
    for (const auto& [name, t] : tensors) {
      if (const auto* ti = std::get_if<Tensor<int32_t>>(&t.source)) {
        Tensor<int32_t> c = ti->is_cpu() ? ti->contiguous() : ti->to(Device::cpu);
        out.write(reinterpret_cast<const char*>(c.data()),
                  static_cast<std::streamsize>(c.numel() * 4));
        continue;
      }
      const auto& tf = std::get<Tensor<float>>(t.source);
      Tensor<float> c = tf.is_cpu() ? tf.contiguous() : tf.to(Device::cpu);
      if (t.dtype == Dtype::F32) {
        out.write(reinterpret_cast<const char*>(c.data()),
                  static_cast<std::streamsize>(c.numel() * 4));
        continue;
      }
      for (int64_t i = 0; i < c.numel(); i += kChunk) {
        const int64_t m = std::min(kChunk, c.numel() - i);
        buf16.resize(static_cast<std::size_t>(m));
        for (int64_t k = 0; k < m; ++k)
          buf16[static_cast<std::size_t>(k)] = t.dtype == Dtype::F16
                                                   ? float_to_f16(c.data()[i + k])
                                                   : float_to_bf16(c.data()[i + k]);
        out.write(reinterpret_cast<const char*>(buf16.data()), static_cast<std::streamsize>(m * 2));
      }
    }
  });
}

}  // namespace cbq::io
