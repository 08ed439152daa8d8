"""The decoding core: what happens to one sequence between two forward passes.

A `Decoder` owns everything per-token about one sequence: its sampler (with its RNG) and the history
its penalties read, the logits processors applied before each draw (`ignore_eos`'s ban of the end
tokens, `logit_bias`), the grammar a structured output follows (its mask, applied last, and the
tokens it forces), the end-of-generation tokens, the stop strings and the UTF-8 text assembler, the
finish reason, and the confidence / logprob records. It never runs the model: a driver does, and
hands it each logits row, which becomes the decoder's (its processors change it in place).

Every front end drives sequences through it: `generation.generate_stream` (the Python API's
`Llama.stream`, `ChatSession`, the attention recorder, the CLI) one sequence at a time, and the
server's scheduler many at once, one row of a batched forward each; so a request behaves alike in
all of them.

    decoder = Decoder(tokenizer, sampler, prompt_ids, context=cache.seq_len, max_tokens=64)
    logits = prefill(prompt_ids)                  # the last prompt position's row
    while True:
        event = decoder.next_token(logits)        # draw, record, assemble text
        ...show event.text...
        if decoder.done:
            break
        logits = forward([event.token], decoder.pos - 1)

Under a grammar (llamarun/structured.py) some tokens are the grammar's alone to decide (the keys
and punctuation a JSON schema fixes): `forced()` names them and `take_forced` records them
without a draw, and the driver runs them through the model together, as a short prefill.

Speculative decoding verifies a draft with one forward over [last token] + draft and hands the rows
to `accept`, which keeps the longest prefix the sampler agrees with (and draws one token more);
the driver goes on from `decoder.pos - 1` as after one token, which rolls its KV cache back (the
positions of rejected draft tokens are written over).

The special token ids live here too: which ids end generation (`end_tokens`) and what a prompt
starts with when it has no text (`first_token`); and what a token id is at all (`check_token_ids`).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import LlamarunError
from .logprobs import TokenConfidence, TokenLogprob, measure, token_logprob, token_text
from .structured import apply_mask

# llama2.c's fixed ids (its tokenizer.bin, and run.c, which stops when it draws BOS)
LLAMA2C_BOS, LLAMA2C_EOS = 1, 2


def end_tokens(tokenizer, sampler=None) -> frozenset[int]:
    """The ids that end generation: run.c's sampler stops only when it draws BOS (as run.c does);
    otherwise the tokenizer's end-of-generation ids (EOS and end-of-turn tokens), its EOS where it
    lists none, and llama2.c's EOS for a model without a tokenizer."""
    from .sampling import Llama2cSampler
    if isinstance(sampler, Llama2cSampler):
        return frozenset({LLAMA2C_BOS})
    if tokenizer is None:
        return frozenset({LLAMA2C_EOS})
    if tokenizer.eog_ids:
        return frozenset(tokenizer.eog_ids)
    return frozenset() if tokenizer.eos_id is None else frozenset({tokenizer.eos_id})


def first_token(tokenizer) -> int:
    """The id a prompt of no text starts with: BOS (llama2.c's BOS for a model without a tokenizer)."""
    if tokenizer is None or tokenizer.bos_id is None:
        return LLAMA2C_BOS
    return tokenizer.bos_id


# ----------------------------------------------------------------------------------------------
# what a decoder reports

@dataclass
class TokenEvent:
    token: int | None     # the drawn id; None for an event that only ends the sequence or flushes text
    text: str             # text released by this event (may be "" while text is held back)
    confidence: TokenConfidence | None = None   # how sure the model was of `token` (when asked)
    logprob: TokenLogprob | None = None         # its log probability and the top k (when asked)
    finish_reason: str | None = None            # on the sequence's last event: "stop" or "length"


