// Helper for tests/reference/make_llamacpp_tokenizer_fixtures.sh (built there with the system
// compiler; not part of the library or the test suite):
//   tokenizer_tool ids TOKENIZER TEXT_FILE      cbq's ids of the file, one JSON list
//   tokenizer_tool export TOKENIZER OUT.gguf    a tiny random LLaMA with this vocabulary, written
//                                               by cbq::io::export_gguf (for llama-tokenize)
//   tokenizer_tool split PATTERN TEXT           the pieces of TEXT split by the regex PATTERN
//                                               (Oniguruma dialect, every match isolated), JSON
// TOKENIZER: a GGUF file (its vocabulary) or a tokenizer.json.
#include <cbq/export/gguf.hpp>
#include <cbq/model/random.hpp>
#include <cbq/tokenizer/gguf_tokenizer.hpp>
#include <cbq/tokenizer/hf_tokenizer.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

using namespace cbq;

static std::shared_ptr<const Tokenizer> load(const std::string& path) {
  if (path.size() > 5 && path.substr(path.size() - 5) == ".json")
    return std::make_shared<HfTokenizer>(HfTokenizer::load(path));
  io::GgufFile f(path);
  std::string why;
  auto tok = gguf_tokenizer(f, INT32_MAX, why);
  if (!tok) fail("{}: no tokenizer: {}", path, why);
  return tok;
}

int main(int argc, char** argv) {
  try {
    CBQ_CHECK(argc == 4, "usage: tokenizer_tool ids|export TOKENIZER FILE, or split PATTERN TEXT");
    const std::string cmd = argv[1];
    if (cmd == "split") {
      const regex::Regex re(argv[2], regex::Dialect::oniguruma);
      const std::string text = argv[3];
      nlohmann::json pieces = nlohmann::json::array();
      for (const auto& [r, match] : bpe::regex_spans(re, text))
        pieces.push_back(text.substr(r.first, r.second - r.first));
      fmt::print("{}\n", pieces.dump());
      return 0;
    }
    auto tok = load(argv[2]);
    if (cmd == "ids") {
      const auto ids = tok->encode(io::read_text_file(argv[3]));
      fmt::print("[{}]\n", fmt::join(ids, ", "));
    } else if (cmd == "export") {
      ModelConfig c = tiny_llama_config();
      c.vocab_size = tok->vocab_size();
      Transformer<LlamaBlock<float>> m(c, random_weights(c, 1));
      io::export_gguf(argv[3], m, tok.get(), nullptr);
    } else {
      fail("unknown command '{}'", cmd);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenizer_tool: %s\n", e.what());
    return 1;
  }
}
