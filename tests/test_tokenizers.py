"""Tokenizers: llama2.c's tokenizer.bin encoder must agree with SentencePiece on Llama 2's vocab."""
from __future__ import annotations

import random
import struct
import sys
import unicodedata

import pytest

from llamarun.errors import LlamarunError
from llamarun.tokenizers import Llama2cTokenizer, SentencePieceTokenizer, load_tokenizer
from llamarun.tokenizers.llama2c import split_code_points

from conftest import MODELS, require

TOKENIZER_BIN = MODELS / "tokenizer.bin"
TOKENIZER_MODEL = MODELS / "tokenizer.model"


def require_shared() -> None:
    require(TOKENIZER_BIN)
    require(TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def bin_tok() -> Llama2cTokenizer:
    require_shared()
    return Llama2cTokenizer.from_file(TOKENIZER_BIN)


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    require_shared()
    return SentencePieceTokenizer.from_file(TOKENIZER_MODEL)


# ------------------------------------------------------------------------------------------------
# the strings: hand-picked cases per category, then seeded random mixes of them

PROSE = [
    "Hello world", "Hello, world!", "Once upon a time", "Once upon a time, a little girl named Lily",
    "In the park, there was a big tree.", "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's not butter!", "She said: \"Don't go.\"", "What's up? Nothing much...",
    "A", "a", "I", "hello", "HELLO", "hElLo WoRlD", "antidisestablishmentarianism",
    "Supercalifragilisticexpialidocious", "The end.", "Tom and Sam were friends. They liked to play.",
    "e-mail, co-operate, well-known", "U.S.A. vs. U.K.", "Mr. Smith went to Washington",
]
PUNCTUATION = [
    "!", "?!", "...", "\u2026", "--", "\u2014 em dash \u2013 en dash", "(parens) [brackets] {braces}",
    "a,b;c:d", "'single' \"double\"", "\u201csmart quotes\u201d \u2018too\u2019", "#hashtag @mention",
    "100% & more", "~`^|\\", "<s>", "</s>", "<unk>", "<0x0A>", "<0xFF> <0x00>", "\n<s>\n", "<<>>",
    "\u00bfQu\u00e9? \u00a1S\u00ed!", "\u00ab guillemets \u00bb",
]
ACCENTS = [
    "caf\u00e9", "cafe\u0301", "\u00e9", "e\u0301", "na\u00efve", "nai\u0308ve", "se\u00f1or", "sen\u0303or",
    "\u00fcber", "u\u0308ber", "Z\u00fcrich", "fa\u00e7ade", "cr\u00e8me br\u00fbl\u00e9e",
    "\u00c5ngstr\u00f6m", "A\u030angstro\u0308m", "\u0141\u00f3d\u017a", "\u0159\u00edzek", "\u00f8re",
    "Stra\u00dfe", "\u1e9e", "\u0130stanbul", "\u0131", "\u01c5", "\u0041\u0300\u0301\u0302",
]
COMPATIBILITY = [  # forms NFKC would change: the Llama 2 model's identity normalizer must not
    "\ufb01", "\ufb01nance", "\ufb02ow", "\uff28\uff45\uff4c\uff4c\uff4f", "\uff11\uff12\uff13",
    "\u2460", "\u2460\u2461\u2462", "\u2122", "Brand\u2122", "\u00bd", "x\u00b2 + y\u00b3",
    "\u2163", "\u3392", "\u33a1", "\u00a0non-breaking\u00a0space", "\u2002en space", "\u3000ideographic",
    "\u2126", "\u212b", "\u1d2c", "\ufe57", "\uff61", "\u32a4",
]
SCRIPTS = [
    "\u65e5\u672c\u8a9e", "\u6211\u7231\u4f60", "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u6f22\u5b57",
    "\u3053\u3093\u306b\u3061\u306f", "\u30ab\u30bf\u30ab\u30ca", "\u9f98", "\u7228",
    "\uc548\ub155\ud558\uc138\uc694", "\ud55c\uad6d\uc5b4", "\u1100\u1161\u11a8",  # Hangul, and as jamo
    "\u0645\u0631\u062d\u0628\u0627", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0939\u093f\u0928\u094d\u0926\u0940",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "\u05e9\u05dc\u05d5\u05dd", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\u1200\u120b",
    "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0", "\u0532\u0561\u0580\u0565\u0582",
    "Ti\u1ebfng Vi\u1ec7t", "\u0baa\u0bbe\u0bb0\u0ba4\u0bae\u0bcd",
]
EMOJI = [
    "\U0001f600", "\U0001f44d", "\U0001f44d\U0001f3fd", "\U0001f44b\U0001f3ff hi",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f468\u200d\U0001f4bb",
    "\U0001f1eb\U0001f1f7", "\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1f8", "\u2764\ufe0f", "\u2764",
    "\U0001f3f3\ufe0f\u200d\U0001f308", "I \u2764\ufe0f NY", "\U0001f525\U0001f525\U0001f525",
    "\U0001f937\u200d\u2642\ufe0f", "1\ufe0f\u20e3", "\U0001f9d1\U0001f3fe\u200d\U0001f91d\u200d\U0001f9d1\U0001f3fb",
]
WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\r\n", " \n ", "a  b", "a   b", "a\tb", "a\n\nb", " leading",
    "  two leading", "trailing ", "trailing  ", "\ttab first", "line1\nline2\nline3", "\n\n\n",
    "        eight spaces", "mixed \t \n whitespace", "\u000b\u000c", "end\n",
]
NUMBERS = [
    "0", "1", "42", "3.14159", "-273.15", "1,000,000", "1e-9", "0x1F", "2024-01-01", "12:30",
    "$19.99", "\u20ac5", "\u00a3100", "10\u00b0C", "1/2", "99 bottles", "123456789012345678901234567890",
    "v1.2.3", "+1 (555) 123-4567", "\u0661\u0662\u0663", "\u0967\u0968\u0969",
]
CODE = [
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; i++) { sum += a[i]; }",
    "#include <stdio.h>\nint main() { printf(\"hi\\n\"); }", "SELECT * FROM users WHERE id = 1;",
    "<div class=\"x\">text</div>", "{\"key\": [1, 2, {\"a\": null}]}", "x => x ** 2",
    "if __name__ == \"__main__\":\n\tmain()", "$ ls -la | grep '.py'", "a != b && c <= d || !e",
    "// comment\n/* block */", "`backticks` and ```fences```", "import numpy as np\n\nnp.zeros((3, 4))",
    "git commit -m \"fix: typo\"", "https://example.com/path?q=1&r=2#frag", "user@example.com",
]
RARE = [  # code points that are not pieces: byte fallback
    "\x00", "a\x00b", "\x01\x02\x03", "\x7f", "\x1b[31mred\x1b[0m", "\u200b", "zero\u200bwidth", "\ufeffBOM",
    "\ue000", "\U000f0000", "\U0010fffd", "\U0001d400\U0001d401", "\U0001f9ff", "\u0378", "\ufffd",
    "\U00020000", "\U0002a6d6", "\u2028", "\u2029", "\U0001fa90", "\u0600", "\U00013000",
    "\U0001d11e music", "\u24b6\u24b7", "\u2603\u2604\u2605",
]
MIXED = [
    "Hello \u4e16\u754c \U0001f30d!", "caf\u00e9 \u2615 \u00e0 Paris \U0001f1eb\U0001f1f7",
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 and English", "\u6570\u5b57123\u3068\u6587\u5b57",
    "\ufb01le \u2460 caf\u00e9 \U0001f600\n\tend", "\u0645\u0631\u062d\u0628\u0627 hello \u05e9\u05dc\u05d5\u05dd",
    " \u00e9 ", "\n\u00e9\n", "a\u0301\u0302\u0303\u0304\u0305", "x" * 64, "ab" * 40, "\u00e9" * 17,
    "\U0001f600" * 5, "na " * 20, "  \u3000  \u00a0  ",
]

