"""Tokenizers stored in a GGUF file's metadata: `tokenizer_from_gguf(meta)`.

A GGUF file carries its tokenizer as `tokenizer.ggml.*` keys; `meta` maps those keys to plain Python
values. Two kinds are read, chosen by `tokenizer.ggml.model`:

- `gpt2`: byte-level BPE (SmolLM2, Llama 3, Qwen, ...): `tokens` and `merges`, with the text cut
  into words first by the pre-tokenizer named in `tokenizer.ggml.pre`. Built on Hugging Face
  `tokenizers`, which runs the merges; this module only assembles it the way llama.cpp reads the
  metadata.
- `llama`: SentencePiece-style BPE (Llama 2, Mistral, ...): `tokens` (with '▁' for a space),
  `scores` and byte-fallback tokens `<0xXX>`, encoded with run.c's merge-by-score loop
  (`Llama2cTokenizer.merge_pairs`).

Token types (`tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte. Control and user-defined tokens written in the text (`<|im_start|>`, `<s>`) are read as those
single tokens, as llama.cpp does for a prompt (its `parse_special`): chat templates rely on it.
`encode(text, special=False)` reads a control token's text as plain text instead (llama.cpp's
parse_special=false, Hugging Face's split_special_tokens): what a chat message's content needs, so
that typing "<|im_end|>" cannot end a turn. User-defined tokens are matched either way, as both do.

What a token prints (`token_bytes`), decided per kind:
- gpt2: a normal token's characters map back to raw bytes through GPT-2's byte<->unicode table; every
  control, unknown and user-defined token prints its own text (`<|im_end|>`), BOS and EOS included.
  That is what Hugging Face's decode gives with `skip_special_tokens=False` and llama.cpp with
  `--special`: the whole of a chat prompt decodes back to the text it came from. A generation loop
  that stops on `eog_ids` never prints the stop token anyway.
- llama: as `SentencePieceTokenizer` does for the same vocabulary: control tokens (`<s>`, `</s>`)
  print nothing, `<unk>` prints ' ⁇ ', a byte token is its byte, and the dummy-prefix space of the
  first piece after BOS is dropped.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

from llamarun.errors import LlamarunError
from llamarun.tokenizers.base import Tokenizer, decode_bytes
from llamarun.tokenizers.llama2c import Llama2cTokenizer, split_code_points
from llamarun.tokenizers.sentencepiece import SPACE_SYMBOL, UNKNOWN_SURFACE

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn. llama.cpp adds such tokens to its end-of-generation set by their
# text, because converted models rarely name them in eot_token_id; here only a control or
# user-defined token counts, so that a normal piece that happens to read "</s>" does not stop.
END_OF_TURN_TEXTS = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>", "<end_of_turn>",
    "</s>", "<|end|>", "<EOT>", "<end_of_utterance>",
})

# Llama 3's pre-tokenizer regex, as in its tokenizer.json (llama.cpp's `llama-bpe`).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return GGUFBpeTokenizer(meta)
    if model == "llama":
        return GGUFSpmTokenizer(meta)
    if model is None:
        raise LlamarunError("the GGUF file has no tokenizer (no tokenizer.ggml.model key): pass a "
                            "separate tokenizer file, or run with token ids only")
    raise LlamarunError(f"the GGUF file's tokenizer model {model!r} is not supported: llamarun reads "
                        f"'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers")


# ------------------------------------------------------------------------------------------------
# the metadata both kinds share


@dataclass
class GGUFVocab:
    """The `tokenizer.ggml.*` keys every tokenizer kind reads, checked and with llama.cpp's defaults."""
    tokens: list[str]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    def is_special(self, token: int) -> bool:
        """Control and user-defined tokens: read as one token wherever their text appears."""
        return self.types[token] in (CONTROL, USER_DEFINED)