@dataclass
class Completion:
    text: str                          # the new text (no prompt, no stop string, no end token)
    tokens: list[int]                  # the new ids (no end token)
    finish_reason: str = "length"      # "stop": end token, stop string or complete grammar; "length": max_tokens or context
    context_full: bool = False         # generation ended because the context was full
    prompt_tokens: list[int] = field(default_factory=list)
    end_token: int | None = None       # the end token that stopped generation, if one did
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0       # kernels compiled during this run (left out of the two above)
    confidence: list[TokenConfidence] = field(default_factory=list)   # one per `tokens` entry, when asked
    logprobs: list[TokenLogprob] = field(default_factory=list)        # one per `tokens` entry, when asked
    drafted: int = 0                   # speculative decoding: draft tokens offered to `accept`
    accepted: int = 0                  # ... and kept

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


# ----------------------------------------------------------------------------------------------
# logits processors: applied to a row before the draw

# A logits processor takes the sequence's ids so far (prompt and drawn tokens) and its logits row
# (float32, (vocab,), the decoder's own copy) and changes the row in place, or returns a new one.
LogitsProcessor = Callable[[Sequence[int], np.ndarray], "np.ndarray | None"]


class LogitBias:
    """Adds a fixed bias to some tokens' logits (OpenAI's and llama.cpp's `logit_bias`); -inf bans a
    token (no sampler draws it, and its probability in `distribution` is 0): llama.cpp's
    --ignore-eos is this bias on the end-of-generation tokens."""

    def __init__(self, bias: Mapping[int, float]):
        self.ids = np.array(sorted(bias), np.int64)
        self.values = np.array([bias[t] for t in self.ids], np.float32)

    @classmethod
    def ban(cls, tokens: Iterable[int]) -> "LogitBias":
        return cls({int(t): -np.inf for t in tokens})

    def __call__(self, ids: Sequence[int], logits: np.ndarray) -> None:
        if len(self.ids):
            logits[self.ids] += self.values


def check_token_ids(ids, vocab_size: int) -> list[int]:
    """`ids` as a list of Python ints, once each is known to be a token of the vocabulary [0, vocab_size).

    Every way token ids come into llamarun from a caller (Llama.encode, decode, logits, generate,
    stream, the generation loop) passes here: an id of -1 would index the embedding table from its
    end, and 1.5 or True would be read as 1.
    """
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise LlamarunError(f"token ids must be a sequence of integers, not {type(ids).__name__} {ids!r:.40}")
    out = []
    for n, token in enumerate(ids):
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise LlamarunError(f"token ids must be integers: item {n} is {type(token).__name__} {token!r:.40}")
        if not 0 <= token < vocab_size:
            raise LlamarunError(f"token id {token} (item {n}) is outside the model's vocabulary [0, {vocab_size})")
        out.append(int(token))
    return out


def check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise LlamarunError(f"{name} must be an integer >= 0, not {type(value).__name__} {value!r:.40}")


def check_prompt(prompt_ids: Sequence[int], start_pos: int, context: int, vocab_size: int) -> None:
    if not len(prompt_ids):
        raise LlamarunError("the prompt is empty: give some text or at least one token id")
    if start_pos + len(prompt_ids) > context:
        raise LlamarunError(f"the prompt is {len(prompt_ids)} tokens but the context holds {context - start_pos} "
                            "more: shorten the prompt, or give a longer context (--ctx, load(n_ctx=)) up to the "
                            "model's trained one")
    check_token_ids(prompt_ids, vocab_size)


# ----------------------------------------------------------------------------------------------
# the decoder

