// cbq_test_edit: makes and damages the files of the command-line reliability tests
// (tests/cli/hostile.sh): one value in a model, checkpoint, GGUF block or tokenizer set to NaN
// (or anything), a sparse llama2.c file of any size, a Q4_1 GGUF of stories260K. Offsets come
// from cbq's own readers, so the damage lands exactly on the named tensor.
//
//   cbq_test_edit llama2c-set FILE TENSOR INDEX VALUE        (TENSOR: Hugging Face name)
//   cbq_test_edit llama2c-sparse FILE DIM HIDDEN LAYERS HEADS VOCAB SEQ
//   cbq_test_edit safetensors-set FILE TENSOR INDEX VALUE [--fix-checksum]
//     (--fix-checksum: also rewrite a cbq checkpoint's "checksum.TENSOR", if it has one)
//   cbq_test_edit gguf-set-scale FILE TENSOR BLOCK VALUE     (fp16 d of a Q4_0/Q4_1/Q8_0 block)
//   cbq_test_edit gguf-set-f32 FILE TENSOR INDEX VALUE       (an F32 tensor's element)
//   cbq_test_edit gguf-set-score FILE ID VALUE               (tokenizer.ggml.scores[ID])
//   cbq_test_edit tok-set-score FILE ID VALUE                (llama2.c tokenizer.bin)
//   cbq_test_edit make-gguf MODEL TOKENIZER OUT              (RTN W4 g32 asym: Q4_1 blocks)
#include <fcntl.h>
#include <unistd.h>

#include <cbq/core/half.hpp>
#include <cbq/export/gguf.hpp>
#include <cbq/formats/llama2c.hpp>
#include <cbq/formats/safetensors.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/checkpoint.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

float parse_value(const std::string& v) { return std::strtof(v.c_str(), nullptr); }

void write_at(const std::string& path, uint64_t offset, const void* data, std::size_t n) {
  const int fd = ::open(path.c_str(), O_WRONLY);
  CBQ_CHECK(fd >= 0, "{}: cannot open for writing: {}", path, std::strerror(errno));
  const ssize_t w = ::pwrite(fd, data, n, static_cast<off_t>(offset));
  ::close(fd);
  CBQ_CHECK(w == static_cast<ssize_t>(n), "{}: pwrite of {} bytes at {} failed", path, n, offset);
}

std::string read_all(const std::string& path) { return cbq::io::read_text_file(path); }

int llama2c_set(const std::string& file, const std::string& tensor, int64_t index, float value) {
  const cbq::io::Llama2cLayout l = cbq::io::probe_llama2c(file);
  uint64_t offset = l.header_bytes;
  for (const auto& a : l.arrays) {
    const int64_t copies = a.per_layer ? l.config.n_layers : 1;
    const uint64_t bytes = static_cast<uint64_t>(a.shape.numel()) * 4;
    for (int64_t i = 0; i < copies; ++i, offset += bytes) {
      if (a.skip || cbq::io::detail::layer_name(a.name, i) != tensor) continue;
      CBQ_CHECK(index >= 0 && index < a.shape.numel(), "{}: index {} outside {}", tensor, index,
                a.shape);
      write_at(file, offset + static_cast<uint64_t>(index) * 4, &value, 4);
      return 0;
    }
  }
  cbq::fail("{}: no tensor {}", file, tensor);
}

int llama2c_sparse(const std::string& file, const std::vector<int32_t>& dims) {
  cbq::io::Llama2cHeader h{dims[0], dims[1], dims[2], dims[3], dims[3], dims[4], dims[5]};
  std::vector<std::byte> head(sizeof(h));
  std::memcpy(head.data(), &h, sizeof(h));
  // The size the header implies (llama2c_layout checks it against the size it is given).
  const cbq::ModelConfig c = cbq::io::detail::llama2c_config(h, true);
  uint64_t size = sizeof(h);
  for (const auto& a : cbq::io::detail::llama2c_arrays(c, true, true))
    size += cbq::io::detail::array_floats(a, c.n_layers, file) * 4;
  cbq::io::llama2c_layout(head, size, file);
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  CBQ_CHECK(fd >= 0, "{}: cannot create: {}", file, std::strerror(errno));
  const bool ok = ::write(fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)) &&
                  ::ftruncate(fd, static_cast<off_t>(size)) == 0;
  ::close(fd);
  CBQ_CHECK(ok, "{}: cannot write a sparse file of {} bytes", file, size);
  std::printf("%llu\n", static_cast<unsigned long long>(size));
  return 0;
}

int safetensors_set(const std::string& file, const std::string& tensor, int64_t index, float value,
                    bool fix_checksum) {
  uint64_t offset = 0;
  {
    cbq::io::SafetensorsFile f(file);
    const auto& info = f.info(tensor);
    CBQ_CHECK(info.dtype == cbq::io::Dtype::F32, "{}: {} is not F32", file, tensor);
    CBQ_CHECK(index >= 0 && index < info.shape.numel(), "{}: index {} outside {}", tensor, index,
              info.shape);
    offset = f.data_offset() + info.begin + static_cast<uint64_t>(index) * 4;
  }
  write_at(file, offset, &value, 4);
  if (!fix_checksum) return 0;
  std::string sum;
  uint64_t header = 0;
  {
    cbq::io::SafetensorsFile f(file);
    sum = cbq::detail::tensor_checksum(f.to_float(tensor));
    header = f.data_offset();
  }
  const std::string text = read_all(file).substr(0, header);
  const std::string key = "\"checksum." + tensor + "\":\"";
  const auto at = text.find(key);
  if (at == std::string::npos) return 0;  // a checkpoint format without checksums
  write_at(file, at + key.size(), sum.data(), sum.size());
  return 0;
}