CATEGORIES = [PROSE, PUNCTUATION, ACCENTS, COMPATIBILITY, SCRIPTS, EMOJI, WHITESPACE, NUMBERS, CODE,
              RARE, MIXED]


def random_mixes(count: int, seed: int = 1234) -> list[str]:
    """Random concatenations of 2-5 fragments from all categories, with random separators."""
    rng = random.Random(seed)
    fragments = [s for category in CATEGORIES for s in category]
    separators = ["", " ", "  ", "\n", "\t", ", ", ". ", " - ", "\u3001"]
    mixes = []
    for _ in range(count):
        parts = rng.sample(fragments, rng.randint(2, 5))
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(separators) + part
        mixes.append(text)
    return mixes


def random_code_points(count: int, seed: int = 99) -> list[str]:
    """Short strings of code points drawn from across Unicode, with ASCII letters and spaces."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x600, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    strings = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 12)):
            lo, hi = rng.choice(ranges)
            c = rng.randint(lo, hi)
            if 0xD800 <= c <= 0xDFFF:          # surrogates are not text
                c = 0x41
            chars.append(chr(c))
        strings.append("".join(chars))
    return strings


def unicode_forms(strings: list[str]) -> list[str]:
    """The NFD and NFKC forms of the strings that have them: SentencePiece must not normalize."""
    forms = []
    for s in strings:
        for form in ("NFD", "NFKC"):
            t = unicodedata.normalize(form, s)
            if t != s:
                forms.append(t)
    return forms


HAND_PICKED = [s for category in CATEGORIES for s in category]
TEXTS = list(dict.fromkeys(HAND_PICKED + unicode_forms(ACCENTS + COMPATIBILITY + SCRIPTS)
                           + random_mixes(120) + random_code_points(80)))


def test_there_are_enough_distinct_texts():
    assert len(TEXTS) >= 200, len(TEXTS)


# ------------------------------------------------------------------------------------------------
# tokenizer.bin (run.c's algorithm) == SentencePiece, exactly


def test_encode_matches_sentencepiece(bin_tok, sp_tok):
    mismatches = []
    for text in TEXTS:
        expected = [1] + sp_tok.sp.EncodeAsIds(text)
        got = bin_tok.encode(text)
        if got != expected:
            mismatches.append((text, got, expected))
    assert not mismatches, f"{len(mismatches)} of {len(TEXTS)} differ, first: {mismatches[0]!r}"


def test_encode_matches_sentencepiece_without_bos(bin_tok, sp_tok):
    for text in TEXTS[:50]:
        assert bin_tok.encode(text, bos=False) == sp_tok.sp.EncodeAsIds(text), text
        assert sp_tok.encode(text, bos=False) == sp_tok.sp.EncodeAsIds(text)


def run_c_merge(tok: Llama2cTokenizer, tokens: list[int]) -> list[int]:
    """run.c's merge loop, transcribed literally: rescan every pair, merge the best, repeat."""
    tokens = list(tokens)
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = tok.piece_to_id.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]])
            if merged is not None and tok.scores[merged] > best_score:
                best_score, best_id, best_idx = tok.scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


