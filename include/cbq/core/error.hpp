#pragma once
// cbq::Error and the checking helpers every op uses. Messages name the op, tensor or file and
// the numbers involved, so a user can act on them without a debugger.
#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace cbq {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace cbq

// CBQ_CHECK(cond, "op: {} vs {}", a, b) throws cbq::Error with the formatted message.
#define CBQ_CHECK(cond, ...)    \
  do {                          \
    if (!(cond)) {              \
      ::cbq::fail(__VA_ARGS__); \
    }                           \
  } while (0)
