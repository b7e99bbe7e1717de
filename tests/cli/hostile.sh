#!/usr/bin/env bash
# Hostile and careless uses of cbq-quantize and cbq-eval, by category (docs/RELIABILITY.md):
# model files, HF folders, GGUF, tokenizers/text, options, output paths, crash safety and
# checkpoints, resource limits. Every case is classified
#   GOOD  refused with a non-zero status and a message matching the case's pattern (the option,
#         file or tensor, and the numbers), before any work, every pre-existing file unchanged;
#         or, for a case that must work, it works (and what it must show is there)
#   WEAK  refused, but late (after loading or evaluating) or with a message missing the names
#   BAD   a crash (signal), a hang (timeout), a destroyed or changed file, or exit 0 where a
#         refusal was due (NaN printed, bad value coerced)
#   SKIP  the machine cannot stage it (no mknod, no mount, ...), with the reason
# and the kill tests inject SIGKILL before every write, fsync, rename, mkdir and unlink of every
# writer (tests/cli/kill_shim.c, LD_PRELOAD) and require the old or the new output, complete.
#
# Usage: hostile.sh [--table] [--quick|--full] BIN_DIR EDIT_TOOL SHIM [DATA_DIR]
#   BIN_DIR    holds cbq-quantize and cbq-eval (of any commit: the table compares two)
#   EDIT_TOOL  tests/cli/cbq_test_edit (built with the tests), SHIM its libcbq_kill_shim.so
#   --table    print one line per case and the category × GOOD/WEAK/BAD counts; exit 0
#   --full     kill at every step of every writer (default: every step but a sample of writes)
#   --quick    the ctest subset (cli_hostile): every category and every writer, but two values
#              of each bad option and at most 6 kill points per writer (its renames among them)
#   --tsv FILE also write "STATUS<TAB>CATEGORY<TAB>CASE<TAB>DETAIL" lines to FILE
# Without --table the exit status is 1 when any case is not GOOD (SKIP aside).
set -u
table=0 full=0 quick=0 tsv=""
while [ $# -gt 0 ]; do
  case "$1" in
    --table) table=1; shift ;;
    --full) full=1; shift ;;
    --quick) quick=1; shift ;;
    --tsv) tsv=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 3 ] || { sed -n '2,23p' "$0"; exit 2; }
