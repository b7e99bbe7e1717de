#!/usr/bin/env python3
"""Checks GPTQ checkpoints written by cbq (include/cbq/export/gptq.hpp) with the reference
loaders' own unpacking logic, and, when torch + transformers are importable, with transformers'
model code.

For every folder given (each written by tests/test_io_gptq.cpp with CBQ_GPTQ_EXPORT_DIR set, so it
holds a cbq_reference.safetensors: the weights cbq computes with, a token sequence and cbq's
logits for it):
  1. every quantized module's qweight / qzeros / scales / g_idx is dequantized with the logic of
     AutoGPTQ's QuantLinear (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, torch path of
     forward(): shifts by `wf`, the 3-bit word-straddling fix-ups, `zeros + 1` for the v1
     "gptq" format) and GPTQModel's BaseQuantLinear.dequantize_weight
     (gptqmodel/nn_modules/qlinear/__init__.py: no +1 for "gptq_v2",
     W = scales[g_idx] * (weight - zeros[g_idx])), transcribed to numpy below, and must equal
     cbq's weights bit for bit;
  2. transformers builds the model from our config.json (AutoConfig / AutoModelForCausalLM), the
     dequantized weights and the stored dense tensors are loaded under their names (nothing may
     be missing or unexpected), and its logits must match cbq's.

Usage:
  CBQ_GPTQ_EXPORT_DIR=/tmp/gptq-exports build/tests/cbq_tests -tc='gptq format: export*,*stories260K*'
  .venv-ref/bin/python tests/reference/check_gptq.py /tmp/gptq-exports/*
Only numpy is required for step 1; step 2 is skipped (and said so) without torch/transformers.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        if e["dtype"] == "BF16":
            raw = np.frombuffer(data[base + begin : base + end], dtype=np.uint16)
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(data[base + begin : base + end], dtype=DTYPES[e["dtype"]])
        out[name] = arr.reshape(e["shape"])
    return out


# --- transcribed reference unpacking (torch ops → numpy; int64 holds the uint32 words so that
# --- shifts are logical; every result is masked, so this equals torch's int32 arithmetic) -------

WF_3BIT = np.array(
    [
        [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
        [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
        [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0],
    ],
    dtype=np.int64,
).reshape(1, 3, 12)


def pad_words(words: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    # The reference loaders only accept widths with in·bits (qweight) and out·bits (qzeros)
    # multiples of 32 (3 bits: of 96); cbq writes other widths as the same bit stream cut at
    # ceil(width·bits/32) words. Zero words complete the last block; the extra codes are dropped.
    missing = (-words.shape[axis]) % multiple
    if missing == 0:
        return words
    pad = [(0, 0)] * words.ndim
    pad[axis] = (0, missing)
    return np.pad(words, pad)


def unpack_qweight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """(words, out) int32 → (codes, out), the rows of AutoGPTQ's unpacked `weight`."""
    q = qweight.astype(np.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        wf = np.arange(0, 32, bits, dtype=np.int64).reshape(1, -1)  # self.wf
        # torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
        weight = (q[:, None, :] >> wf[:, :, None]) & ((1 << bits) - 1)
        return weight.reshape(-1, q.shape[1])
    q = pad_words(q, 0, 3)
    weight = np.broadcast_to(q.reshape(q.shape[0] // 3, 3, 1, q.shape[1]), (q.shape[0] // 3, 3, 12, q.shape[1]))
    weight = (weight >> WF_3BIT[..., None]) & 0x7
    weight = weight.copy()
    weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
    weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
    weight = weight & 0x7
    weight = np.concatenate([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], axis=1)
    return weight.reshape(-1, q.shape[1])


def unpack_qzeros(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """(groups, words) int32 → (groups, zeros) as stored (before any +1)."""
    z = qzeros.astype(np.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        wf = np.arange(0, 32, bits, dtype=np.int64).reshape(1, -1)
        # torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
        zeros = (z[:, :, None] >> wf[None, :, :]) & ((1 << bits) - 1)
        return zeros.reshape(z.shape[0], -1)
    z = pad_words(z, 1, 3)
    zeros = np.broadcast_to(z.reshape(z.shape[0], z.shape[1] // 3, 3, 1), (z.shape[0], z.shape[1] // 3, 3, 12))
    zeros = (zeros >> WF_3BIT[None]).copy()
    zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
    zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
    zeros = zeros & 0x7
    zeros = np.concatenate([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], axis=2)
    return zeros.reshape(z.shape[0], -1)


def dequantize(t: dict[str, np.ndarray], module: str, bits: int, v2: bool) -> np.ndarray:
    scales = t[module + ".scales"].astype(np.float32)  # (groups, out)
    groups, out = scales.shape
    g_idx = t[module + ".g_idx"].astype(np.int64)  # (in,)
    infeatures = g_idx.shape[0]
    weight = unpack_qweight(t[module + ".qweight"], bits)[:infeatures]  # (in, out)
    zeros = unpack_qzeros(t[module + ".qzeros"], bits)[:, :out]  # (groups, out)
    if not v2:
        zeros = zeros + 1  # AutoGPTQ v1: "zeros = zeros + 1" after unpacking
    # GPTQModel: weights = self.scales[self.g_idx.long()] * (weight - zeros[self.g_idx.long()])
    w = scales[g_idx] * (weight - zeros[g_idx]).astype(np.float32)
    return w.T  # (out, in), as nn.Linear stores it


def check_folder(folder: Path) -> bool:
    ok = True
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    bits, v2 = q["bits"], q.get("checkpoint_format", "gptq") == "gptq_v2"
    tensors = read_safetensors(folder / "model.safetensors")
    ref = read_safetensors(folder / "cbq_reference.safetensors")
    modules = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    dequantized = {}
    mismatched = 0
    for m in modules:
        w = dequantize(tensors, m, bits, v2)
        dequantized[m + ".weight"] = w
        want = ref[m + ".weight"]
        if w.shape != want.shape or not np.array_equal(w, want):
            mismatched += 1
            diff = np.max(np.abs(w - want)) if w.shape == want.shape else float("nan")
            print(f"  MISMATCH {m}: shape {w.shape} vs {want.shape}, max |diff| {diff}")
    fmt = q.get("checkpoint_format", "gptq")
    print(
        f"{folder.name}: {len(modules)} modules, {bits}-bit, group_size {q['group_size']}, "
        f"sym={q['sym']}, desc_act={q['desc_act']}, {fmt}: reference unpacking "
        + ("bit-equal to cbq" if mismatched == 0 else f"{mismatched} MISMATCHED")
    )
    ok &= mismatched == 0

    try:
        import torch
        import transformers
    except ImportError:
        print("  transformers check skipped (torch/transformers not importable)")
        return ok
    cfg = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # build the float model; the weights come dequantized
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dequantized.items()}
    for name, arr in tensors.items():
        if name.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
            continue
        state[name] = torch.from_numpy(arr.astype(np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [k for k in missing if k not in allowed and "rotary_emb" not in k]
    if missing or unexpected:
        print(f"  transformers: missing {missing}, unexpected {unexpected}")
        return False
    tokens = torch.from_numpy(ref["tokens"].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(tokens).logits[0].numpy()
    want = ref["logits"]
    err = float(np.max(np.abs(logits - want)) / max(1e-6, float(np.max(np.abs(want)))))
    good = err < 1e-4
    print(
        f"  transformers {transformers.__version__} {cfg.architectures[0]}: logits for "
        f"{tokens.shape[1]} tokens, max |diff| / max |logit| = {err:.2e} "
        + ("(match)" if good else "(MISMATCH)")
    )
    return ok and good


def main() -> int:
    folders = [Path(p) for p in sys.argv[1:]]
    if not folders:
        print(__doc__)
        return 2
    results = [check_folder(f) for f in folders]
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
