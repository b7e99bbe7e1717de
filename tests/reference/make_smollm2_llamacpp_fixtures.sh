#!/usr/bin/env bash
# llama.cpp's greedy continuations and first-chunk perplexities of SmolLM2-135M-Instruct's GGUF,
# for tests/test_tokenizer_smollm2_llamacpp.cpp, written to tests/fixtures/smollm2/llamacpp.json:
#   * llama-simple -m GGUF -n 64 PROMPT (greedy sampler; no BOS: the file says add_bos false;
#     prints the prompt and the 64 generated pieces) for three prompts;
#   * llama-perplexity -m GGUF -f wikitext2_test.txt -c 2048 --chunks N: the running perplexity
#     it prints after each chunk (4 decimals), and its final estimate;
#   * both again on an F32 copy of the GGUF (llama-quantize --allow-requantize GGUF F32: the
#     same dequantized weights cbq computes with), where llama.cpp's matrix products take float
#     activations instead of quantizing them to 8 bits (Q4_1 x Q8_1 dot products).
# usage: tests/reference/make_smollm2_llamacpp_fixtures.sh [CHUNKS]   (default 4; a few minutes)
# env:   CBQ_SMOLLM2_GGUF (else scripts/fetch-models.sh), CBQ_EXTRA_DATA_DIR (../shared/data),
#        THREADS (2)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=$("$root/scripts/llama-cpp.sh")
gguf=${CBQ_SMOLLM2_GGUF:-$("$root/scripts/fetch-models.sh" --quiet | grep SmolLM2 | head -1)}
extra=${CBQ_EXTRA_DATA_DIR:-$root/../shared/data}
"$bin/llama-quantize" --allow-requantize "$gguf" "$tmp/f32.gguf" F32 >/dev/null 2>&1
export F32=$tmp/f32.gguf ROOT=$root BIN=$bin GGUF=$gguf WIKI=$extra/text/wikitext2_test.txt CHUNKS=${1:-4} \
  THREADS=${THREADS:-2}
python3 - <<'PY'
import hashlib, json, os, re, subprocess

root, bin_, gguf, wiki = (os.environ[k] for k in ("ROOT", "BIN", "GGUF", "WIKI"))
chunks, threads = int(os.environ["CHUNKS"]), os.environ["THREADS"]
prompts = [
    "Once upon a time, there was a little robot named",
    "The three most important inventions of the 20th century are",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n"
    "<|im_start|>assistant\n",
]
result = {"llama_cpp": "llama-cpp-python 0.3.16 (scripts/llama-cpp.sh)",
          "command": "tests/reference/make_smollm2_llamacpp_fixtures.sh %d" % chunks,
          "gguf": os.path.basename(gguf),
          "sha256": hashlib.sha256(open(gguf, "rb").read()).hexdigest()}


def greedy(model):
    runs = []
    for p in prompts:
        out = subprocess.run([os.path.join(bin_, "llama-simple"), "-m", model, "-n", "64", p],
                             capture_output=True, check=True).stdout.decode("utf-8")
        assert out.endswith("\n")
        runs.append({"prompt": p, "output": out[:-1]})
        print(repr(out[:-1]))
    return {"n_predict": 64, "tool": "llama-simple -m GGUF -n 64 PROMPT", "runs": runs}


def perplexity(model):
    log = subprocess.run([os.path.join(bin_, "llama-perplexity"), "-m", model, "-f", wiki, "-c",
                          "2048", "--chunks", str(chunks), "-t", threads],
                         capture_output=True, text=True, check=True)
    text = log.stdout + log.stderr
    running = [float(x) for x in re.findall(r"\[\d+\](\d+\.\d+)", text)]
    final = re.search(r"Final estimate: PPL = (\d+\.\d+) \+/- (\d+\.\d+)", text)
    print(running, final.group(0))
    return {"tool": "llama-perplexity -m GGUF -f wikitext2_test.txt -c 2048 --chunks %d -t %s"
                    % (chunks, threads),
            "n_ctx": 2048, "chunks": chunks, "running": running,
            "final": float(final.group(1)), "final_error": float(final.group(2))}


result["greedy"] = greedy(gguf)
result["perplexity"] = perplexity(gguf)
f32 = os.environ["F32"]
result["f32"] = {"made_by": "llama-quantize --allow-requantize GGUF F32", "greedy": greedy(f32),
                 "perplexity": perplexity(f32)}
os.makedirs(os.path.join(root, "tests", "fixtures", "smollm2"), exist_ok=True)
path = os.path.join(root, "tests", "fixtures", "smollm2", "llamacpp.json")
with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, ensure_ascii=False, indent=1)
    f.write("\n")
print("wrote", path)
PY
