// libFuzzer target: Hugging Face tokenizer.json through HfTokenizer, then encode/decode.
// Input layout: [flags][n][n bytes of text][JSON]. flags bit 0/1: add BOS/EOS; bit 2: the JSON is
// the tokenizer_config.json next to the real tiny-llama tokenizer.json (HfTokenizer::load);
// bit 3: pass model_vocab_size 600.
#include <cbq/tokenizer/hf_tokenizer.hpp>
#include <filesystem>
#include <string_view>

#include "fuzz_common.hpp"

namespace {

void exercise(const cbq::HfTokenizer& tok, std::string_view text, bool bos, bool eos) {
  cbq::fuzz::accept_errors([&] {
    const std::vector<int32_t> ids = tok.encode(text, bos, eos);
    for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
    (void)tok.decode(ids);
    int32_t prev = -1;
    for (int32_t id : ids) {
      (void)tok.decode_piece(prev, id);
      prev = id;
    }
  });
}

const std::filesystem::path& config_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const fs::path d = cbq::fuzz::scratch_dir() / "tok";
    fs::create_directories(d);
    fs::copy_file(cbq::fuzz::fixtures_dir() / "tiny-llama" / "tokenizer.json", d / "tokenizer.json",
                  fs::copy_options::overwrite_existing);
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t flags = data[0];
  const std::size_t text_len = std::min<std::size_t>(data[1], size - 2);
  const std::string_view text(reinterpret_cast<const char*>(data + 2), text_len);
  const std::size_t head = 2 + text_len;
  const std::string_view json(reinterpret_cast<const char*>(data + head), size - head);
  cbq::HfTokenizerOptions options;
  if (flags & 8) options.model_vocab_size = 600;
  cbq::fuzz::accept_errors([&] {
    std::optional<cbq::HfTokenizer> tok;
    if (flags & 4) {
      const std::filesystem::path dir = config_dir();
      cbq::fuzz::write_file("tok/tokenizer_config.json", json.data(), json.size());
      tok.emplace(cbq::HfTokenizer::load(dir.string(), options));
    } else {
      tok.emplace(json, "fuzz/tokenizer.json", options);
    }
    const int32_t n = tok->vocab_size();
    FUZZ_CHECK(n > 0);
    FUZZ_CHECK(tok->bos_id() >= -1 && tok->bos_id() < n);
    FUZZ_CHECK(tok->eos_id() >= -1 && tok->eos_id() < n);
    for (int32_t id = 0; id < n; ++id) {
      (void)tok->piece(id);
      (void)tok->score(id);
    }
    exercise(*tok, text, flags & 1, flags & 2);
    exercise(*tok, "Hello world, it's 2024! <s> caf\xC3\xA9  \t\n end</s>", false, false);
    exercise(*tok, " \xE2\x96\x81x \xF0\x9F\x98\x80\xFF\xC3 ''ll 's", tok->bos_id() >= 0, false);
  });
  return 0;
}
