// libFuzzer target: one .safetensors file (header JSON, dtypes, shapes, offsets) through
// SafetensorsFile and SafetensorsCheckpoint, reading every tensor it accepts.
#include <cbq/formats/safetensors.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cbq::fuzz::write_file("model.safetensors", data, size);
  cbq::fuzz::accept_errors([&] {
    const cbq::io::SafetensorsFile f(path);
    FUZZ_CHECK(f.data_offset() >= 8 && f.data_offset() <= size);
    for (const auto& entry : f.tensors()) {
      const std::string& name = entry.first;
      const cbq::io::TensorInfo& t = entry.second;  // (clang 14 cannot capture bindings)
      const auto raw = f.raw(name);
      FUZZ_CHECK(raw.size() == t.nbytes());
      FUZZ_CHECK(f.data_offset() + t.end <= size);
      cbq::fuzz::accept_errors([&] {
        if (t.dtype == cbq::io::Dtype::I32) {
          FUZZ_CHECK(f.to_int32(name).numel() * 4 == static_cast<int64_t>(t.nbytes()));
        } else {
          const auto x = f.to_float(name);
          FUZZ_CHECK(static_cast<uint64_t>(x.numel()) * cbq::io::dtype_size(t.dtype) == t.nbytes());
        }
      });
    }
  });
  cbq::fuzz::accept_errors([&] {
    const cbq::io::SafetensorsCheckpoint ckpt(path);
    for (const auto& name : ckpt.names()) (void)ckpt.info(name);
  });
  return 0;
}
