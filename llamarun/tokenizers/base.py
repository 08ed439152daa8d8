"""The interface every tokenizer implements, so the rest of llamarun never asks which one it has."""
from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]      # ids that end generation (EOS, end-of-turn tokens)

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        """Text -> ids, with BOS/EOS prepended/appended when asked.

        Left out, `bos` follows the tokenizer's convention: always for llama2.c and SentencePiece
        tokenizers, the file's add_bos_token flag for GGUF ones (SmolLM2 adds none).
        special: a control token's text ("<|im_end|>") is read as that one token, as in a prompt
        written by hand; special=False reads it as plain text, spelled with ordinary pieces (what a
        chat message's content needs, llama.cpp's parse_special=false). User-defined tokens are
        matched either way, as llama.cpp and Hugging Face match them. llama2.c's and SentencePiece's
        tokenizers never read a control token from text, so for them the flag changes nothing.
        """

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        """The raw bytes `token` contributes to the text when it follows `prev`.

        Follows run.c's decode(): the leading space of a piece is dropped right after BOS, and a byte
        token (`<0x0A>`) is that one raw byte. Special tokens (BOS/EOS) give b"".
        Bytes, not str: a multi-byte character may be split over several tokens.
        """

    def decode(self, ids: list[int]) -> str:
        """ids -> text: the concatenated token_bytes, decoded as UTF-8 (invalid bytes replaced)."""


def decode_bytes(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The concatenated token_bytes of `ids` (each after its predecessor), as UTF-8 with invalid
    bytes replaced: every tokenizer's decode()."""
    out = bytearray()
    prev = None
    for token in ids:
        out += tokenizer.token_bytes(token, prev)
        prev = token
    return out.decode("utf-8", errors="replace")