int gguf_set_scale(const std::string& file, const std::string& tensor, int64_t block, float value) {
  uint64_t offset = 0;
  {
    cbq::io::GgufFile f(file);
    const auto& t = f.tensor(tensor);
    const auto traits = cbq::io::ggml_traits(t.type);
    CBQ_CHECK(traits.block > 1, "{}: {} is not a block type", file, tensor);
    CBQ_CHECK(block >= 0 && static_cast<uint64_t>(block * traits.bytes) < t.nbytes,
              "{}: block {} outside {}", file, block, tensor);
    offset = f.data_offset() + t.offset + static_cast<uint64_t>(block * traits.bytes);
  }
  const uint16_t d = cbq::io::float_to_f16(value);
  write_at(file, offset, &d, 2);
  return 0;
}

int gguf_set_f32(const std::string& file, const std::string& tensor, int64_t index, float value) {
  uint64_t offset = 0;
  {
    cbq::io::GgufFile f(file);
    const auto& t = f.tensor(tensor);
    CBQ_CHECK(t.type == cbq::io::GgmlType::f32, "{}: {} is not F32", file, tensor);
    CBQ_CHECK(index >= 0 && index < t.numel(), "{}: index {} outside {}", file, index, tensor);
    offset = f.data_offset() + t.offset + static_cast<uint64_t>(index) * 4;
  }
  write_at(file, offset, &value, 4);
  return 0;
}

int gguf_set_score(const std::string& file, int64_t id, float value) {
  const std::string bytes = read_all(file);
  const std::string key = "tokenizer.ggml.scores";
  const auto at = bytes.find(key);
  CBQ_CHECK(at != std::string::npos, "{}: no {}", file, key);
  // key, u32 value type (array), u32 element type, u64 count, then the floats
  const uint64_t first = at + key.size() + 4 + 4 + 8;
  uint64_t count = 0;
  std::memcpy(&count, bytes.data() + first - 8, 8);
  CBQ_CHECK(id >= 0 && static_cast<uint64_t>(id) < count, "{}: score {} outside {}", file, id,
            count);
  write_at(file, first + static_cast<uint64_t>(id) * 4, &value, 4);
  return 0;
}

int tok_set_score(const std::string& file, int64_t id, float value) {
  const std::string bytes = read_all(file);
  uint64_t pos = 4;  // max_token_length
  for (int64_t i = 0; i < id; ++i) {
    int32_t len = 0;
    std::memcpy(&len, bytes.data() + pos + 4, 4);
    pos += 8 + static_cast<uint64_t>(len);
    CBQ_CHECK(pos < bytes.size(), "{}: token {} is past the end", file, id);
  }
  write_at(file, pos, &value, 4);
  return 0;
}

int make_gguf(const std::string& model_path, const std::string& tokenizer, const std::string& out) {
  cbq::AnyModel any = cbq::load_model(model_path, tokenizer);
  auto& m = any.llama();
  cbq::PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.group_size = 32;
  spec.weight.granularity = cbq::quant::Granularity::per_group;
  cbq::QuantizationResult r = cbq::quantize_baseline(m, cbq::Baseline::rtn, spec, {}, {}, false);
  cbq::io::export_gguf(out, m, m.tokenizer.get(), &r);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  auto need = [&](std::size_t n) {
    if (a.empty()) {
      std::fprintf(stderr, "usage: cbq_test_edit COMMAND ARGS... (the commands: see the source)\n");
      std::exit(2);
    }
    if (a.size() < n) {
      std::fprintf(stderr, "cbq_test_edit: %s needs %zu arguments\n", a[0].c_str(), n - 1);
      std::exit(2);
    }
  };
  try {
    need(1);
    const std::string& cmd = a[0];
    if (cmd == "llama2c-set") {
      need(5);
      return llama2c_set(a[1], a[2], std::stoll(a[3]), parse_value(a[4]));
    }
    if (cmd == "llama2c-sparse") {
      need(8);
      std::vector<int32_t> dims;
      for (int i = 2; i < 8; ++i) dims.push_back(static_cast<int32_t>(std::stol(a[i])));
      return llama2c_sparse(a[1], dims);
    }
    if (cmd == "safetensors-set") {
      need(5);
      return safetensors_set(a[1], a[2], std::stoll(a[3]), parse_value(a[4]),
                             a.size() > 5 && a[5] == "--fix-checksum");
    }
    if (cmd == "gguf-set-scale") {
      need(5);
      return gguf_set_scale(a[1], a[2], std::stoll(a[3]), parse_value(a[4]));
    }
    if (cmd == "gguf-set-f32") {
      need(5);
      return gguf_set_f32(a[1], a[2], std::stoll(a[3]), parse_value(a[4]));
    }
    if (cmd == "gguf-set-score") {
      need(4);
      return gguf_set_score(a[1], std::stoll(a[2]), parse_value(a[3]));
    }
    if (cmd == "tok-set-score") {
      need(4);
      return tok_set_score(a[1], std::stoll(a[2]), parse_value(a[3]));
    }
    if (cmd == "make-gguf") {
      need(4);
      return make_gguf(a[1], a[2], a[3]);
    }
    std::fprintf(stderr, "cbq_test_edit: unknown command %s\n", cmd.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbq_test_edit: %s\n", e.what());
    return 1;
  }
}
