"""How sure the model was of each token it generated.

For a drawn token and the logits row it was drawn from, `measure` gives:

- `prob`: its probability under the model, softmax of the raw logits (no temperature, no filters);
- `sampled_prob`: its probability under the distribution the sampler actually drew from (after
  penalties, temperature, top-k, top-p, min-p; 1.0 for greedy decoding, whose distribution is one-hot);
- `margin` and `margin2`: the largest raw logit minus the second and the third largest;
- `entropy`: of the model's distribution, in nats (0 = certain, log(vocab) = uniform);
- `top`: the most probable tokens under the model, each with both probabilities.

Everything is computed in float64 from the float32 logits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Alternative:
    token: int
    text: str | None          # the token's text where it stands (None without a tokenizer)
    prob: float               # under the model: softmax of the raw logits
    sampled_prob: float       # under the sampler's distribution


@dataclass
class TokenConfidence:
    token: int
    text: str | None          # the token's own text (its bytes decoded; None without a tokenizer)
    prob: float               # p(token) under softmax(raw logits)
    sampled_prob: float       # p(token) under the distribution the sampler drew from
    margin: float             # 1st - 2nd largest raw logit
    margin2: float            # 1st - 3rd largest raw logit
    entropy: float            # of softmax(raw logits), nats
    top: list[Alternative] = field(default_factory=list)   # most probable first

    def as_dict(self) -> dict:
        """Plain JSON-ready values (what `--confidence-json` writes)."""
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every token, in float64.   (vocab,) -> (vocab,)"""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def entropy(logp: np.ndarray) -> float:
    """-sum p log p in nats; tokens whose probability underflows to 0 add nothing."""
    p = np.exp(logp)
    return float(-(p * np.where(p > 0, logp, 0.0)).sum())


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values, largest first (ties: lower id first)."""
    k = min(k, values.size)
    ids = np.argpartition(-values, k - 1)[:k] if k < values.size else np.arange(values.size)
    return ids[np.lexsort((ids, -values[ids]))]


def measure(logits: np.ndarray, token: int, sampled: np.ndarray, top: int = 5,
            text_of: Callable[[int], str | None] = lambda token: None) -> TokenConfidence:
    """The confidence figures of `token` drawn from `logits`.

    logits: (vocab,) the model's raw logits; sampled: (vocab,) the probabilities the sampler drew
    from (its `.distribution`); text_of(id) -> the text shown for a token.
    """
    logits = np.asarray(logits)
    logp = log_softmax(logits)                                            # (vocab,)
    best = np.sort(np.partition(logits, logits.size - 3)[-3:].astype(np.float64))[::-1]   # 1st, 2nd, 3rd
    alternatives = [Alternative(int(t), text_of(int(t)), float(np.exp(logp[t])), float(sampled[t]))
                    for t in top_ids(logp, top)]
    return TokenConfidence(token=int(token), text=text_of(int(token)), prob=float(np.exp(logp[token])),
                           sampled_prob=float(sampled[token]), margin=float(best[0] - best[1]),
                           margin2=float(best[0] - best[2]), entropy=entropy(logp), top=alternatives)


def token_text(tokenizer, token: int, prev: int | None) -> str | None:
    """A token's text after `prev`: its bytes as UTF-8, a split character's part shown as U+FFFD."""
    if tokenizer is None:
        return None
    return tokenizer.token_bytes(token, prev).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# colours for the terminal: by the token's probability under the model

CONFIDENT, UNSURE = 0.5, 0.2


def colour(confidence: TokenConfidence | None) -> str | None:
    """A rich style for a token: green from p >= 0.5, yellow from 0.2, red below; None: no colour."""
    if confidence is None:
        return None
    if confidence.prob >= CONFIDENT:
        return "green"
    return "yellow" if confidence.prob >= UNSURE else "red"


LEGEND = (f"confidence (model probability of each token): green >= {CONFIDENT}, "
          f"yellow >= {UNSURE}, red below")
