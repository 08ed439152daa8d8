"""Tokenizers built from GGUF metadata: the real SmolLM2 GGUF against Hugging Face's ids, synthetic
byte-level vocabularies against `tokenizers`' own pre-tokenizers, and a SentencePiece-style vocabulary
(Llama 2's, written as GGUF metadata) against the sentencepiece package."""
from __future__ import annotations

import json

import pytest
import tokenizers as tk

from llamarun.errors import LlamarunError
from llamarun.tokenizers import tokenizer_from_gguf
from llamarun.tokenizers.gguf import (CONTROL, USER_DEFINED, GGUFBpeTokenizer, GGUFSpmTokenizer,
                                      bytes_to_unicode)

from conftest import GOLDEN, MODELS, require


SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GOLDEN = GOLDEN / "smollm2"

# Written out here rather than imported, so that a typo in the module's copy shows.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# ------------------------------------------------------------------------------------------------
# SmolLM2: the real GGUF


@pytest.fixture(scope="module")
def smol_meta(smol_checkpoint) -> dict:
    # our reader's metadata equals gguf.GGUFReader's (tests/test_gguf_format.py) and opens in ms
    return smol_checkpoint.metadata


@pytest.fixture(scope="module")
def smol(smol_meta) -> GGUFBpeTokenizer:
    return tokenizer_from_gguf(smol_meta)


def smol_cases(name: str) -> list[dict]:
    return json.loads(require(SMOL_GOLDEN / name).read_text())


def test_smol_metadata_is_what_the_tests_assume(smol_meta, smol):
    assert smol_meta["tokenizer.ggml.model"] == "gpt2" and smol_meta["tokenizer.ggml.pre"] == "smollm"
    assert isinstance(smol, GGUFBpeTokenizer)
    assert (smol.vocab_size, smol.bos_id, smol.eos_id) == (49152, 1, 2)


def test_smol_tokenizer_cases(smol):
    # Hugging Face's tokenizer of SmolLM2 with add_special_tokens=False
    for case in smol_cases("smol_tok.json"):
        assert smol.encode(case["s"], bos=False) == case["ids"], case["s"]


def test_smol_prompts_with_the_default_bos_flag(smol):
    # add_bos_token is False for SmolLM2: the chat prompt's first id 1 is the <|im_start|> in the text
    cases = [case for case in smol_cases("smol_hf.json") if case.get("text") is not None]
    assert len(cases) == 3
    for case in cases:
        assert smol.encode(case["text"]) == case["ids"], case["text"]
        assert smol.encode(case["text"], bos=True) == [1] + case["ids"]
    assert smol.encode(cases[2]["text"])[0] == 1


def test_smol_decode_round_trips(smol):
    for case in smol_cases("smol_tok.json"):
        assert smol.decode(case["ids"]) == case["s"]
    for case in smol_cases("smol_hf.json"):
        assert smol.decode(case["ids"]) == case["text"]
        assert smol.decode(case["greedy"]) == case["greedy_text"]   # ends in a literal <|im_end|>
        # the same as Hugging Face's own ByteLevel decoder, special tokens kept
        assert smol.hf.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_smol_token_bytes_of_a_character_split_over_tokens(smol):
    text = "caf\u00e9 \u00fcn\u00efc\u00f6d\u00e9 \U0001f999"
    ids = smol.encode(text, bos=False)
    pieces = [smol.token_bytes(t) for t in ids]
    assert b"".join(pieces) == text.encode()
    # Hugging Face's ids end [15107, 116, 243]: " \xf0\x9f", "\xa6", "\x99" (🦙 is F0 9F A6 99)
    assert ids[-3:] == [15107, 116, 243]
    assert pieces[-3:] == [b" \xf0\x9f", b"\xa6", b"\x99"]
    for piece in pieces[-3:]:
        with pytest.raises(UnicodeDecodeError):
            piece.decode("utf-8")                          # a piece of the character, not all of it
    assert smol.decode(ids[:-1]).endswith("\ufffd")       # a cut character is replaced


def test_smol_special_tokens(smol):
    assert smol.encode("<|im_end|>", bos=False) == [2]
    assert smol.encode("<|im_start|>user\nHi<|im_end|>", bos=False)[0] == 1
    assert smol.token_bytes(2) == b"<|im_end|>"           # control tokens print as written
    assert smol.token_bytes(1, prev=2) == b"<|im_start|>"
    assert smol.token_bytes(198) == b"\n"                 # 'Ċ'
    assert smol.decode([19556, 905]) == "Hello world"
    assert 2 in smol.eog_ids and 0 in smol.eog_ids        # <|im_end|> (EOS) and <|endoftext|>
    assert 1 not in smol.eog_ids


