#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdlib>

#include "support/child_process.hpp"

int main(int argc, char** argv) {
  // A test re-running this binary as a child process (support/child_process.hpp).
  if (const char* child = std::getenv("CBQ_TEST_CHILD")) return cbq::testing::run_child(child);
  doctest::Context context(argc, argv);
  return context.run();
}