def test_heap_merge_equals_run_c_loop(bin_tok):
    for text in TEXTS[::3] + ["aaaaaaaaaa", "    ", "ab" * 30]:
        start = [1] + bin_tok.code_point_tokens(b" ")
        for cp in split_code_points(text.encode()):
            start += bin_tok.code_point_tokens(cp)
        assert bin_tok.merge_pairs(start) == run_c_merge(bin_tok, start), text


def test_golden_prompts(bin_tok):
    # prompt_tokens recorded from llama2.c's run.c
    assert bin_tok.encode("In the park, there was") == [1, 512, 278, 14089, 29892, 727, 471]
    assert bin_tok.encode("Hello world") == [1, 15043, 3186]
    assert bin_tok.encode("Once upon a time, a little") == [1, 9038, 2501, 263, 931, 29892, 263, 2217]


def test_long_text_is_fast_and_exact(bin_tok, sp_tok):
    text = " ".join(TEXTS) * 3
    assert bin_tok.encode(text) == sp_tok.encode(text)


# ------------------------------------------------------------------------------------------------
# flags, special tokens, decoding


def test_bos_eos_flags(bin_tok, sp_tok):
    for tok in (bin_tok, sp_tok):
        body = tok.encode("Hello", bos=False)
        assert body == [15043]
        assert tok.encode("Hello") == [1, 15043]
        assert tok.encode("Hello", bos=True, eos=True) == [1, 15043, 2]
        assert tok.encode("Hello", bos=False, eos=True) == [15043, 2]
        assert (tok.bos_id, tok.eos_id, tok.eog_ids, tok.vocab_size) == (1, 2, frozenset({2}), 32000)


