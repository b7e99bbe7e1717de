// libFuzzer target: GGUF files through the reader (GgufFile: header, metadata of every value
// type, tensor infos, offsets, dequantization) and through load_gguf (the LLaMA loader on top).
#include <cbq/formats/gguf.hpp>
#include <cbq/model/load.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cbq::fuzz::write_file("model.gguf", data, size);
  cbq::fuzz::accept_errors([&] {
    const cbq::io::GgufFile f(path);
    FUZZ_CHECK(f.data_offset() <= std::max<uint64_t>(size, f.data_offset()));
    for (const auto& entry : f.metadata()) {
      const std::string& key = entry.first;
      const cbq::io::GgufValue& v = entry.second;
      FUZZ_CHECK(f.find(key) == &v);
      (void)v.describe_type();
      cbq::fuzz::accept_errors([&] { (void)f.get<int64_t>(key); });
      cbq::fuzz::accept_errors([&] { (void)f.get<uint32_t>(key); });
      cbq::fuzz::accept_errors([&] { (void)f.get<double>(key); });
      cbq::fuzz::accept_errors([&] { (void)f.get<std::string>(key); });
      cbq::fuzz::accept_errors([&] { (void)f.get<bool>(key); });
      if (v.type() == cbq::io::GgufType::array) {
        const std::size_t n = v.size();
        for (std::size_t i = 0; i < n && i < 64; ++i) (void)v.item(i).describe_type();
        cbq::fuzz::accept_errors([&] { (void)v.array<int32_t>(); });
        cbq::fuzz::accept_errors([&] { (void)v.array<float>(); });
        cbq::fuzz::accept_errors([&] { (void)v.array<std::string>(); });
      }
    }
    for (const auto& t : f.tensors()) {
      FUZZ_CHECK(f.find_tensor(t.name) == &t);
      const auto bytes = f.data(t);
      FUZZ_CHECK(bytes.size() == t.nbytes);
      FUZZ_CHECK(f.data_offset() + t.offset + t.nbytes <= size);
      cbq::fuzz::accept_errors([&] {
        const cbq::Tensor<float> x = f.to_float(t.name);
        FUZZ_CHECK(x.numel() == t.numel());
      });
    }
  });
  cbq::fuzz::accept_errors([&] {
    const cbq::io::GgufModel m = cbq::io::load_gguf(path);
    FUZZ_CHECK(m.config.dim > 0 && m.config.n_layers > 0 && m.config.vocab_size > 0);
    if (m.tokenizer) {  // the file's vocabulary (SentencePiece or byte-level BPE) must run
      const auto ids = m.tokenizer->encode("Hello, it's 123 caf\xC3\xA9 <|endoftext|>\n\n  x\xFF");
      for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < m.tokenizer->vocab_size());
      (void)m.tokenizer->decode(ids);
    }
  });
  return 0;
}
