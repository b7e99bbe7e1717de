#!/usr/bin/env bash
# cbq-quantize killed with SIGKILL in the middle of a window, then resumed, must write a model
# byte-identical to an uninterrupted run's. Usage: resume_kill.sh PATH/TO/cbq-quantize
set -euo pipefail
tool=$1
work=$(mktemp -d)
trap 'kill -9 "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
# Small budget: 4 windows of 32 samples × 3 epochs on stories260K, 1 thread (determinism).
common=(--method cbq --samples 32 --seq-len 128 --epochs 3 --threads 1 --ctx 256 --no-kl-eval)

"$tool" "${common[@]}" --out "$work/reference.safetensors" > "$work/reference.log"

"$tool" "${common[@]}" --resume "$work/ck" --out "$work/resumed.safetensors" \
  > "$work/killed.log" 2>&1 &
pid=$!
# Wait for the first checkpoint (window 1 done), then kill inside the next window.
for _ in $(seq 1 600); do
  [ -f "$work/ck/cbq-checkpoint.safetensors" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "the run ended before its first checkpoint"; exit 1; }
  sleep 0.1
done
[ -f "$work/ck/cbq-checkpoint.safetensors" ] || { echo "no checkpoint appeared"; exit 1; }
sleep 0.3
kill -9 "$pid"
wait "$pid" 2>/dev/null && { echo "the run finished before it was killed"; exit 1; }
[ ! -e "$work/resumed.safetensors" ] || { echo "a killed run left an output file"; exit 1; }
done_windows=$(head -c 4000000 "$work/ck/cbq-checkpoint.safetensors" | grep -ao '"windows_done":"[0-9]*"' | grep -o '[0-9]\+')
[ "$done_windows" -lt 4 ] || { echo "killed after the last window"; exit 1; }
echo "killed with SIGKILL during window $((done_windows + 1)) of 4 (checkpoint after window $done_windows); resuming"

"$tool" "${common[@]}" --resume "$work/ck" --out "$work/resumed.safetensors" > "$work/resumed.log"
grep -q "resumed from" "$work/resumed.log" || { echo "did not resume"; cat "$work/resumed.log"; exit 1; }
cmp "$work/reference.safetensors" "$work/resumed.safetensors"
echo "resumed output is byte-identical to the uninterrupted run"
