#pragma once
// Which kernel set ("core") OpenBLAS runs, and a correction when it fell back to a generic one.
//
// A DYNAMIC_ARCH OpenBLAS (Debian's, and most distributions') picks its kernels once, when the
// library loads, from the CPU's family and model numbers. On a processor newer than the library
// it does not recognise the model and falls back to Prescott (SSE3) kernels: Debian's 0.3.21 on
// a family 6 model 207 Xeon (AVX-512) ran SGEMM 768³ at 25 GFLOP/s on one thread instead of 118
// with its SkylakeX kernels, and cbq 4-7x slower overall, without a word. The choice can only
// be changed before the library loads, through the environment variable OPENBLAS_CORETYPE; so a
// program that finds a fallback re-executes itself with the variable set (use_best_blas_kernels,
// called first thing in main by cbq's tools and benchmarks). The decision is a pure function of
// the CPU's features and the chosen core's name (better_openblas_core), tested on its own.
//
// Environment:
//   OPENBLAS_CORETYPE        set by the user: respected, never overridden.
//   CBQ_BLAS_CORE=keep       never correct (the one-line warning still says what runs).
//   CBQ_PRETEND_OPENBLAS_CORE=NAME   act as if OpenBLAS had chosen NAME (to test the correction
//                            on a CPU that OpenBLAS knows).
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

// Weak, so that a CBLAS other than OpenBLAS still links (the function is then null).
extern "C" __attribute__((weak)) char* openblas_get_corename(void);

namespace cbq::blas {

// The vector features of a CPU that decide OpenBLAS's x86 kernel sets.
struct CpuFeatures {
  bool avx = false, avx2 = false, fma = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512cd = false;
  bool avx512bf16 = false;

