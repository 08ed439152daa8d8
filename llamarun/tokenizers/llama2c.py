"""llama2.c's tokenizer: the `tokenizer.bin` file and the BPE encoder/decoder of its run.c.

tokenizer.bin is a flat list written by llama2.c's tokenizer.py:
    int32 max_token_length
    then, for each token id in order: float32 score, int32 length, `length` bytes of the piece.
The file does not store the number of tokens: it is read to EOF. SentencePiece's '▁' is already a
plain space in the pieces, BOS and EOS are the pieces "\\n<s>\\n" and "\\n</s>\\n", and ids 3..258
are the byte-fallback tokens "<0x00>".."<0xFF>".
"""
from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

from llamarun.errors import LlamarunError
from llamarun.tokenizers.base import decode_bytes

BOS_ID = 1
EOS_ID = 2
BYTE_TOKEN_OFFSET = 3          # byte b is token b + 3: ids 0, 1, 2 are <unk>, <s>, </s>
NO_MERGE_SCORE = -1e10         # run.c starts its search for the best merge at this score
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def read_tokenizer_bin(path: Path) -> tuple[int, list[bytes], list[float]]:
    """(max_token_length, pieces, scores) of a tokenizer.bin, checking every length field."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LlamarunError(f"tokenizer file {path} does not exist: pass the path of a tokenizer.bin "
                            f"or a SentencePiece .model") from None
    except OSError as e:
        raise LlamarunError(f"cannot read tokenizer file {path} ({e.strerror}): check the path "
                            f"and its permissions") from None

    def bad(what: str) -> LlamarunError:
        return LlamarunError(f"{path} is not a valid llama2.c tokenizer.bin ({what}): pass the "
                             f"tokenizer.bin exported by llama2.c, or a SentencePiece .model")

    if len(data) < 4:
        raise bad(f"it is {len(data)} bytes long, too short for its header")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    if max_token_length <= 0:
        raise bad(f"its max_token_length is {max_token_length}")

    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data):
        token = len(pieces)
        if offset + 8 > len(data):
            raise bad(f"token {token}'s score and length run past the end of the file")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0:
            raise bad(f"token {token} has a negative length {length}")
        if offset + length > len(data):
            raise bad(f"token {token}'s {length} bytes run past the end of the file")
        pieces.append(data[offset:offset + length])
        scores.append(score)
        offset += length
    if not pieces:
        raise bad("it holds no tokens")
    return max_token_length, pieces, scores


class Llama2cTokenizer:
    """run.c's encode() and decode() over the pieces and scores of a tokenizer.bin."""

    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID
    eog_ids: frozenset[int] = frozenset({EOS_ID})

    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int | None = None):
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.vocab_size = len(self.pieces)
        self.max_token_length = max_token_length or max(map(len, self.pieces), default=0)
        # run.c binary-searches a sorted copy of the vocab; a dict answers the same question.
        # Should two ids share a piece, take the first (run.c's bsearch would pick either).
        self.piece_to_id: dict[bytes, int] = {}
        for token, piece in enumerate(self.pieces):
            self.piece_to_id.setdefault(piece, token)

    @classmethod
    def from_file(cls, path: str | Path) -> Llama2cTokenizer:
        max_token_length, pieces, scores = read_tokenizer_bin(Path(path))
        return cls(pieces, scores, max_token_length)

    # ----------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        # special: run.c reads no token from its text, so "<s>" is always plain text (Tokenizer.encode)
        # surrogateescape gives back the raw bytes of a command-line argument that was not UTF-8,
        # which is what run.c would have seen in argv.
        data = text.encode("utf-8", errors="surrogateescape")
        tokens = [BOS_ID] if bos else []
        # SentencePiece's add_dummy_prefix: the text is encoded as if it began with a space, so that
        # "Hello" at the start of a prompt gets the same token as " Hello" in the middle of one.
        if data:
            tokens += self.code_point_tokens(b" ")
        for code_point in split_code_points(data):
            tokens += self.code_point_tokens(code_point)
        # run.c merges over the whole list, BOS included (its piece "\n<s>\n" merges with nothing
        # in a real vocab); EOS is appended only after merging.
        tokens = self.merge_pairs(tokens)
        if eos:
            tokens.append(EOS_ID)
        return tokens

    def code_point_tokens(self, code_point: bytes) -> list[int]:
        """The token of one UTF-8 code point, or with byte fallback one <0xXX> token per byte."""
        token = self.piece_to_id.get(code_point)
        if token is not None:
            return [token]
        return [b + BYTE_TOKEN_OFFSET for b in code_point]

    def merge_pairs(self, tokens: list[int]) -> list[int]:
        """Merge adjacent tokens until no pair's concatenation is in the vocab.

        Each step merges the pair whose merged piece has the highest score, the leftmost of equal
        scores; that is run.c's loop, which rescans every pair after each merge. Here the candidate
        pairs wait in a heap and the tokens form a linked list, so a long prompt costs O(n log n)
        instead of O(n^2). A heap entry goes stale when either of its tokens has merged since it
        was pushed: it is then skipped when popped.
        """
        ids = list(tokens)                          # ids[i]: the token at position i (None: merged away)
        nxt = list(range(1, len(ids))) + [-1]       # the next live position, -1 at the end
        prv = list(range(-1, len(ids) - 1))         # the previous live position, -1 at the start
        heap: list[tuple[float, int, int, int, int]] = []

        def push_pair(left: int) -> None:
            right = nxt[left] if left >= 0 else -1
            if left < 0 or right < 0:
                return
            merged = self.piece_to_id.get(self.pieces[ids[left]] + self.pieces[ids[right]])
            # run.c only merges a piece that scores strictly above its starting best of -1e10.
            if merged is not None and self.scores[merged] > NO_MERGE_SCORE:
                # (-score, left): the highest score first, then the leftmost position, because
                # positions keep their left-to-right order as tokens merge.
                heapq.heappush(heap, (-self.scores[merged], left, ids[left], ids[right], merged))

        for i in range(len(ids) - 1):
            push_pair(i)
        while heap:
            _, left, left_id, right_id, merged = heapq.heappop(heap)
            right = nxt[left]
            if ids[left] != left_id or right < 0 or ids[right] != right_id:
                continue                                 # stale: one of the pair merged already
            ids[left] = merged                           # the pair becomes one token at `left`
            ids[right] = None
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push_pair(prv[left])                         # the new token pairs with both neighbours
            push_pair(left)
        return [token for token in ids if token is not None]

    # ----------------------------------------------------------------------------------------
    # decoding

    def token_bytes(self, token: int, prev: int | None = None) -> bytes:
        if token in (BOS_ID, EOS_ID):
            return b""
        piece = self.pieces[token]
        # The first piece after BOS carries the dummy-prefix space that encode() added: drop it.
        if prev == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(self, ids)


def split_code_points(data: bytes) -> list[bytes]:
    """Cut UTF-8 bytes into code points the way run.c does.

    A code point is a leading byte and the continuation bytes (0b10xxxxxx) that follow it, at most 4
    bytes in all; on invalid UTF-8 a stray continuation byte starts a piece of its own, and a
    run of more than 4 continuation bytes is cut every 4 bytes, as run.c cuts it.
    """
    code_points = []
    start = 0
    for i in range(1, len(data) + 1):
        is_continuation = i < len(data) and (data[i] & 0xC0) == 0x80
        if not is_continuation or i - start >= 4:
            code_points.append(data[start:i])
            start = i
    return code_points
