#!/usr/bin/env python3
"""A NumPy re-implementation of the reference GPTQ run (IST-DASLab/gptq: llama.py's
llama_sequential + llama_eval, gptq.py's GPTQ.add_batch / fasterquant, quant.py's Quantizer,
datautils.py's calibration sampling) for a llama2.c checkpoint, so that cbq's GPTQ can be
compared with the reference algorithm on the same weights and tokens without a GPU or torch.

Written from the reference's public code (read, not copied); every step says what it mirrors.
The reference works in float32 (torch); so does this script (numpy float32), except where noted.

  python3 tests/reference/gptq_reference.py --wbits 4 --groupsize 32 --true-sequential --seed 0
  python3 tests/reference/gptq_reference.py --wbits 4 --groupsize 32 --sampler cbq --dump out.npz

Options mirror llama.py's: --wbits, --groupsize (-1: per output channel), --sym, --percdamp,
--act-order, --static-groups, --true-sequential, --nsamples, --seed. Beyond it:
  --sampler python  datautils.py's sampling: random.seed(seed); start = random.randint(0, N - L - 1)
                    for each segment, N = tokens of the whole training text (BOS + text)
  --sampler cbq     cbq::sample_calibration's: std::mt19937_64(seed), start = rng() % (N - L + 1)
                    (so cbq and this script see the same segments)
  --dump FILE.npz   every layer's Hessian (as the reference accumulates it), quantized weight,
                    scales and zero-points, and the calibration offsets, for a layer-by-layer
                    comparison with cbq (tests/reference/compare_gptq.py)
  --fp64            run the model and GPTQ in float64 instead of float32 (precision check)
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import struct
import sys
import time
from pathlib import Path

# One BLAS thread: the products here are tiny, and threaded OpenBLAS on a busy 2-core machine
# is 40x slower than one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"

# ----------------------------------------------------------------------------------------------
# llama2.c checkpoint (legacy version-0 file, as llama2.c's export.py legacy_export writes it)


def load_llama2c(path: Path) -> dict:
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    if dim <= 0 or n_layers <= 0 or n_heads <= 0:
        sys.exit(f"{path}: not a legacy llama2.c checkpoint (header {dim}, {n_layers}, {n_heads})")
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    f = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        a = f[pos : pos + n].reshape(shape).copy()
        pos += n
        return a

    m = {"dim": dim, "hidden": hidden, "n_layers": n_layers, "n_heads": n_heads, "n_kv": n_kv,
         "vocab": vocab, "seq_len": seq_len, "head_dim": hd}
    m["tok_emb"] = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, n_heads * hd, dim)
    wk = take(n_layers, n_kv * hd, dim)
    wv = take(n_layers, n_kv * hd, dim)
    wo = take(n_layers, dim, n_heads * hd)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    m["rms_final"] = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real (recomputed below, as HF does)
    take(seq_len, hd // 2)  # freq_cis_imag
    m["wcls"] = m["tok_emb"] if shared else take(vocab, dim)
    # HF names (llama.py's find_layers keys); w1 = gate, w3 = up, w2 = down.
    m["layers"] = [
        {"input_layernorm": rms_att[i], "post_attention_layernorm": rms_ffn[i],
         "self_attn.q_proj": wq[i], "self_attn.k_proj": wk[i], "self_attn.v_proj": wv[i],
         "self_attn.o_proj": wo[i], "mlp.gate_proj": w1[i], "mlp.up_proj": w3[i],
         "mlp.down_proj": w2[i]}
        for i in range(n_layers)
    ]
    return m


# ----------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin and run.c's encode (a heap instead of run.c's quadratic scan: the same
# merge, the best score and among equal scores the leftmost pair, at every step)


def load_tokenizer(path: Path, vocab: int):
    raw = path.read_bytes()
    pos = 4  # max_token_length
    pieces, scores = [], []
    for _ in range(vocab):
        score, n = struct.unpack("<fi", raw[pos : pos + 8])
        pos += 8
        pieces.append(raw[pos : pos + n])
        scores.append(score)
        pos += n
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    return pieces, scores, lookup


def encode(text: str, tok, bos: bool = True) -> list[int]:
    pieces, scores, lookup = tok
    data = text.encode("utf-8")
    ids = [1] if bos else []
    if data:
        ids.append(lookup.get(b" ", 32 + 3))
    i = 0
    while i < len(data):  # run.c: a code point is a lead byte and up to 3 continuation bytes
        j = i + 1
        while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        cp = data[i:j]
        if cp in lookup:
            ids.append(lookup[cp])
        else:
            ids.extend(b + 3 for b in cp)
        i = j
    n = len(ids)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []

    def push(a):
        b = nxt[a]
        if b >= n:
            return
        m = lookup.get(pieces[ids[a]] + pieces[ids[b]])
        if m is not None:
            heapq.heappush(heap, (-scores[m], a, b, ids[a], ids[b], m))

    for a in range(n - 1):
        push(a)
    while heap:
        _, a, b, ia, ib, m = heapq.heappop(heap)
        if not (alive[a] and alive[b] and nxt[a] == b and ids[a] == ia and ids[b] == ib):
            continue
        ids[a] = m
        alive[b] = False
        nxt[a] = nxt[b]
        if nxt[b] < n:
            prv[nxt[b]] = a
        if prv[a] >= 0:
            push(prv[a])
        push(a)
    return [ids[k] for k in range(n) if alive[k]]


# ----------------------------------------------------------------------------------------------
# Calibration segments


class MT19937_64:
    """std::mt19937_64 (its output sequence is fixed by the C++ standard)."""

    def __init__(self, seed: int):
        M = (1 << 64) - 1
        self.mt = [seed & M]
        for i in range(1, 312):
            p = self.mt[-1]
            self.mt.append((6364136223846793005 * (p ^ (p >> 62)) + i) & M)
        self.i = 312

    def __call__(self) -> int:
        M = (1 << 64) - 1
        if self.i >= 312:
            mt = self.mt
            for k in range(312):
                y = (mt[k] & 0xFFFFFFFF80000000) | (mt[(k + 1) % 312] & 0x7FFFFFFF)
                v = mt[(k + 156) % 312] ^ (y >> 1)
                if y & 1:
                    v ^= 0xB5026F5AA96619E9
                mt[k] = v
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        y ^= y >> 43
        return y & M


def sample_offsets(n_tokens: int, nsamples: int, seqlen: int, seed: int, sampler: str):
    if sampler == "python":  # datautils.py get_wikitext2 / get_ptb
        random.seed(seed)
        return [random.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]
    rng = MT19937_64(seed)  # cbq::sample_calibration
    return [rng() % (n_tokens - seqlen + 1) for _ in range(nsamples)]


# ----------------------------------------------------------------------------------------------
# The model (HF LlamaForCausalLM's computation; llama2.c's interleaved RoPE layout, which is the
# same function after HF's q/k permutation)


class Model:
    def __init__(self, m: dict, dtype):
        self.m = m
        self.dt = dtype
        hd = m["head_dim"]
        inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        ang = np.arange(m["seq_len"], dtype=np.float64)[:, None] * inv[None, :]
        self.cos = np.cos(ang).astype(dtype)
        self.sin = np.sin(ang).astype(dtype)
        for k in ("tok_emb", "rms_final", "wcls"):
            m[k] = m[k].astype(dtype)
        for layer in m["layers"]:
            for k in layer:
                layer[k] = layer[k].astype(dtype)

    def rmsnorm(self, x, w):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.dt(1e-5))) * w

    def rope(self, x, n_heads):  # x (B, T, H*hd), pairs (2j, 2j+1)
        B, T, _ = x.shape
        hd = self.m["head_dim"]
        x = x.reshape(B, T, n_heads, hd // 2, 2)
        c = self.cos[:T][None, :, None, :]
        s = self.sin[:T][None, :, None, :]
        x0, x1 = x[..., 0], x[..., 1]
        out = np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
        return out.reshape(B, T, n_heads * hd)

    def block(self, i, x, hook=None):
        """Block i on x (B, T, d); hook(name, input) sees every linear layer's input."""
        L = self.m["layers"][i]
        H, Hkv, hd = self.m["n_heads"], self.m["n_kv"], self.m["head_dim"]

        def lin(name, inp):
            if hook is not None:
                hook(name, inp)
            return inp @ L[name].T

        B, T, d = x.shape
        n1 = self.rmsnorm(x, L["input_layernorm"])
        q = self.rope(lin("self_attn.q_proj", n1), H)
        k = self.rope(lin("self_attn.k_proj", n1), Hkv)
        v = lin("self_attn.v_proj", n1)
        q = q.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
        rep = H // Hkv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        att = (q @ k.transpose(0, 1, 3, 2)) / self.dt(math.sqrt(hd))
        mask = np.triu(np.ones((T, T), dtype=bool), 1)
        att = np.where(mask, -np.inf, att).astype(self.dt)
        att = att - att.max(-1, keepdims=True)
        att = np.exp(att)
        att /= att.sum(-1, keepdims=True)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
        h = x + lin("self_attn.o_proj", a)
        n2 = self.rmsnorm(h, L["post_attention_layernorm"])
        g = lin("mlp.gate_proj", n2)
        u = lin("mlp.up_proj", n2)
        s = (g / (1 + np.exp(-g))) * u
        return h + lin("mlp.down_proj", s)

    def embed(self, tokens):
        return self.m["tok_emb"][np.asarray(tokens)]

    def head(self, x):
        return self.rmsnorm(x, self.m["rms_final"]) @ self.m["wcls"].T


