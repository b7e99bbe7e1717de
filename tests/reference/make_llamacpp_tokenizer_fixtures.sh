#!/usr/bin/env bash
# Reference ids from llama.cpp (llama-tokenize of llama-cpp-python 0.3.16, built by
# scripts/llama-cpp.sh) for tests/test_tokenizer_llamacpp.cpp, written to
# tests/fixtures/tokenizers/llamacpp.json:
#   * SmolLM2-135M-Instruct's GGUF (scripts/fetch-models.sh): token count and FNV-1a 64 hash of
#     the ids of wikitext2_test.txt and both TinyStories texts, full ids of the varied texts of
#     tests/fixtures/tokenizers/hf.json and of the first 4 KB of wikitext2_test.txt;
#   * GGUF files written by cbq's io::export_gguf (a tiny random LLaMA carrying the vocabulary)
#     for the SmolLM2 vocabulary and the byte-level tokenizer.json fixtures that have a llama.cpp
#     pre-tokenizer name: llama-tokenize's ids of the varied texts on each.
# It also prints cbq's agreement on all of them (cbq's ids come from tests/reference/
# tokenizer_tool.cpp, compiled here).
# usage: tests/reference/make_llamacpp_tokenizer_fixtures.sh   (about a minute)
# env:   CBQ_SMOLLM2_GGUF (else scripts/fetch-models.sh), CBQ_EXTRA_DATA_DIR (../shared/data)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$("$root/scripts/llama-cpp.sh")
gguf=${CBQ_SMOLLM2_GGUF:-$("$root/scripts/fetch-models.sh" --quiet | grep SmolLM2 | head -1)}
extra=${CBQ_EXTRA_DATA_DIR:-$root/../shared/data}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
c++ -std=c++20 -O2 -I"$root/include" "$root/tests/reference/tokenizer_tool.cpp" -o "$tmp/tool" \
  -lfmt -lopenblas -lpthread
export ROOT=$root BIN=$bin GGUF=$gguf EXTRA=$extra TMP=$tmp
python3 - <<'PY'
import hashlib, json, os, struct, subprocess, sys

root, bin_, gguf, extra, tmp = (os.environ[k] for k in ("ROOT", "BIN", "GGUF", "EXTRA", "TMP"))
fix = os.path.join(root, "tests", "fixtures", "tokenizers")
tool = os.path.join(tmp, "tool")


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for b in struct.pack("<%di" % len(ids), *ids):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def llama_ids(model, path):
    out = subprocess.run([os.path.join(bin_, "llama-tokenize"), "-m", model, "-f", path, "--ids",
                          "--log-disable"], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cbq_ids(tokenizer, path):
    out = subprocess.run([tool, "ids", tokenizer, path], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def text_file(name, text):
    p = os.path.join(tmp, name)
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return p


texts = json.load(open(os.path.join(fix, "hf.json"), encoding="utf-8"))["texts"]
wiki = os.path.join(extra, "text", "wikitext2_test.txt")
with open(wiki, encoding="utf-8") as f:
    head = f.read(4096)
head = head[:head.rfind("\n") + 1]
samples = texts + [head]
sample_files = [text_file("sample%d.txt" % i, t) for i, t in enumerate(samples)]
ok = True


def varied(model, tokenizer, what):
    global ok
    ref = [llama_ids(model, p) for p in sample_files]
    got = [cbq_ids(tokenizer, p) for p in sample_files]
    same = sum(a == b for a, b in zip(ref, got))
    print("%-34s cbq == llama-tokenize on %d / %d varied texts" % (what, same, len(ref)))
    ok = ok and same == len(ref)
    return ref


result = {"llama_cpp": "llama-cpp-python 0.3.16 (scripts/llama-cpp.sh), llama-tokenize --ids",
          "command": "tests/reference/make_llamacpp_tokenizer_fixtures.sh",
          "texts": "hf.json texts, then the first 4 KB of wikitext2_test.txt (cut at a line end)",
          "smollm2": {"gguf": os.path.basename(gguf),
                      "sha256": hashlib.sha256(open(gguf, "rb").read()).hexdigest(),
                      "files": {}},
          "exported": {}}
for name, path in [("wikitext2_test.txt", wiki),
                   ("tinystories_train_excerpt.txt",
                    os.path.join(root, "data", "text", "tinystories_train_excerpt.txt")),
                   ("tinystories_valid_200k.txt",
                    os.path.join(root, "data", "text", "tinystories_valid_200k.txt"))]:
    ref = llama_ids(gguf, path)
    got = cbq_ids(gguf, path)
    print("%-34s %d tokens, cbq %s" % (name, len(ref), "identical" if ref == got else "DIFFERENT"))
    ok = ok and ref == got
    result["smollm2"]["files"][name] = {"bytes": os.path.getsize(path), "tokens": len(ref),
                                        "fnv1a64": fnv1a64(ref)}
result["smollm2"]["varied_ids"] = varied(gguf, gguf, "SmolLM2 GGUF")

exports = [("smollm2_vocab", gguf)] + [
    (n, os.path.join(fix, "hf", n + ".json"))
    for n in ("gpt2_bytelevel", "smollm_digits_bytelevel", "llama3_split", "qwen2_nfc_split")]
for name, tokenizer in exports:
    out = os.path.join(tmp, name + ".gguf")
    subprocess.run([tool, "export", tokenizer, out], check=True)
    result["exported"][name] = varied(out, out, "cbq export of " + name)

with open(os.path.join(fix, "llamacpp.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
print("wrote", os.path.join(fix, "llamacpp.json"), os.path.getsize(os.path.join(fix, "llamacpp.json")), "bytes")
sys.exit(0 if ok else 1)
PY
