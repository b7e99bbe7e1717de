#!/usr/bin/env python3
"""Reference ids from Hugging Face `tokenizers` for every pre-tokenizer / normalizer kind cbq reads.

Trains one tiny BPE tokenizer per configuration (on the TinyStories excerpt shipped in data/text
plus the varied sample below, so every script in the sample has merges), saves its tokenizer.json
under tests/fixtures/tokenizers/hf/<name>.json and records in tests/fixtures/tokenizers/hf.json
the ids `tokenizers` gives for each test text, without and with special tokens.

Usage: python3 tests/reference/make_tokenizer_fixtures.py     (tokenizers 0.23.3; seconds)
"""
import json
import os
import sys

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers")

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
STARCODER2 = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Varied text: contractions (any case, ſ and the Kelvin sign), digits, tabs, CR LF, runs of
# spaces and newlines, emoji (modifiers, ZWJ), CJK, Hangul, Arabic, Devanagari (combining
# marks), decomposed and precomposed accents, ligatures and fullwidth forms (NFKC), final sigma,
# dotted I, NBSP, NEL, ideographic space, zero-width space, letters new in Unicode 15 / 16.
VARIED = [
    "Hello world! It's 2024; don't, we'll, I'M, THEY'RE, you'VE, she'd, 'ſ and 'K.",
    "Numbers: 1234567 3.14159 -42 +7e10 1,000,000 ٣٤٥ ²³ Ⅻ",
    "tabs\tand\t\ttabs, spaces   between  words,\r\nCRLF lines\n\n\nand blank lines \n  indented\n",
    "emoji 🦙👍🏽 👨‍👩‍👧 ❤️ ✨ and symbols ©®™ ∑∫ → ← ≠ ≤ €£¥ $5 #tag @user",
    "日本語のテキスト、中文文本。한국어 텍스트! العربية नमस्ते दुनिया",
    "cafe\u0301 café naïve coöperate e\u0300\u0323 \u1e9b\u0323 ﬁne ﬂow ＡＢＣ１２３ ㍿ ½",
    "ΟΔΟΣ Σίσυφος İstanbul ǅemal ß STRASSE",
    "nbsp\u00a0here nel\u0085there ideo\u3000space zw\u200bsp soft\u00adhyphen",
    "new letters \U00011f04\U00011f05 \U0001e4d0\U0001e4d1 (15.0) \U00010d50\U00010d51 (16.0) "
    "CJK-H \U00031350 end",
    "x  \n  y   z\t\n\t w  ",
    "<|endoftext|> special <|im_start|>user\nhi<|im_end|>  [MASK] and mask [MASK]x <tag> word",
    "code: def f(x):\n    return x**2  # comment\n\tif a<=b and c!=d: pass\n",
    "",
    " ",
    "\n",
    "a",
]


def corpus():
    with open(os.path.join(ROOT, "data", "text", "tinystories_train_excerpt.txt"),
              encoding="utf-8") as f:
        text = f.read()[:60000]
    return [text] + VARIED * 20


def train(tok, vocab_size, special=(), alphabet=True):
    trainer = BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [],
        show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def byte_level(pre, normalizer=None, vocab=1000, special=("<|endoftext|>",), post=None):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    train(tok, vocab, special)
    if post is not None:
        tok.post_processor = post(tok)
    return tok


def spm_like(metaspace):
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0)])
    specials = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    trainer = BpeTrainer(vocab_size=1200, min_frequency=2, special_tokens=specials,
                         show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    # The byte tokens are plain vocabulary entries in real LLaMA tokenizers, not added tokens.
    j = json.loads(tok.to_str())
    j["added_tokens"] = [a for a in j["added_tokens"] if not a["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(j))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def bos_template(name):
    return lambda tok: processors.TemplateProcessing(
        single=f"{name} $A", special_tokens=[(name, tok.token_to_id(name))])


def configs():
    bl = pre_tokenizers.ByteLevel
    yield "gpt2_bytelevel", byte_level(bl(add_prefix_space=False, use_regex=True))
    yield "bytelevel_prefix_noregex", byte_level(bl(add_prefix_space=True, use_regex=False))
    yield "smollm_digits_bytelevel", byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), bl(add_prefix_space=False)]))
    llama3 = byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
         bl(add_prefix_space=False, use_regex=False)]),
        special=("<|begin_of_text|>", "<|end_of_text|>"), post=bos_template("<|begin_of_text|>"))
    j = json.loads(llama3.to_str())
    j["model"]["ignore_merges"] = True
    yield "llama3_split", Tokenizer.from_str(json.dumps(j))
    yield "qwen2_nfc_split", byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
         bl(add_prefix_space=False, use_regex=False)]), normalizer=normalizers.NFC(),
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    yield "starcoder2_split", byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(STARCODER2), behavior="isolated"),
         bl(add_prefix_space=False, use_regex=False)]))
    yield "digits_contiguous_punctuation", byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=False),
         pre_tokenizers.Punctuation(behavior="isolated"), bl(add_prefix_space=True)]))
    yield "split_behaviors", byte_level(pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[,.;:!?]"), behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"\d+"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="isolated", invert=True),
        pre_tokenizers.Punctuation(behavior="merged_with_next"),
        bl(add_prefix_space=False, use_regex=False)]))
    yield "nfkc_lowercase_strip_whitespace", byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), bl(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.Sequence([
            normalizers.NFKC(), normalizers.Lowercase(),
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(r"\s+"), " ")]))
    yield "nfd_stripaccents_whitespacesplit", byte_level(pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.CharDelimiterSplit("-"),
         bl(add_prefix_space=True, use_regex=True)]),
        normalizer=normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]))
    yield "nfkd_bytelevel", byte_level(bl(add_prefix_space=False, use_regex=True),
                                       normalizer=normalizers.NFKD())
    yield "metaspace_first", spm_like(True)
    yield "llama2_normalizer", spm_like(False)
    # Added tokens with every option, on a GPT-2 style tokenizer.
    tok = byte_level(bl(add_prefix_space=False, use_regex=True),
                     special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.add_special_tokens([tokenizers.AddedToken("[MASK]", lstrip=True, rstrip=False,
                                                  single_word=True, normalized=False)])
    tok.add_tokens([tokenizers.AddedToken("<tag>", rstrip=True, normalized=True),
                    tokenizers.AddedToken("word", single_word=True, normalized=True)])
    yield "added_tokens", tok


def main():
    os.makedirs(os.path.join(OUT, "hf"), exist_ok=True)
    result = {"tokenizers_version": tokenizers.__version__,
              "command": "python3 tests/reference/make_tokenizer_fixtures.py",
              "texts": VARIED, "tokenizers": {}}
    for name, tok in configs():
        path = os.path.join(OUT, "hf", name + ".json")
        tok.save(path, pretty=False)
        tok = Tokenizer.from_file(path)
        result["tokenizers"][name] = {
            "ids": [tok.encode(t, add_special_tokens=False).ids for t in VARIED],
            "ids_special": [tok.encode(t, add_special_tokens=True).ids for t in VARIED],
        }
        print(name, tok.get_vocab_size(), os.path.getsize(path), file=sys.stderr)
    with open(os.path.join(OUT, "hf.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=0)
        f.write("\n")


if __name__ == "__main__":
    main()