def run_batched(fn, x, batch=8):
    return np.concatenate([fn(x[b : b + batch]) for b in range(0, len(x), batch)])


# ----------------------------------------------------------------------------------------------
# quant.py: Quantizer (perchannel=True, mse=False, as llama.py configures it) and quantize()


class Quantizer:
    def __init__(self, bits, sym, dt):
        self.maxq = dt(2**bits - 1)
        self.sym = sym
        self.dt = dt
        self.scale = None

    def find_params(self, x):  # x (rows, cols): one (scale, zero) per row
        zero = np.zeros(x.shape[0], dtype=self.dt)
        xmin = np.minimum(x.min(1), zero)
        xmax = np.maximum(x.max(1), zero)
        if self.sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            neg = xmin < 0
            xmin = np.where(neg, -xmax, xmin)
        both = (xmin == 0) & (xmax == 0)
        xmin = np.where(both, self.dt(-1), xmin)
        xmax = np.where(both, self.dt(1), xmax)
        self.scale = ((xmax - xmin) / self.maxq).astype(self.dt)
        if self.sym:
            self.zero = np.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = np.round(-xmin / self.scale).astype(self.dt)

    def quantize(self, x):  # x (rows,) one column
        q = np.clip(np.round(x / self.scale) + self.zero, 0, self.maxq)
        return (self.scale * (q - self.zero)).astype(self.dt)