def test_smol_bos_eos_flags(smol):
    assert smol.encode("Hello world") == [19556, 905]
    assert smol.encode("Hello world", bos=True) == [1, 19556, 905]
    assert smol.encode("Hello world", bos=False, eos=True) == [19556, 905, 2]
    assert smol.encode("") == []


def test_smol_pre_tokenizer_splits_digits_before_gpt2s_regex(smol):
    # llama.cpp's smollm: "\p{N}" first, GPT-2's regex after, on what is left between the digits.
    # GPT-2's regex alone would give "a", " ", " 1"; with the digits cut out first, "a  " splits
    # into "a" and "  ", which merge into "ĠĠ".
    words = [w for w, _ in smol.hf.pre_tokenizer.pre_tokenize_str("a  1")]
    assert words == ["a", "\u0120\u0120", "1"]
    assert [smol.decode([t]) for t in smol.encode("a  12", bos=False)] == ["a", "  ", "1", "2"]


def test_smol_invalid_unicode_does_not_crash(smol):
    ids = smol.encode("a\udcff", bos=False)                # a non-UTF-8 argv byte, surrogate-escaped
    assert smol.decode(ids) == "a\ufffd"


# ------------------------------------------------------------------------------------------------
# byte-level BPE on a small synthetic vocabulary, per pre-tokenizer

BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
SYNTHETIC_SPECIALS = [("<|begin_of_text|>", CONTROL), ("<|eot_id|>", CONTROL), ("<tool>", USER_DEFINED)]
SYNTHETIC_MERGES = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he"), ("i", "n"), ("\u0120", "a"),
                    ("1", "2"), ("12", "3"), ("\u0120", "\u0120"), ("\u010a", "\u010a"), ("'", "s"),
                    ("\u0120", "1"), ("\u0120a", "n"), ("t", "h")]
# "Ġcat" has no merges that build it: only Llama 3's ignore_merges takes the word " cat" whole.
SYNTHETIC_WORDS = ["\u0120cat"]

PRE_TOKENIZER_TEXTS = [
    "Hello world", "The cat's hat", "DON'T SHOUT, I'M HERE", "they'll've we'd", "  two leading spaces",
    "trailing   ", "line one\nline two\n\n", "a\r\nb", "\n\n\n  x", "tabs\tand\t\tmore",
    "12345678", "1234 + 5678 = 6912", "x1y22z333w4444", "3.14159 and 2,718", "$19.99!!!\n",
    "caf\u00e9 \u00fcn\u00efc\u00f6d\u00e9", "\U0001f999 llama \U0001f600\U0001f600", "\u65e5\u672c\u8a9e\u306e\u6587",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!", "def f(x):\n    return x ** 2\n",
    "<div class=\"x\">text</div>", "a  1", "  \n  ", "?!?! ...", "e-mail: user@example.com",
    "in the thin then", " an ant", "it's 123 o'clock", "\u00a0nbsp\u3000ideographic", "",
    "ab<|eot_id|>cd", "<|begin_of_text|>Hi <tool> there<|eot_id|>",
]


