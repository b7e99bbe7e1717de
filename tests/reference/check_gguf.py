#!/usr/bin/env python3
"""Checks a GGUF file written by cbq (cbq::io::export_gguf) with llama.cpp's own reader, gguf-py.

    pip install gguf numpy          # llama.cpp's gguf-py from PyPI (0.19.0 was used)
    python tests/reference/check_gguf.py FILE.gguf [--llama2c MODEL.bin] [--same-as REF.gguf]

* reads FILE with gguf.GGUFReader and prints the metadata (key, type, value);
* checks what llama.cpp's "llama" loader needs: the keys and their types, the tensor names and
  shapes (ne innermost first), row lengths that are multiples of the block size, a vocabulary of
  `vocab_size` tokens;
* dequantizes every tensor with gguf.quants.dequantize;
* --llama2c BIN: compares every tensor with the llama2.c checkpoint it came from, parsed here
  independently of cbq (FFN padding must be zeros; F32 must match exactly);
* --same-as REF: compares every tensor with the same-named tensor of REF (e.g. a quantized file
  against an F32 file of cbq's dequantized weights): prints the max |difference| per type and
  fails unless it is 0.
Exit status 0 when every check passed.
"""
import argparse
import struct
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL:", msg)


def field_value(field):
    t = field.types[0]
    if t == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if t == GGUFValueType.ARRAY:
        sub = field.types[1] if len(field.types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    return field.parts[field.data[0]][0].item()


def tensors_of(reader):
    """name -> (type, ne list, dequantized float32 array in row-major shape)."""
    out = {}
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = (t.tensor_type, ne, values.reshape(list(reversed(ne))))
    return out


def read_llama2c(path):
    """llama2.c legacy checkpoint -> (config, {gguf name: float32 array}); q/k kept as stored."""
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack_from("<7i", raw, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    kv = n_kv * (dim // n_heads)
    a = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        v = a[pos : pos + n].reshape(shape)
        pos += n
        return v

    w = {"token_embd.weight": take(vocab, dim)}
    att = take(n_layers, dim)
    wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, kv, dim), take(n_layers, kv, dim), take(n_layers, dim, dim)
    ffn = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    w["output_norm.weight"] = take(dim)
    take(seq, dim // n_heads // 2)
    take(seq, dim // n_heads // 2)
    if not shared:
        w["output.weight"] = take(vocab, dim)
    check(pos == a.size, f"{path}: {a.size - pos} floats left over after the llama2.c layout")
    for i in range(n_layers):
        w[f"blk.{i}.attn_norm.weight"] = att[i]
        w[f"blk.{i}.ffn_norm.weight"] = ffn[i]
        w[f"blk.{i}.attn_q.weight"], w[f"blk.{i}.attn_k.weight"] = wq[i], wk[i]
        w[f"blk.{i}.attn_v.weight"], w[f"blk.{i}.attn_output.weight"] = wv[i], wo[i]
        w[f"blk.{i}.ffn_gate.weight"], w[f"blk.{i}.ffn_down.weight"] = w1[i], w2[i]
        w[f"blk.{i}.ffn_up.weight"] = w3[i]
    cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, vocab=vocab, seq=seq)
    return cfg, w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--llama2c", help="llama2.c checkpoint the file was exported from")
    ap.add_argument("--same-as", help="GGUF whose tensors must equal this file's after dequantization")
    ap.add_argument("--quiet", action="store_true", help="do not print the metadata")
    args = ap.parse_args()

    r = GGUFReader(args.file)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field_value(field)
        types = "/".join(t.name for t in field.types)
        if not args.quiet:
            v = meta[name]
            shown = (f"[{len(v)} items] {v[:6]}{' ...' if len(v) > 6 else ''}" if isinstance(v, list) else repr(v))
            print(f"  {name:45s} {types:14s} {shown}")

    # Keys and types llama.cpp's llama loader reads (wrong types are load errors there).
    want = {
        "general.architecture": "STRING",
        "llama.context_length": "UINT32",
        "llama.embedding_length": "UINT32",
        "llama.block_count": "UINT32",
        "llama.feed_forward_length": "UINT32",
        "llama.attention.head_count": "UINT32",
        "llama.attention.head_count_kv": "UINT32",
        "llama.rope.dimension_count": "UINT32",
        "llama.attention.layer_norm_rms_epsilon": "FLOAT32",
        "llama.rope.freq_base": "FLOAT32",
        "tokenizer.ggml.model": "STRING",
    }
    for k, t in want.items():
        check(k in r.fields, f"metadata key {k} missing")
        if k in r.fields:
            check(r.fields[k].types[0].name == t, f"{k} has type {r.fields[k].types[0].name}, llama.cpp wants {t}")
    check(meta.get("general.architecture") == "llama", "architecture is not llama")
    dim, ff = meta["llama.embedding_length"], meta["llama.feed_forward_length"]
    n_layers, n_head, n_kv = meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    head = meta.get("llama.attention.key_length", dim // n_head)

    tensors = tensors_of(r)
    vocab = tensors["token_embd.weight"][1][1]
    if meta["tokenizer.ggml.model"] != "no_vocab":
        toks, scores, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
        check(len(toks) == len(scores) == len(types) == vocab, f"vocabulary sizes {len(toks)}/{len(scores)}/{len(types)} vs {vocab}")
        hist = {t: types.count(t) for t in sorted(set(types))}
        print(f"vocabulary: {len(toks)} tokens, token types {hist}, first {toks[:5]}, bos {meta.get('tokenizer.ggml.bos_token_id')} eos {meta.get('tokenizer.ggml.eos_token_id')} unk {meta.get('tokenizer.ggml.unknown_token_id')}")

    expect = {"token_embd.weight": [dim, vocab], "output_norm.weight": [dim]}
    if "output.weight" in tensors:
        expect["output.weight"] = [dim, vocab]
    for i in range(n_layers):
        p = f"blk.{i}."
        expect.update({
            p + "attn_norm.weight": [dim], p + "ffn_norm.weight": [dim],
            p + "attn_q.weight": [dim, n_head * head], p + "attn_k.weight": [dim, n_kv * head],
            p + "attn_v.weight": [dim, n_kv * head], p + "attn_output.weight": [n_head * head, dim],
            p + "ffn_gate.weight": [dim, ff], p + "ffn_up.weight": [dim, ff], p + "ffn_down.weight": [ff, dim],
        })
    for name, ne in expect.items():
        check(name in tensors, f"tensor {name} missing")
        if name in tensors:
            check(tensors[name][1] == ne, f"{name}: ne {tensors[name][1]}, llama.cpp expects {ne}")
    counts = {}
    for name, (ttype, ne, _) in tensors.items():
        block, _size = GGML_QUANT_SIZES[ttype]
        check(ne[0] % block == 0, f"{name}: row length {ne[0]} not a multiple of the {ttype.name} block {block}")
        counts[ttype.name] = counts.get(ttype.name, 0) + 1
        check(name in expect or name.endswith(".bias"), f"unexpected tensor {name}")
    print(f"{len(tensors)} tensors: {counts}; all dequantized with gguf.quants.dequantize")

    if args.llama2c:
        cfg, ref = read_llama2c(args.llama2c)
        worst = 0.0
        for name, want_t in ref.items():
            got = tensors[name][2]
            rows, cols = want_t.shape if want_t.ndim == 2 else (None, want_t.shape[0])
            if want_t.ndim == 2:
                check(np.all(got[rows:, :] == 0) and np.all(got[:, cols:] == 0), f"{name}: padding is not zero")
                got = got[:rows, :cols]
            worst = max(worst, float(np.max(np.abs(got - want_t))))
        print(f"against the llama2.c checkpoint {args.llama2c} (parsed here): max |diff| = {worst:.3g} over {len(ref)} tensors")
        if all(t[0] == GGMLQuantizationType.F32 for t in tensors.values()):
            check(worst == 0.0, "F32 tensors differ from the llama2.c checkpoint")

    if args.same_as:
        ref = tensors_of(GGUFReader(args.same_as))
        by_type = {}
        for name, (ttype, ne, got) in tensors.items():
            check(name in ref and ref[name][1] == ne, f"{name} missing or shaped differently in {args.same_as}")
            d = float(np.max(np.abs(got - ref[name][2])))
            by_type[ttype.name] = max(by_type.get(ttype.name, 0.0), d)
        print(f"against {args.same_as}: max |diff| by type {by_type}")
        check(all(v == 0.0 for v in by_type.values()), "dequantized tensors differ from the reference")

    print("OK" if not failures else f"{len(failures)} check(s) FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