def read_vocab(meta: dict, *, default_ids: dict[str, int | None], default_add_bos: bool,
               default_add_space_prefix: bool) -> GGUFVocab:
    """The shared keys of `meta`; a key that is absent takes the default llama.cpp gives it."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise LlamarunError("the GGUF file's tokenizer has no tokens (tokenizer.ggml.tokens): the file "
                            "is incomplete, convert the model again")
    tokens = [str(t) for t in tokens]
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if len(types) != len(tokens):
        raise LlamarunError(f"the GGUF file's tokenizer has {len(tokens)} tokens but {len(types)} token "
                            f"types: the file is corrupt, convert the model again")

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id", default_ids.get(name))
        # llama.cpp ignores an id outside the vocabulary (with a warning); so do we.
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    return GGUFVocab(
        tokens=tokens, types=types,
        bos_id=token_id("bos"), eos_id=token_id("eos"), unk_id=token_id("unknown"),
        eot_id=token_id("eot"), eom_id=token_id("eom"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", default_add_space_prefix)),
    )


def end_of_generation_ids(vocab: GGUFVocab) -> frozenset[int]:
    """EOS, the named end-of-turn/-message tokens, and the special tokens whose text ends a turn."""
    ids = {t for t in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if t is not None}
    ids.update(token for token, text in enumerate(vocab.tokens)
               if text in END_OF_TURN_TEXTS and vocab.is_special(token))
    return frozenset(ids)


def with_bos_eos(ids: list[int], vocab: GGUFVocab, bos: bool | None, eos: bool) -> list[int]:
    """`ids` with BOS in front (bos=None: the model's add_bos_token flag) and EOS behind, if asked."""
    if bos is None:
        bos = vocab.add_bos
    if bos and vocab.bos_id is not None:
        ids = [vocab.bos_id] + ids
    if eos and vocab.eos_id is not None:
        ids = ids + [vocab.eos_id]
    return ids



# ------------------------------------------------------------------------------------------------
# gpt2: byte-level BPE through Hugging Face tokenizers


@dataclass(frozen=True)
class PreTokenizerRecipe:
    """How llama.cpp treats one `tokenizer.ggml.pre` name."""
    build: Callable                  # (tokenizers.pre_tokenizers module, tokenizers.Regex) -> PreTokenizer
    ignore_merges: bool = False      # a word that is itself a token is taken whole, unmerged
    add_bos: bool = False            # llama.cpp's add_bos default when the GGUF does not say


def gpt2_words(pt, Regex):
    # GPT-2's own split: 's 't..., letters, numbers, other symbols, each with one leading space.
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)


def smollm_words(pt, Regex):
    # llama.cpp's `smollm` runs two regexes in turn: "\p{N}" (every digit a word of its own), then
    # GPT-2's. SmolLM2's tokenizer.json says the same as a Sequence of Digits(individual_digits)
    # and ByteLevel: "1234" is four tokens.
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, use_regex=True)])


def llama3_words(pt, Regex):
    # Llama 3 splits with its own regex (numbers in runs of up to 3 digits, case-insensitive
    # contractions), then maps bytes to characters without GPT-2's regex.
    return pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS: dict[str, PreTokenizerRecipe] = {
    "smollm": PreTokenizerRecipe(smollm_words),
    "gpt2": PreTokenizerRecipe(gpt2_words),
    "gpt-2": PreTokenizerRecipe(gpt2_words),            # the name llama.cpp's converter writes
    # llama.cpp: Llama 3's names set ignore_merges (as its tokenizer.json does) and add BOS by default.
    "llama-bpe": PreTokenizerRecipe(llama3_words, ignore_merges=True, add_bos=True),
    "llama3": PreTokenizerRecipe(llama3_words, ignore_merges=True, add_bos=True),
    "llama-v3": PreTokenizerRecipe(llama3_words, ignore_merges=True, add_bos=True),
}


def pre_tokenizer_recipe(meta: dict) -> PreTokenizerRecipe:
    name = meta.get("tokenizer.ggml.pre")
    recipe = PRE_TOKENIZERS.get(name)
    if recipe is None:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        what = "names no pre-tokenizer (tokenizer.ggml.pre)" if name is None else \
            f"uses the pre-tokenizer {name!r} (tokenizer.ggml.pre), which is not supported"
        raise LlamarunError(f"the GGUF file's byte-level BPE tokenizer {what}: llamarun supports {supported}")
    return recipe


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character that stands for it in the vocab.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD)
    take the characters from U+0100 on, in byte order: the space becomes 'Ġ', '\\n' becomes 'Ċ'.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def byte_level_bytes(token_text: str) -> bytes:
    """The raw bytes a byte-level token stands for. A character outside the table (a vocab that was
    not byte-level encoded) stands for its own UTF-8."""
    out = bytearray()
    for char in token_text:
        byte = UNICODE_TO_BYTE.get(char)
        out += bytes([byte]) if byte is not None else char.encode("utf-8")
    return bytes(out)


def import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise LlamarunError("this GGUF file's byte-level BPE tokenizer needs the tokenizers package: "
                            "pip install tokenizers") from None
    return tokenizers


def split_merge(merge: str) -> tuple[str, str]:
    """'Ġ t' -> ('Ġ', 't'). Search from the second character, as llama.cpp does, so that a first
    part that is itself a space is kept."""
    at = merge.find(" ", 1)
    if at < 0:
        raise LlamarunError(f"the GGUF file's tokenizer has a merge {merge!r} that is not two tokens "
                            f"separated by a space: the file is corrupt, convert the model again")
    return merge[:at], merge[at + 1:]