def reference_pre_tokenizer(name: str):
    """The pre-tokenizers the tokenizers library's own tokenizer.json files use for each name."""
    pt = tk.pre_tokenizers
    if name in ("gpt2", "gpt-2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    if name == "llama-bpe":
        return pt.Sequence([pt.Split(tk.Regex(LLAMA3_REGEX), "isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise AssertionError(name)


def synthetic_meta(pre: str, **extra) -> dict:
    merged = ["".join(pair) for pair in SYNTHETIC_MERGES]
    tokens = [text for text, _ in SYNTHETIC_SPECIALS] + BYTE_CHARS + merged + SYNTHETIC_WORDS
    types = [kind for _, kind in SYNTHETIC_SPECIALS] + [1] * (len(tokens) - len(SYNTHETIC_SPECIALS))
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in SYNTHETIC_MERGES],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(extra)
    return meta


def reference_tokenizer(meta: dict):
    """A tokenizers.Tokenizer assembled here, independently of llamarun."""
    vocab = {text: i for i, text in enumerate(meta["tokenizer.ggml.tokens"])}
    llama3 = meta["tokenizer.ggml.pre"] == "llama-bpe"
    hf = tk.Tokenizer(tk.models.BPE(vocab, SYNTHETIC_MERGES, ignore_merges=llama3))
    hf.pre_tokenizer = reference_pre_tokenizer(meta["tokenizer.ggml.pre"])
    hf.add_special_tokens([tk.AddedToken(text, special=True, normalized=False) for text, _ in SYNTHETIC_SPECIALS])
    return hf


@pytest.mark.parametrize("pre", ["gpt2", "gpt-2", "llama-bpe", "smollm"])
def test_pre_tokenizer_splits_like_the_reference(pre):
    ours = tokenizer_from_gguf(synthetic_meta(pre)).hf.pre_tokenizer
    reference = reference_pre_tokenizer(pre)
    for text in PRE_TOKENIZER_TEXTS:
        assert ours.pre_tokenize_str(text) == reference.pre_tokenize_str(text), text


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_pre_tokenizer_splits_like_llama_cpps_regex(pre):
    # llama.cpp's own regexes, run by the `regex` package: an independent check of the splits
    import regex
    pattern = {
        "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        # llama.cpp spells the case-insensitive contractions out
        "llama-bpe": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                     r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }[pre]
    tok = tokenizer_from_gguf(synthetic_meta(pre))
    to_byte = {c: b for b, c in enumerate(BYTE_CHARS)}
    for text in PRE_TOKENIZER_TEXTS:
        words = [bytes(to_byte[c] for c in w).decode() for w, _ in tok.hf.pre_tokenizer.pre_tokenize_str(text)]
        assert words == regex.findall(pattern, text), text


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "smollm"])
def test_synthetic_encode_matches_a_reference_tokenizer(pre):
    meta = synthetic_meta(pre)
    tok = tokenizer_from_gguf(meta)
    reference = reference_tokenizer(meta)
    for text in PRE_TOKENIZER_TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text                         # byte-level BPE loses nothing


def test_synthetic_merges_and_ignore_merges():
    gpt2 = tokenizer_from_gguf(synthetic_meta("gpt2"))
    llama3 = tokenizer_from_gguf(synthetic_meta("llama-bpe"))
    tokens = synthetic_meta("gpt2")["tokenizer.ggml.tokens"]
    the, cat = tokens.index("\u0120the"), tokens.index("\u0120cat")
    assert gpt2.encode(" the", bos=False) == [the]
    assert cat not in gpt2.encode(" cat", bos=False)            # no merges lead to it
    assert llama3.encode(" cat", bos=False) == [cat]            # Llama 3 takes a whole-word token
    assert llama3.encode("<|eot_id|>", bos=False) == [1]
    assert gpt2.encode("x<tool>y", bos=False)[1] == 2           # user-defined: also one token


def test_synthetic_bos_default_and_eog():
    assert tokenizer_from_gguf(synthetic_meta("gpt2")).encode("a") == [BYTE_CHARS.index("a") + 3]
    llama3 = tokenizer_from_gguf(synthetic_meta("llama-bpe"))  # llama.cpp: Llama 3 adds BOS
    assert llama3.encode("a")[0] == 0
    assert tokenizer_from_gguf(synthetic_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})
                               ).encode("a")[0] != 0
    assert llama3.eog_ids == frozenset({1})                    # EOS, which is also <|eot_id|>
    eot = tokenizer_from_gguf(synthetic_meta("gpt2", **{"tokenizer.ggml.eos_token_id": 0,
                                                        "tokenizer.ggml.eot_token_id": 2}))
    assert eot.eog_ids == frozenset({0, 1, 2})                 # EOS, eot_token_id, <|eot_id|> by text


def test_unknown_pre_tokenizer():
    with pytest.raises(LlamarunError, match=r"'qwen2'.*smollm"):
        tokenizer_from_gguf(synthetic_meta("qwen2"))
    with pytest.raises(LlamarunError, match="no pre-tokenizer.*llama-bpe"):
        tokenizer_from_gguf({k: v for k, v in synthetic_meta("gpt2").items() if k != "tokenizer.ggml.pre"})


