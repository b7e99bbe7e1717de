#!/usr/bin/env bash
# Installs the Debian packages cbq needs on a fresh machine (idempotent). The CUDA toolkit is
# expected at /usr/local/cuda (optional: without it the CUDA backend is simply not built).
set -euo pipefail
packages=(build-essential cmake pkg-config doctest-dev libfmt-dev libopenblas-dev nlohmann-json3-dev
          libcli11-dev libbenchmark-dev clang-format)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  echo "note: add /usr/local/cuda/bin to PATH to build the CUDA backend"
fi
