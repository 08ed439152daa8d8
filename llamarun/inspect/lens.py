"""The logit lens: what the model would predict if it stopped after each layer.

After every layer the residual stream at a position is read as the last layer's is: through the
final RMSNorm and the classifier, then softmaxed. Early layers mostly echo the input token; the
answer usually surfaces in the later ones. The last layer's lens is the model's own logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import LlamarunError
from ..logprobs import log_softmax, top_ids
from ..model import Batch, Probe, linear, rmsnorm


@dataclass
class LensLayer:
    layer: int              # 0-based: the residual stream after this layer
    tokens: list[int]       # the most probable next tokens, most probable first
    probs: list[float]      # their probabilities


@dataclass
class Lens:
    pos: int                # the position read (0-based)
    logits: np.ndarray      # (n_layers, vocab) float32: the classifier's reading after each layer
    layers: list[LensLayer]


def resolve_position(pos: int | None, n: int) -> int:
    """The position P of a prompt of n tokens (None: the last one; negative: from the end)."""
    if pos is None:
        return n - 1
    if not -n <= pos < n:
        raise LlamarunError(f"position {pos} is outside the prompt's {n} tokens: use 0..{n - 1} "
                            f"(or -1..-{n} from the end)")
    return pos % n


def residual_streams(model, ids: Sequence[int], pos: int) -> np.ndarray:
    """The residual stream at `pos` after each layer.   -> (n_layers, dim) float32

    Attention is causal, so the tokens after `pos` change nothing there: only ids[:pos+1] run.
    """
    rows = []
    probe = Probe(residual=lambda layer, x: rows.append(x[pos].copy()))           # x: (n, dim)
    model.forward(Batch.sequence(ids[:pos + 1]), model.new_cache(seq_len=pos + 1), probe)
    return np.stack(rows)


def logit_lens(model, ids: Sequence[int], pos: int | None = None, top: int = 5) -> Lens:
    """Per layer, the `top` next tokens (at most the vocabulary) that the final norm and classifier read
    at position `pos`."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise LlamarunError(f"top must be a positive number of tokens, not {top!r}")
    top = min(top, model.config.vocab_size)
    ids = list(ids)
    if not ids:
        raise LlamarunError("the prompt is empty: the lens needs at least one token")
    if len(ids) > model.config.seq_len:
        raise LlamarunError(f"{len(ids)} tokens do not fit the model's context of {model.config.seq_len}")
    pos = resolve_position(pos, len(ids))
    c, w = model.config, model.w
    x = rmsnorm(residual_streams(model, ids, pos), w["norm"], c.norm_eps, not model.exact)   # (n_layers, dim)
    logits = linear(x, w["output"])                                        # (n_layers, vocab)
    layers = []
    for layer, row in enumerate(logits):
        logp = log_softmax(row)
        best = top_ids(logp, top)
        layers.append(LensLayer(layer, [int(t) for t in best], [float(np.exp(logp[t])) for t in best]))
    return Lens(pos, logits, layers)
