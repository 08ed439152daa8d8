"""Attention emphasis: `--emphasize WORD:FACTOR[@LAYERS]` makes the model pay FACTOR times more
attention to the prompt's tokens of WORD.

How: log(FACTOR) is added to the attention scores of those tokens' key positions (after the
1/sqrt(head_dim) scaling, before the softmax), in the chosen layers (default: all). A weight p of
such a key becomes F*p / Z, with Z renormalising the row, so an emphasised mass m becomes
F*m / (F*m + 1 - m): the law tests/test_emphasis.py checks at the first emphasised layer.

The bias is an argument of the forward calls that ask for it (a `model.Probe`'s `bias`, one
(seq_len,) row per layer, empty where no emphasis), never model state: it reaches only the sequence
it was made for. The attention kernels add it to key positions, for every head. Two emphases of the
same token multiply their factors (their logs add).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import LlamarunError
from ..model import Probe

LAYERS_SYNTAX = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


@dataclass
class Emphasis:
    word: str
    factor: float
    layers: list[int] | None      # None: every layer

    def __str__(self) -> str:
        where = "" if self.layers is None else f" in layers {format_layers(self.layers)}"
        return f"{self.word!r} x{self.factor:g}{where}"


# ----------------------------------------------------------------------------------------------
# parsing WORD:FACTOR[@LAYERS]

def parse_emphasis(spec: str, n_layers: int) -> Emphasis:
    """'WORD:FACTOR', 'WORD:FACTOR@0-5' or 'WORD:FACTOR@3,7,9' -> Emphasis (layers checked against
    the model's n_layers). WORD may itself hold ':' or '@': the last ':' before the factor counts."""
    head, at, tail = spec.rpartition("@")
    if at and LAYERS_SYNTAX.fullmatch(tail.replace(" ", "")):
        word_factor, layers = head, parse_layers(tail, n_layers)
    else:
        word_factor, layers = spec, None
    word, colon, factor_text = word_factor.rpartition(":")
    if not colon or not word:
        raise LlamarunError(f"--emphasize {spec!r}: expected WORD:FACTOR (optionally @LAYERS, e.g. 'Paris:5@0-5')")
    try:
        factor = float(factor_text)
    except ValueError:
        raise LlamarunError(f"--emphasize {spec!r}: the factor {factor_text!r} is not a number") from None
    if not (factor > 0 and math.isfinite(factor)):
        raise LlamarunError(f"--emphasize {spec!r}: the factor must be a positive finite number, not {factor_text}")
    return Emphasis(word, factor, layers)


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'0-5' -> [0..5], '3,7,9' -> [3, 7, 9] (ranges inclusive, combinable: '0-2,9')."""
    text = text.replace(" ", "")
    if not LAYERS_SYNTAX.fullmatch(text):
        raise LlamarunError(f"--emphasize: bad layers {text!r}: use e.g. @0-5 or @3,7,9")
    layers = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if lo > hi:
            raise LlamarunError(f"--emphasize: bad layer range {part!r}: the first layer comes first")
        if hi >= n_layers:
            raise LlamarunError(f"--emphasize: layer {hi} does not exist: the model has layers 0-{n_layers - 1}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def format_layers(layers: list[int]) -> str:
    return ",".join(map(str, layers))


# ----------------------------------------------------------------------------------------------
# which tokens are WORD's

def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) byte offsets of each token's text in the decoded prompt (decoded token by token,
    as generation prints it; special tokens such as BOS cover nothing)."""
    spans, offset, prev = [], 0, None
    for token in ids:
        n = len(tokenizer.token_bytes(token, prev))
        spans.append((offset, offset + n))
        offset, prev = offset + n, token
    return spans


def word_positions(tokenizer, ids: list[int], word: str) -> list[int]:
    """Positions of the prompt tokens whose text overlaps an occurrence of `word` (case-sensitive).

    A word split over several tokens gives all of them; a token that holds the word and more (' Paris,')
    counts too. Raises LlamarunError when the word does not occur.
    """
    text = b"".join(tokenizer.token_bytes(t, p) for t, p in zip(ids, [None] + list(ids[:-1])))
    needle = word.encode("utf-8")
    occurrences = [m.start() for m in re.finditer(re.escape(needle), text)]
    if not occurrences:
        raise LlamarunError(f"--emphasize: {word!r} does not occur in the prompt")
    spans = token_spans(tokenizer, ids)
    return [i for i, (start, end) in enumerate(spans)
            if any(start < at + len(needle) and end > at for at in occurrences)]


# ----------------------------------------------------------------------------------------------
# the bias

def emphasis_bias(config, positions_factors: list[tuple[list[int], float, list[int] | None]]) -> list[np.ndarray]:
    """A Probe's bias for these emphases: per layer, (seq_len,) float32 holding the sum of
    log(FACTOR) at the emphasised key positions (0 elsewhere); an empty row for a layer no emphasis
    touches, so that layer runs the plain kernel arithmetic. A layer that is emphasised with FACTOR 1
    gets a row of zeros: the bias is added (and changes nothing, bit for bit)."""
    rows = [np.zeros(0, np.float32)] * config.n_layers
    for positions, factor, layers in positions_factors:
        for layer in range(config.n_layers) if layers is None else layers:
            if rows[layer].shape[0] == 0:
                rows[layer] = np.zeros(config.seq_len, np.float32)
            rows[layer][positions] += np.float32(math.log(factor))
    return rows


def emphasize(llama, ids: list[int], specs: list[str]) -> tuple[Probe | None, list[tuple[Emphasis, list[int]]]]:
    """Parse the --emphasize specs and find their tokens in the prompt `ids`.
    -> the Probe that applies them (None for no specs; pass it to the forwards of this sequence),
    and each emphasis with its token positions."""
    if not specs:
        return None, []
    if llama.tokenizer is None:
        raise LlamarunError("--emphasize needs a tokenizer to find the word's tokens")
    found = []
    for spec in specs:
        e = parse_emphasis(spec, llama.config.n_layers)
        found.append((e, word_positions(llama.tokenizer, ids, e.word)))
    bias = emphasis_bias(llama.config, [(pos, e.factor, e.layers) for e, pos in found])
    return Probe(bias=bias), found