class GGUFBpeTokenizer:
    """A byte-level BPE tokenizer (`tokenizer.ggml.model` = gpt2) over Hugging Face `tokenizers`."""

    def __init__(self, meta: dict):
        recipe = pre_tokenizer_recipe(meta)
        self.pre = meta.get("tokenizer.ggml.pre")
        # gpt2's own defaults in llama.cpp are BOS = EOS = 11 (GPT-2's vocab); a real GGUF names them.
        self.vocab = read_vocab(meta, default_ids={}, default_add_bos=recipe.add_bos,
                                default_add_space_prefix=False)
        self.vocab_size = len(self.vocab.tokens)
        self.bos_id = self.vocab.bos_id
        self.eos_id = self.vocab.eos_id
        self.eog_ids = end_of_generation_ids(self.vocab)
        self.special_ids = special_token_ids(self.vocab)
        self.hf = self.build_hf_tokenizer(meta, recipe)
        # special=False is a switch on the one Hugging Face tokenizer (a second copy would cost ~40 MB):
        # encodes that set it take turns, so that threads sharing the model never see the other's mode
        self.hf_mode = threading.Lock()
        self.piece_bytes = [self.bytes_of(token) for token in range(self.vocab_size)]

    def build_hf_tokenizer(self, meta: dict, recipe: PreTokenizerRecipe):
        tk = import_tokenizers()
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise LlamarunError("the GGUF file's byte-level BPE tokenizer has no merges "
                                "(tokenizer.ggml.merges): the file is incomplete, convert the model again")
        vocab: dict[str, int] = {}
        for token, text in enumerate(self.vocab.tokens):
            vocab.setdefault(text, token)
        model = tk.models.BPE(vocab, [split_merge(m) for m in merges],
                              ignore_merges=recipe.ignore_merges)
        hf = tk.Tokenizer(model)
        hf.pre_tokenizer = recipe.build(tk.pre_tokenizers, tk.Regex)
        hf.decoder = tk.decoders.ByteLevel()
        # Special tokens are cut out of the text before pre-tokenization and keep their vocab ids;
        # `special` marks the control ones, which encode_special_tokens (special=False) leaves as text.
        hf.add_special_tokens([
            tk.AddedToken(text, special=self.vocab.types[token] == CONTROL, normalized=False)
            for text, token in self.special_ids.items()])
        return hf

    def bytes_of(self, token: int) -> bytes:
        kind = self.vocab.types[token]
        text = self.vocab.tokens[token]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")          # printed as written: see the module docstring
        if kind == NORMAL:
            return byte_level_bytes(text)
        return b""                               # unused (and byte, which byte-level BPE lacks)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = True) -> list[int]:
        """Text -> ids. `bos=None` follows the model's add_bos_token flag; True/False force it.
        special=False: control tokens' texts are plain text (Tokenizer.encode)."""
        with self.hf_mode:
            self.hf.encode_special_tokens = not special
            ids = self.hf.encode(valid_unicode(text), add_special_tokens=False).ids
        return with_bos_eos(ids, self.vocab, bos, eos)

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        return self.piece_bytes[token]           # byte-level BPE has no dummy prefix to drop

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(self, ids)


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (a command-line argument that was not UTF-8) replaced by U+FFFD:
    `tokenizers` takes only valid Unicode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)


# ------------------------------------------------------------------------------------------------
# llama: SentencePiece-style BPE with run.c's merge loop

NEVER_MERGES = b"\xff"     # the piece given to tokens that text must never merge into: no UTF-8 has 0xFF


