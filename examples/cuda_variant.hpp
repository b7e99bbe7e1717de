#pragma once
// The CUDA variant of a tool: with CBQ_ENABLE_CUDA the build makes NAME (C++ compiler, no CUDA
// runtime linked) and NAME-cuda (nvcc, the CUDA backend) from the same source
// (examples/CMakeLists.txt). NAME runs everything on the CPU; asked for the GPU it replaces
// itself with NAME-cuda from its own folder, same arguments and environment.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <system_error>

namespace cbq_tools {

// Re-executes `variant` (a file beside this program) with `argv`; returns only when that is not
// possible (no such file, or exec failed), so the caller reports the missing backend.
inline void exec_cuda_variant([[maybe_unused]] const char* variant, [[maybe_unused]] char** argv) {
#ifdef CBQ_CUDA_VARIANT
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return;
  const std::filesystem::path path = self.parent_path() / variant;
  if (!std::filesystem::exists(path, ec)) return;
  std::fflush(stdout);
  std::fflush(stderr);
  execv(path.c_str(), argv);
  std::fprintf(stderr, "cannot run %s: exec failed\n", path.c_str());
#endif
}

}  // namespace cbq_tools