def test_empty_and_space_strings(bin_tok, sp_tok):
    for tok in (bin_tok, sp_tok):
        assert tok.encode("") == [1]
        assert tok.encode("", bos=False) == []
        assert tok.encode("", eos=True) == [1, 2]
        assert tok.encode(" ") == [1, 259]        # dummy prefix + the space: "▁▁"
        assert tok.decode(tok.encode(" ")) == " "


def test_decode_round_trip(bin_tok, sp_tok):
    for text in TEXTS:
        ids = bin_tok.encode(text)
        assert bin_tok.decode(ids) == text
        assert sp_tok.decode(ids) == text
        # SentencePiece's own decode drops the dummy prefix too
        assert sp_tok.sp.DecodeIds(ids) == text


def test_token_bytes_agree_between_the_two_tokenizers(bin_tok, sp_tok):
    for token in range(0, 32000, 7):
        for prev in (None, 1, 2, 3186):
            if token == 0:
                continue                          # <unk>: run.c prints "<unk>", SentencePiece " ⁇ "
            assert bin_tok.token_bytes(token, prev) == sp_tok.token_bytes(token, prev), (token, prev)


def test_token_bytes(bin_tok, sp_tok):
    for tok in (bin_tok, sp_tok):
        assert tok.token_bytes(13) == b"\n"                       # <0x0A>
        assert tok.token_bytes(3) == b"\x00"                      # <0x00>
        assert tok.token_bytes(258) == b"\xff"                    # <0xFF>
        assert tok.token_bytes(13, prev=1) == b"\n"
        assert tok.token_bytes(35, prev=1) == b" "                # <0x20> is a real space: kept
        assert tok.token_bytes(3186) == b" world"                 # "▁world"
        assert tok.token_bytes(3186, prev=1) == b"world"          # dummy prefix dropped after BOS
        assert tok.token_bytes(3186, prev=2) == b" world"
        assert tok.token_bytes(1) == b"" and tok.token_bytes(2) == b""
        assert tok.token_bytes(29871, prev=1) == b""              # "▁" alone after BOS
        assert tok.token_bytes(259, prev=1) == b" "               # "▁▁" after BOS
    assert bin_tok.token_bytes(0) == b"<unk>"
    assert sp_tok.token_bytes(0) == sp_tok.token_bytes(0, prev=1) == " \u2047 ".encode()
    assert sp_tok.decode([1, 0]) == sp_tok.sp.DecodeIds([1, 0])


def test_decode_split_multibyte_character(bin_tok):
    ids = bin_tok.encode("\U0001f9ff", bos=False)                # byte fallback: 4 byte tokens
    assert ids == [29871] + [b + 3 for b in "\U0001f9ff".encode()]
    assert b"".join(bin_tok.token_bytes(t) for t in ids) == " \U0001f9ff".encode()
    assert bin_tok.decode(ids) == " \U0001f9ff"                   # no BOS: the space stays
    assert bin_tok.decode(ids[:3]) == " \ufffd"                   # a cut character is replaced


