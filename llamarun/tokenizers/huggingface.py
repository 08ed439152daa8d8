"""A Hugging Face `tokenizer.json` (a checkpoint directory's tokenizer) through the `tokenizers` package.

`tokenizers` runs the file as written (normalizer, pre-tokenizer, model, added tokens), so encoding is
Hugging Face's own. What this class adds is llamarun's Tokenizer protocol around it: BOS/EOS as
tokenizer_config.json asks for them, the end-of-generation ids, and decoding token by token into
raw bytes. Two kinds of vocabulary are decoded, told apart by the model the file holds:

- byte-level BPE (Llama 3, SmolLM2, GPT-2): every character of a piece stands for one byte through
  GPT-2's byte<->unicode table ('Ġ' is a space); added tokens print their own text, as
  GGUFBpeTokenizer prints them (the same vocabulary converted to GGUF decodes the same way).
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): '▁' is a space, `<0x0A>` is that
  one byte, control tokens print nothing and the dummy-prefix space of the first piece after BOS is
  dropped, as SentencePieceTokenizer decodes the same vocabulary (run.c's rules).
"""
from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

from llamarun.errors import LlamarunError
from llamarun.tokenizers.base import decode_bytes
from llamarun.tokenizers.gguf import END_OF_TURN_TEXTS, byte_level_bytes, valid_unicode
from llamarun.tokenizers.sentencepiece import SPACE_SYMBOL, UNKNOWN_SURFACE

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

BYTE_LEVEL, SENTENCEPIECE = "byte-level BPE", "SentencePiece-style BPE"


def load_hf_tokenizer(path: str | Path):
    """A tokenizers.Tokenizer for the tokenizer.json at `path`; the package is imported only here."""
    try:
        import tokenizers
    except ImportError:
        raise LlamarunError(f"reading {path} needs the tokenizers package: pip install tokenizers") from None
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:      # tokenizers raises a bare Exception for a file it cannot parse
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlamarunError(f"{path} is not a tokenizer.json that the tokenizers package reads ({reason}): "
                            "download it again") from None
    release_freed_memory()
    return hf


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Parsing a tokenizer.json
    builds a JSON tree of small allocations that is freed once the tokenizer is made, but glibc keeps
    the pages: Llama 3's 128k vocabulary left 150 MB resident where the tokenizer itself holds 48."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: its allocator decides
        pass


def vocabulary_kind(hf) -> str:
    """BYTE_LEVEL or SENTENCEPIECE, by the file's model and decoder; anything else is refused."""
    model = hf.model
    if type(model).__name__ == "BPE" and model.byte_fallback:
        return SENTENCEPIECE
    if type(hf.decoder).__name__ == "ByteLevel" or "ByteLevel" in repr(hf.pre_tokenizer):
        return BYTE_LEVEL
    raise LlamarunError(f"the tokenizer.json holds a {type(model).__name__} model with a "
                        f"{type(hf.decoder).__name__} decoder; llamarun reads byte-level BPE and SentencePiece-"
                        "style (byte fallback) BPE tokenizers: pass a tokenizer.model instead, or none (ids only)")


class HuggingFaceTokenizer:
    """Encode with `tokenizers`; decode piece by piece into bytes (module docstring)."""

    def __init__(self, hf, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 end_ids: frozenset[int] = frozenset()):
        """hf: a tokenizers.Tokenizer. end_ids: further ids that end generation (generation_config.json's
        eos_token_id list), beside EOS and the special tokens whose text ends a turn."""
        self.hf = hf
        self.kind = vocabulary_kind(hf)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.added = hf.get_added_tokens_decoder()          # id -> AddedToken (content, special, ...)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        turn_ends = {token for token, added in self.added.items() if added.special and added.content in END_OF_TURN_TEXTS}
        self.eog_ids = frozenset({t for t in (eos_id,) if t is not None} | set(end_ids) | turn_ends)
        # whether encoding puts SentencePiece's dummy-prefix space before the text ("a" -> "▁a"): then
        # decoding drops it again from the first piece after BOS
        self.dummy_prefix = self.kind == SENTENCEPIECE and \
            hf.encode("a", add_special_tokens=False).tokens[:1] in (["▁a"], ["▁"])
        # special=False is a switch on the one Hugging Face tokenizer: encodes that set it take turns
        self.hf_mode = threading.Lock()
        self._piece_bytes: list[bytes] | None = None         # built on first decode (a 128k vocabulary: ~0.1 s)

    @classmethod
    def from_file(cls, path: str | Path, **options) -> HuggingFaceTokenizer:
        return cls(load_hf_tokenizer(path), **options)

    # encoding

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = True) -> list[int]:
        """Text -> ids. `bos=None` follows tokenizer_config.json's add_bos_token; True/False force it.
        special=False: special tokens' texts are plain text (Tokenizer.encode)."""
        with self.hf_mode:
            self.hf.encode_special_tokens = not special
            ids = self.hf.encode(valid_unicode(text), add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    # decoding

    def token_text(self, token: int) -> str:
        """The vocabulary's spelling of `token` ("<|eot_id|>", "Ġthe"): how a chat template writes it."""
        return self.hf.id_to_token(token) or ""

    def piece_bytes(self) -> list[bytes]:
        if self._piece_bytes is None:
            self._piece_bytes = [self.bytes_of(token) for token in range(self.vocab_size)]
        return self._piece_bytes

    def bytes_of(self, token: int) -> bytes:
        text = self.hf.id_to_token(token)
        if text is None:
            return b""                                       # a hole in the ids
        added = self.added.get(token)
        if self.kind == BYTE_LEVEL:
            return text.encode("utf-8") if added is not None else byte_level_bytes(text)
        if added is not None:
            return b"" if added.special else text.encode("utf-8")   # <s>, </s>: markers, not text
        if text == self.hf.model.unk_token:
            return UNKNOWN_SURFACE
        match = _BYTE_PIECE.fullmatch(text)
        if match:
            return bytes([int(match.group(1), 16)])
        return text.replace(SPACE_SYMBOL, " ").encode("utf-8")

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        pieces = self.piece_bytes()
        piece = pieces[token] if 0 <= token < len(pieces) else b""
        # The first piece after BOS carries the dummy-prefix space that encoding added: drop it (not
        # from a byte piece <0x20>, which is a real space, nor from an added token's own text).
        if (self.dummy_prefix and prev is not None and prev == self.bos_id and piece.startswith(b" ")
                and token not in self.added and not _BYTE_PIECE.fullmatch(self.hf.id_to_token(token) or "")):
            piece = piece[1:]
        return piece

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(self, ids)
