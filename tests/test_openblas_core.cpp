// The OpenBLAS kernel-set correction (core/openblas_core.hpp): which core a CPU should get, and
// when the core OpenBLAS chose is a generic fallback to correct.
#include <sys/wait.h>

#include <cbq/core/openblas_core.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "doctest/doctest.h"
#include "support/child_process.hpp"

using cbq::blas::better_openblas_core;
using cbq::blas::CpuFeatures;

namespace {

CpuFeatures sse_only() { return CpuFeatures{}; }
CpuFeatures avx_only() {
  CpuFeatures f;
  f.avx = true;
  return f;
}
CpuFeatures avx2() {
  CpuFeatures f = avx_only();
  f.avx2 = f.fma = true;
  return f;
}
CpuFeatures avx512() {  // Skylake-SP, Ice Lake, Zen 4 without BF16 reported
  CpuFeatures f = avx2();
  f.avx512f = f.avx512bw = f.avx512dq = f.avx512vl = f.avx512cd = true;
  return f;
}
CpuFeatures avx512_bf16() {  // Cooper Lake, Sapphire / Emerald Rapids
  CpuFeatures f = avx512();
  f.avx512bf16 = true;
  return f;
}

}  // namespace

TEST_CASE("openblas core: the best core for a CPU's vector features") {
  CHECK(cbq::blas::best_openblas_core(sse_only()) == "");
  CHECK(cbq::blas::best_openblas_core(avx_only()) == "");
  CHECK(cbq::blas::best_openblas_core(avx2()) == "Haswell");
  CHECK(cbq::blas::best_openblas_core(avx512()) == "SkylakeX");
  CHECK(cbq::blas::best_openblas_core(avx512_bf16()) == "Cooperlake");
  // AVX2 without FMA, or AVX-512F without BW/DQ/VL (Knights Landing), is not enough.
  CpuFeatures no_fma = avx2();
  no_fma.fma = false;
  CHECK(cbq::blas::best_openblas_core(no_fma) == "");
  CpuFeatures knl = avx2();
  knl.avx512f = knl.avx512cd = true;
  CHECK(cbq::blas::best_openblas_core(knl) == "Haswell");
}

TEST_CASE("openblas core: generic fallbacks on better CPUs are corrected") {
  // The case that motivated it: Debian's 0.3.21 on a family 6 model 207 Xeon (AVX-512, BF16).
  CHECK(better_openblas_core(avx512_bf16(), "Prescott") == "Cooperlake");
  CHECK(better_openblas_core(avx512(), "Prescott") == "SkylakeX");
  CHECK(better_openblas_core(avx512(), "Nehalem") == "SkylakeX");
  CHECK(better_openblas_core(avx512(), "Sandybridge") == "SkylakeX");
  CHECK(better_openblas_core(avx512(), "Haswell") == "SkylakeX");
  CHECK(better_openblas_core(avx2(), "Prescott") == "Haswell");
  CHECK(better_openblas_core(avx2(), "Core2") == "Haswell");
  CHECK(better_openblas_core(avx2(), "Sandybridge") == "Haswell");
  CHECK(better_openblas_core(avx2(), "Barcelona") == "Haswell");
  // Names in any case, as OPENBLAS_CORETYPE accepts them.
  CHECK(better_openblas_core(avx512(), "PRESCOTT") == "SkylakeX");
  CHECK(better_openblas_core(avx512(), "prescott") == "SkylakeX");
}

