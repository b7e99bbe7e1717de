#pragma once
// Command-line parsing shared by cbq-quantize and cbq-eval, on CLI11 (help text, groups,
// --opt=value, unknown or repeated options). Every option is declared once with its type, the
// values it accepts and its default: the same declaration parses the value and writes the
// help line, so the help cannot drift from what is accepted. Values are parsed strictly here
// rather than by CLI11's converters (which, in the Debian version, read "-1" as 2^64 - 1 for
// unsigned types, "010" as octal and saturate overflows): integers are decimal (1e5 is accepted
// when it is exactly an integer), reals must be finite, both are range-checked, and a value
// that is another option's name ("--out --quiet") is refused.
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace cbq::cli {

// A bad command line: the tool prints it with a pointer to --help and exits with status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void usage_error(const std::string& msg) { throw UsageError(msg); }

// `text` as an integer in [lo, hi]: decimal digits with an optional sign, or a decimal or
// scientific number that is exactly an integer ("1e5"); anything else (1.5, nan, inf, 0x10,
// an empty string, trailing characters) is refused naming the option and the range.
template <class Int>
Int parse_integer(const std::string& option, const std::string& text, Int lo, Int hi) {
  const std::string range = fmt::format("an integer in [{}, {}]", lo, hi);
  Int v{};
  const char* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(text.data(), end, v);
  if (ec == std::errc() && p == end) {
    if (v < lo || v > hi)
      usage_error(fmt::format("{}: {} is out of range (expected {})", option, text, range));
    return v;
  }
  if (ec == std::errc::result_out_of_range)
    usage_error(fmt::format("{}: {} is out of range (expected {})", option, text, range));
  // 1e5, 2.0: a decimal number with an exponent or a point, exactly an integer.
  const bool numeric_syntax = !text.empty() &&
                              text.find_first_not_of("0123456789+-.eE") == std::string::npos &&
                              text.find_first_of("0123456789") != std::string::npos;
  double d = 0;
  auto [q, dec] = std::from_chars(text.data(), end, d);
  if (!numeric_syntax || dec != std::errc() || q != end)
    usage_error(fmt::format("{}: expected {}, got '{}'", option, range, text));
  if (!std::isfinite(d) || d != std::floor(d))
    usage_error(fmt::format("{}: expected {}, got '{}' (not an integer)", option, range, text));
  if (d < static_cast<double>(lo) || d > static_cast<double>(hi) || std::fabs(d) > 9.007e15)
    usage_error(fmt::format("{}: {} is out of range (expected {})", option, text, range));
  return static_cast<Int>(d);
}

// `text` as a finite real in [lo, hi] (`lo_open`: (lo, hi]).
inline double parse_real(const std::string& option, const std::string& text, double lo, double hi,
                         bool lo_open = false) {
  const std::string range = fmt::format("a number in {}{}, {}]", lo_open ? "(" : "[", lo, hi);
  double d = 0;
  const char* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(text.data(), end, d);
  if (text.empty() || ec != std::errc() || p != end)
    usage_error(fmt::format("{}: expected {}, got '{}'", option, range, text));
  if (!std::isfinite(d))
    usage_error(
        fmt::format("{}: expected {}, got '{}' (not a finite number)", option, range, text));
  if (d < lo || d > hi || (lo_open && d == lo))
    usage_error(fmt::format("{}: {} is out of range (expected {})", option, text, range));
  return d;
}

// The declarations of one tool's options (see the file comment).
class Options {
 public:
  Options(std::string tool, std::string description)
      : app_(std::move(description), tool), tool_(std::move(tool)) {
    app_.get_formatter()->column_width(36);
    app_.get_formatter()->label("REQUIRED", "");
  }
  CLI::App& app() { return app_; }
  const std::string& tool() const { return tool_; }

  // An integer option in [lo, hi].
  template <class Int>
  CLI::Option* integer(const std::string& name, Int& dest, const std::string& help, Int lo, Int hi,
                       const std::string& shown_default = "") {
    auto* o = add(name, help, [&dest, name, lo, hi](const std::string& v) {
      dest = parse_integer<Int>(name, v, lo, hi);
    });
    o->type_name(fmt::format("INT in [{}, {}]", lo, hi));
    o->default_str(shown_default.empty() ? fmt::format("{}", dest) : shown_default);
    return o;
  }
  // A finite real option in [lo, hi] ((lo, hi] when lo_open).
  CLI::Option* real(const std::string& name, double& dest, const std::string& help, double lo,
                    double hi, bool lo_open = false) {
    auto* o = add(name, help, [&dest, name, lo, hi, lo_open](const std::string& v) {
      dest = parse_real(name, v, lo, hi, lo_open);
    });
    o->type_name(fmt::format("X in {}{}, {}]", lo_open ? "(" : "[", lo, hi));
    o->default_str(fmt::format("{}", dest));
    return o;
  }
  // One of named values.
  template <class E>
  CLI::Option* choice(const std::string& name, E& dest, const std::string& help,
                      std::vector<std::pair<std::string, E>> values) {
    std::string names, shown;
    for (const auto& [n, e] : values) {
      names += (names.empty() ? "" : "|") + n;
      if (e == dest && shown.empty()) shown = n;
    }
    auto* o = add(name, help, [&dest, name, values, names](const std::string& v) {
      for (const auto& [n, e] : values)
        if (v == n) {
          dest = e;
          return;
        }
      usage_error(fmt::format("{}: unknown value '{}' (expected one of {})", name, v, names));
    });
    o->type_name(names);
    if (!shown.empty()) o->default_str(shown);
    return o;
  }
  // A text value (a path, a list); `check` may refuse it (throw UsageError).
  CLI::Option* text(const std::string& name, std::string& dest, const std::string& help,
                    const std::string& type = "PATH",
                    std::function<void(const std::string&)> check = {}) {
    auto* o = add(name, help, [&dest, name, check](const std::string& v) {
      if (v.empty()) usage_error(fmt::format("{}: empty value", name));
      if (check) check(v);
      dest = v;
    });
    o->type_name(type);
    return o;
  }
  // A switch: sets `dest` to `value` when given.
  CLI::Option* flag(const std::string& name, bool& dest, const std::string& help,
                    bool value = true) {
    auto* o = app_.add_flag_callback(
        name, [&dest, value] { dest = value; }, help);
    o->group(group_);
    names_.insert(name);
    return o;
  }
  // An option taking two values (--export FORMAT PATH).
  CLI::Option* pair(const std::string& name,
                    std::function<void(const std::string&, const std::string&)> set,
                    const std::string& help, const std::string& type) {
    auto* o = app_.add_option(
        name,
        [this, name, set](const CLI::results_t& r) {
          check_not_option(name, r.at(0));
          check_not_option(name, r.at(1));
          set(r.at(0), r.at(1));
          return true;
        },
        help);
    o->type_size(2)->expected(1)->type_name(type)->group(group_);
    names_.insert(name);
    return o;
  }
  // The positional argument.
  CLI::Option* positional(const std::string& name, std::string& dest, const std::string& help) {
    auto* o = app_.add_option(name, dest, help);
    o->type_name("");
    return o;
  }
  // Options declared from now on are listed under `group` in the help.
  void group(std::string g) { group_ = std::move(g); }
  bool given(const std::string& name) const { return app_.count(name) > 0; }

  // Parses argv; prints the help and exits 0 for --help; a bad command line throws UsageError.
  void parse(int argc, char** argv) {
    try {
      app_.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
      std::fputs(app_.help().c_str(), stdout);
      std::exit(0);
    } catch (const CLI::ParseError& e) {
      // CLI11 says "--x: At Most 1 required but received 2" for a repeated option.
      const std::string what = e.what();
      const auto at = what.find(": At Most 1 required but received ");
      if (at != std::string::npos)
        usage_error(fmt::format("{} is given {} times; give it once", what.substr(0, at),
                                what.substr(at + 34)));
      usage_error(what);
    }
  }

 private:
  CLI::Option* add(const std::string& name, const std::string& help,
                   std::function<void(const std::string&)> set) {
    auto* o = app_.add_option_function<std::string>(
        name,
        [this, name, set](const std::string& v) {
          check_not_option(name, v);
          set(v);
        },
        help);
    o->group(group_);
    names_.insert(name);
    return o;
  }
  void check_not_option(const std::string& name, const std::string& v) const {
    const std::string key = v.substr(0, v.find('='));
    if (names_.count(key) || key == "--help" || key == "-h")
      usage_error(fmt::format("{} needs a value, got the option {}", name, v));
  }

  CLI::App app_;
  std::string tool_, group_ = "Options";
  std::set<std::string> names_;
};

// OpenBLAS's pthread build starts nproc − 1 worker threads when the library loads, and each
// maps a 128 MiB buffer as it starts; under an address-space limit (ulimit -v) a worker whose
// mmap fails retries forever (blas_memory_alloc), and the process hangs when it exits and joins
// it. cbq never uses those workers (core/blas.hpp runs OpenBLAS on one thread per call), and only
// the environment stops them before the library's constructor runs: so the tool re-executes
// itself once with OPENBLAS_NUM_THREADS=1 (and keeps going as it is if that fails). Not under
// valgrind, whose client would leave the tool (set OPENBLAS_NUM_THREADS=1 there, or to skip
// the re-execution anywhere).
inline void single_threaded_openblas(char** argv) {
  const char* v = std::getenv("OPENBLAS_NUM_THREADS");
  if ((v && std::string(v) == "1") || std::getenv("CBQ_OPENBLAS_REEXEC")) return;
  const char* preload = std::getenv("LD_PRELOAD");
  if (preload && std::string(preload).find("vgpreload") != std::string::npos) return;
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return;
  self[n] = '\0';
  ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
  ::setenv("CBQ_OPENBLAS_REEXEC", "1", 1);
  ::execv(self, argv);
}

// Runs `body` and turns the ways a command-line tool ends into exit statuses: a usage error
// (2, with a pointer to --help), cbq::Error and other exceptions (1, the message), out of
// memory (1, naming what was being done).
inline int run_tool(const std::string& tool, const std::string* phase,
                    const std::function<int()>& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: %s\nRun '%s --help' for the options.\n", tool.c_str(), e.what(),
                 tool.c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: out of memory%s%s\n", tool.c_str(),
                 phase && !phase->empty() ? " while " : "", phase ? phase->c_str() : "");
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    const std::string what = e.what();
    std::string where;
    if (phase && !phase->empty() && what.rfind("out of memory", 0) == 0)
      where = "while " + *phase + ": ";
    std::fprintf(stderr, "%s: %s%s\n", tool.c_str(), where.c_str(), what.c_str());
    return 1;
  }
}

}  // namespace cbq::cli