class GGUFSpmTokenizer:
    """A SentencePiece-style tokenizer (`tokenizer.ggml.model` = llama) from pieces and scores."""

    def __init__(self, meta: dict):
        # llama.cpp's SPM defaults: <unk> 0, <s> 1, </s> 2, BOS added, dummy prefix on.
        self.vocab = read_vocab(meta, default_ids={"bos": 1, "eos": 2, "unknown": 0},
                                default_add_bos=True, default_add_space_prefix=True)
        vocab = self.vocab
        self.vocab_size = len(vocab.tokens)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.eog_ids = end_of_generation_ids(vocab)
        scores = meta.get("tokenizer.ggml.scores")
        scores = [0.0] * self.vocab_size if scores is None else [float(s) for s in scores]
        if len(scores) != self.vocab_size:
            raise LlamarunError(f"the GGUF file's tokenizer has {self.vocab_size} tokens but {len(scores)} "
                                f"scores: the file is corrupt, convert the model again")
        # run.c's merge loop over the normal pieces (with '▁' as the space it stands for). Every
        # other token gets a piece no text can build, as SentencePiece never merges into a control,
        # byte, user-defined or unused piece.
        merge_pieces = [text.replace(SPACE_SYMBOL, " ").encode("utf-8")
                        if vocab.types[token] == NORMAL and text else NEVER_MERGES
                        for token, text in enumerate(vocab.tokens)]
        self.merger = Llama2cTokenizer(merge_pieces, scores)
        self.byte_ids = self.byte_token_ids()
        self.special_ids = special_token_ids(vocab)
        self.special_pattern = special_token_pattern(self.special_ids)
        # what special=False still matches: the user-defined tokens only
        self.user_defined_ids = {text: token for text, token in self.special_ids.items()
                                 if vocab.types[token] == USER_DEFINED}
        self.user_defined_pattern = special_token_pattern(self.user_defined_ids)
        self.piece_bytes = [self.bytes_of(token) for token in range(self.vocab_size)]

    def byte_token_ids(self) -> dict[int, int]:
        """Byte value -> the id of its <0xXX> token."""
        ids = {}
        for token, text in enumerate(self.vocab.tokens):
            match = _BYTE_PIECE.fullmatch(text) if self.vocab.types[token] == BYTE else None
            if match:
                ids.setdefault(int(match.group(1), 16), token)
        return ids

    def bytes_of(self, token: int) -> bytes:
        kind = self.vocab.types[token]
        text = self.vocab.tokens[token]
        if kind == BYTE and _BYTE_PIECE.fullmatch(text):
            return bytes([int(text[3:5], 16)])
        if kind == UNKNOWN:
            return UNKNOWN_SURFACE
        if kind in (CONTROL, UNUSED):
            return b""
        if kind == USER_DEFINED:
            return text.encode("utf-8")          # matched in text as written, printed as written
        return text.replace(SPACE_SYMBOL, " ").encode("utf-8")

    # encoding

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = True) -> list[int]:
        """Text -> ids. `bos=None` follows the model's add_bos_token flag; True/False force it.
        special=False: control tokens' texts are plain text (Tokenizer.encode)."""
        ids: list[int] = []
        after_special = True           # llama.cpp: the text at the start or after a special token
        matched = (self.special_pattern, self.special_ids) if special else \
            (self.user_defined_pattern, self.user_defined_ids)
        for fragment, token in split_special(text, *matched):
            if token is not None:
                ids.append(token)
                after_special = True
                continue
            # SentencePiece and llama.cpp write every space as '▁' before encoding, so a '▁' in the
            # text is a space too. surrogateescape: the raw bytes of an argument that was not UTF-8.
            data = fragment.replace(SPACE_SYMBOL, " ").encode("utf-8", errors="surrogateescape")
            if self.vocab.add_space_prefix and after_special:
                data = b" " + data     # SentencePiece's dummy prefix: "Hello" encodes as " Hello"
            ids += self.encode_fragment(data)
            after_special = False
        return with_bos_eos(ids, self.vocab, bos, eos)

    def encode_fragment(self, data: bytes) -> list[int]:
        """Plain text bytes -> ids: code points (or their bytes), merged by score."""
        tokens = []
        for code_point in split_code_points(data):
            token = self.merger.piece_to_id.get(code_point)
            if token is not None and self.vocab.types[token] == NORMAL:
                tokens.append(token)
            else:
                tokens += [self.byte_token(b) for b in code_point]
        return self.merger.merge_pairs(tokens)

    def byte_token(self, byte: int) -> int:
        token = self.byte_ids.get(byte)
        if token is None:              # no byte fallback in this vocab: llama.cpp gives <unk>
            if self.vocab.unk_id is None:
                raise LlamarunError(f"the text holds byte 0x{byte:02X}, which this GGUF tokenizer can "
                                    f"encode neither as a piece nor as a byte token: remove it from the text")
            return self.vocab.unk_id
        return token

    # decoding

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        piece = self.piece_bytes[token]
        # The first piece after BOS carries the dummy-prefix space that encoding added: drop it.
        if (prev is not None and prev == self.bos_id and self.vocab.add_space_prefix
                and self.vocab.types[token] == NORMAL and piece.startswith(b" ")):
            piece = piece[1:]
        return piece

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(self, ids)


def special_token_ids(vocab: GGUFVocab) -> dict[str, int]:
    """The text -> id of every control and user-defined token (the first id, should two share a text)."""
    ids: dict[str, int] = {}
    for token, text in enumerate(vocab.tokens):
        if vocab.is_special(token) and text:
            ids.setdefault(text, token)
    return ids


def special_token_pattern(special_ids: dict[str, int]) -> re.Pattern | None:
    """A regex that finds any of the special texts, the longest first where they overlap."""
    texts = sorted(special_ids, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def split_special(text: str, pattern: re.Pattern | None, special_ids: dict[str, int]):
    """Yield (fragment, None) for each run of plain text and (text, id) for each special token."""
    start = 0
    if pattern is not None:
        for match in pattern.finditer(text):
            if match.start() > start:
                yield text[start:match.start()], None
            yield match.group(), special_ids[match.group()]
            start = match.end()
    if start < len(text):
        yield text[start:], None
