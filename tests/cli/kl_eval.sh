#!/usr/bin/env bash
# The KL divergence statistics of the tools on stories260K (data/):
#   cbq-quantize --method rtn,gptq prints them for both methods (the second method's model is
#   loaded after the first one's is gone), finite and above 0;
#   cbq-eval MODEL --kl-base MODEL (a model against itself) prints KL 0 and 100 % same top p.
# Usage: kl_eval.sh PATH/TO/cbq-quantize PATH/TO/cbq-eval DATA_DIR
set -euo pipefail
quantize=$1
eval_tool=$2
data=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c 12000 "$data/text/tinystories_valid_200k.txt" > "$work/eval.txt"

"$quantize" --method rtn,gptq --samples 4 --seq-len 128 --ctx 256 --threads 1 --quiet \
  --eval "$work/eval.txt" > "$work/quantize.log"
for method in rtn gptq; do
  line=$(grep "^$method: KL divergence from FP" "$work/quantize.log") ||
    { echo "no KL line for $method"; cat "$work/quantize.log"; exit 1; }
  echo "$line"
  kl=$(sed -E 's/.*from FP ([^ ]+) .*/\1/' <<< "$line")
  same=$(sed -E 's/.*same top p ([^%]+)%.*/\1/' <<< "$line")
  # awk's comparisons are false for nan, so a NaN fails here too
  awk -v kl="$kl" -v same="$same" 'BEGIN { exit !(kl > 0 && kl < 1 && same > 50 && same < 100) }' ||
    { echo "$method: KL $kl, same top p $same% out of range"; exit 1; }
done

model="$data/models/stories260K.bin"
"$eval_tool" "$model" --tokenizer "$data/models/tok512.bin" --text "$work/eval.txt" --ctx 256 \
  --kl-base "$model" > "$work/eval.log"
grep -A3 "^KL divergence from" "$work/eval.log"
grep -q "Mean KLD 0.000000 ± 0.000000  Maximum 0.000000" "$work/eval.log" ||
  { echo "a model against itself: KL is not 0"; cat "$work/eval.log"; exit 1; }
grep -q "Same top p 100.000 %" "$work/eval.log" ||
  { echo "a model against itself: same top p is not 100 %"; exit 1; }
echo "KL statistics of cbq-quantize and cbq-eval: ok"