BIN=$(cd "$1" && pwd)
EDIT=$(realpath "$2")
SHIM=$(realpath "$3")
DATA=${4:-$(cd "$(dirname "$0")/../../data" && pwd)}
FIXTURES=$(cd "$(dirname "$0")/../fixtures" && pwd)
Q=$BIN/cbq-quantize
E=$BIN/cbq-eval
WORK=$(mktemp -d /tmp/cbq-hostile.XXXXXX)
F=$WORK/f   # inputs every case may read and none may change
S=$WORK/s   # per-case scratch
mkdir -p "$F" "$S"
cleanup() {
  [ -n "${MOUNTED:-}" ] && umount "$MOUNTED" 2>/dev/null
  chmod -R u+w "$WORK" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
# Every case runs under a soft address-space limit, so that a binary without memory checks
# cannot take the machine's memory (cases may lower it further).
DEFAULT_AS_KB=8000000

# ---- fixtures ----
cp "$DATA/models/stories260K.bin" "$F/model.bin"
cp "$DATA/models/tok512.bin" "$F/tok512.bin"
cp "$DATA/models/tokenizer32k.bin" "$F/tok32k.bin"
head -c 20000 "$DATA/text/tinystories_train_excerpt.txt" > "$F/calib.txt"
head -c 6000 "$DATA/text/tinystories_valid_200k.txt" > "$F/eval.txt"
printf 'Once upon a time.' > "$F/short.txt"
: > "$F/empty.txt"
mkdir -p "$F/dir"
mkfifo "$F/fifo"
cp -r "$FIXTURES/tiny-llama" "$F/hf"
M=$F/model.bin T=$F/tok512.bin CAL=$F/calib.txt EV=$F/eval.txt
C=(--tokenizer "$T" --calib "$CAL" --eval "$EV" --samples 2 --epochs 1 --max-steps 2
   --seq-len 32 --threads 1 --quiet)
edit() { "$EDIT" "$@" > /dev/null || { echo "fixture: cbq_test_edit $* failed"; exit 2; }; }
# Damaged copies.
cp "$M" "$F/nan_embed.bin"; edit llama2c-set "$F/nan_embed.bin" model.embed_tokens.weight 5 nan
cp "$M" "$F/inf_norm.bin"; edit llama2c-set "$F/inf_norm.bin" model.norm.weight 3 inf
cp "$M" "$F/nan_q.bin"; edit llama2c-set "$F/nan_q.bin" model.layers.2.self_attn.q_proj.weight 7 nan
head -c 100000 "$M" > "$F/truncated.bin"
: > "$F/empty.bin"
edit llama2c-sparse "$F/huge36.bin" 4096 11008 48 32 32000 2048      # 36.7 GiB, sparse
edit llama2c-sparse "$F/huge1t.bin" 16384 65536 80 128 32000 4096    # ~1.2 TiB, sparse
cp "$T" "$F/tok_nan.bin"; edit tok-set-score "$F/tok_nan.bin" 300 nan
cp -r "$F/hf" "$F/hf_nan_head"
edit safetensors-set "$F/hf_nan_head/model.safetensors" lm_head.weight 11 nan
cp -r "$F/hf" "$F/hf_nan_norm"
edit safetensors-set "$F/hf_nan_norm/model.safetensors" model.norm.weight 0 -inf
cp -r "$F/hf" "$F/hf_badjson"; printf '{"model_type": "llama", ' > "$F/hf_badjson/config.json"
cp -r "$F/hf" "$F/hf_noweights"; rm "$F/hf_noweights/model.safetensors"
edit make-gguf "$M" "$T" "$F/q41.gguf"
cp "$F/q41.gguf" "$F/q41_nan_scale.gguf"
edit gguf-set-scale "$F/q41_nan_scale.gguf" blk.1.attn_q.weight 3 nan
cp "$F/q41.gguf" "$F/q41_inf_embd.gguf"
edit gguf-set-f32 "$F/q41_inf_embd.gguf" token_embd.weight 70 inf
cp "$F/q41.gguf" "$F/q41_nan_score.gguf"; edit gguf-set-score "$F/q41_nan_score.gguf" 300 nan
head -c 5000 "$F/q41.gguf" > "$F/q41_truncated.gguf"
printf 'some notes\n' > "$F/notes.txt"
ln -s "$M" "$F/link_to_model"
ln "$M" "$F/hardlink_to_model" 2>/dev/null || cp "$M" "$F/hardlink_to_model"
mkdir -p "$F/foreign"; printf 'x' > "$F/foreign/mine.txt"

# A pristine copy, put back after a case changed files, so that one destroyed input does not
# spoil the cases after it (the sparse giants are never written to and stay where they are).
(cd "$F" && tar -cf "$WORK/pristine.tar" --exclude='huge*.bin' .)
restore() {
  find "$F" -mindepth 1 -maxdepth 1 ! -name 'huge*.bin' -exec rm -rf {} +
  (cd "$F" && tar -xf "$WORK/pristine.tar")
}

# ---- the runner ----
results=()   # "STATUS<TAB>CATEGORY<TAB>NAME<TAB>REASON"
snapshot() {  # every path under $F and $S: type, size, mtime; the content hash below 64 MiB
  (cd "$WORK" && find f s \( -type f -printf '%p f %s %T@\n' \) -o -printf '%p %y\n' | LC_ALL=C sort
   find f s -type f -size -65536k -exec sha256sum {} + 2>/dev/null | LC_ALL=C sort -k2) 2>/dev/null
}
# The "before" snapshot of a case is the previous case's "after" when nothing changed in between:
# a listing with inode and ctime (which every write, rename or chmod updates) decides that.
snapshot_key() { (cd "$WORK" && find f s -printf '%p %i %s %T@ %C@\n' | LC_ALL=C sort) 2>/dev/null; }
last_key="" last_snapshot=""
record() {  # STATUS CATEGORY NAME REASON (one line: the TSV has one case a line)
  local reason=${4//$'\n'/ }; reason=${reason//$'\t'/ }
  results+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$reason")
  [ "$table" = 1 ] || [ "$1" != GOOD ] && printf '%-4s %-12s %-44s %s\n' "$1" "$2" "$3" "$reason"
}
# Output that means the expensive work began (loading the weights, evaluating, quantizing).
STARTED='^(LLaMA|OPT) model|FP perplexity|^calibration:|\(loaded in|^CBQ:|^perplexity \('

# run_case CATEGORY NAME KIND PATTERN TIMEOUT COMMAND
#   KIND refuse: must exit non-zero (no signal) with PATTERN (extended regex, case-insensitive)
#                in its output, before any work, changing nothing.
#   KIND ok:     must exit 0 with PATTERN in its output, no NaN, changing only $S/out*.
run_case() {
  local cat=$1 name=$2 kind=$3 pattern=$4 limit=$5 cmd=$6
  rm -rf "$S"; mkdir -p "$S"
  [ -n "${SETUP:-}" ] && eval "$SETUP"
  local before after log=$WORK/log rc
  local key; key=$(snapshot_key)
  if [ "$key" = "$last_key" ]; then before=$last_snapshot; else before=$(snapshot); fi
  ( ulimit -S -v $DEFAULT_AS_KB; cd "$S" && timeout -k 5 "$limit" bash -c "$cmd" ) > "$log" 2>&1
  rc=$?
  after=$(snapshot)
  last_key=$(snapshot_key) last_snapshot=$after
  local changed
  if [ "$kind" = ok ]; then
    changed=$(diff <(echo "$before") <(echo "$after") | grep '^[<>]' | grep -v ' s/out' | head -3)
  else
    changed=$(diff <(echo "$before") <(echo "$after") | grep '^[<>]' | head -3)
  fi
  local msg
  msg=$(grep -v "^Run '" "$log" | grep -iE "error|refus|cbq-quantize:|cbq-eval:|$pattern" | head -2 | tr '\n' ' ' | cut -c1-160)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record BAD "$cat" "$name" "hang: killed after ${limit}s"
  elif [ $rc -gt 128 ]; then
    record BAD "$cat" "$name" "crash: signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null))"
  elif [ -n "$changed" ]; then
    record BAD "$cat" "$name" "changed files: $(echo "$changed" | tr '\n' ' ' | cut -c1-120)"
  elif [ "$kind" = refuse ] && [ $rc -eq 0 ]; then
    local nan=""
    grep -qiE '(^|[^a-z])-?nan([^a-z]|$)|[^a-z]inf([^a-z]|$)' "$log" && nan=" (printed NaN/Inf)"
    record BAD "$cat" "$name" "accepted: exit 0$nan"
  elif [ "$kind" = refuse ]; then
    if ! grep -qiE -- "$pattern" "$log"; then
      record WEAK "$cat" "$name" "exit $rc, message lacks /$pattern/: $msg"
    elif grep -qE "$STARTED" "$log"; then
      record WEAK "$cat" "$name" "exit $rc, but only after loading/evaluating: $msg"
    else
      record GOOD "$cat" "$name" "exit $rc: $msg"
    fi
  else  # ok
    if [ $rc -ne 0 ]; then
      record BAD "$cat" "$name" "failed: exit $rc: $msg"
    elif grep -qiE '(^|[^a-z])-?nan([^a-z]|$)' "$log"; then
      record BAD "$cat" "$name" "printed NaN"
    elif ! grep -qiE -- "$pattern" "$log"; then
      record BAD "$cat" "$name" "output lacks /$pattern/"
    else
      record GOOD "$cat" "$name" "works"
    fi
  fi
  [ -n "$changed" ] && restore
  SETUP=""
}
skip() { record SKIP "$1" "$2" "$3"; }
q() { printf '%q ' "$Q" "$@"; }      # a quoted cbq-quantize command line
ev() { printf '%q ' "$E" "$@"; }
# qm MODEL [ARGS...]: cbq-quantize MODEL with the small budget of $C, where ARGS replace the
# value of an option $C already has (an option given twice is itself refused).
declare -A BASE=([--tokenizer]=$T [--calib]=$CAL [--eval]=$EV [--samples]=2 [--epochs]=1
                 [--max-steps]=2 [--seq-len]=32 [--threads]=1)
qm() {
  local model=$1; shift
  local -A o=(); local k
  for k in "${!BASE[@]}"; do o[$k]=${BASE[$k]}; done
  local extra=()
  while [ $# -gt 0 ]; do
    if [ -n "${o[$1]+x}" ] && [ $# -ge 2 ]; then o[$1]=$2; shift 2; else extra+=("$1"); shift; fi
  done
  local args=()
  for k in --tokenizer --calib --eval --samples --epochs --max-steps --seq-len --threads; do
    args+=("$k" "${o[$k]}")
  done
  # --no-kl-eval: the KL statistics cost an evaluation per method; cli_kl_statistics checks them
  q "$model" "${args[@]}" --quiet --no-kl-eval "${extra[@]}"
}

# ---- model files ----
run_case model truncated-llama2c refuse 'truncated\.bin.*(size|truncated).*bytes' 60 "$(qm "$F/truncated.bin")"
run_case model empty-model refuse 'empty\.bin.*empty|empty\.bin.*truncated' 60 "$(qm "$F/empty.bin")"
run_case model nan-embedding refuse 'embed_tokens.*(nan|non-finite)' 60 "$(qm "$F/nan_embed.bin")"
run_case model inf-final-norm refuse 'model\.norm\.weight.*(inf|non-finite)' 60 "$(qm "$F/inf_norm.bin")"
run_case model nan-block-linear refuse 'q_proj.*(nan|non-finite)' 60 "$(qm "$F/nan_q.bin")"
run_case model eval-nan-model refuse 'embed_tokens.*(nan|non-finite)' 60 "$(ev "$F/nan_embed.bin" --tokenizer "$T" --text "$EV")"
run_case model model-is-fifo refuse 'fifo.*(FIFO|regular)' 20 "$(qm "$F/fifo")"
run_case model model-is-folder refuse 'config\.json' 60 "$(qm "$F/dir")"
run_case model wrong-tokenizer refuse 'tok32k.*(vocab|token)' 60 "$(qm "$M" --tokenizer "$F/tok32k.bin")"
run_case model huge-header-ulimit refuse '(address|memory).*huge36.*[0-9.]+ GiB' 60 "ulimit -S -v 2000000; $(qm "$F/huge36.bin")"
run_case model huge-header-memory refuse 'memory.*huge1t.*[0-9.]+ (GiB|TiB)' 60 "$(qm "$F/huge1t.bin")"

# ---- Hugging Face folders ----
run_case hf nan-lm-head refuse 'lm_head.*(nan|non-finite)' 60 "$(qm "$F/hf_nan_head" --tokenizer "$F/hf/tokenizer.json")"
run_case hf inf-norm refuse 'model\.norm.*(inf|non-finite)' 60 "$(ev "$F/hf_nan_norm" --text "$EV" --ctx 64)"
run_case hf broken-config refuse 'config\.json' 60 "$(qm "$F/hf_badjson" --tokenizer "$F/hf/tokenizer.json")"
run_case hf no-weights refuse 'model\.safetensors' 60 "$(qm "$F/hf_noweights" --tokenizer "$F/hf/tokenizer.json")"
run_case hf export-onto-source refuse 'hf.*(input|source)' 120 "$(qm "$F/hf" --tokenizer "$F/hf/tokenizer.json" --method rtn --seq-len 16 --ctx 64 --export gptq "$F/hf")"
run_case hf export-onto-parent refuse '(input|source)' 120 "$(qm "$F/hf" --tokenizer "$F/hf/tokenizer.json" --method rtn --seq-len 16 --ctx 64 --export gptq "$F")"

# ---- GGUF ----
run_case gguf nan-q41-scale refuse 'attn_q.*(nan|non-finite).*block' 60 "$(qm "$F/q41_nan_scale.gguf")"
run_case gguf inf-embedding refuse 'token_embd.*(inf|non-finite)' 60 "$(ev "$F/q41_inf_embd.gguf" --text "$EV")"
run_case gguf nan-tokenizer-score refuse 'scores.*(nan|finite)' 60 "$(ev "$F/q41_nan_score.gguf" --text "$EV")"
run_case gguf truncated refuse 'q41_truncated.*(truncated|bytes)' 60 "$(qm "$F/q41_truncated.gguf")"
run_case gguf export-onto-input refuse 'q41\.gguf.*input' 60 "$(qm "$F/q41.gguf" --method rtn --export gguf "$F/q41.gguf")"

# ---- tokenizers and texts ----
run_case text nan-llama2c-score refuse 'tok_nan.*(score|nan)' 60 "$(qm "$M" --tokenizer "$F/tok_nan.bin")"
run_case text calib-fifo refuse 'calib.*fifo.*(FIFO|regular)' 20 "$(qm "$M" --calib "$F/fifo")"
run_case text eval-folder refuse 'eval.*dir.*folder' 20 "$(qm "$M" --eval "$F/dir")"
run_case text calib-empty refuse 'calib.*empty' 20 "$(qm "$M" --calib "$F/empty.txt")"
run_case text calib-missing refuse 'calib.*(not exist|no such)' 20 "$(qm "$M" --calib "$F/missing.txt")"
run_case text eval-text-fifo refuse 'text.*fifo.*(FIFO|regular)' 20 "$(ev "$M" --tokenizer "$T" --text "$F/fifo")"
run_case text eval-text-folder refuse 'text.*dir.*folder' 20 "$(ev "$M" --tokenizer "$T" --text "$F/dir")"
run_case text eval-text-empty refuse 'text.*empty' 20 "$(ev "$M" --tokenizer "$T" --text "$F/empty.txt")"
run_case text eval-text-short refuse 'short\.txt.*[0-9]+ tokens.*window of 512' 60 "$(ev "$M" --tokenizer "$T" --text "$F/short.txt")"
run_case text tokenizer-missing refuse 'nope\.bin.*(not exist|no such)' 20 "$(qm "$M" --tokenizer "$F/nope.bin")"

# ---- options ----
# values VALUE...: every value, or with --quick the first and the last (the suite's CI subset).
values() {
  if [ "$quick" = 1 ] && [ $# -gt 2 ]; then printf '%s\n' "$1" "${!#}"; else printf '%s\n' "$@"; fi
}
re_escape() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|/]/\\&/g'; }
bad_option() {  # NAME VALUE PATTERN [tool]: the message must match PATTERN, then the value
  local tool=${4:-q}
  set -- "$1" "$2" "$3.*$(re_escape "$2")" "$tool"
  if [ "$tool" = q ] && [ "$1" = --method ]; then
    run_case options "$1 $2" refuse "$3" 60 "$(qm "$M" "$1" "$2")"
  elif [ "$tool" = q ]; then
    run_case options "$1 $2" refuse "$3" 60 "$(qm "$M" --method rtn "$1" "$2")"
  else
    run_case options "eval $1 $2" refuse "$3" 60 "$(ev "$M" --tokenizer "$T" --text "$EV" "$1" "$2")"
  fi
}
for v in $(values 0 -1 nan inf 1.5); do bad_option --seq-len "$v" '--seq-len'; done
for v in $(values 0 nan inf 99999); do bad_option --ctx "$v" '--ctx'; done
for v in $(values inf 1e30 -1 18446744073709551616); do bad_option --seed "$v" '--seed'; done
for v in $(values nan inf 0 -1 100000); do bad_option --threads "$v" '--threads'; done
for v in $(values 1 9 12 17 1e9); do bad_option --abits "$v" '--abits'; done
for v in $(values -1 nan); do bad_option --gamma "$v" '--gamma'; bad_option --output-kld "$v" '--output-kld'; done
for v in $(values 1.5 nan 0 -3); do bad_option --samples "$v" '--samples'; done
for v in $(values 4.9 1 9 nan); do bad_option --wbits "$v" '--wbits'; done
for v in $(values 0 nan 2); do bad_option --gptq-damp "$v" '--gptq-damp'; done
for v in $(values -1 nan); do bad_option --group "$v" '--group'; bad_option --lr-step "$v" '--lr-step'; done
for v in $(values rtn,rtn cbq,cbq gptq,gptq cbq,rtn,cbq foo); do bad_option --method "$v" "--method.*(twice|unknown)"; done
bad_option --window 0 '--window'
bad_option --preset foo '--preset.*unknown'
for v in $(values r3 r1,r1 foo r1,,r2); do bad_option --rotate "$v" "--rotate.*(twice|unknown|r3|no rotation)"; done
bad_option --epochs 0 '--epochs'
bad_option --max-steps -1 '--max-steps'
run_case options "--window 9 (5 blocks)" refuse '--window.*5 blocks' 60 "$(qm "$M" --window 9)"
run_case options "--method acbq --max-group 11 (10 units)" refuse '--max-group 11.*10 sub-block' 60 "$(qm "$M" --method acbq --max-group 11)"
run_case options "--units sub-block --window 11" refuse '--window 11.*10 sub-block units' 60 "$(qm "$M" --units sub-block --window 11)"
bad_option --dependency foo '--dependency'
for v in $(values 0 1.5 nan); do bad_option --half-block-steps "$v" '--half-block-steps'; done
for v in $(values -1 nan); do bad_option --min-window "$v" '--min-window'; bad_option --boundary-loss "$v" '--boundary-loss'; done
bad_option --units foo '--units'
run_case options "--overlap 2 --window 2" refuse '--overlap' 60 "$(qm "$M" --overlap 2)"
run_case options "--rank 999" refuse '--rank.*999' 60 "$(qm "$M" --rank 999)"
run_case options "--rotate r4 (MLP 172)" refuse '--rotate r4.*172.*--rotate-fallback' 60 "$(qm "$M" --method rtn --rotate r4)"
run_case options "--rotate r4 --out" refuse 'r4.*(--out|export)' 60 "$(qm "$M" --method rtn --rotate r1,r4 --rotate-fallback --out "$S/out-r4.safetensors")"
for v in $(values foo down,down r4); do bad_option --fit-online "$v" "--fit-online.*(twice|unknown)"; done
run_case options "--fit-online down without r4" refuse '--fit-online down.*add r4' 60 "$(qm "$M" --method rtn --fit-online down --rotate r1)"
run_case options "--fit-online mlp --out" refuse 'fit-online.*(--out|export)' 60 "$(qm "$M" --method rtn --fit-online mlp --out "$S/out-fit.safetensors")"
run_case options "--act-layers foo" refuse "act.layers.*foo|'foo'" 60 "$(qm "$M" --abits 8 --act-layers foo)"
run_case options "unknown option" refuse 'bogus' 20 "$(qm "$M" --bogus)"
run_case options "missing value" refuse '--out' 20 "$(qm "$M" --out)"
for v in $(values 0 nan 99999); do bad_option --ctx "$v" '--ctx' e; done
bad_option --generate -1 '--generate' e
# Values that must be honoured, not coerced.
run_case options "--gptq-damp reaches gptq" ok 'DIFFER' 240 "$(qm "$M" --method gptq --gptq-damp 0.0001 --out "$S/out-a.safetensors") > /dev/null && $(qm "$M" --method gptq --gptq-damp 0.5 --out "$S/out-b.safetensors") > /dev/null && { cmp -s out-a.safetensors out-b.safetensors && echo SAME || echo DIFFER; }"
# Each method after the first quantizes a freshly loaded model (reusing the moved-from one was
# the SIGSEGV of a repeated method): the rtn model of "cbq,rtn" is the one "rtn" alone saves.
run_case options "--method cbq,rtn: rtn as alone" ok 'SAME' 240 "$(qm "$M" --method cbq,rtn --out "$S/out-a.safetensors") > /dev/null && $(qm "$M" --method rtn --out "$S/out-b.safetensors") > /dev/null && { cmp -s out-a-rtn.safetensors out-b.safetensors && echo SAME || echo DIFFER; }"
run_case options "--seed 2^64-1 is not 0" ok 'DIFFER' 240 "$(qm "$M" --method rtn,gptq --seed 0 --out "$S/out-a.safetensors") > /dev/null && $(qm "$M" --method rtn,gptq --seed 18446744073709551615 --out "$S/out-b.safetensors") > /dev/null && { cmp -s out-a-gptq.safetensors out-b-gptq.safetensors && echo SAME || echo DIFFER; }"

# --preset a4 sets full-matrix rounding and the output KL; an explicit --rounding after it wins.
run_case options "--preset a4" ok '^PRESET 1 1$' 240 "echo PRESET \$($(qm "$M" --preset a4) | grep '^| cbq' | grep -c 'full AdaRound.*output KL x1') \$($(qm "$M" --preset a4 --rounding lora) | grep '^| cbq' | grep -c 'LoRA-Rounding.*output KL x1')"
# The rotated full-precision model is the same function: the same FP perplexity to 4 digits.
run_case options "--rotate r1,r2,r4 keeps FP" ok 'SAME' 240 "a=\$($(qm "$M" --method rtn --no-kl-eval) | grep '^FP perplexity' | cut -d' ' -f3) && b=\$($(qm "$M" --method rtn --no-kl-eval --rotate r1,r2,r4 --rotate-fallback) | grep '^FP perplexity' | cut -d' ' -f3) && { [ -n \"\$a\" ] && [ \"\$a\" = \"\$b\" ] && echo SAME || echo DIFFER \$a \$b; }"
# The same for OPT (LayerNorms folded, R1 keeping the mean direction), on the HF fixture.
OPTQ=$(q "$FIXTURES/tiny-opt" --calib "$CAL" --eval "$EV" --samples 2 --epochs 1 --max-steps 2 --seq-len 32 --ctx 64 --threads 1 --quiet --no-kl-eval --method rtn)
# The fitted transforms keep the function too: the same FP perplexity to 4 digits.
run_case options "--fit-online down,mlp keeps FP" ok 'SAME' 240 "a=\$($(qm "$M" --method rtn --no-kl-eval --rotate r4 --rotate-fallback) | grep '^FP perplexity' | cut -d' ' -f3) && b=\$($(qm "$M" --method rtn --no-kl-eval --rotate r4 --rotate-fallback --fit-online down,mlp) | grep '^FP perplexity' | cut -d' ' -f3) && { [ -n \"\$a\" ] && [ \"\$a\" = \"\$b\" ] && echo SAME || echo DIFFER \$a \$b; }"
run_case options "--rotate r1,r2,r4 keeps FP (OPT)" ok 'SAME' 240 "a=\$($OPTQ | grep '^FP perplexity' | cut -d' ' -f3) && b=\$($OPTQ --rotate r1,r2,r4 --rotate-fallback | grep '^FP perplexity' | cut -d' ' -f3) && { [ -n \"\$a\" ] && [ \"\$a\" = \"\$b\" ] && echo SAME || echo DIFFER \$a \$b; }"

# ---- output paths ----
out_case() {  # NAME PATTERN ARGS...
  local name=$1 pattern=$2; shift 2
  run_case outputs "$name" refuse "$pattern" 120 "$(qm "$M" --method rtn "$@")"
}
out_case "--out MODEL" 'model\.bin.*input' --out "$M"
out_case "--out symlink to MODEL" 'input' --out "$F/link_to_model"
out_case "--out hard link to MODEL" 'input' --out "$F/hardlink_to_model"
out_case "--export gguf MODEL" 'model\.bin.*input' --export gguf "$M"
out_case "--out TOKENIZER" 'tok512.*input' --out "$T"
out_case "--out CALIB" 'calib.*input' --out "$CAL"
out_case "--out FIFO" 'fifo.*(FIFO|regular)' --out "$F/fifo"
out_case "--out FOLDER" 'dir.*(folder|regular)' --out "$F/dir"
out_case "--out in a missing folder" 'nowhere.*(not exist|no such)' --out "$F/nowhere/x.safetensors"
out_case "--out a text file" 'notes\.txt.*--force' --out "$F/notes.txt"
out_case "--export gptq foreign folder" 'foreign.*--force' --export gptq "$F/foreign"
out_case "--out = --export gguf" 'same' --out "$S/x.gguf" --export gguf "$S/x.gguf"
out_case "--wbits 5 --export gptq" '--wbits 5|5-bit' --wbits 5 --export gptq "$S/gptq5"
if mknod "$F/nulldev" c 1 3 2>/dev/null; then
  out_case "--out character device" 'nulldev.*(device|regular)' --out "$F/nulldev"
else
  skip outputs "--out character device" "mknod not permitted"
fi
SETUP='printf victim > "$S/victim"; ln -s "$S/victim" "$S/out.safetensors.tmp"'
run_case outputs "planted OUT.tmp symlink" ok 'saved' 120 "$(qm "$M" --method rtn --out "$S/out.safetensors") && grep -qx victim victim && echo victim-intact || echo VICTIM-OVERWRITTEN"
run_case outputs "--force replaces a text file" ok 'saved' 120 "cp $(printf %q "$F/notes.txt") out.txt && $(qm "$M" --method rtn --force --out "$S/out.txt")"
if [ "$(id -u)" = 0 ] && command -v setpriv > /dev/null; then
  as_user="setpriv --reuid=65534 --regid=65534 --clear-groups"
else
  as_user=""
fi
if [ "$(id -u)" != 0 ] || [ -n "$as_user" ]; then
  SETUP='mkdir -p "$S/ro"; chmod 555 "$S/ro"; chmod 755 "$S"; chmod -R a+rX "$WORK"'
  run_case outputs "--out in a read-only folder" refuse 'ro.*(cannot write|permission)' 60 "$as_user $(qm "$M" --method rtn --out "$S/ro/x.safetensors")"
  SETUP='mkdir -p "$S/ro"; chmod 555 "$S/ro"; chmod 755 "$S"; chmod -R a+rX "$WORK"'
  run_case checkpoints "read-only --resume folder" refuse 'ro.*(cannot write|permission)' 60 "$as_user $(qm "$M" --resume "$S/ro")"
else
  skip outputs "--out in a read-only folder" "running as root without setpriv"
fi

# ---- checkpoints: an edited checkpoint is refused naming the tensor ----
CKOPTS=(--method cbq --samples 2 --epochs 1 --max-steps 2 --seq-len 32 --threads 1 --quiet
        --tokenizer "$T" --calib "$CAL" --eval "$EV")
# The checkpoint after the first window (block 0's layers hardened: codes and steps; block 1's
# still learning: LoRA factors): the run is killed at the write step after its first rename.
mkdir -p "$WORK/ck"
( ulimit -S -v $DEFAULT_AS_KB; CBQ_SHIM_DIR=$WORK/ck CBQ_SHIM_TRACE=$WORK/ck.trace LD_PRELOAD=$SHIM \
  timeout 300 "$Q" "$M" "${CKOPTS[@]}" --checkpoint "$WORK/ck/ref" ) > "$WORK/ck.log" 2>&1
first_rename=$(grep -m1 ' rename .*cbq-checkpoint\.safetensors$' "$WORK/ck.trace" | cut -d' ' -f1)
rm -rf "$WORK/ck/ref"
if [ -n "$first_rename" ]; then
  { ( ulimit -S -v $DEFAULT_AS_KB; CBQ_SHIM_DIR=$WORK/ck CBQ_SHIM_KILL_AT=$((first_rename + 1)) \
    LD_PRELOAD=$SHIM timeout 300 "$Q" "$M" "${CKOPTS[@]}" --checkpoint "$WORK/ck/ref" ) > "$WORK/ck.log" 2>&1; } 2> /dev/null
fi
CKFILE=$WORK/ck/ref/cbq-checkpoint.safetensors
ck_case() {  # NAME TENSOR INDEX VALUE PATTERN [--fix-checksum]
  local name=$1 tensor=$2 index=$3 value=$4 pattern=$5 fix=${6:-}
  if [ ! -f "$CKFILE" ]; then skip checkpoints "$name" "no checkpoint was written"; return; fi
  rm -rf "$F/ck"; cp -r "$WORK/ck/ref" "$F/ck"
  if ! "$EDIT" safetensors-set "$F/ck/cbq-checkpoint.safetensors" "$tensor" "$index" "$value" $fix > /dev/null 2>&1; then
    skip checkpoints "$name" "the checkpoint has no tensor $tensor"; return
  fi
  run_case checkpoints "$name" refuse "$pattern" 300 "$(q "$M" "${CKOPTS[@]}" --resume "$F/ck")"
  rm -rf "$F/ck"
}
ck_case "codes = NaN" layer.layers.0.q_proj.codes 3 nan 'layers\.0\.q_proj\.codes'
ck_case "codes = 2.5 (checksum fixed)" layer.layers.0.q_proj.codes 3 2.5 'layers\.0\.q_proj\.codes.*2\.5' --fix-checksum
ck_case "codes = 99 (checksum fixed)" layer.layers.0.q_proj.codes 3 99 'q_proj.*(code|codes).*99' --fix-checksum
ck_case "q_scale = NaN" layer.layers.0.v_proj.q_scale 0 nan 'layers\.0\.v_proj\.q_scale'
ck_case "q_scale = 0 (checksum fixed)" layer.layers.0.v_proj.q_scale 0 0 'q_scale.*0' --fix-checksum
ck_case "q_scale = -1 (checksum fixed)" layer.layers.0.v_proj.q_scale 0 -1 'q_scale.*-1' --fix-checksum
ck_case "lora_a1 = NaN (checksum fixed)" layer.layers.1.up_proj.lora_a1 0 nan 'layers\.1\.up_proj\.lora_a1.*nan' --fix-checksum
ck_case "activation = 7 (one value)" x_fp.1 100 7 'x_fp\.1.*checksum'
ck_case "activation = NaN (checksum fixed)" x_q.0 5 nan 'x_q\.0.*nan' --fix-checksum

# ---- resource limits ----
# A tool linked with the CUDA backend maps cuBLASLt (about 520 MiB) before main() runs: give it a
# limit the loader fits in but the run (two threads' OpenBLAS buffers, 256 MiB) does not.
as_kb=200000
ldd "$Q" 2> /dev/null | grep -q libcublasLt && as_kb=900000
run_case resources "ulimit -v $((as_kb / 1000)) MB" refuse 'address.space.*ulimit.*[0-9.]+ MiB' 30 "ulimit -S -v $as_kb; $(qm "$M" --threads 2 --method rtn)"
run_case resources "--samples 1e5" refuse 'memory.*[0-9.]+ GiB.*--samples' 120 "$(qm "$M" --samples 100000 --seq-len 512)"
run_case resources "--samples 1e5 (written 1e5)" refuse 'memory.*[0-9.]+ GiB' 120 "$(qm "$M" --samples 1e5 --seq-len 512)"
run_case resources "--out beyond ulimit -f" refuse '(file-size limit|too large).*(--out|safetensors)' 120 "ulimit -S -f 64; $(qm "$M" --method rtn --out "$S/out.safetensors")"
run_case resources "--offload-dir beyond ulimit -f" refuse '(file-size limit|too large|reserve).*(offload|activation)|(offload|activation).*(too large|reserve)' 120 "ulimit -S -f 64; $(qm "$M" --samples 16 --seq-len 128 --offload-dir "$S/off")"
mp=$WORK/tiny-disk
mkdir -p "$mp"
if mount -t tmpfs -o size=200k tmpfs "$mp" 2>/dev/null; then
  MOUNTED=$mp
  run_case resources "--offload-dir on a 200 KB disk" refuse 'disk|space|reserve' 120 "$(qm "$M" --samples 16 --seq-len 128 --offload-dir "$mp/off")"
  run_case resources "--out on a 200 KB disk" refuse 'disk|space|write' 120 "$(qm "$M" --method rtn --out "$mp/out.safetensors")"
  run_case resources "--export gptq on a 200 KB disk" refuse 'disk|space|write' 120 "$(qm "$M" --method rtn --export gptq "$mp/gptq")"
  left=$(ls -A "$mp" | grep -v '^off$' | tr '\n' ' ')
  if [ -n "$left" ]; then record BAD resources "200 KB disk: nothing left" "left behind: $left"
  else record GOOD resources "200 KB disk: nothing left" "no output or temporary left on the full disk"; fi
  umount "$mp"; MOUNTED=""
else
  skip resources "--offload-dir on a 200 KB disk" "cannot mount a tmpfs"
fi

# ---- crash safety: SIGKILL before every write step of every writer ----
KD=$WORK/k   # the folder the shim watches
# quick_points TRACE: with --quick, at most 6 of the traced steps: the first renames (where a
# writer switches from the old output to the new, up to 3), the first and the last step, and
# evenly spaced others.
quick_points() {
  local trace=$1 events i
  events=$(wc -l < "$trace")
  { awk '$2 == "rename" { print $1 }' "$trace" | head -3
    for i in 0 5 1 4 2 3; do echo $((1 + i * (events - 1) / 5)); done
  } | awk '!seen[$1]++' | head -6 | sort -n
}
writer_case() {  # NAME OUTPUT KIND(file|folder) ARGS... (the output option and its path last)
  local name=$1 out=$2 kind=$3; shift 3
  rm -rf "$KD" "$WORK/old" "$WORK/new"; mkdir -p "$KD"
  local run=( "$Q" "$M" "${C[@]}" --method rtn "$@" )
  # The old output (seed 1) and the new one (seed 0): a kill must leave one of them, complete.
  ( ulimit -S -v $DEFAULT_AS_KB; "${run[@]}" --seed 1 ) > "$WORK/klog" 2>&1 || { record BAD crash "$name" "the reference run failed: $(tail -1 "$WORK/klog")"; return; }
  mv "$out" "$WORK/old"
  ( ulimit -S -v $DEFAULT_AS_KB; CBQ_SHIM_DIR=$KD CBQ_SHIM_TRACE=$WORK/trace LD_PRELOAD=$SHIM "${run[@]}" --seed 0 ) > "$WORK/klog" 2>&1
  mv "$out" "$WORK/new"
  local events
  events=$(wc -l < "$WORK/trace" 2>/dev/null || echo 0)
  local points=() n
  for n in $(seq 1 "$events"); do points+=("$n"); done
  if [ "$quick" = 1 ] && [ "$events" -gt 0 ]; then
    mapfile -t points < <(quick_points "$WORK/trace")
  elif [ "$full" = 0 ] && [ "$events" -gt 40 ]; then  # every 4th step, and the last 12
    points=(); for n in $(seq 1 "$events"); do
      if [ $((n % 4)) = 1 ] || [ "$n" -gt $((events - 12)) ]; then points+=("$n"); fi
    done
  fi
  rm -f "$WORK/trace"
  local torn="" left="" killed=0
  for n in "${points[@]}"; do
    rm -rf "$KD"; mkdir -p "$KD"; cp -r "$WORK/old" "$out"
    { ( ulimit -S -v $DEFAULT_AS_KB; CBQ_SHIM_DIR=$KD CBQ_SHIM_KILL_AT=$n LD_PRELOAD=$SHIM "${run[@]}" --seed 0 ) > "$WORK/klog" 2>&1; } 2> /dev/null
    local rc=$?
    [ $rc -eq 137 ] && killed=$((killed + 1))
    if [ "$kind" = file ]; then
      cmp -s "$out" "$WORK/old" || cmp -s "$out" "$WORK/new" || torn="$torn $n"
    else
      diff -rq "$out" "$WORK/old" > /dev/null 2>&1 || diff -rq "$out" "$WORK/new" > /dev/null 2>&1 || torn="$torn $n"
    fi
    # A later run must clean what the killed one left.
    ( ulimit -S -v $DEFAULT_AS_KB; "${run[@]}" --seed 0 ) > "$WORK/klog" 2>&1
    local extra
    extra=$(ls -A "$KD" | grep -v "^$(basename "$out")\$")
    [ -z "$extra" ] || left="$left $n:$extra"
  done
  if [ -n "$torn" ]; then
    record BAD crash "$name" "killed at step(s)${torn} of $events: neither the old nor the new output"
  elif [ -n "$left" ]; then
    record WEAK crash "$name" "leftovers after a later run:$(echo "$left" | cut -c1-100)"
  elif [ "$killed" = 0 ]; then
    record SKIP crash "$name" "no write step was seen under $KD"
  elif [ "$killed" != "${#points[@]}" ]; then
    record WEAK crash "$name" "only $killed of the ${#points[@]} kill points were reached (of $events steps traced)"
  else
    record GOOD crash "$name" "$killed of $events steps killed, old or new output each time"
  fi
}
writer_case "kill during --out" "$KD/out.safetensors" file --out "$KD/out.safetensors"
writer_case "kill during --export gguf" "$KD/out.gguf" file --export gguf "$KD/out.gguf"
writer_case "kill during --export gptq" "$KD/out-gptq" folder --export gptq "$KD/out-gptq"

# Checkpoints: a kill at any step leaves a checkpoint a resumed run continues from to the
# same result as an uninterrupted run.
ck_kill_case() {
  local run=( "$Q" "$M" "${CKOPTS[@]}" --resume "$KD/ck" --out "$WORK/resumed.safetensors" )
  rm -rf "$KD"; mkdir -p "$KD"
  ( ulimit -S -v $DEFAULT_AS_KB; "$Q" "$M" "${CKOPTS[@]}" --out "$WORK/reference.safetensors" ) > "$WORK/klog" 2>&1 || { record BAD crash "kill during checkpoints" "the reference run failed"; return; }
  ( ulimit -S -v $DEFAULT_AS_KB; CBQ_SHIM_DIR=$KD CBQ_SHIM_TRACE=$WORK/trace LD_PRELOAD=$SHIM "${run[@]}" ) > "$WORK/klog" 2>&1
  local events; events=$(wc -l < "$WORK/trace" 2>/dev/null || echo 0)
  local points=() n bad="" killed=0
  for n in $(seq 1 "$events"); do
    if [ "$full" = 1 ] || [ "$events" -le 40 ] || [ $((n % 5)) = 1 ] || [ "$n" -gt $((events - 6)) ]; then points+=("$n"); fi
  done
  [ "$quick" = 1 ] && [ "$events" -gt 0 ] && mapfile -t points < <(quick_points "$WORK/trace")
  rm -f "$WORK/trace"
  for n in "${points[@]}"; do
    rm -rf "$KD" "$WORK/resumed.safetensors"; mkdir -p "$KD"
    { ( ulimit -S -v $DEFAULT_AS_KB; CBQ_SHIM_DIR=$KD CBQ_SHIM_KILL_AT=$n LD_PRELOAD=$SHIM "${run[@]}" ) > "$WORK/klog" 2>&1; } 2> /dev/null
    [ $? -eq 137 ] && killed=$((killed + 1))
    ( ulimit -S -v $DEFAULT_AS_KB; "${run[@]}" ) > "$WORK/klog" 2>&1 || { bad="$bad $n(resume failed: $(grep -m1 -iE 'error|cbq' "$WORK/klog" | cut -c1-80))"; continue; }
    cmp -s "$WORK/resumed.safetensors" "$WORK/reference.safetensors" || bad="$bad $n(different result)"
  done
  if [ -n "$bad" ]; then
    record BAD crash "kill during checkpoints" "killed at step(s)$(echo "$bad" | cut -c1-140)"
  elif [ "$events" = 0 ]; then
    record SKIP crash "kill during checkpoints" "no write step was seen"
  elif [ "$killed" != "${#points[@]}" ]; then
    record WEAK crash "kill during checkpoints" "only $killed of the ${#points[@]} kill points were reached (of $events steps traced)"
  else
    record GOOD crash "kill during checkpoints" "$killed of $events steps killed; each resumed to the uninterrupted result"
  fi
}
ck_kill_case

# ---- summary ----
summary() {
  printf '\n| category | GOOD | WEAK | BAD | SKIP |\n|---|---:|---:|---:|---:|\n'
  local cat
  for cat in model hf gguf text options outputs checkpoints crash resources; do
    local g=0 w=0 b=0 s=0 line
    for line in "${results[@]}"; do
      IFS=$'\t' read -r st c _ _ <<< "$line"
      [ "$c" = "$cat" ] || continue
      case "$st" in GOOD) g=$((g+1));; WEAK) w=$((w+1));; BAD) b=$((b+1));; SKIP) s=$((s+1));; esac
    done
    printf '| %s | %d | %d | %d | %d |\n' "$cat" $g $w $b $s
  done
}
summary
[ -n "$tsv" ] && printf '%s\n' "${results[@]}" > "$tsv"
failed=0
for line in "${results[@]}"; do
  case "$line" in WEAK*|BAD*) failed=$((failed + 1));; esac
done
echo "${#results[@]} cases, $failed not GOOD"
[ "$table" = 1 ] && exit 0
[ "$failed" = 0 ]
