#!/usr/bin/env python3
"""Layer-by-layer comparison of cbq's GPTQ baseline with the reference re-implementation.

  python3 tests/reference/gptq_reference.py --groupsize 32 --true-sequential --seed 0 \
      --dump /tmp/ref.npz
  g++ -O2 -std=c++20 -Iinclude tests/reference/gptq_seeds.cpp -o /tmp/gptq_seeds -lfmt -lopenblas
  mkdir -p /tmp/cbq-dump && /tmp/gptq_seeds --group 32 --sampler gptq --seed 0 --dump /tmp/cbq-dump
  python3 tests/reference/compare_gptq.py /tmp/ref.npz /tmp/cbq-dump

For every layer, in the order GPTQ quantized it: the relative difference of the Hessians (the
reference's H is 2/n_sequences Σ x xᵀ, cbq's 2/n_tokens Σ x xᵀ: they are compared after scaling
both to mean diagonal 1), the number of quantized weights that differ and the largest
difference. cbq's dump holds <layer>.H.npy (float64) and <layer>.Q.npy (the dequantized weight).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ref = np.load(sys.argv[1])
    cbq_dir = Path(sys.argv[2])
    names = sorted({k.rsplit(".", 1)[0] for k in ref.files if k.endswith(".Q")},
                   key=lambda n: (int(n.split(".")[1]), n))
    total = differ = 0
    worst_h = 0.0
    print(f"{'layer':24} {'H rel diff':>11} {'weights':>8} {'differ':>7} {'max |dQ|':>10}")
    for name in names:
        h_ref = ref[name + ".H"].astype(np.float64)
        q_ref = ref[name + ".Q"].astype(np.float64)
        h_cbq = np.load(cbq_dir / f"{name}.H.npy")
        q_cbq = np.load(cbq_dir / f"{name}.Q.npy")
        a = h_ref / np.mean(np.diag(h_ref))
        b = h_cbq / np.mean(np.diag(h_cbq))
        dh = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        worst_h = max(worst_h, dh)
        d = np.abs(q_ref - q_cbq)
        n = int(np.sum(d > 1e-6 * np.max(np.abs(q_cbq))))
        total += q_ref.size
        differ += n
        print(f"{name:24} {dh:11.2e} {q_ref.size:8d} {n:7d} {float(d.max()):10.3g}")
    print(f"all layers: {differ} of {total} quantized weights differ "
          f"({100 * differ / total:.4f} %); largest Hessian difference {worst_h:.2e} (relative)")


if __name__ == "__main__":
    main()
