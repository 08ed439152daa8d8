"""Tokenizers: text <-> token ids. `load_tokenizer` picks the reader a file needs."""
from __future__ import annotations

from pathlib import Path

from llamarun.errors import LlamarunError
from llamarun.tokenizers.base import Tokenizer
from llamarun.tokenizers.gguf import tokenizer_from_gguf
from llamarun.tokenizers.llama2c import Llama2cTokenizer
from llamarun.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = ["Tokenizer", "Llama2cTokenizer", "SentencePieceTokenizer", "load_tokenizer"]
__all__ += ["tokenizer_from_gguf"]


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer stored at `path`: a SentencePiece `.model` or a llama2.c `tokenizer.bin`.

    The extension decides first (`.model` is SentencePiece); any other file is read as a
    tokenizer.bin, and only if that fails and the file looks like a protobuf is it tried as a
    SentencePiece model. With `vocab_size` (the model's), a tokenizer of another size is refused:
    its ids would index the wrong rows of the embedding table.
    """
    path = Path(path)
    if not path.exists():
        raise LlamarunError(f"tokenizer file {path} does not exist: pass the path of a tokenizer.bin "
                            f"or a SentencePiece .model")
    if path.is_dir():
        raise LlamarunError(f"tokenizer path {path} is a directory: pass the tokenizer file itself "
                            f"(tokenizer.bin or tokenizer.model)")

    tokenizer: Tokenizer
    if path.suffix == ".model":
        tokenizer = SentencePieceTokenizer.from_file(path)
    else:
        try:
            tokenizer = Llama2cTokenizer.from_file(path)
        except LlamarunError as not_tokenizer_bin:
            if not looks_like_sentencepiece(path):
                raise
            try:
                tokenizer = SentencePieceTokenizer.from_file(path)
            except LlamarunError:
                raise not_tokenizer_bin from None     # neither: the tokenizer.bin complaint is clearer

    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise LlamarunError(f"{path} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                            f"{vocab_size}: pass the tokenizer that was trained with this model "
                            f"(-z PATH), or none for ids-only use")
    return tokenizer


def looks_like_sentencepiece(path: Path) -> bool:
    """A SentencePiece model is a ModelProto whose first field is a piece: tag 0x0A, then a
    nonzero length. A tokenizer.bin starts with a small little-endian int32, so its second byte
    is 0 for any max_token_length under 256."""
    with path.open("rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x0A and head[1] != 0
