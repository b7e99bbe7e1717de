#pragma once
// Test support for file-based tests: a self-removing temporary folder, whole-file read/write, and
// the message of the cbq::Error a call throws.
#include <unistd.h>

#include <cbq/core/error.hpp>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

namespace cbq::testing {

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           fmt::format("cbq_{}_{}_{}", tag, static_cast<long>(::getpid()), counter++);
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
};

inline void write_all(const std::string& path, const std::string& s) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

inline std::string read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// True when `folder` holds a temporary of cbq's atomic writes (core/atomic_file.hpp:
// ".NAME.cbq-tmp-…",
// ".NAME.cbq-tmpdir-…", ".NAME.cbq-old-…") or an old-style "NAME.tmp".
inline bool has_temporaries(const std::filesystem::path& folder) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(folder, ec)) {
    const std::string name = e.path().filename().string();
    if (name.find(".cbq-tmp") != std::string::npos || name.find(".cbq-old-") != std::string::npos ||
        (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0))
      return true;
  }
  return false;
}

// The message of the cbq::Error that f throws, or "<no error>".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const cbq::Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace cbq::testing