TEST_CASE("openblas core: the right core, Zen, unknown names and weak CPUs are kept") {
  CHECK(better_openblas_core(avx512(), "SkylakeX") == "");
  CHECK(better_openblas_core(avx512_bf16(), "Cooperlake") == "");
  CHECK(better_openblas_core(avx512_bf16(), "SapphireRapids") == "");
  CHECK(better_openblas_core(avx512_bf16(), "SkylakeX") == "");  // same level: not a fallback
  CHECK(better_openblas_core(avx2(), "Haswell") == "");
  CHECK(better_openblas_core(avx2(), "Zen") == "");
  CHECK(better_openblas_core(avx512(), "Zen") == "");  // Zen 4: OpenBLAS's own choice
  CHECK(better_openblas_core(avx512(), "neoversen1") == "");
  CHECK(better_openblas_core(avx512(), "") == "");
  CHECK(better_openblas_core(avx_only(), "Prescott") == "");  // nothing better to ask for
  CHECK(better_openblas_core(sse_only(), "Prescott") == "");
  // A core above what the CPU has (forced by hand) is not "corrected" downwards.
  CHECK(better_openblas_core(avx2(), "SkylakeX") == "");
}

TEST_CASE("openblas core: levels of the core names") {
  CHECK(cbq::blas::openblas_core_level("Prescott") == 1);
  CHECK(cbq::blas::openblas_core_level("Opteron_SSE3") == 1);
  CHECK(cbq::blas::openblas_core_level("Sandybridge") == 2);
  CHECK(cbq::blas::openblas_core_level("Haswell") == 3);
  CHECK(cbq::blas::openblas_core_level("Zen") == 3);
  CHECK(cbq::blas::openblas_core_level("SkylakeX") == 4);
  CHECK(cbq::blas::openblas_core_level("cooperlake") == 4);
  CHECK(cbq::blas::openblas_core_level("POWER10") == 0);
  CHECK(cbq::blas::openblas_core_level("Prescot") == 0);
}

TEST_CASE("openblas core: the library names the core it runs") {
  const std::string name = cbq::blas::blas_core_name();
  CHECK(!name.empty());
  CHECK(cbq::blas::blas_core_summary().find(name == "not OpenBLAS" ? "other than" : name) !=
        std::string::npos);
}

// Runs the start-up correction in a child process and writes what it ended with to the file
// named by its argument: "<OPENBLAS_CORETYPE or -> <the core OpenBLAS runs>".
CBQ_TEST_CHILD_PROCESS(openblas_core_child) {
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  cbq::blas::use_best_blas_kernels(1, argv);  // a restart runs this function again
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  std::ofstream out(cbq::testing::child_arg());
  out << (forced ? forced : "-") << " " << cbq::blas::blas_core_name() << "\n";
  return 0;
}

TEST_CASE("openblas core: a program on a generic fallback restarts with the better core") {
  if (!openblas_get_corename) {
    MESSAGE("skipped: the CBLAS is not OpenBLAS");
    return;
  }
  if (std::getenv("OPENBLAS_CORETYPE")) {
    MESSAGE("skipped: OPENBLAS_CORETYPE is set (the user's choice is never changed)");
    return;
  }
  const std::string better(
      better_openblas_core(cbq::blas::cpu_features(), "Prescott"));  // what a fallback gets
  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / ("cbq_openblas_core_" + std::to_string(getpid()));
  setenv("CBQ_PRETEND_OPENBLAS_CORE", "Prescott", 1);
  const int status = cbq::testing::spawn_self("openblas_core_child", file.string());
  unsetenv("CBQ_PRETEND_OPENBLAS_CORE");
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  std::ifstream in(file);
  std::string forced, runs;
  in >> forced >> runs;
  std::filesystem::remove(file);
  if (better.empty()) {  // a CPU without AVX2: nothing better, no restart
    CHECK(forced == "-");
  } else {
    CHECK(forced == better);
    CHECK(cbq::blas::detail::same_name(runs, better));
  }

  // Without the pretence the core OpenBLAS chose on this machine is kept or corrected, never
  // made worse: whatever it ends with is at least the level it started with.
  const int status2 = cbq::testing::spawn_self("openblas_core_child", file.string());
  REQUIRE(WIFEXITED(status2));
  std::ifstream in2(file);
  std::string forced2, runs2;
  in2 >> forced2 >> runs2;
  std::filesystem::remove(file);
  CHECK(cbq::blas::openblas_core_level(runs2) >=
        cbq::blas::openblas_core_level(cbq::blas::blas_core_name()));
}
