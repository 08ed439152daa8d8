"""How probable tokens were: log-softmax, negative log-likelihood, and the per-token records
generation reports when asked (the decoding core fills them; inspect/ presents them).

- `log_softmax`, `token_nll`: in float64 from the float32 logits (perplexity, logprobs, the lens).
- `TokenLogprob`: OpenAI's `logprobs`: the drawn token's log probability and the k most probable.
- `TokenConfidence` (`measure`): for a drawn token and the logits row it was drawn from,
  - `prob`: its probability under the model, softmax of the raw logits (no temperature, no filters);
  - `sampled_prob`: its probability under the distribution the sampler actually drew from (after
    penalties, temperature, top-k, top-p, min-p; 1.0 for greedy decoding, whose distribution is one-hot);
  - `margin` and `margin2`: the largest raw logit minus the second and the third largest;
  - `entropy`: of the model's distribution, in nats (0 = certain, log(vocab) = uniform);
  - `top`: the most probable tokens under the model, each with both probabilities.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .kernels.select import top_k_positions


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
    """log p of every token, in float64.   (..., vocab) -> (..., vocab)"""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets) -> np.ndarray:
    """-log softmax(logits)[target], row by row, in float64.   logits: (n, vocab) -> (n,)

    log_softmax's arithmetic, without its second (n, vocab) array: only the targets' entries are needed."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return log_norm - z[np.arange(len(targets)), targets]


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]        # the most probable tokens and their log probabilities


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The drawn token's log probability under the raw logits, with the k most probable tokens'."""
    lp = log_softmax(logits)
    top = np.argsort(-lp, kind="stable")[:k] if k else np.array([], np.int64)
    return TokenLogprob(int(token), float(lp[token]), [(int(t), float(lp[t])) for t in top])


def entropy(logp: np.ndarray) -> float:
    """-sum p log p in nats; tokens whose probability underflows to 0 add nothing."""
    p = np.exp(logp)
    return float(-(p * np.where(p > 0, logp, 0.0)).sum())


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values, largest first (ties: lower id first)."""
    k = min(k, values.size)
    ids = top_k_positions(values, k) if k < values.size else np.arange(values.size)
    return ids[np.lexsort((ids, -values[ids]))]


def measure(logits: np.ndarray, token: int, sampled: np.ndarray, top: int = 5,
            text_of: Callable[[int], str | None] = lambda token: None) -> TokenConfidence:
    """The confidence figures of `token` drawn from `logits`.

    logits: (vocab,) the model's raw logits; sampled: (vocab,) the probabilities the sampler drew
    from (its `.distribution`); text_of(id) -> the text shown for a token.
    """
    logits = np.asarray(logits)
    logp = log_softmax(logits)                                            # (vocab,)
    best = np.sort(logits[top_k_positions(logits, 3)].astype(np.float64))[::-1]          # 1st, 2nd, 3rd
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