def test_bad_metadata():
    with pytest.raises(LlamarunError, match="'bert'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(LlamarunError, match="no tokenizer"):
        tokenizer_from_gguf({})
    with pytest.raises(LlamarunError, match="no tokens"):
        tokenizer_from_gguf({**synthetic_meta("gpt2"), "tokenizer.ggml.tokens": []})
    with pytest.raises(LlamarunError, match="merges"):
        tokenizer_from_gguf({k: v for k, v in synthetic_meta("gpt2").items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(LlamarunError, match="token types"):
        tokenizer_from_gguf({**synthetic_meta("gpt2"), "tokenizer.ggml.token_type": [1]})


# ------------------------------------------------------------------------------------------------
# llama (SentencePiece-style): Llama 2's vocabulary written as GGUF metadata

SPM_TEXTS = [
    "Hello world", "Hello, world!", "Once upon a time", "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's not butter!", "A", "a", "hElLo WoRlD", "antidisestablishmentarianism",
    " leading", "  two leading", "trailing ", "a  b", "a\tb", "a\n\nb", "\n", " ", "   ", "",
    "line1\nline2\nline3", "caf\u00e9", "cafe\u0301", "na\u00efve", "Stra\u00dfe", "\u0130stanbul",
    "\ufb01nance", "\uff28\uff45\uff4c\uff4c\uff4f", "\u00bd", "\u65e5\u672c\u8a9e", "\u4f60\u597d\uff0c\u4e16\u754c\uff01",
    "\uc548\ub155\ud558\uc138\uc694", "\u0645\u0631\u062d\u0628\u0627", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\U0001f600", "\U0001f999 llama", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\u2764\ufe0f",
    "3.14159", "1,000,000", "123456789012345678901234567890", "$19.99", "\x00", "a\x00b", "\x1b[31mred\x1b[0m",
    "\U0010fffd", "\ue000", "def f(x):\n    return x * 2\n", "{\"key\": [1, 2, {\"a\": null}]}",
    "https://example.com/path?q=1&r=2#frag", "Hello \u4e16\u754c \U0001f30d!", "ab" * 40, "na " * 20,
    "<0x0A>", "<<>>", "\u2581already a space symbol",
]


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor()
    processor.Load(str(require(MODELS / "tokenizer.model")))
    return processor


def spm_meta(sp) -> dict:
    n = sp.GetPieceSize()

    def token_type(i: int) -> int:
        return 2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 5 if sp.IsUnused(i) else 1

    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }


@pytest.fixture(scope="module")
def spm_tok(sp) -> GGUFSpmTokenizer:
    return tokenizer_from_gguf(spm_meta(sp))


def test_spm_encode_matches_sentencepiece(spm_tok, sp):
    assert isinstance(spm_tok, GGUFSpmTokenizer) and len(SPM_TEXTS) >= 50
    for text in SPM_TEXTS:
        assert spm_tok.encode(text, bos=False) == sp.EncodeAsIds(text), text
        assert spm_tok.encode(text) == [1] + sp.EncodeAsIds(text)   # add_bos_token: BOS by default
    long = " ".join(SPM_TEXTS) * 3
    assert spm_tok.encode(long) == [1] + sp.EncodeAsIds(long)


def test_spm_decode_round_trips(spm_tok, sp):
    for text in SPM_TEXTS:
        ids = spm_tok.encode(text)
        assert spm_tok.decode(ids) == sp.DecodeIds(ids)
        if "\u2581" not in text:                                   # '▁' in the text reads as a space
            assert spm_tok.decode(ids) == text, text


def test_spm_special_tokens_and_token_bytes(spm_tok):
    assert (spm_tok.vocab_size, spm_tok.bos_id, spm_tok.eos_id, spm_tok.eog_ids) == (32000, 1, 2, frozenset({2}))
    assert spm_tok.encode("Hello", bos=True, eos=True) == [1, 15043, 2]
    assert spm_tok.token_bytes(1) == b"" and spm_tok.token_bytes(2) == b""
    assert spm_tok.token_bytes(13) == b"\n"                      # <0x0A>
    assert spm_tok.token_bytes(3186) == b" world"                # "▁world"
    assert spm_tok.token_bytes(3186, prev=1) == b"world"         # dummy prefix dropped after BOS
    assert spm_tok.token_bytes(35, prev=1) == b" "               # <0x20>: a real space, kept
    assert spm_tok.token_bytes(0) == " \u2047 ".encode()         # <unk>, as SentencePieceTokenizer
    # Control tokens written in the text are those tokens (llama.cpp's parse_special), and the text
    # after one gets a dummy-prefix space, as in llama.cpp: "▁hi".
    assert spm_tok.encode("<s>hi</s>", bos=False) == [1, 7251, 2]
    ids = spm_tok.encode("\U0001f999", bos=False)                # byte fallback: 4 byte tokens
    assert [spm_tok.token_bytes(t) for t in ids[1:]] == [bytes([b]) for b in "\U0001f999".encode()]


def test_spm_user_defined_tokens_and_flags(sp):
    meta = spm_meta(sp)
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<|user|>"]
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"] + [0.0]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [USER_DEFINED]
    meta["tokenizer.ggml.add_bos_token"] = False
    meta["tokenizer.ggml.add_space_prefix"] = False
    tok = tokenizer_from_gguf(meta)
    assert tok.encode("Hello<|user|>world") == [10994, 32000, 11526]   # "Hello", <|user|>, "world"
    assert tok.token_bytes(32000) == b"<|user|>"
    assert tok.decode(tok.encode("Hi <|user|> there")) == "Hi <|user|> there"
    assert tok.encode("Hello", bos=True) == [1, 10994]
