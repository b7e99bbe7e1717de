#pragma once
// Tests that need a separate process (e.g. one killed with SIGKILL) re-run the test binary
// itself: spawn_self(name, arg) starts /proc/self/exe with CBQ_TEST_CHILD=name and
// CBQ_TEST_CHILD_ARG=arg, and tests/main.cpp runs the registered child function instead of
// doctest. Register with
//   CBQ_TEST_CHILD_PROCESS(my_child) { ...; return 0; }   // reads child_arg()
#include <spawn.h>
#include <sys/wait.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace cbq::testing {

inline std::map<std::string, std::function<int()>>& child_registry() {
  static std::map<std::string, std::function<int()>> registry;
  return registry;
}

inline const char* child_arg() {
  const char* a = std::getenv("CBQ_TEST_CHILD_ARG");
  return a ? a : "";
}

// Runs the child function `name` (called from main when CBQ_TEST_CHILD is set).
inline int run_child(const std::string& name) {
  auto it = child_registry().find(name);
  if (it == child_registry().end()) return 125;
  return it->second();
}

// Starts this test binary as child `name` and waits for it; returns the wait status.
inline int spawn_self(const std::string& name, const std::string& arg) {
  std::vector<std::string> env_strings = {"CBQ_TEST_CHILD=" + name, "CBQ_TEST_CHILD_ARG=" + arg};
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    if (kv.rfind("CBQ_TEST_CHILD", 0) != 0) env_strings.push_back(kv);
  }
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string exe = "/proc/self/exe";
  char* argv[] = {exe.data(), nullptr};
  pid_t pid = 0;
  if (posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv, envp.data()) != 0)
    throw std::runtime_error("spawn_self: posix_spawn failed");
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) throw std::runtime_error("spawn_self: waitpid failed");
  return status;
}

struct ChildRegistration {
  ChildRegistration(const char* name, std::function<int()> f) {
    child_registry()[name] = std::move(f);
  }
};

}  // namespace cbq::testing

#define CBQ_TEST_CHILD_PROCESS(name)                                                \
  static int name();                                                                \
  static const ::cbq::testing::ChildRegistration name##_registration(#name, &name); \
  static int name()
