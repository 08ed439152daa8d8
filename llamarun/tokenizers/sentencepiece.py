"""A SentencePiece `.model` (e.g. Llama 2's tokenizer.model) through the `sentencepiece` package.

Encoding is the package's own. Decoding follows run.c's rules, like Llama2cTokenizer, so that the
two tokenizers of the same vocabulary print the same bytes: the leading space of the first piece
after BOS is dropped, a byte piece is its raw byte. Unlike `SentencePieceProcessor.decode`, a
leading space is kept when the ids do not start with BOS, and a space after an EOS is kept.
"""
from __future__ import annotations

import re
from pathlib import Path

from llamarun.errors import LlamarunError
from llamarun.tokenizers.base import decode_bytes

SPACE_SYMBOL = "\u2581"                      # '▁': SentencePiece's visible space
UNKNOWN_SURFACE = " \u2047 ".encode()        # ' ⁇ ': what SentencePiece decodes <unk> to
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_processor(path: Path):
    """A sentencepiece.SentencePieceProcessor for `path`; the package is imported only here."""
    try:
        import sentencepiece
    except ImportError:
        raise LlamarunError(f"reading the SentencePiece model {path} needs the sentencepiece package: "
                            f"pip install sentencepiece") from None
    if not path.is_file():
        raise LlamarunError(f"tokenizer file {path} does not exist: pass the path of a tokenizer.bin "
                            f"or a SentencePiece .model")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        reason = str(e).strip() or type(e).__name__
        raise LlamarunError(f"{path} is not a valid SentencePiece model ({reason}): pass a .model file "
                            f"written by SentencePiece, or llama2.c's tokenizer.bin") from None
    if processor.GetPieceSize() == 0:
        raise LlamarunError(f"{path} is a SentencePiece model with no pieces: pass the model's real "
                            f"tokenizer")
    return processor


class SentencePieceTokenizer:
    """Encode with SentencePiece; decode piece by piece with run.c's rules."""

    def __init__(self, processor):
        self.sp = processor
        self.vocab_size = processor.GetPieceSize()
        self.bos_id = _id_or_none(processor.bos_id(), self.vocab_size)
        self.eos_id = _id_or_none(processor.eos_id(), self.vocab_size)
        self.eog_ids = frozenset() if self.eos_id is None else frozenset({self.eos_id})
        # The bytes of every piece, worked out once: decoding then needs no call into sentencepiece.
        self.piece_bytes = [self._piece_bytes(token) for token in range(self.vocab_size)]
        # Only a text piece can carry the dummy-prefix space; a byte piece <0x20> is a real space.
        self.is_text_piece = [not (processor.IsControl(t) or processor.IsUnknown(t) or processor.IsByte(t))
                              for t in range(self.vocab_size)]

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        return cls(load_processor(Path(path)))

    def _piece_bytes(self, token: int) -> bytes:
        sp = self.sp
        if sp.IsControl(token):
            return b""                                   # <s>, </s>: markers, not text
        if sp.IsUnknown(token):
            return UNKNOWN_SURFACE
        piece = sp.IdToPiece(token)
        if sp.IsByte(token):
            return bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
        return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        # special: SentencePiece never reads a control piece ("<s>") from text (Tokenizer.encode)
        ids = list(self.sp.EncodeAsIds(text))
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        piece = self.piece_bytes[token]
        # The first piece after BOS carries the dummy-prefix space that encoding added: drop it.
        # Not from <unk> (SentencePiece keeps the spaces of its ' ⁇ ') nor from the byte <0x20>.
        if prev is not None and prev == self.bos_id and self.is_text_piece[token] and piece.startswith(b" "):
            piece = piece[1:]
        return piece

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(self, ids)


def _id_or_none(token: int, vocab_size: int) -> int | None:
    """SentencePiece answers -1 for a special token the model does not have."""
    return token if 0 <= token < vocab_size else None


# tokenizer.ggml.token_type values, as llama.cpp's converter gives SentencePiece's pieces
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def gguf_metadata(tokenizer: SentencePieceTokenizer) -> dict:
    """The tokenizer in GGUF's key spelling, as llama.cpp's convert_hf_to_gguf.py writes a SentencePiece
    vocabulary (its _create_vocab_sentencepiece): every piece with its score and type, the special
    ids, BOS added and EOS not (SentencePiece Llama models' convention). A checkpoint directory's
    metadata carries it so that `convert` writes the tokenizer into a GGUF file."""
    sp = tokenizer.sp
    types = []
    for token in range(tokenizer.vocab_size):
        types.append(_UNKNOWN if sp.IsUnknown(token) else _CONTROL if sp.IsControl(token) else
                     _UNUSED if sp.IsUnused(token) else _BYTE if sp.IsByte(token) else _NORMAL)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.IdToPiece(token) for token in range(tokenizer.vocab_size)],
        "tokenizer.ggml.scores": [float(sp.GetScore(token)) for token in range(tokenizer.vocab_size)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unknown": sp.unk_id(), "padding": sp.pad_id()}
    for name, token in special.items():
        if _id_or_none(token, tokenizer.vocab_size) is not None:
            metadata[f"tokenizer.ggml.{name}_token_id"] = token
    return metadata