# ----------------------------------------------------------------------------------------------
# gptq.py: GPTQ.add_batch and GPTQ.fasterquant


class GPTQ:
    def __init__(self, w, dt):
        self.w = w
        self.dt = dt
        self.columns = w.shape[1]
        self.H = np.zeros((self.columns, self.columns), dtype=dt)
        self.nsamples = 0

    def add_batch(self, inp):  # inp (B, T, in): B sequences
        tmp = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).T
        self.H *= self.dt(self.nsamples / (self.nsamples + tmp))
        self.nsamples += tmp
        x = self.dt(math.sqrt(2 / self.nsamples)) * x.astype(self.dt)
        self.H += x @ x.T

    def fasterquant(self, quantizer, blocksize=128, percdamp=0.01, groupsize=-1, actorder=False,
                    static_groups=False, updated_group_params=False):
        dt = self.dt
        W = self.w.astype(dt).copy()
        rows, cols = W.shape
        if groupsize == -1:
            quantizer.find_params(W)
        H = self.H.copy()
        dead = np.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        groups = []
        if static_groups:
            for i in range(0, cols, groupsize):
                q = Quantizer(0, quantizer.sym, dt)
                q.maxq = quantizer.maxq
                q.find_params(W[:, i : i + groupsize])
                groups.append(q)
        perm = None
        if actorder:
            perm = np.argsort(-np.diag(H), kind="stable")
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = np.argsort(perm)
        Q = np.zeros_like(W)
        Losses = np.zeros_like(W)
        scales = np.zeros((rows, (cols + groupsize - 1) // groupsize if groupsize > 0 else 1), dt)
        zeros = np.zeros_like(scales)
        damp = dt(percdamp) * np.mean(np.diag(H))
        H[np.arange(cols), np.arange(cols)] += damp
        # torch.linalg.cholesky, torch.cholesky_inverse, torch.linalg.cholesky(upper=True)
        Lc = np.linalg.cholesky(H)
        Linv = np.linalg.inv(Lc).astype(dt)
        Hinv_full = (Linv.T @ Linv).astype(dt)
        Hinv = np.linalg.cholesky(Hinv_full).T.astype(dt)
        if groupsize == -1:
            scales[:, 0], zeros[:, 0] = quantizer.scale, quantizer.zero
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].copy()
            Q1 = np.zeros_like(W1)
            Err1 = np.zeros_like(W1)
            Losses1 = np.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if groupsize != -1:
                    if not static_groups:
                        if (i1 + i) % groupsize == 0:
                            # the reference reads the group from W, whose columns i1..i2 lack
                            # this block's updates (W1 holds them)
                            src = W[:, i1 + i : i1 + i + groupsize]
                            if updated_group_params:  # cbq's choice: the updated weights
                                src = np.concatenate([W1[:, i:], W[:, i2:]], axis=1)
                                src = src[:, :groupsize]
                                pend = Err1[:, :i] @ Hinv[i1 : i1 + i, i2 : i1 + i + groupsize]
                                src[:, count - i :] -= pend.astype(dt)
                            quantizer.find_params(src)
                            g = (i1 + i) // groupsize
                            scales[:, g], zeros[:, g] = quantizer.scale, quantizer.zero
                    else:
                        idx = i1 + i
                        if actorder:
                            idx = perm[idx]
                        quantizer = groups[idx // groupsize]
                q = quantizer.quantize(w)
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= np.outer(err1, Hinv1[i, i:]).astype(dt)
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            Losses[:, i1:i2] = Losses1 / 2
            W[:, i2:] -= (Err1 @ Hinv[i1:i2, i2:]).astype(dt)
        if static_groups:
            for g, q in enumerate(groups):
                scales[:, g], zeros[:, g] = q.scale, q.zero
        if actorder:
            Q = Q[:, invperm]
        return Q, float(Losses.sum()), scales, zeros, perm


# ----------------------------------------------------------------------------------------------
# llama.py: llama_sequential and llama_eval

SEQUENTIAL = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]
ALL = [n for group in SEQUENTIAL for n in group]


def llama_sequential(model: Model, calib: np.ndarray, args, dump: dict):
    dt = model.dt
    inps = model.embed(calib)  # (nsamples, L, d)
    for i in range(model.m["n_layers"]):
        layer = model.m["layers"][i]
        sequential = SEQUENTIAL if args.true_sequential else [ALL]
        for names in sequential:
            gptq = {n: GPTQ(layer[n], dt) for n in names}

            def hook(name, inp):
                if name in gptq:
                    for j in range(inp.shape[0]):  # add_batch per sequence, as the hook sees it
                        gptq[name].add_batch(inp[j : j + 1])

            for j in range(len(inps)):
                model.block(i, inps[j : j + 1], hook)
            for name in names:
                quantizer = Quantizer(args.wbits, args.sym, dt)
                Q, loss, scales, zeros, perm = gptq[name].fasterquant(
                    quantizer, blocksize=args.blocksize, percdamp=args.percdamp,
                    groupsize=args.groupsize, actorder=args.act_order,
                    static_groups=args.static_groups,
                    updated_group_params=args.updated_group_params)
                key = f"layers.{i}.{name.split('.')[-1]}"
                if dump is not None:
                    dump[key + ".H"] = gptq[name].H
                    dump[key + ".W"] = layer[name].copy()
                    dump[key + ".Q"] = Q
                    dump[key + ".scales"] = scales
                    dump[key + ".zeros"] = zeros
                    if perm is not None:
                        dump[key + ".perm"] = perm
                if args.verbose:
                    print(f"{i} {name} error {loss:.6g}", flush=True)
                layer[name] = Q.astype(dt)
        inps = run_batched(lambda x: model.block(i, x), inps)


def write_safetensors(path: str, tensors: dict, metadata: dict):
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dtype = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32",
                 np.dtype(np.int32): "I32"}[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def fixture_tensors(dump: dict, groupsize: int, static_groups: bool) -> dict:
    """Integer codes, scales and zero-points of every layer (cbq's QuantizedWeight layout)."""
    out = {}
    for key in [k[:-2] for k in dump if k.endswith(".Q")]:
        Q, sc, ze = dump[key + ".Q"], dump[key + ".scales"], dump[key + ".zeros"]
        cols = Q.shape[1]
        if groupsize > 0:
            if key + ".perm" in dump and not static_groups:  # act-order: g_idx
                gidx = np.empty(cols, np.int64)
                gidx[dump[key + ".perm"]] = np.arange(cols) // groupsize
            else:
                gidx = np.arange(cols) // groupsize
        else:
            gidx = np.zeros(cols, np.int64)
        codes = np.round(Q.astype(np.float64) / sc[:, gidx] + ze[:, gidx])
        out[key + ".codes"] = codes.astype(np.uint8)
        out[key + ".scales"] = sc.astype(np.float32)
        out[key + ".zeros"] = ze.astype(np.float32)
        if key + ".perm" in dump:
            out[key + ".perm"] = dump[key + ".perm"].astype(np.int32)
    return out


def llama_eval(model: Model, tokens: list[int], seqlen: int) -> float:
    nsamples = len(tokens) // seqlen
    nll = 0.0
    for s in range(nsamples):
        t = np.asarray(tokens[s * seqlen : (s + 1) * seqlen])
        x = model.embed(t)[None]
        for i in range(model.m["n_layers"]):
            x = model.block(i, x)
        logits = model.head(x)[0, :-1].astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float(np.mean(lse - logits[np.arange(seqlen - 1), t[1:]])) * seqlen
    return math.exp(nll / (nsamples * seqlen))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(DATA / "models" / "stories260K.bin"))
    p.add_argument("--tokenizer", default=str(DATA / "models" / "tok512.bin"))
    p.add_argument("--calib", default=str(DATA / "text" / "tinystories_train_excerpt.txt"))
    p.add_argument("--eval", default=str(DATA / "text" / "tinystories_valid_200k.txt"))
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["python", "cbq"], default="python")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--groupsize", type=int, default=-1)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--true-sequential", action="store_true")
    p.add_argument("--fp64", action="store_true")
    p.add_argument("--updated-group-params", action="store_true",
                   help="a group's (scale, zero) from the fully updated weights (cbq's default) "
                   "instead of the reference's W, which lacks the current block's updates")
    p.add_argument("--dump", default="")
    p.add_argument("--dump-tokens", default="", help="write the calibration and evaluation "
                   "token ids (int32) to PREFIX.calib.bin / PREFIX.eval.bin")
    p.add_argument("--fixture", default="", help="write every layer's codes, scales, "
                   "zero-points (and act-order permutation) as a safetensors file for "
                   "tests/test_gptq.cpp (skips the evaluation)")
    p.add_argument("--json", default="", help="append a JSON line with the result to this file")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()

    dt = np.float64 if args.fp64 else np.float32
    t0 = time.time()
    m = load_llama2c(Path(args.model))
    tok = load_tokenizer(Path(args.tokenizer), m["vocab"])
    calib_tokens = encode(Path(args.calib).read_text(encoding="utf-8"), tok)
    eval_tokens = encode(Path(args.eval).read_text(encoding="utf-8"), tok)
    if args.dump_tokens:
        np.asarray(calib_tokens, np.int32).tofile(args.dump_tokens + ".calib.bin")
        np.asarray(eval_tokens, np.int32).tofile(args.dump_tokens + ".eval.bin")
    offsets = sample_offsets(len(calib_tokens), args.nsamples, args.seqlen, args.seed,
                             args.sampler)
    calib = np.stack([np.asarray(calib_tokens[o : o + args.seqlen]) for o in offsets])
    model = Model(m, dt)
    dump = {} if args.dump or args.fixture else None
    fp = None
    if args.wbits < 16:
        llama_sequential(model, calib, args, dump)
    if args.fixture:
        meta = {"generator": "tests/reference/gptq_reference.py " + " ".join(sys.argv[1:]),
                "numpy": np.__version__, "offsets": ",".join(map(str, offsets))}
        write_safetensors(args.fixture, fixture_tensors(dump, args.groupsize, args.static_groups), meta)
        print(f"wrote {args.fixture}")
        return None
    ppl = llama_eval(model, eval_tokens, args.seqlen)
    setting = (f"W{args.wbits} " + (f"g{args.groupsize}" if args.groupsize > 0 else "per-channel")
               + (" sym" if args.sym else "") + (" act-order" if args.act_order else "")
               + (" static-groups" if args.static_groups else "")
               + (" true-sequential" if args.true_sequential else "")
               + (" updated-group-params" if args.updated_group_params else ""))
    print(f"{setting} seed {args.seed} ({args.sampler} sampler, {args.nsamples}x{args.seqlen}, "
          f"{'fp64' if args.fp64 else 'fp32'}): perplexity {ppl:.4f} "
          f"[calib {len(calib_tokens)} tokens, eval {len(eval_tokens)} tokens, "
          f"{time.time() - t0:.0f}s]", flush=True)
    if args.dump:
        dump["offsets"] = np.asarray(offsets)
        np.savez(args.dump, **dump)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"setting": setting, "wbits": args.wbits,
                                "groupsize": args.groupsize, "sym": args.sym,
                                "act_order": args.act_order, "static_groups": args.static_groups,
                                "true_sequential": args.true_sequential, "seed": args.seed,
                                "sampler": args.sampler, "fp64": args.fp64,
                                "updated_group_params": args.updated_group_params,
                                "perplexity": ppl}) + "\n")
    return fp


if __name__ == "__main__":
    main()
