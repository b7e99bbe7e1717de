#!/usr/bin/env bash
# Differential check of cbq's regex matcher (Oniguruma dialect) against Hugging Face tokenizers'
# Split pre-tokenizer: random strings over an alphabet of the hard cases (contractions in any
# case, ſ, the Kelvin sign, digits of several scripts, superscripts, combining marks, NBSP, NEL,
# ideographic space, zero-width space, CR, emoji, a Unicode 16.0 letter) split by the Llama-3,
# GPT-2 and GPT-4o patterns, the Whitespace pre-tokenizer's \w pattern and one with lazy
# quantifiers and anchors. Prints the mismatches; exits non-zero when there is one.
# usage: tests/reference/check_regex_against_tokenizers.sh [STRINGS]   (default 300; tokenizers 0.23)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
c++ -std=c++20 -O1 -I"$root/include" "$root/tests/reference/tokenizer_tool.cpp" -o "$tmp/tool" \
  -lfmt -lopenblas -lpthread
TOOL=$tmp/tool N=${1:-300} python3 - <<'PY'
import json, os, random, subprocess, sys
from tokenizers import Regex, pre_tokenizers

patterns = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"\w+|[^\w\s]+",
    r"a+?b|.$|^x|\d{2,}?|[^a-c\d]+",
]
alphabet = list("aAbBsSxX'\u2019 \t\n\r019\u0663.,!?-_/") + [
    "\u00e9", "e\u0301", "\u65e5", "\u00df", "\u03a3", "\u017f", "\u212a", "\u00a0", "\u0085",
    "\u3000", "\u200b", "\U0001f999", "\U00010d50", "\u0941", "\u00b2"]
random.seed(1)
bad = total = 0
for _ in range(int(os.environ["N"])):
    s = "".join(random.choice(alphabet) for _ in range(random.randint(0, 24)))
    for p in patterns:
        ref = [t for t, _ in pre_tokenizers.Split(Regex(p), behavior="isolated").pre_tokenize_str(s)]
        got = json.loads(subprocess.run([os.environ["TOOL"], "split", p, s], capture_output=True,
                                        check=True).stdout)
        total += 1
        if ref != got:
            bad += 1
            print("MISMATCH", repr(p[:40]), repr(s), "\n  tokenizers", ref, "\n  cbq       ", got)
print("%d mismatches in %d splits" % (bad, total))
sys.exit(1 if bad else 0)
PY
