#pragma once
// Shared by the libFuzzer targets. The loaders take paths, so each input is written to a
// per-process scratch folder in shared memory (fast) first. A cbq::Error or another
// std::exception thrown by a parser is an accepted outcome; crashes, sanitizer reports, leaks,
// hangs and huge allocations are findings, as is a broken FUZZ_CHECK invariant.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <string>

namespace cbq::fuzz {

// Created on first use, removed when the process exits normally. libFuzzer often ends with
// _exit (after a finding, or when its time is up), so folders of processes that no longer
// exist are removed here too.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const fs::path base =
        fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    const std::string prefix = "cbq_fuzz_";
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(base, ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind(prefix, 0) != 0) continue;
      const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
      if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
        fs::remove_all(e.path(), ec);
    }
    fs::path d = base / (prefix + std::to_string(static_cast<long>(::getpid())));
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return dir;
}

// Writes `size` bytes to `relative` under the scratch folder (creating sub-folders); its path.
inline std::string write_file(const std::string& relative, const void* data, std::size_t size) {
  const std::filesystem::path p = scratch_dir() / relative;
  std::filesystem::create_directories(p.parent_path());
  std::FILE* f = std::fopen(p.c_str(), "wb");
  if (!f) {
    std::perror(p.c_str());
    std::abort();
  }
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return p.string();
}

// Runs `parse`; exceptions are the parser rejecting the input, which is fine.
template <class F>
void accept_errors(F&& parse) {
  try {
    parse();
  } catch (const std::exception&) {
  }
}

// The fixtures folder of the source tree (compiled in by scripts/fuzz.sh).
inline std::filesystem::path fixtures_dir() {
#ifdef CBQ_SOURCE_DIR
  return std::filesystem::path(CBQ_SOURCE_DIR) / "tests" / "fixtures";
#else
  return std::filesystem::path("tests") / "fixtures";
#endif
}

}  // namespace cbq::fuzz

// An invariant the parser promises for inputs it accepts; aborting makes it a finding.
#define FUZZ_CHECK(cond)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "FUZZ_CHECK failed: %s at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)
