#!/usr/bin/env python3
"""Generate cbq's reference test fixtures with the real reference stack
(PyTorch + Hugging Face transformers + tokenizers).

Everything is built locally (no hub downloads): tokenizers are trained on the
TinyStories excerpt in shared/data/text, models are random-initialised from
config objects with fixed seeds.  Output goes to tests/fixtures/ (see
tests/reference/README.md for the exact layout of every file).

Usage:  .venv-ref/bin/python tests/reference/make_fixtures.py [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import tokenizers
import transformers
import safetensors
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizerFast,
    OPTConfig,
    OPTForCausalLM,
)

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"

LLAMA_VOCAB = 512
OPT_VOCAB = 448
SEQ_LENGTHS = (1, 7, 33)
SPM = "\u2581"  # "▁"

TRICKY = [
    "",
    "Hello world",
    " Hello",
    "Hello ",
    "  two  spaces  between  ",
    "line one\nline two\n",
    "tab\tseparated",
    "Hello, world! It's 3.14 (really)?",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e",
    "emoji \U0001F642\U0001F44D!",
    "Once upon a time, there was a little girl named Lily.",
    "a<s>b</s>c",
]


# --------------------------------------------------------------------------- utils

def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def r7(x) -> float:
    """Round to 7 significant digits (json then prints the shortest repr)."""
    return float(f"{float(x):.7g}")


def r9(x) -> float:
    """9 significant digits: round-trips float32 exactly."""
    return float(f"{float(x):.9g}")


def tolist7(t: torch.Tensor):
    a = t.detach().to(torch.float64).cpu().numpy()
    if a.ndim == 1:
        return [r7(v) for v in a]
    return [tolist7(torch.from_numpy(row)) for row in a]


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def weight_samples(state: dict[str, torch.Tensor], names=None) -> dict:
    """For each tensor: stored dtype, shape, first 8 values (as float32) and
    the float64 sum of all values (as float32) -- for loader tests."""
    out = {}
    for name in sorted(state) if names is None else names:
        t = state[name]
        f = t.to(torch.float32)
        out[name] = {
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "first8": [r9(v) for v in f.flatten()[:8].tolist()],
            "sum": float(f"{f.to(torch.float64).sum().item():.12g}"),
        }
    return out


def load_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    state = {}
    for p in sorted(d.glob("*.safetensors")):
        state.update(load_file(str(p)))
    return state


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ----------------------------------------------------------------- tokenizers

def build_llama_tokenizer(train_lines: list[str]) -> Tokenizer:
    """LLaMA-2 style tokenizer.json (as produced by transformers' LlamaConverter,
    legacy=True): BPE with byte_fallback, ids <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF>
    = 3..258, then the trained pieces; normalizer Prepend(▁)+Replace(' ',▁), no
    pre-tokenizer, decoder Replace(▁,' ')+ByteFallback+Fuse+Strip(left 1)."""
    specials = ["<unk>", "<s>", "</s>"]
    # Train on "words" split like SentencePiece's split_by_whitespace: each piece
    # starts with ▁, so no merge crosses a word boundary.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB - 256,
        special_tokens=specials,
        show_progress=False,
        min_frequency=2,
    )
    trainer_tok.train_from_iterator(train_lines, trainer=trainer)
    tjson = json.loads(trainer_tok.to_str())
    tvocab: dict[str, int] = tjson["model"]["vocab"]
    tmerges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in tjson["model"]["merges"]]

    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(tvocab.items(), key=lambda kv: kv[1]):
        if piece in specials:
            continue
        assert piece not in vocab, piece
        vocab[piece] = len(vocab)

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=tmerges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM), normalizers.Replace(" ", SPM)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok


def build_opt_tokenizer(train_lines: list[str]) -> Tokenizer:
    """GPT-2 byte-level BPE as used by OPT: <s>=0 <pad>=1 </s>=2 <unk>=3, then the
    256 byte symbols and merges; OPT prepends </s> (id 2) as BOS."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=OPT_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(train_lines, trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="</s>:0 $A:0", pair="</s>:0 $A:0 $B:1", special_tokens=[("</s>", 2)]
    )
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def llama_merges_to_legacy_strings(tokenizer_json: Path) -> None:
    """Rewrite model.merges as "a b" strings, the format of the real LLaMA-2
    tokenizer.json (tokenizers >= 0.20 writes [a, b] pairs, kept for OPT)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    out = []
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ")
        assert " " not in a and " " not in b
        out.append(f"{a} {b}")
    data["model"]["merges"] = out
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def encodings_fixture(model_dir: Path) -> list[dict]:
    """Encode the tricky strings with tokenizers (the tokenizer.json semantics)
    and check that transformers' AutoTokenizer agrees."""
    tk = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for text in TRICKY:
        e0 = tk.encode(text, add_special_tokens=False)
        e1 = tk.encode(text, add_special_tokens=True)
        assert hf(text, add_special_tokens=False)["input_ids"] == e0.ids, (model_dir, text)
        assert hf(text, add_special_tokens=True)["input_ids"] == e1.ids, (model_dir, text)
        dec = tk.decode(e1.ids, skip_special_tokens=True)
        dec_sp = tk.decode(e1.ids, skip_special_tokens=False)
        assert hf.decode(e1.ids, skip_special_tokens=True) == dec, (model_dir, text, dec)
        out.append(
            {
                "text": text,
                "ids": e0.ids,
                "tokens": e0.tokens,
                "ids_with_special": e1.ids,
                "decoded": dec,
                "decoded_with_special": dec_sp,
            }
        )
    return out


