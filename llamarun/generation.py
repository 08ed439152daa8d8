"""The generation loop: prefill the prompt in one pass, then decode token by token, streaming text.

`generate_stream` is the one loop every front end uses (the API's `generate` and `stream`, the CLI).
It yields a `TokenEvent` per drawn token, carrying the text that token completes. Text is held back
while it is still unfinished: the bytes of a UTF-8 character split over several tokens, or the start of
what may become a stop string (which is never shown).
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .errors import LlamarunError
from .inspect.confidence import TokenConfidence, measure, token_text
from .model import Batch, KVCache, Transformer
from .sampling import forbid


@dataclass
class TokenEvent:
    token: int | None     # the drawn id; None for the last event that only flushes held-back text
    text: str             # text released by this event (may be "" while text is held back)
    confidence: TokenConfidence | None = None   # how sure the model was of `token` (when asked)


@dataclass
class Completion:
    text: str                          # the new text (no prompt, no stop string, no end token)
    tokens: list[int]                  # the new ids (no end token)
    finish_reason: str = "length"      # "stop": end token or stop string; "length": max_tokens or context
    context_full: bool = False         # generation ended because the context was full
    prompt_tokens: list[int] = field(default_factory=list)
    end_token: int | None = None       # the end token that stopped generation, if one did
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    confidence: list[TokenConfidence] = field(default_factory=list)   # one per `tokens` entry, when asked

    @property
    def walked(self) -> list[int]:
        """Every id the run went through: prompt, drawn tokens, and the end token that stopped it."""
        return self.prompt_tokens + self.tokens + ([self.end_token] if self.end_token is not None else [])

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first drawn token comes from the prefill's logits: decode time covers the others
        n = len(self.tokens) + (self.end_token is not None) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


class TextAssembler:
    """Turns token bytes into text: completes UTF-8 characters and holds back possible stop strings."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""          # decoded text not yet released
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to show."""
        self.held += self.utf8.decode(data)
        for s in self.stop:
            at = self.held.find(s)
            if at >= 0:
                self.stopped = True
                out, self.held = self.held[:at], ""
                return out
        keep = self._possible_stop_start()
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        """Release everything held back (generation is over)."""
        out = self.held + self.utf8.decode(b"", final=True)
        self.held = ""
        return out

    def _possible_stop_start(self) -> int:
        """Length of the longest end of `held` that is the beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), longest, -1):
                if self.held.endswith(s[:n]):
                    longest = n
                    break
        return longest


def check_prompt(prompt_ids: Sequence[int], start_pos: int, context: int, vocab_size: int) -> None:
    if not prompt_ids:
        raise LlamarunError("the prompt is empty: give some text, or enable BOS so there is a first token")
    if start_pos + len(prompt_ids) > context:
        raise LlamarunError(f"the prompt is {len(prompt_ids)} tokens but the context holds {context - start_pos} "
                            "more: shorten the prompt (or use a model with a longer context)")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise LlamarunError(f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}")


def generate_stream(model: Transformer, tokenizer, prompt_ids: Sequence[int], sampler, *, max_tokens: int,
                    stop_tokens: frozenset[int] = frozenset(), never: frozenset[int] = frozenset(),
                    stop: Sequence[str] = (),
                    cache: KVCache | None = None, start_pos: int = 0, seq_id: int = 0,
                    result: Completion | None = None, confidence: bool = False,
                    confidence_top: int = 5) -> Iterator[TokenEvent]:
    """An iterator of one TokenEvent per new token, filling `result` (a Completion) as it goes.

    never: tokens that are never drawn (their logits set to -inf: `ignore_eos` bans the end tokens).
    The cache may already hold `start_pos` tokens of this sequence (a chat's earlier turns); the
    prompt continues from there. Without a tokenizer the events carry ids only (text is "").
    confidence: each event (and `result.confidence`) carries the token's confidence figures, with
    the `confidence_top` most probable alternatives (llamarun/inspect/confidence.py).
    Bad input is refused here, before anything runs.
    """
    cache = cache or model.new_cache()
    check_prompt(prompt_ids, start_pos, cache.seq_len, model.config.vocab_size)
    if max_tokens < 0:
        raise LlamarunError(f"the number of new tokens must be >= 0, not {max_tokens}")
    if confidence_top < 0:
        raise LlamarunError(f"the number of alternatives must be >= 0, not {confidence_top}")
    result = result if result is not None else Completion("", [])
    result.prompt_tokens = list(prompt_ids)
    top = confidence_top if confidence else None
    return _generate(model, tokenizer, list(prompt_ids), sampler, max_tokens, stop_tokens, never, stop, cache,
                     start_pos, seq_id, result, top)


def _generate(model, tokenizer, prompt_ids, sampler, max_tokens, stop_tokens, never, stop, cache, start_pos,
              seq_id, result: Completion, confidence_top: int | None) -> Iterator[TokenEvent]:
    context = cache.seq_len
    text = TextAssembler(stop) if tokenizer is not None else None
    pieces = []

    def release(s: str) -> str:
        pieces.append(s)
        result.text = "".join(pieces)
        return s

    t0 = time.perf_counter()
    logits = model.forward(Batch.sequence(prompt_ids, start_pos, seq_id), cache)[-1]
    t1 = time.perf_counter()
    result.prefill_seconds = t1 - t0
    pos = start_pos + len(prompt_ids)       # where the next token goes
    history = list(prompt_ids)
    prev = prompt_ids[-1]

    for n in range(1, max_tokens + 1):
        forbid(logits, never)
        # the distribution is taken before the draw, with the same history (it draws no coin)
        sampled = sampler.distribution(logits, history) if confidence_top is not None else None
        token = int(sampler.sample(logits, history))
        history.append(token)
        if token in stop_tokens:
            result.finish_reason, result.end_token = "stop", token
            break
        result.tokens.append(token)
        conf = None
        if sampled is not None:
            conf = measure(logits, token, sampled, confidence_top, lambda t: token_text(tokenizer, t, prev))
            result.confidence.append(conf)
        piece = release(text.push(tokenizer.token_bytes(token, prev))) if text else ""
        prev = token
        if text and text.stopped:
            result.finish_reason = "stop"
            yield TokenEvent(token, piece, conf)
            break
        last = n == max_tokens or pos >= context
        if last:
            result.context_full = n < max_tokens
            if text:
                piece += release(text.flush())
        yield TokenEvent(token, piece, conf)
        if last:
            break
        logits = model.forward(Batch.sequence([token], pos, seq_id), cache)[0]
        pos += 1
        result.decode_seconds = time.perf_counter() - t1
    result.decode_seconds = time.perf_counter() - t1

    if text and not text.stopped:
        rest = text.flush()
        if rest:
            yield TokenEvent(None, release(rest))
