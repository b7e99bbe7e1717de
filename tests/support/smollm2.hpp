#pragma once
// Where tests find SmolLM2-135M-Instruct's GGUF (scripts/fetch-models.sh): $CBQ_SMOLLM2_GGUF, else
// the fetch cache ${CBQ_MODEL_CACHE:-${XDG_CACHE_HOME:-~/.cache}/cbq/models}.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace cbq::testing {

// The file's path, or "" after a doctest MESSAGE saying the test is skipped.
inline std::string smollm2_gguf() {
  namespace fs = std::filesystem;
  if (const char* p = std::getenv("CBQ_SMOLLM2_GGUF"); p && fs::exists(p)) return p;
  fs::path cache;
  if (const char* c = std::getenv("CBQ_MODEL_CACHE"))
    cache = c;
  else if (const char* x = std::getenv("XDG_CACHE_HOME"))
    cache = fs::path(x) / "cbq" / "models";
  else if (const char* home = std::getenv("HOME"))
    cache = fs::path(home) / ".cache" / "cbq" / "models";
  const fs::path p = cache / "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (fs::exists(p)) return p.string();
  MESSAGE(
      "skipped: SmolLM2-135M-Instruct.Q4_1.gguf not found (run scripts/fetch-models.sh, or "
      "set CBQ_SMOLLM2_GGUF)");
  return "";
}

}  // namespace cbq::testing
