#!/usr/bin/env python3
"""Writes the committed seed corpus fuzz/corpus/<target>/ (small files, < 100 KB per target).

Seeds are small valid inputs of every format variant the parsers accept, plus truncated real
headers, so that the fuzzer starts from deep inside each parser. Standard library only.
Usage: fuzz/make_seeds.py  (from anywhere; reads tests/fixtures and, if present, /work/shared/data
or $CBQ_DATA_DIR)."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(ROOT, "tests", "fixtures")
DATA = os.environ.get("CBQ_DATA_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def floats(n, start=0.0):
    return struct.pack("<%df" % n, *[start + 0.01 * i for i in range(n)])


# ---- llama2.c checkpoints ----
def llama2c(dim, hidden, layers, heads, kv, vocab, seq, shared=True, version1=False):
    hd = dim // heads
    kvd = kv * hd
    L = layers
    emb, rms, final = vocab * dim, dim, dim
    w = dict(wq=dim * dim, wk=kvd * dim, wv=kvd * dim, wo=dim * dim, w1=hidden * dim,
             w2=dim * hidden, w3=hidden * dim)
    if version1:
        header = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, L, heads, kv, vocab, seq,
                             1 if shared else 0)
        header += b"\0" * (256 - len(header))
        n = L * rms * 2 + final + emb + L * sum(w.values())
    else:
        header = struct.pack("<7i", dim, hidden, L, heads, kv, vocab if shared else -vocab, seq)
        n = emb + L * rms + L * sum(w.values()) + L * rms + final + 2 * seq * (hd // 2)
    if not shared:
        n += vocab * dim
    return header + floats(n)


out("llama2c", "legacy_shared", llama2c(4, 6, 1, 2, 1, 5, 3))
out("llama2c", "legacy_untied_gqa", llama2c(8, 4, 2, 4, 2, 3, 2, shared=False))
out("llama2c", "v1_shared", llama2c(4, 6, 1, 2, 2, 5, 3, version1=True))
out("llama2c", "v1_untied", llama2c(4, 2, 2, 2, 1, 3, 2, shared=False, version1=True))
stories = os.path.join(DATA, "models", "stories260K.bin")
if os.path.exists(stories):
    out("llama2c", "stories260K_header_truncated", read(stories)[:512])

# ---- llama2.c tokenizer.bin, prefixed by [flags][n][text] ----
def tok_file(pieces, max_len=None):
    b = struct.pack("<i", max_len if max_len is not None else max(len(p) for _, p in pieces))
    for score, p in pieces:
        p = p.encode() if isinstance(p, str) else p
        b += struct.pack("<fi", score, len(p)) + p
    return b


def prefixed(flags, text, body):
    text = text.encode() if isinstance(text, str) else text
    body = body.encode() if isinstance(body, str) else body
    return bytes([flags, len(text)]) + text + body


tiny = [(0.0, "<unk>"), (0.0, "\n<s>\n"), (0.0, "\n</s>\n")]
tiny += [(0.0, "<0x%02X>" % b) for b in range(256)]
tiny += [(-1.0, " "), (-2.0, "a"), (-3.0, "b"), (-0.5, "ab"), (-0.25, " ab"), (-4.0, "\u00e9")]
out("llama2c_tokenizer", "tiny_bytes", prefixed(3, "ab ab\u00e9\xff", tok_file(tiny)))
out("llama2c_tokenizer", "tiny_nobytes",
    prefixed(1, "abba", tok_file([(0.0, "<unk>"), (0.0, "<s>"), (0.0, "</s>"), (-1.0, " "),
                                  (-1.0, "a"), (-1.0, "b"), (-0.5, "ab")])))
tok512 = os.path.join(DATA, "models", "tok512.bin")
if os.path.exists(tok512):
    out("llama2c_tokenizer", "tok512", prefixed(5, "Once upon a time, a cat.", read(tok512)))
out("llama2c_tokenizer", "fixture_tokenizer",
    prefixed(1, "Hello world", read(os.path.join(FIX, "tiny-llama", "tokenizer.bin"))))

# ---- safetensors ----
NO_METADATA = object()


def safetensors(tensors, metadata=NO_METADATA, pad=True):
    """tensors: list of (name, dtype, shape, raw bytes); metadata None writes JSON null."""
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not NO_METADATA:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


out("safetensors", "all_dtypes", safetensors([
    ("f32", "F32", [2, 3], floats(6)),
    ("f16", "F16", [3], struct.pack("<3e", 1.0, -2.5, 65504.0)),
    ("bf16", "BF16", [2], struct.pack("<2H", 0x3F80, 0xC020)),
    ("f64", "F64", [1, 1, 2], struct.pack("<2d", 3.25, -1e-3)),
    ("i32", "I32", [2], struct.pack("<2i", 7, -7)),
    ("u8", "U8", [3], b"\1\2\3"),
    ("scalar", "F32", [], floats(1)),
    ("empty", "F32", [0, 4], b""),
], metadata={"format": "pt"}))
out("safetensors", "unpadded_unaligned", safetensors([
    ("b", "I8", [1], b"\x05"), ("a", "F32", [2], floats(2)), ("c", "BOOL", [2], b"\0\1"),
    ("d", "I64", [1], struct.pack("<q", 9)), ("e", "I16", [1], struct.pack("<h", -3))],
    pad=False))
out("safetensors", "null_metadata", safetensors([("w", "F16", [2, 2], b"\0<" * 4)], metadata=None))
fixture = read(os.path.join(FIX, "tiny-llama-bf16", "model.safetensors"))
hlen = struct.unpack("<Q", fixture[:8])[0]
out("safetensors", "fixture_header_truncated", fixture[:8 + hlen + 64])

# ---- sharded index ----
out("safetensors_index", "fixture_index",
    read(os.path.join(FIX, "tiny-llama-sharded", "model.safetensors.index.json")))
out("safetensors_index", "two_entries", json.dumps({
    "metadata": {"total_size": 1},
    "weight_map": {"model.norm.weight": "model-00003-of-00003.safetensors",
                   "model.embed_tokens.weight": "model-00001-of-00003.safetensors"}}))

# ---- config.json ----
for name in ["tiny-llama", "tiny-opt", "tiny-llama-bf16"]:
    out("hf_config", name, read(os.path.join(FIX, name, "config.json")))
llama = json.loads(read(os.path.join(FIX, "tiny-llama", "config.json")))
mistral = dict(llama, architectures=["MistralForCausalLM"], sliding_window=16, head_dim=8)
out("hf_config", "mistral_sliding_window", json.dumps(mistral))
out("hf_config", "model_type_only", json.dumps(
    {"model_type": "llama", "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
     "num_attention_heads": 2, "vocab_size": 10, "bos_token_id": [1, 2], "eos_token_id": None}))

# ---- tokenizer.json, prefixed by [flags][n][text] ----
for name in ["tiny-llama", "tiny-opt"]:
    out("hf_tokenizer", name, prefixed(3, "Hello world, it's caf\u00e9 </s>!",
                                       read(os.path.join(FIX, name, "tokenizer.json"))))
out("hf_tokenizer", "config_tiny_llama",
    prefixed(4, "a b", read(os.path.join(FIX, "tiny-llama", "tokenizer_config.json"))))
spm_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
spm_vocab.update({"<0x%02X>" % b: 3 + b for b in range(256)})
spm_vocab.update({"\u2581": 259, "a": 260, "b": 261, "\u2581a": 262, "ab": 263, "\u2581ab": 264})
added = [{"id": i, "content": s, "special": True, "lstrip": False, "rstrip": i == 2,
          "normalized": False} for i, s in enumerate(["<unk>", "<s>", "</s>"])]
spm = {
    "added_tokens": added,
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None,
    "post_processor": {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "</s>", "type_id": 0}}]},
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
              "vocab": spm_vocab, "merges": [["\u2581", "a"], "a b", ["\u2581a", "b"]]},
}
out("hf_tokenizer", "spm_normalizer", prefixed(3, "ab ab c\u00e9</s> a", json.dumps(spm)))
meta = dict(spm, normalizer=None,
            pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                           "split": True},
            decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"})
meta["model"] = dict(spm["model"], ignore_merges=True)
out("hf_tokenizer", "spm_metaspace", prefixed(1, " ab  a<s>b", json.dumps(meta)))
gpt2_vocab = {"h": 0, "e": 1, "l": 2, "o": 3, "\u0120": 4, "w": 5, "he": 6, "ll": 7, "hell": 8,
              "hello": 9, "\u0120w": 10, "'": 11, "s": 12, "'s": 13}
gpt2 = {
    "added_tokens": [{"id": 14, "content": "<|endoftext|>", "special": True, "lstrip": True,
                      "rstrip": False}],
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}]},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "vocab": gpt2_vocab,
              "merges": ["h e", "l l", "he ll", "hell o", "\u0120 w", "' s"]},
}
out("hf_tokenizer", "gpt2_bytelevel", prefixed(2, "hello's  world\n<|endoftext|>", json.dumps(gpt2)))
# Every pre-tokenizer / normalizer kind of the Llama-3 / Qwen2 / SmolLM era, on the same vocabulary.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
kinds = {
    "split_llama3": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
    "digits_bytelevel": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
    "split_behaviors": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext"},
        {"type": "Split", "pattern": {"Regex": "[,.]"}, "behavior": "MergedWithPrevious"},
        {"type": "Split", "pattern": {"Regex": "\\d+"}, "behavior": "Contiguous"},
        {"type": "Split", "pattern": {"Regex": "\\p{L}+"}, "behavior": "Removed", "invert": True},
        {"type": "Punctuation", "behavior": "Isolated"}, {"type": "WhitespaceSplit"},
        {"type": "Whitespace"}, {"type": "CharDelimiterSplit", "delimiter": "-"},
        {"type": "ByteLevel", "add_prefix_space": True, "use_regex": False}]},
}
for name, pre in kinds.items():
    out("hf_tokenizer", name, prefixed(1, "Hello, it's 12345 W\u00f6rld-x \u65e5\u672c!\n\n  y",
                                        json.dumps(dict(gpt2, pre_tokenizer=pre))))
norm = {"type": "Sequence", "normalizers": [
    {"type": "NFKC"}, {"type": "NFD"}, {"type": "StripAccents"}, {"type": "NFC"}, {"type": "NFKD"},
    {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}]}
out("hf_tokenizer", "normalizers", prefixed(2, " \uff21\ufb01 Cafe\u0301 \u0130 \u03a3 ",
                                            json.dumps(dict(gpt2, normalizer=norm))))
added = gpt2["added_tokens"] + [
    {"id": 15, "content": "[MASK]", "special": True, "lstrip": True, "rstrip": True,
     "single_word": True, "normalized": False},
    {"id": 16, "content": "hel", "special": False, "normalized": True, "single_word": True}]
out("hf_tokenizer", "added_options", prefixed(3, "x [MASK] hel hello [MASK]y hel",
                                              json.dumps(dict(gpt2, added_tokens=added,
                                                              normalizer={"type": "Lowercase"}))))
out("hf_tokenizer", "regress_bad_regex", prefixed(0, "a", json.dumps(dict(gpt2, pre_tokenizer={
    "type": "Split", "pattern": {"Regex": "(a*)*(?<=x)\\p{Han}["}, "behavior": "Isolated"}))))
out("hf_tokenizer", "regress_merge_unknown", prefixed(0, "a", json.dumps(dict(
    gpt2, model=dict(gpt2["model"], merges=gpt2["model"]["merges"] + ["x y"])))))

# ---- regression inputs: each crashed, hung or exhausted memory before its fix ----
out("llama2c_tokenizer", "regress_bos_beyond_vocab", bytes([1, 0]) + struct.pack("<ifi", 0, 0.0, 0))
out("hf_tokenizer", "regress_huge_id",
    prefixed(0, "a", json.dumps({"model": {"type": "BPE", "vocab": {"a": 1000000000}}})))
out("hf_tokenizer", "regress_sequence_without_list", prefixed(0, "a", json.dumps(
    {"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "Sequence"}})))
out("hf_tokenizer", "regress_prepend_without_string", prefixed(0, "a", json.dumps(
    {"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "Prepend"}})))
grow = {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 64}
out("hf_tokenizer", "regress_normalizer_growth", prefixed(0, "a" * 200, json.dumps(
    {"model": {"type": "BPE", "vocab": {"a": 0}},
     "normalizer": {"type": "Sequence", "normalizers": [grow] * 4}})))
header = json.dumps({"x": {"dtype": "F32", "shape": [0, 2**32, 2**32], "data_offsets": [0, 0]}})
out("safetensors", "regress_zero_dim_stride_overflow",
    struct.pack("<Q", len(header)) + header.encode())
out("hf_config", "regress_two_billion_layers", json.dumps(dict(llama, num_hidden_layers=2000000000)))

# ---- GGUF (llama.cpp) ----
GGUF_TYPES = dict(u8=0, i8=1, u16=2, i16=3, u32=4, i32=5, f32=6, bool=7, string=8, array=9,
                  u64=10, i64=11, f64=12)
SCALAR_FMT = dict(u8="B", i8="b", u16="H", i16="h", u32="I", i32="i", f32="f", bool="?",
                  u64="Q", i64="q", f64="d")


def gguf_str(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def gguf_value(kind, v):
    if kind == "string":
        return gguf_str(v)
    if isinstance(kind, tuple):  # ("array", element kind)
        elem = kind[1]
        body = b"".join(gguf_str(x) if elem == "string" else struct.pack("<" + SCALAR_FMT[elem], x)
                        for x in v)
        return struct.pack("<IQ", GGUF_TYPES[elem], len(v)) + body
    return struct.pack("<" + SCALAR_FMT[kind], v)


def gguf(metadata, tensors, alignment=32, version=3):
    """metadata: list of (key, kind, value); tensors: list of (name, ne, ggml type, raw bytes)."""
    b = struct.pack("<IIQQ", 0x46554747, version, len(tensors), len(metadata))
    for key, kind, v in metadata:
        t = GGUF_TYPES["array"] if isinstance(kind, tuple) else GGUF_TYPES[kind]
        b += gguf_str(key) + struct.pack("<I", t) + gguf_value(kind, v)
    offset, data = 0, b""
    for name, ne, ggml_type, raw in tensors:
        b += gguf_str(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
        b += struct.pack("<IQ", ggml_type, offset)
        pad = -len(raw) % alignment
        data += raw + b"\0" * pad
        offset += len(raw) + pad
    b += b"\0" * (-len(b) % alignment)
    return b + data


F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
q4_0 = struct.pack("<e", 0.5) + bytes(range(0, 256, 16))
q4_1 = struct.pack("<ee", 0.25, -1.0) + bytes(range(16))
q8_0 = struct.pack("<e", 0.125) + struct.pack("<32b", *range(-16, 16))
out("gguf", "all_value_and_tensor_types", gguf(
    [("general.architecture", "string", "test"), ("general.alignment", "u32", 64),
     ("a.u8", "u8", 200), ("a.i8", "i8", -3), ("a.u16", "u16", 60000), ("a.i16", "i16", -300),
     ("a.i32", "i32", -70000), ("a.f32", "f32", 1.5), ("a.bool", "bool", True),
     ("a.u64", "u64", 2**40), ("a.i64", "i64", -2**40), ("a.f64", "f64", -0.25),
     ("a.tokens", ("array", "string"), ["<unk>", "a", "\u2581b"]),
     ("a.scores", ("array", "f32"), [0.0, -1.0, -2.0]),
     ("a.types", ("array", "i32"), [2, 1, 1]), ("a.flags", ("array", "bool"), [True, False])],
    [("f32", [2, 3], F32, floats(6)), ("f16", [4], F16, struct.pack("<4e", 1, -2, 0.5, 65504)),
     ("bf16", [2], BF16, struct.pack("<2H", 0x3F80, 0xC020)), ("q4_0", [32], Q4_0, q4_0),
     ("q4_1", [32, 1], Q4_1, q4_1), ("q8_0", [32, 1, 1], Q8_0, q8_0)],
    alignment=64))
out("gguf", "version2_empty", gguf([], [], version=2))


def gguf_llama(vocab_tokens, bpe=None):
    d, F, V, heads, kv_heads = 4, 8, len(vocab_tokens), 2, 1
    hd = d // heads
    meta = [("general.architecture", "string", "llama"), ("llama.embedding_length", "u32", d),
            ("llama.feed_forward_length", "u32", F), ("llama.block_count", "u32", 1),
            ("llama.attention.head_count", "u32", heads),
            ("llama.attention.head_count_kv", "u32", kv_heads),
            ("llama.context_length", "u32", 8),
            ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-5),
            ("llama.rope.freq_base", "f32", 10000.0),
            ("tokenizer.ggml.model", "string", "llama"),
            ("tokenizer.ggml.tokens", ("array", "string"), vocab_tokens),
            ("tokenizer.ggml.scores", ("array", "f32"), [-float(i) for i in range(V)]),
            ("tokenizer.ggml.token_type", ("array", "i32"), [2 if i in (1, 2) else 1 for i in range(V)])]
    if bpe is not None:  # byte-level BPE ("gpt2"): merges and a pre-tokenizer name
        meta = meta[:-4] + [("tokenizer.ggml.model", "string", "gpt2"),
                            ("tokenizer.ggml.pre", "string", bpe[0]),
                            ("tokenizer.ggml.tokens", ("array", "string"), vocab_tokens),
                            ("tokenizer.ggml.merges", ("array", "string"), bpe[1]),
                            ("tokenizer.ggml.token_type", ("array", "i32"),
                             [3 if t.startswith("<|") else 1 for t in vocab_tokens]),
                            ("tokenizer.ggml.bos_token_id", "u32", 0),
                            ("tokenizer.ggml.add_bos_token", "bool", False)]

    def t(name, *ne):
        n = 1
        for e in ne:
            n *= e
        return (name, list(ne), F32, floats(n))

    tensors = [t("token_embd.weight", d, V), t("output_norm.weight", d),
               t("output.weight", d, V), t("blk.0.attn_norm.weight", d),
               t("blk.0.ffn_norm.weight", d), t("blk.0.attn_q.weight", d, heads * hd),
               t("blk.0.attn_k.weight", d, kv_heads * hd), t("blk.0.attn_v.weight", d, kv_heads * hd),
               t("blk.0.attn_output.weight", heads * hd, d), t("blk.0.ffn_gate.weight", d, F),
               t("blk.0.ffn_up.weight", d, F), t("blk.0.ffn_down.weight", F, d)]
    return gguf(meta, tensors)


out("gguf", "tiny_llama_no_tokenizer", gguf_llama(["<unk>", "<s>", "</s>", "a", "b", "\u2581a"]))
llama_tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + ["\u2581", "a"]
out("gguf", "tiny_llama_with_tokenizer", gguf_llama(llama_tokens))
bl_tokens = ["<|endoftext|>"] + [chr(c) for c in range(0x21, 0x7F)] + ["\u0120", "\u0120a", "ab"]
out("gguf", "tiny_llama_byte_level_smollm", gguf_llama(bl_tokens, ("smollm", ["\u0120 a", "a b"])))
out("gguf", "tiny_llama_byte_level_llama3", gguf_llama(bl_tokens, ("llama-bpe", ["\u0120 a"])))
