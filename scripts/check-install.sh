#!/usr/bin/env bash
# Installs cbq from an existing build tree into a temporary prefix and builds a consumer project
# against it with find_package(cbq). Usage: scripts/check-install.sh BUILD_DIR
set -euo pipefail
build=${1:-build}
prefix=$(mktemp -d)
consumer=$(mktemp -d)
trap 'rm -rf "$prefix" "$consumer"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
cat > "$consumer/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.24)
project(cbq_consumer LANGUAGES CXX)
find_package(cbq REQUIRED)
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE cbq::cbq)
CM
cat > "$consumer/main.cpp" <<'CPP'
#include <cbq/cbq.hpp>
#include <cstdio>
int main() {
  cbq::Tape<float> tape;
  cbq::Parameter<float> w("w", cbq::Tensor<float>::full(cbq::Shape{2, 3}, 0.5f));
  auto x = tape.constant(cbq::Tensor<float>::full(cbq::Shape{4, 3}, 1.f));
  auto y = cbq::ops::linear(x, tape.param(w));
  y.grad().fill(1.f);
  tape.backward_from_seeded();
  std::printf("installed cbq works: y[0] = %g, dW[0] = %g\n", y.value()[0], w.grad[0]);
  return (y.value()[0] == 1.5f && w.grad[0] == 4.f) ? 0 : 1;
}
CPP
cmake -S "$consumer" -B "$consumer/build" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$consumer/build" >/dev/null
"$consumer/build/consumer"
