#!/usr/bin/env python3
"""Projects the CBQ pass's wall time and memory from SmolLM2-135M to larger LLaMA models.

The anchor is a measured pass estimate at SmolLM2 shapes on the machine at hand (cbq-quantize
prints it before the pass: "estimate: CBQ pass about …"; docs/PERFORMANCE.md has the one this
script defaults to). Each of its three parts is scaled by the work it does:

  steps     (forward + backward of a 2-block window, batch 1): linear layers 6·T·P per block,
            attention 7·T²·(heads·head_dim) per block (causal half; bench_window_step's count),
            LoRA 6·P·r per block; times the number of steps (windows × epochs × trained samples)
  forwards  (the window's targets and evaluations): the same per-block forward FLOPs 2·T·P +
            2·T²·H·hd, times samples and blocks
  gptq      (the GPTQ start): Hessians Σ over layers of 2·N·T·in², Cholesky solves in³ per layer

and every part keeps the anchor's FLOP rate: a larger GEMM runs at least as close to the
machine's SGEMM peak, so the projection is an upper estimate on the same machine (and a
lower one where the model does not fit in memory). Memory: the four calibration activation
sets (4·N·T·d floats, the pass's default placement), the model in float32 (or mapped, when
--offload-dir is used, not counted) and a rough size of a window's tape (12·T·d + 6·T·f + T²
floats per block: a lower bound; the pass's own estimate measures it at the real shapes).

usage: scripts/project-pass-cost.py [--anchor-steps S --anchor-forwards S --anchor-gptq S]
                                    [--samples N] [--seq-len T] [--epochs E] [--rank R]
The defaults are the paper's budget (128 × 2048, 3 epochs, window 2/1, LoRA r5) and the anchor
measured on SmolLM2 at that budget (docs/PERFORMANCE.md, issue 17: steps 29 × 345 × 0.615 s,
forwards 77 min, GPTQ start 28 min; 2 threads).
"""
import argparse

MODELS = [
    # name, blocks, d, mlp, heads, kv heads, head dim, vocab
    ("SmolLM2-135M", 30, 576, 1536, 9, 3, 64, 49152),
    ("LLaMA-3.2-1B", 16, 2048, 8192, 32, 8, 64, 128256),
    ("LLaMA-2-7B", 32, 4096, 11008, 32, 32, 128, 32000),
    ("LLaMA-3-8B", 32, 4096, 14336, 32, 8, 128, 128256),
    ("LLaMA-2-13B", 40, 5120, 13824, 40, 40, 128, 32000),
    ("LLaMA-2-70B", 80, 8192, 28672, 64, 8, 128, 32000),
]


def block_shapes(d, f, h, kv, hd):
    q, k = h * hd, kv * hd
    # (in, out) of every linear layer of a LLaMA block
    return [(d, q), (d, k), (d, k), (q, d), (d, f), (d, f), (f, d)]


def parts(model, n, t, epochs, rank, holdout):
    _, blocks, d, f, h, kv, hd, vocab = model
    lin = block_shapes(d, f, h, kv, hd)
    p = sum(i * o for i, o in lin)
    att_width = h * hd
    windows = blocks - 1  # window 2, overlap 1
    trained = n - holdout
    step = 2 * (6 * t * p + 7 * t * t * att_width + 6 * p * rank)  # two blocks per window
    steps = windows * epochs * trained * step
    # targets (FP and homologous) and the evaluations before/after: ~6 window forwards per sample
    fwd_block = 2 * t * p + 2 * t * t * att_width
    forwards = windows * 6 * n * 2 * fwd_block
    gptq = blocks * sum(2 * n * t * i * i + i ** 3 for i, _ in lin)
    params = blocks * (p + 2 * d) + 2 * vocab * d + d
    act_bytes = 4 * n * t * d * 4
    tape_bytes = 2 * (12 * t * d + 6 * t * f + t * t) * 4
    return steps, forwards, gptq, params, act_bytes, tape_bytes


def fmt_time(s):
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def main():
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a.add_argument("--anchor-steps", type=float, default=29 * 345 * 0.615)
    a.add_argument("--anchor-forwards", type=float, default=77 * 60)
    a.add_argument("--anchor-gptq", type=float, default=28 * 60)
    a.add_argument("--samples", type=int, default=128)
    a.add_argument("--seq-len", type=int, default=2048)
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--rank", type=int, default=5)
    args = a.parse_args()
    n, t = args.samples, args.seq_len
    holdout = min(max(4, round(0.1 * n)), n // 2)
    anchor = parts(MODELS[0], n, t, args.epochs, args.rank, holdout)
    rates = [anchor[0] / args.anchor_steps, anchor[1] / args.anchor_forwards,
             anchor[2] / args.anchor_gptq]
    print(f"budget: {n} x {t} tokens, {args.epochs} epochs, window 2/1, LoRA r{args.rank}, "
          f"{holdout} samples held out")
    print(f"anchor rates (SmolLM2): steps {rates[0] / 1e9:.0f} GFLOP/s, forwards "
          f"{rates[1] / 1e9:.0f} GFLOP/s, GPTQ start {rates[2] / 1e9:.0f} GFLOP/s\n")
    print("| model | step TFLOP | steps | forwards | GPTQ start | whole pass | activations | "
          "model (fp32) | window tape |")
    print("|---|---|---|---|---|---|---|---|---|")
    gib = float(1 << 30)
    for m in MODELS:
        steps, fwd, gptq, params, act, tape = parts(m, n, t, args.epochs, args.rank, holdout)
        times = [steps / rates[0], fwd / rates[1], gptq / rates[2]]
        one_step = steps / ((m[1] - 1) * args.epochs * (n - holdout))
        print(f"| {m[0]} | {one_step / 1e12:.2f} | {fmt_time(times[0])} | {fmt_time(times[1])} | "
              f"{fmt_time(times[2])} | **{fmt_time(sum(times))}** | {act / gib:.1f} GiB | "
              f"{params * 4 / gib:.1f} GiB | {tape / gib:.1f} GiB |")


if __name__ == "__main__":
    main()