class Decoder:
    """One sequence's decoding: from each logits row the driver hands it, the next token and its event.

    prompt: the ids the cache holds (or is about to) after `start_pos`, whose last position gives the
    first logits row; context: the cache's positions (a drawn token that no longer fits ends the
    sequence: "length", `context_full`). end: the ids that end it ("stop"; default `end_tokens`);
    ignore_eos: they are banned instead, so only max_tokens, the context or a stop string end it.
    stop: strings that end it, never shown. logprobs=k: each event's TokenLogprob with the top k;
    confidence_top=k: each event's TokenConfidence with k alternatives. processors: logits
    processors, applied in order after the ban of the end tokens. grammar: a structured.Matcher:
    the tokens it does not allow are -inf after the processors, each token taken advances it, and
    once it is complete the sequence ends ("stop"; an end token, allowed as soon as the grammar may
    end, ends it too). completion: the Completion to fill (a new one by default). Without a
    tokenizer the events carry ids only (text is "").
    """

    def __init__(self, tokenizer, sampler, prompt: Sequence[int], *, context: int, max_tokens: int,
                 start_pos: int = 0, end: frozenset[int] | None = None, ignore_eos: bool = False,
                 stop: Sequence[str] = (), logprobs: int | None = None, confidence_top: int | None = None,
                 processors: Sequence[LogitsProcessor] = (), grammar=None, completion: Completion | None = None):
        check_count("max_tokens (the number of new tokens)", max_tokens)
        if confidence_top is not None:
            check_count("confidence_top (the number of alternatives)", confidence_top)
        if logprobs is not None:
            check_count("logprobs (the number of most probable tokens)", logprobs)
        stop = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, Iterable) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise LlamarunError(f"stop must be a string or a list of strings, not {stop!r:.60}")
        self.tokenizer, self.sampler = tokenizer, sampler
        self.end = end_tokens(tokenizer, sampler) if end is None else frozenset(end)
        self.processors = list(processors)
        if ignore_eos and self.end:
            self.processors.insert(0, LogitBias.ban(self.end))
            self.end = frozenset()
        self.grammar = grammar
        self.max_tokens, self.context = max_tokens, context
        self.logprobs, self.confidence_top = logprobs, confidence_top
        self.history = list(prompt)              # what the penalties and the processors see
        self.pos = start_pos + len(prompt)       # the position of the next drawn token
        self.prev = prompt[-1] if len(prompt) else None     # the token before it (for token_bytes)
        self.text = TextAssembler(stop) if tokenizer is not None else None
        self.completion = completion if completion is not None else Completion("", [])   # what it fills
        self.completion.prompt_tokens = list(prompt)
        self.done = max_tokens == 0

    # -- one token ----------------------------------------------------------------------------

    def next_token(self, logits: np.ndarray) -> TokenEvent:
        """Draw the next token from its logits row (vocab,), record it, and report it. The event's
        finish_reason is set when this token ends the sequence (then `done`)."""
        if self.done:
            raise RuntimeError("this sequence has finished")
        logits = self.processed(logits)
        return self._take(self._draw(logits), logits)

    def processed(self, logits: np.ndarray) -> np.ndarray:
        """The row the sampler draws from: the processors applied (when there are any), then the
        grammar's mask (last, so that no bias can bring back a token it rules out).

        The processors change the row in place: the drivers hand over rows of a forward's output that
        nothing reads afterwards (a row two choices draw from is copied for each: server/scheduler.py),
        as llama.cpp's samplers and Hugging Face's logits processors change theirs. A copy of a
        vocabulary-sized row for every drawn token was a measurable part of a served step with
        `ignore_eos` (the end tokens' ban): right after a forward, whose weight stream has left the
        copy's destination out of the caches (docs/performance.md, 2026-12-06 21:50). A read-only row,
        or one not of float32, is copied."""
        row = logits
        if self.processors:
            if row.dtype != np.float32 or not row.flags.writeable:
                row = np.array(logits, np.float32)
            for processor in self.processors:
                changed = processor(self.history, row)
                if changed is not None:
                    row = changed
        if self.grammar is not None:
            row = apply_mask(row, self.grammar.allowed())
        return row

    def draws_argmax(self) -> bool:
        """Whether the next draw is the argmax of the model's own logits row: a greedy sampler whose
        chain cannot move it, no processors, no grammar. A driver may then run several greedy steps in
        one call (model.Transformer.greedy) and hand their rows to `accept`."""
        draws = getattr(self.sampler, "draws_argmax", None)
        return not self.processors and self.grammar is None and draws is not None and draws(self.history)

    def _draw(self, logits: np.ndarray) -> int:
        return int(self.sampler.sample(logits, self.history))

    def _take(self, token: int, logits: np.ndarray | None) -> TokenEvent:
        """Record `token` (drawn from `logits`; None: forced by the grammar) and make its event."""
        result = self.completion
        # the distribution is taken with the history the token was drawn with (it draws no coin)
        sampled = self.sampler.distribution(logits, self.history) \
            if self.confidence_top is not None and logits is not None else None
        self.history.append(token)
        if token in self.end:
            result.finish_reason, result.end_token = "stop", token
            return self._finish(TokenEvent(None, self._flush(), finish_reason="stop"))
        if self.grammar is not None:
            self.grammar.consume(token)
        result.tokens.append(token)
        event = TokenEvent(token, "")
        if sampled is not None:
            event.confidence = measure(logits, token, sampled, self.confidence_top,
                                       lambda t, prev=self.prev: token_text(self.tokenizer, t, prev))
            result.confidence.append(event.confidence)
        if self.logprobs is not None and logits is not None:
            event.logprob = token_logprob(logits, token, self.logprobs)
            result.logprobs.append(event.logprob)
        if self.text is not None:
            event.text = self._release(self.text.push(self.tokenizer.token_bytes(token, self.prev)))
        self.prev = token
        self.pos += 1
        if self.text is not None and self.text.stopped:
            result.finish_reason = "stop"
            event.finish_reason = "stop"
            return self._finish(event)
        if self.grammar is not None and self.grammar.finished:
            result.finish_reason = "stop"
            event.text += self._flush()
            event.finish_reason = "stop"
            return self._finish(event)
        if len(result.tokens) >= self.max_tokens or self.pos > self.context:
            # the token was drawn but cannot be run: the context holds no position for it
            result.finish_reason = "length"
            result.context_full = len(result.tokens) < self.max_tokens
            event.text += self._flush()
            event.finish_reason = "length"
            return self._finish(event)
        return event

    def _release(self, s: str) -> str:
        self.completion.text += s          # the text so far, readable while the sequence runs
        return s

    def _flush(self) -> str:
        return self._release(self.text.flush()) if self.text is not None else ""

    def _finish(self, event: TokenEvent) -> TokenEvent:
        self.done = True
        return event

    # -- tokens the grammar forces ------------------------------------------------------------------

    def forced(self) -> list[int]:
        """The tokens the grammar decides alone from here (often []): the driver appends them with
        `take_forced` instead of drawing them one forward at a time. Empty when records of the
        model's own probabilities are asked for (logprobs, confidence): every token is then drawn
        from its row, where the grammar's mask leaves only what it allows."""
        if self.grammar is None or self.done or self.logprobs is not None or self.confidence_top is not None:
            return []
        return self.grammar.forced()

    def take_forced(self, tokens: Sequence[int]) -> list[TokenEvent]:
        """Record forced tokens as if drawn (history, text, grammar, finish): one event each, fewer
        when the sequence ends among them. The driver then runs the taken ones through the model in
        one batch, the last one's row giving the next draw."""
        events = []
        for token in tokens:
            if self.done:
                break
            events.append(self._take(int(token), None))
        return events

    # -- several tokens at once (speculative verification) ----------------------------------------

    def accept(self, rows: np.ndarray, draft: Sequence[int], drafted: bool = True) -> list[TokenEvent]:
        """Verify a draft: rows[i] are the logits after the sequence's last drawn token and draft[:i]
        ((len(draft) + 1, vocab), one forward over [last token] + draft). Draws from each row in turn
        and keeps going while the drawn token is the draft's: each kept token is drawn from the
        target model's own distribution, so the output is what decoding one token at a time gives
        (greedy: token for token). A grammar's mask applies to every row, from the state the
        tokens taken before it left. -> the events of the tokens taken (the agreeing prefix, then the
        first token drawn where the draft went wrong, or one past a fully accepted draft), fewer if
        the sequence ends. The driver then runs the last event's token at `pos - 1`, as after
        `next_token`: that rolls its KV cache back, the rejected draft tokens' keys and values
        being written over. drafted=False: the tokens are not a draft but greedy steps run ahead (no
        draft counts)."""
        events = []
        if drafted:
            self.completion.drafted += len(draft)
        for i, row in enumerate(rows[:len(draft) + 1]):
            if self.done:
                break
            logits = self.processed(row)
            token = self._draw(logits)
            events.append(self._take(token, logits))
            if i == len(draft) or token != draft[i]:
                break
            if drafted:
                self.completion.accepted += 1
        return events