def pick_sequences(tok_dir: Path, valid_lines: list[str]) -> tuple[list[list[int]], list[str]]:
    """Sequences of SEQ_LENGTHS tokens (BOS included, as transformers adds it).
    Length 1 is BOS alone; the others are prefixes of validation paragraphs."""
    tk = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    seqs, texts = [], []
    li = 0
    for n in SEQ_LENGTHS:
        if n == 1:
            ids = tk.encode("", add_special_tokens=True).ids
            assert len(ids) == 1
            seqs.append(ids)
            texts.append("")
            continue
        while True:
            text = valid_lines[li]
            li += 1
            ids = tk.encode(text, add_special_tokens=True).ids
            if len(ids) >= n:
                break
        ids = ids[:n]
        seqs.append(ids)
        texts.append(tk.decode(ids, skip_special_tokens=True))
    return seqs, texts


# --------------------------------------------------------------------- models

@torch.no_grad()
def scale_init(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:  # RMSNorm / LayerNorm
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))


@torch.no_grad()
def run_model(model, seqs, want_hidden=True):
    logits, hidden = [], []
    for ids in seqs:
        out = model(torch.tensor([ids]), output_hidden_states=want_hidden)
        logits.append(out.logits[0].float())
        if want_hidden:
            hidden.append([h[0, -1].float() for h in out.hidden_states])
    return logits, hidden


def llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def opt_config(vocab_size: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        ffn_dim=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        do_layer_norm_before=True,
        word_embed_proj_dim=64,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        init_std=0.02,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


# ------------------------------------------------------------ llama2.c export

def l2c_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of HF's convert_llama_weights_to_hf permute (rotate_half layout
    -> Meta/llama2.c interleaved layout); llama2.c export.py permute_reverse."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_llama2c_v0(path: Path, state: dict[str, torch.Tensor], cfg: LlamaConfig) -> None:
    """llama2.c legacy (version 0) checkpoint, as llama2.c export.py legacy_export
    writes it: 7 x int32 header, then float32 tensors."""
    dim, hid, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    nh, nkv, V, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size, cfg.max_position_embeddings
    hs = dim // nh
    shared = torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])
    with open(path, "wb") as f:
        f.write(struct.pack("7i", dim, hid, L, nh, nkv, V if shared else -V, T))

        def w(t):
            f.write(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

        p = "model.layers.{}."
        w(state["model.embed_tokens.weight"])
        for i in range(L):
            w(state[p.format(i) + "input_layernorm.weight"])
        for i in range(L):
            w(l2c_unpermute(state[p.format(i) + "self_attn.q_proj.weight"], nh))
        for i in range(L):
            w(l2c_unpermute(state[p.format(i) + "self_attn.k_proj.weight"], nkv))
        for i in range(L):
            w(state[p.format(i) + "self_attn.v_proj.weight"])
        for i in range(L):
            w(state[p.format(i) + "self_attn.o_proj.weight"])
        for i in range(L):
            w(state[p.format(i) + "post_attention_layernorm.weight"])
        for i in range(L):
            w(state[p.format(i) + "mlp.gate_proj.weight"])  # w1
        for i in range(L):
            w(state[p.format(i) + "mlp.down_proj.weight"])  # w2
        for i in range(L):
            w(state[p.format(i) + "mlp.up_proj.weight"])  # w3
        w(state["model.norm.weight"])
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2)[: hs // 2].double() / hs))
        ang = torch.outer(torch.arange(T).double(), freqs)
        w(torch.cos(ang))  # freq_cis_real [T, hs/2] (unused by run.c)
        w(torch.sin(ang))  # freq_cis_imag
        if not shared:
            w(state["lm_head.weight"])


def llama2c_forward(path: Path, tokens: list[int]) -> np.ndarray:
    """Independent float64 re-implementation of llama2.c run.c's forward()
    reading the .bin written above (interleaved RoPE, GQA)."""
    raw = path.read_bytes()
    dim, hid, L, nh, nkv, V, T = struct.unpack("7i", raw[:28])
    shared = V > 0
    V = abs(V)
    hs = dim // nh
    kvd = nkv * hs
    data = np.frombuffer(raw[28:], dtype="<f4").astype(np.float64)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = data[off : off + n].reshape(shape)
        off += n
        return a

    emb = take(V, dim)
    rms_att = take(L, dim)
    wq, wk, wv = take(L, dim, dim), take(L, kvd, dim), take(L, kvd, dim)
    wo = take(L, dim, dim)
    rms_ffn = take(L, dim)
    w1, w2, w3 = take(L, hid, dim), take(L, dim, hid), take(L, hid, dim)
    rms_final = take(dim)
    take(T, hs // 2)
    take(T, hs // 2)
    wcls = emb if shared else take(V, dim)
    assert off == data.size

    def rms(x, wt):
        return wt * x / np.sqrt(np.mean(x * x) + 1e-5)

    def rope(vec, pos):
        vec = vec.copy()
        for i in range(0, vec.size, 2):
            hd = i % hs
            val = pos * (1.0 / 10000.0 ** (hd / hs))
            c, s = math.cos(val), math.sin(val)
            v0, v1 = vec[i], vec[i + 1]
            vec[i], vec[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
        return vec

    kc = np.zeros((L, len(tokens), kvd))
    vc = np.zeros((L, len(tokens), kvd))
    out = []
    for pos, tokid in enumerate(tokens):
        x = emb[tokid].copy()
        for l in range(L):
            xb = rms(x, rms_att[l])
            q, k, v = rope(wq[l] @ xb, pos), rope(wk[l] @ xb, pos), wv[l] @ xb
            kc[l, pos], vc[l, pos] = k, v
            att_out = np.zeros(dim)
            for h in range(nh):
                kh = h // (nh // nkv)
                qh = q[h * hs : (h + 1) * hs]
                sc = kc[l, : pos + 1, kh * hs : (kh + 1) * hs] @ qh / math.sqrt(hs)
                sc = np.exp(sc - sc.max())
                sc /= sc.sum()
                att_out[h * hs : (h + 1) * hs] = sc @ vc[l, : pos + 1, kh * hs : (kh + 1) * hs]
            x = x + wo[l] @ att_out
            xb = rms(x, rms_ffn[l])
            h1 = w1[l] @ xb
            x = x + w2[l] @ ((h1 / (1.0 + np.exp(-h1))) * (w3[l] @ xb))
        out.append(wcls @ rms(x, rms_final))
    return np.stack(out)


def write_llama2c_tokenizer(path: Path, tokenizer_json: Path) -> list[tuple[bytes, float]]:
    """llama2.c tokenizer.bin as llama2.c's tokenizer.py export writes it: uint32
    max_token_length, then per id: float32 score, int32 length, bytes.  Pieces
    have '▁' replaced by ' ', <s>/</s> become '\n<s>\n'/'\n</s>\n'.  Scores
    (SentencePiece BPE style): a merged piece made by merge #r scores -r, every
    other piece (specials, <0xXX>, single characters) 0."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    rank = {}
    for r, m in enumerate(data["model"]["merges"]):
        a, b = m if isinstance(m, list) else m.split(" ")
        rank.setdefault(a + b, r)
    table = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        t = {1: "\n<s>\n", 2: "\n</s>\n"}.get(i, piece).replace(SPM, " ")
        table.append((t.encode("utf-8"), -float(rank[piece]) if piece in rank else 0.0))
    with open(path, "wb") as f:
        f.write(struct.pack("I", max(len(b) for b, _ in table)))
        for b, sc in table:
            f.write(struct.pack("fI", sc, len(b)))
            f.write(b)
    return table


def llama2c_encode(table: list[tuple[bytes, float]], text: str) -> list[int]:
    """Python port of llama2.c run.c encode(text, bos=0, eos=0)."""
    lookup = {}
    for i, (b, _) in enumerate(table):
        lookup.setdefault(b, i)
    toks = []
    if text:
        toks.append(lookup[b" "])  # dummy prefix
    for ch in text:
        b = ch.encode("utf-8")
        toks.extend([lookup[b]] if b in lookup else [x + 3 for x in b])
    while True:
        best, best_id, best_i = -1e10, -1, -1
        for i in range(len(toks) - 1):
            j = lookup.get(table[toks[i]][0] + table[toks[i + 1]][0], -1)
            if j != -1 and table[j][1] > best:
                best, best_id, best_i = table[j][1], j, i
        if best_i == -1:
            return toks
        toks[best_i : best_i + 2] = [best_id]


# ----------------------------------------------------------------------- main

def reset_dir(d: Path) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None, help="folder with tinystories_*.txt (default: shared/data/text)")
    args = ap.parse_args()
    cands = [Path(args.data_dir)] if args.data_dir else [ROOT / "shared/data/text", ROOT.parent / "shared/data/text"]
    data_dir = next((c for c in cands if (c / "tinystories_train_excerpt.txt").exists()), None)
    if data_dir is None:
        raise SystemExit(f"TinyStories text not found in {cands}")
    train_lines = read_lines(data_dir / "tinystories_train_excerpt.txt")
    valid_lines = read_lines(data_dir / "tinystories_valid_200k.txt")

    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic reductions
    FIX.mkdir(parents=True, exist_ok=True)
    gen = {"script": "tests/reference/make_fixtures.py", "versions": versions()}

    # ------------------------------------------------------------ tiny-llama
    ltok = build_llama_tokenizer(train_lines)
    lhf = LlamaTokenizerFast(
        tokenizer_object=ltok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    lcfg = llama_config(ltok.get_vocab_size())
    torch.manual_seed(1)
    lmodel = LlamaForCausalLM(lcfg)
    scale_init(lmodel, seed=11)
    lmodel.eval()

    d = reset_dir(FIX / "tiny-llama")
    lmodel.save_pretrained(d, safe_serialization=True)
    lhf.save_pretrained(d)
    llama_merges_to_legacy_strings(d / "tokenizer.json")

    ref_model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    seqs, texts = pick_sequences(d, valid_lines)
    logits, hidden = run_model(ref_model, seqs)
    # float64 cross-check: how far fp32 is from the exact result
    m64 = LlamaForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()
    l64, _ = run_model(m64, seqs, want_hidden=False)
    fp64_diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(logits, l64))
    # sanity: hidden_states[-1] is the final-norm output, logits = lm_head(it)
    with torch.no_grad():
        assert torch.allclose(ref_model.lm_head(hidden[-1][-1]), logits[-1][-1], atol=1e-5)
    state = load_safetensors_dir(d)

    # llama2.c legacy export of the same weights, verified by an independent forward
    write_llama2c_v0(d / "llama2c.bin", state, lcfg)
    l2c_logits = [llama2c_forward(d / "llama2c.bin", s) for s in seqs]
    l2c_diff = max(np.abs(a - b.double().numpy()).max() for a, b in zip(l2c_logits, l64))
    assert l2c_diff < 1e-4, l2c_diff
    # llama2.c tokenizer.bin of the same vocabulary; record on which texts
    # run.c's greedy-by-score encode agrees with the HF BPE ids
    l2c_table = write_llama2c_tokenizer(d / "tokenizer.bin", d / "tokenizer.json")
    encs = encodings_fixture(d)
    l2c_enc = []
    for e in encs:
        if "<s>" in e["text"]:
            continue  # run.c has no special-token splitting
        ids = llama2c_encode(l2c_table, e["text"])
        l2c_enc.append({"text": e["text"], "ids": ids, "same_as_hf": ids == e["ids"]})

    write_json(
        d / "reference.json",
        {
            "model": "tiny-llama",
            "generator": gen,
            "dtype": "float32",
            "texts": texts,
            "token_ids": seqs,
            "logits": [tolist7(x) for x in logits],
            "hidden_states": [[tolist7(h) for h in hs] for hs in hidden],
            "fp64_max_abs_diff": r7(fp64_diff),
            "llama2c_max_abs_diff": r7(l2c_diff),
            "weights": weight_samples(state),
            "encodings": encs,
            "llama2c_encodings": l2c_enc,
        },
    )

    # bf16 / fp16 copies: same weights rounded; references are computed with the
    # rounded weights upcast to float32 (what a loader converting to f32 sees).
    short = [s for s in seqs if len(s) <= 7]
    for variant, dt in (("tiny-llama-bf16", torch.bfloat16), ("tiny-llama-fp16", torch.float16)):
        dv = reset_dir(FIX / variant)
        m = LlamaForCausalLM.from_pretrained(d, dtype=dt)
        m.save_pretrained(dv, safe_serialization=True)
        lhf.save_pretrained(dv)
        llama_merges_to_legacy_strings(dv / "tokenizer.json")
        if dt == torch.bfloat16:
            # mimic checkpoints written by transformers < 4.56 ("torch_dtype" key)
            cfgj = json.loads((dv / "config.json").read_text())
            cfgj = {("torch_dtype" if k == "dtype" else k): v for k, v in cfgj.items()}
            (dv / "config.json").write_text(json.dumps(cfgj, indent=2, sort_keys=True) + "\n")
        st = load_safetensors_dir(dv)
        assert all(t.dtype == dt for t in st.values())
        mf = LlamaForCausalLM.from_pretrained(dv, dtype=torch.float32, attn_implementation="eager").eval()
        lg, _ = run_model(mf, short, want_hidden=False)
        write_json(
            dv / "reference.json",
            {
                "model": variant,
                "generator": gen,
                "dtype": str(dt).replace("torch.", ""),
                "note": "logits computed in float32 from the stored weights upcast to float32",
                "token_ids": short,
                "logits": [tolist7(x) for x in lg],
                "weights": weight_samples(st),
            },
        )

    # sharded fp32 copy
    ds = reset_dir(FIX / "tiny-llama-sharded")
    ref_model.save_pretrained(ds, safe_serialization=True, max_shard_size="250KB")
    lhf.save_pretrained(ds)
    llama_merges_to_legacy_strings(ds / "tokenizer.json")
    st = load_safetensors_dir(ds)
    assert set(st) == set(state) and all(torch.equal(st[k], state[k]) for k in st)
    ms = LlamaForCausalLM.from_pretrained(ds, dtype=torch.float32, attn_implementation="eager").eval()
    lg, _ = run_model(ms, short, want_hidden=False)
    write_json(
        ds / "reference.json",
        {
            "model": "tiny-llama-sharded",
            "generator": gen,
            "dtype": "float32",
            "note": "same tensors as tiny-llama, split over several shards",
            "shards": sorted(p.name for p in ds.glob("*.safetensors")),
            "token_ids": short,
            "logits": [tolist7(x) for x in lg],
            "weights": weight_samples(st),
        },
    )

    # --------------------------------------------------------------- tiny-opt
    otok = build_opt_tokenizer(train_lines)
    ohf = GPT2TokenizerFast(
        tokenizer_object=otok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_prefix_space=False,
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    ocfg = opt_config(otok.get_vocab_size())
    torch.manual_seed(2)
    omodel = OPTForCausalLM(ocfg)
    scale_init(omodel, seed=22)
    omodel.eval()
    do = reset_dir(FIX / "tiny-opt")
    omodel.save_pretrained(do, safe_serialization=True)
    ohf.save_pretrained(do)
    oref = OPTForCausalLM.from_pretrained(do, dtype=torch.float32, attn_implementation="eager").eval()
    oseqs, otexts = pick_sequences(do, valid_lines)
    ologits, ohidden = run_model(oref, oseqs)
    o64 = OPTForCausalLM.from_pretrained(do, dtype=torch.float64, attn_implementation="eager").eval()
    ol64, _ = run_model(o64, oseqs, want_hidden=False)
    ofp64 = max((a.double() - b.double()).abs().max().item() for a, b in zip(ologits, ol64))
    with torch.no_grad():
        assert torch.allclose(oref.lm_head(ohidden[-1][-1]), ologits[-1][-1], atol=1e-5)
    ostate = load_safetensors_dir(do)
    write_json(
        do / "reference.json",
        {
            "model": "tiny-opt",
            "generator": gen,
            "dtype": "float32",
            "texts": otexts,
            "token_ids": oseqs,
            "logits": [tolist7(x) for x in ologits],
            "hidden_states": [[tolist7(h) for h in hs] for hs in ohidden],
            "fp64_max_abs_diff": r7(ofp64),
            "weights": weight_samples(ostate),
            "encodings": encodings_fixture(do),
        },
    )

    # ---------------------------------------------------------------- summary
    manifest = {}
    for p in sorted(FIX.rglob("*")):
        if p.is_file() and p.name != "MANIFEST.json":
            manifest[str(p.relative_to(FIX))] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    write_json(FIX / "MANIFEST.json", {"generator": gen, "files": manifest})
    total = sum(v["bytes"] for v in manifest.values())
    print(f"fixtures written to {FIX} ({total / 1e6:.2f} MB)")
    print(f"llama fp32-vs-fp64 max |dlogit| {fp64_diff:.3g}, llama2.c-vs-fp64 {l2c_diff:.3g}, opt {ofp64:.3g}")


if __name__ == "__main__":
    main()