def test_split_code_points_like_run_c():
    assert split_code_points("a\u00e9\u4e16\U0001f600".encode()) == [b"a", "\u00e9".encode(),
                                                                    "\u4e16".encode(), "\U0001f600".encode()]
    assert split_code_points(b"\x80a") == [b"\x80", b"a"]                 # stray continuation byte
    assert split_code_points(b"\xf0" + b"\x80" * 5) == [b"\xf0\x80\x80\x80", b"\x80\x80"]  # cut at 4


def test_invalid_utf8_from_argv_falls_back_to_bytes(bin_tok):
    text = b"a\xffb".decode("utf-8", errors="surrogateescape")      # how Python passes such argv
    assert bin_tok.encode(text, bos=False) == [263, 0xFF + 3, 29890]


# ------------------------------------------------------------------------------------------------
# loading


def test_load_tokenizer_picks_by_extension_and_content(tmp_path):
    require_shared()
    assert isinstance(load_tokenizer(TOKENIZER_BIN), Llama2cTokenizer)
    assert isinstance(load_tokenizer(TOKENIZER_MODEL, vocab_size=32000), SentencePieceTokenizer)
    renamed = tmp_path / "tokenizer.spm"                           # a .model under another name
    renamed.write_bytes(TOKENIZER_MODEL.read_bytes())
    assert isinstance(load_tokenizer(renamed), SentencePieceTokenizer)


def test_vocab_size_mismatch(tmp_path):
    require_shared()
    for path in (TOKENIZER_BIN, TOKENIZER_MODEL):
        with pytest.raises(LlamarunError, match=r"has 32000 tokens but the model's vocabulary has 512.*-z PATH"):
            load_tokenizer(path, vocab_size=512)


def test_missing_file(tmp_path):
    for name in ("nope.bin", "nope.model"):
        with pytest.raises(LlamarunError, match="does not exist"):
            load_tokenizer(tmp_path / name)
    with pytest.raises(LlamarunError, match="directory"):
        load_tokenizer(tmp_path)


def test_missing_sentencepiece_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)        # makes `import sentencepiece` fail
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\x05hello")
    with pytest.raises(LlamarunError, match="pip install sentencepiece"):
        load_tokenizer(path)


def test_truncated_tokenizer_bin(tmp_path):
    require_shared()
    data = TOKENIZER_BIN.read_bytes()
    for cut in (0, 3, 4 + 5, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut])
        with pytest.raises(LlamarunError, match=str(path)):
            load_tokenizer(path)


def test_garbage_tokenizer_files(tmp_path):
    cases = {
        "negative_len.bin": struct.pack("<ifi", 8, 0.0, -1),
        "bad_header.bin": struct.pack("<i", -5) + b"x" * 20,
        "text.bin": b"this is not a tokenizer at all, just some text\n",
        "proto_like.bin": b"\x0a\x05hello world, not a protobuf",
        "garbage.model": b"\x00\x01\x02 not a protobuf",
        "empty.model": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(LlamarunError, match=str(path)):
            load_tokenizer(path)


def test_small_handmade_tokenizer_bin(tmp_path):
    """A tiny vocab written in the tokenizer.bin format: the reader, byte fallback and merges."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [b" ", b"a", b"b", b"ab", b" ab", b"aa"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -4.0]
    blob = struct.pack("<i", max(map(len, pieces)))
    for piece, score in zip(pieces, scores):
        blob += struct.pack("<fi", score, len(piece)) + piece
    path = tmp_path / "tiny.bin"
    path.write_bytes(blob)
    tok = load_tokenizer(path, vocab_size=len(pieces))
    ids = {p: i for i, p in enumerate(pieces)}
    # " aab": "ab" (-4) ties "aa" (-4): the leftmost pair "aa" wins, then nothing else merges
    assert tok.encode("aab", bos=False) == [ids[b" "], ids[b"aa"], ids[b"b"]]
    # " ab": "ab" (-4) first, then " ab" (-5)
    assert tok.encode("ab") == [1, ids[b" ab"]]
    assert tok.encode("c", bos=False) == [ids[b" "], ord("c") + 3]
    assert tok.decode([1, ids[b" ab"], ord("!") + 3]) == "ab!"
