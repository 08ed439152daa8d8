"""Perplexity of a text under the model, computed as llama.cpp's `perplexity` tool and HF's docs do.

The token ids are cut into consecutive, non-overlapping chunks of `ctx` tokens (the last one may be
shorter). Each chunk is one batched forward pass from an empty cache; every position but the
chunk's first is scored by the negative log-likelihood the previous position's logits give it
(the first token of a chunk has no context inside the chunk). PPL = exp(mean NLL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import LlamarunError
from ..logprobs import token_nll
from ..model import Batch


@dataclass
class Perplexity:
    ppl: float
    nll: float          # mean negative log-likelihood, nats per token
    scored: int         # tokens scored
    chunks: int


def check_inputs(model, ids: Sequence[int], ctx: int) -> None:
    """Refuse what cannot be scored, in one sentence each."""
    if ctx < 2:
        raise LlamarunError(f"the perplexity context must be at least 2 tokens, not {ctx}")
    if ctx > model.config.seq_len:
        raise LlamarunError(f"a context of {ctx} tokens exceeds the model's {model.config.seq_len}")
    if len(ids) < 2:
        raise LlamarunError("the text is too short to score: it needs at least 2 tokens")


def perplexity(model, ids: Sequence[int], ctx: int,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of `ids` in chunks of `ctx` tokens; progress(done_chunks, total_chunks) if given."""
    check_inputs(model, ids, ctx)
    starts = range(0, len(ids), ctx)
    total, scored = 0.0, 0
    if progress:
        progress(0, len(starts))
    for done, start in enumerate(starts, 1):
        chunk = list(ids[start:start + ctx])
        if len(chunk) >= 2:
            logits = model.forward(Batch.sequence(chunk, all_logits=True), model.new_cache(seq_len=len(chunk)))
            nll = token_nll(logits[:-1], chunk[1:])                # (len(chunk) - 1,)
            total += float(nll.sum())
            scored += len(nll)
        if progress:
            progress(done, len(starts))
    mean = total / scored
    return Perplexity(math.exp(mean), mean, scored, len(starts))
