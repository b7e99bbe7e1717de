// libFuzzer target: llama2.c tokenizer.bin through Llama2cTokenizer, then encode/decode.
// Input layout: [flags][n][n bytes of text][tokenizer file]. flags bit 0/1: add BOS/EOS,
// bit 2: pass vocab_size 512 (stories260K's) instead of inferring it from the file.
#include <cbq/tokenizer/llama2c_tokenizer.hpp>
#include <string_view>

#include "fuzz_common.hpp"

namespace {

void exercise(const cbq::Llama2cTokenizer& tok, std::string_view text, bool bos, bool eos) {
  cbq::fuzz::accept_errors([&] {
    const std::vector<int32_t> ids = tok.encode(text, bos, eos);
    for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
    (void)tok.decode(ids);
    int32_t prev = tok.bos_id();
    for (int32_t id : ids) {
      (void)tok.decode_piece(prev, id);
      prev = id;
    }
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t flags = data[0];
  const std::size_t text_len = std::min<std::size_t>(data[1], size - 2);
  const std::string_view text(reinterpret_cast<const char*>(data + 2), text_len);
  const std::size_t head = 2 + text_len;
  const std::string path = cbq::fuzz::write_file("tokenizer.bin", data + head, size - head);
  cbq::fuzz::accept_errors([&] {
    const cbq::Llama2cTokenizer tok(path, (flags & 4) ? 512 : 0);
    FUZZ_CHECK(tok.vocab_size() > 0);
    for (int32_t id = 0; id < tok.vocab_size(); ++id) {
      FUZZ_CHECK(tok.find(tok.piece(id)) >= 0);
      (void)tok.score(id);
    }
    exercise(tok, text, flags & 1, flags & 2);
    exercise(tok, "Once upon a time, Lily saw a big dog.", true, false);
    exercise(tok, "h\xC3\xA9llo \xE6\x97\xA5\xE6\x9C\xAC \xFF\xC0 x", false, true);
  });
  return 0;
}