  bool has_avx512() const { return avx512f && avx512bw && avx512dq && avx512vl && avx512cd; }
  bool has_avx2() const { return avx2 && fma; }
};

// This CPU's features, as usable (GCC's __builtin_cpu_supports also checks that the operating
// system saves the AVX / AVX-512 registers). All false on other architectures or compilers.
inline CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  f.avx = __builtin_cpu_supports("avx");
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512cd = __builtin_cpu_supports("avx512cd");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

// "AVX-512 + BF16", "AVX-512", "AVX2", "AVX" or "SSE": the widest vector set the CPU offers.
inline const char* describe_vector_isa(const CpuFeatures& f) {
  if (f.has_avx512()) return f.avx512bf16 ? "AVX-512 + BF16" : "AVX-512";
  if (f.has_avx2()) return "AVX2";
  if (f.avx) return "AVX";
  return "SSE";
}

namespace detail {
inline bool same_name(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}
}  // namespace detail

// The vector level of an OpenBLAS x86 core name (as openblas_get_corename() spells it, any
// case): 1 SSE-class, 2 AVX, 3 AVX2, 4 AVX-512; 0 for a name this table does not know (other
// architectures, future cores), which is then never corrected.
inline int openblas_core_level(std::string_view core) {
  static constexpr std::string_view sse[] = {"Katmai",       "Coppermine", "Northwood", "Prescott",
                                             "Banias",       "Atom",       "Core2",     "Penryn",
                                             "Dunnington",   "Nehalem",    "Athlon",    "Opteron",
                                             "Opteron_SSE3", "Barcelona",  "Nano",      "Bobcat"};
  static constexpr std::string_view avx[] = {"Sandybridge", "Bulldozer", "Piledriver",
                                             "Steamroller"};
  static constexpr std::string_view avx2[] = {"Haswell", "Excavator", "Zen"};
  static constexpr std::string_view avx512[] = {"SkylakeX", "Cooperlake", "SapphireRapids"};
  for (std::string_view n : sse)
    if (detail::same_name(n, core)) return 1;
  for (std::string_view n : avx)
    if (detail::same_name(n, core)) return 2;
  for (std::string_view n : avx2)
    if (detail::same_name(n, core)) return 3;
  for (std::string_view n : avx512)
    if (detail::same_name(n, core)) return 4;
  return 0;
}

// The OpenBLAS core that best matches a CPU: Cooperlake (AVX-512 with BF16), SkylakeX
// (AVX-512 F, BW, DQ, VL, CD), Haswell (AVX2 + FMA); "" when none of those applies.
inline std::string_view best_openblas_core(const CpuFeatures& f) {
  if (f.has_avx512()) return f.avx512bf16 ? "Cooperlake" : "SkylakeX";
  if (f.has_avx2()) return "Haswell";
  return "";
}

// The core to ask for instead of `chosen` on a CPU with features `f`, or "" to keep `chosen`:
// a correction only when `chosen` is a known x86 core of a lower vector level than the CPU
// offers. Zen is kept even on AVX-512 Zen 4 (OpenBLAS maps every Zen to its Zen kernels on
// purpose), as is any core this table does not know.
inline std::string_view better_openblas_core(const CpuFeatures& f, std::string_view chosen) {
  const std::string_view best = best_openblas_core(f);
  if (best.empty()) return "";
  const int level = openblas_core_level(chosen);
  if (level == 0 || detail::same_name(chosen, "Zen")) return "";
  return level < openblas_core_level(best) ? best : "";
}

// The kernel set OpenBLAS runs ("SkylakeX"), or "not OpenBLAS" for another CBLAS.
inline std::string blas_core_name() {
  if (!openblas_get_corename) return "not OpenBLAS";
  const char* name = openblas_get_corename();
  return name ? std::string(name) : std::string("unknown");
}

// One line for benchmark reports: "OpenBLAS SkylakeX kernels on an AVX-512 CPU".
inline std::string blas_core_summary() {
  const CpuFeatures f = cpu_features();
  if (!openblas_get_corename)
    return std::string("a CBLAS other than OpenBLAS on an ") + describe_vector_isa(f) + " CPU";
  return "OpenBLAS " + blas_core_name() + " kernels on an " + describe_vector_isa(f) + " CPU";
}

namespace detail {
inline constexpr const char* kReexecVariable = "CBQ_BLAS_REEXEC";

// The core OpenBLAS chose, or the one CBQ_PRETEND_OPENBLAS_CORE names (tests).
inline std::string chosen_openblas_core() {
  if (const char* pretend = std::getenv("CBQ_PRETEND_OPENBLAS_CORE"); pretend && *pretend)
    return pretend;
  return blas_core_name();
}

// "" when the kernels are fine or not cbq's to change; else the one-line warning.
inline std::string generic_core_warning() {
  if (!openblas_get_corename || std::getenv("OPENBLAS_CORETYPE")) return "";
  const CpuFeatures f = cpu_features();
  const std::string chosen = chosen_openblas_core();
  const std::string_view better = better_openblas_core(f, chosen);
  if (better.empty()) return "";
  return "cbq: OpenBLAS runs its generic " + chosen + " kernels on this " + describe_vector_isa(f) +
         " CPU (GEMMs several times slower); set OPENBLAS_CORETYPE=" + std::string(better) +
         " before the program starts";
}
}  // namespace detail

// Call first thing in main(), before any BLAS call and before starting threads. When OpenBLAS
// chose a generic core on a CPU with AVX2 or AVX-512 (and neither OPENBLAS_CORETYPE nor
// CBQ_BLAS_CORE=keep is set), prints one line to stderr and re-executes the program
// (/proc/self/exe, the same argv and environment) with OPENBLAS_CORETYPE set to the better core
// (better_openblas_core). In the restarted process it checks that OpenBLAS took the core and
// says so in one line if it did not. Returns when nothing needs changing, or when the restart is
// impossible (then with a line saying what to set).
inline void use_best_blas_kernels([[maybe_unused]] int argc, char** argv) {
  if (!openblas_get_corename) return;  // another CBLAS: nothing to choose
  if (const char* asked = std::getenv(detail::kReexecVariable)) {  // the restarted process
    const std::string wanted = asked;
    unsetenv(detail::kReexecVariable);  // children of this process start afresh
    const std::string runs = blas_core_name();
    if (!detail::same_name(runs, wanted))
      std::fprintf(stderr, "cbq: asked OpenBLAS for its %s kernels, but it runs %s\n",
                   wanted.c_str(), runs.c_str());
    return;
  }
  if (std::getenv("OPENBLAS_CORETYPE")) return;  // the user's choice
  const CpuFeatures f = cpu_features();
  const std::string chosen = detail::chosen_openblas_core();
  const std::string better(better_openblas_core(f, chosen));
  if (better.empty()) return;
  // Kept on request: the first GEMM prints the warning (blas.hpp).
  if (const char* keep = std::getenv("CBQ_BLAS_CORE"); keep && std::string_view(keep) == "keep")
    return;
  std::fprintf(stderr,
               "cbq: OpenBLAS chose its generic %s kernels on this %s CPU; restarting with "
               "OPENBLAS_CORETYPE=%s\n",
               chosen.c_str(), describe_vector_isa(f), better.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  if (argv != nullptr && argv[0] != nullptr) {
    setenv("OPENBLAS_CORETYPE", better.c_str(), 1);
    setenv(detail::kReexecVariable, better.c_str(), 1);
    unsetenv("CBQ_PRETEND_OPENBLAS_CORE");
    execv("/proc/self/exe", argv);
    const int err = errno;  // only reached when the restart failed
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv(detail::kReexecVariable);
    std::fprintf(stderr, "cbq: restart failed (%s); continuing with the %s kernels\n",
                 std::strerror(err), chosen.c_str());
  }
}

}  // namespace cbq::blas
