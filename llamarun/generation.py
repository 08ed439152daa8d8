"""The generation loop for one sequence: prefill the prompt in one pass, then decode token by token.

`generate_stream` drives one sequence's `Decoder` (llamarun/decoding.py: sampling, end tokens, stop
strings, text, finish reasons, records) with forward passes of the model; every single-sequence
front end uses it (the API's `Llama.stream` and `generate`, `ChatSession`, the attention recorder,
the CLI). The server's scheduler drives the same Decoder, many sequences per forward.
It yields a `TokenEvent` per drawn token, carrying the text that token completes. Text is held back
while it is still unfinished: the bytes of a UTF-8 character split over several tokens, or the start
of what may become a stop string (which is never shown).

With a `Speculation` (llamarun/speculative.py) each step after the prompt's may take several tokens:
the drawn token runs with a draft behind it, every row's logits come back, and the Decoder's
`accept` keeps the agreeing prefix and draws one token more (without a draft, that is one draw:
`next_token`). The next step runs from `decoder.pos - 1` either way, over the rejected draft's
positions in the cache.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

from . import compiling
from .decoding import Completion, Decoder, LogitsProcessor, TokenEvent, check_prompt
from .interrupts import ctrl_c_never_lost
from .model import Batch, KVCache, Probe, Transformer
from .speculative import Speculation, verify


def generate_stream(model: Transformer, tokenizer, prompt_ids: Sequence[int], sampler, *, max_tokens: int,
                    end: frozenset[int] | None = None, ignore_eos: bool = False, stop: Sequence[str] = (),
                    cache: KVCache | None = None, start_pos: int = 0, seq_id: int = 0,
                    result: Completion | None = None, confidence: bool = False, confidence_top: int = 5,
                    logprobs: int | None = None, processors: Sequence[LogitsProcessor] = (),
                    grammar=None, probe: Probe | None = None, speculation: Speculation | None = None,
                    earlier_ids: Sequence[int] = ()) -> Iterator[TokenEvent]:
    """An iterator of one TokenEvent per new token, filling `result` (a Completion) as it goes.

    The cache may already hold `start_pos` tokens of this sequence (a chat's earlier turns); the
    prompt continues from there. end, ignore_eos, stop, logprobs, processors, grammar (a
    structured.Matcher): as `Decoder`'s; the tokens a grammar forces run through the model together,
    in the forward of the token drawn before them (or of the prompt).
    confidence: each event (and `result.confidence`) carries the token's confidence figures, with
    the `confidence_top` most probable alternatives (llamarun/logprobs.py). probe: what inspection
    tools ask of every forward (model.Probe). speculation: drafts to verify after each drawn token
    (not with a probe, whose forwards are one token's); earlier_ids: the ids at positions
    [0, start_pos), when the caller knows them (a chat's earlier turns), which drafts start from.
    Bad input is refused here, before anything runs.
    """
    cache = cache or model.new_cache()
    check_prompt(prompt_ids, start_pos, cache.seq_len, model.config.vocab_size)
    decoder = Decoder(tokenizer, sampler, list(prompt_ids), context=cache.seq_len, max_tokens=max_tokens,
                      start_pos=start_pos, end=end, ignore_eos=ignore_eos, stop=stop, logprobs=logprobs,
                      confidence_top=confidence_top if confidence else None, processors=processors,
                      grammar=grammar, completion=result)
    earlier = list(earlier_ids) if len(earlier_ids) == start_pos else None
    drafts = speculation if probe is None or not probe.active else None
    return _generate(model, decoder, list(prompt_ids), cache, start_pos, seq_id, probe, drafts, earlier)


def _generate(model: Transformer, decoder: Decoder, prompt_ids: list[int], cache: KVCache, start_pos: int,
              seq_id: int, probe: Probe | None, speculation: Speculation | None,
              earlier: list[int] | None) -> Iterator[TokenEvent]:
    result = decoder.completion
    # rates leave out the kernels' first compile (llamarun/compiling.py), reported on its own
    c0, t0 = compiling.seconds(), time.perf_counter()
    c1 = t1 = None
    # the ids the next forward runs, from position `at`: the prompt, then each drawn token; either
    # followed by the tokens a grammar forces after it, which run in the same forward
    pending, at = list(prompt_ids), start_pos
    pace = GreedyPace()
    while True:
        forced = decoder.take_forced(decoder.forced())
        for event in forced:
            if event.token is not None:
                pending.append(event.token)
            if event.token is not None or event.text:
                yield event
        if forced and decoder.done:
            # Every taken token but the last has run, here as after a drawn one: a chat's next turn
            # reuses the cache on that promise (ChatSession). Forced tokens that ended the sequence
            # have not, so they run now, their logits unused (a forced end token is not in `pending`).
            ran = pending if forced[-1].token is None else pending[:-1]
            if ran:
                with ctrl_c_never_lost():
                    model.forward(Batch.sequence(ran, at, seq_id), cache, probe)
            break
        # after the prompt, with no draft to verify and no probe to show each step: greedy steps may run ahead
        ahead = t1 is not None and speculation is None and probe is None
        steps = pace.steps(decoder, model, pending, at, cache) if ahead else 1
        if steps > 1:               # greedy steps run ahead in one call, their rows checked as a draft's
            with ctrl_c_never_lost():
                ran, rows = pace.run(model, pending[0], at, cache, steps, decoder.end, seq_id)
        else:
            draft = _draft(speculation, decoder, model, pending, at, cache, earlier) if t1 is not None else []
            batch = Batch.sequence(pending + draft, at, seq_id)
            batch.logits[len(pending) - 1:] = True          # the rows that verify the draft and draw past it
            with ctrl_c_never_lost():   # a Ctrl-C raises after the native call it lands in, never inside numba
                rows = model.forward(batch, cache, probe)
        if t1 is None:
            c1, t1 = compiling.seconds(), time.perf_counter()
            result.prefill_seconds = t1 - t0 - (c1 - c0)
        else:
            result.decode_seconds = time.perf_counter() - t1 - (compiling.seconds() - c1)
        if decoder.done:            # max_tokens=0: the prompt ran, nothing is drawn
            break
        if steps > 1:
            events = decoder.accept(rows, ran[1:].tolist(), drafted=False)
        else:
            events, _ = verify(decoder, rows, draft, speculation)   # one draw per row while they agree with the draft
        for event in events:
            if event.token is not None or event.text:     # an end token that releases no text is not shown
                yield event
        if decoder.done:
            break
        pending, at = [events[-1].token], decoder.pos - 1
    if t1 is not None:
        result.decode_seconds = time.perf_counter() - t1 - (compiling.seconds() - c1)
    result.compile_seconds = compiling.seconds() - c0


def _draft(speculation: Speculation | None, decoder: Decoder, model: Transformer, pending: list[int], at: int,
           cache: KVCache, earlier: list[int] | None) -> list[int]:
    """The draft to run behind `pending`, within what the context and max_tokens leave, and within
    the batch sizes whose rows are computed independently of each other (model.matvec_rows), so that
    each row's logits, and greedy output, are what decoding one token at a time gives."""
    if speculation is None or decoder.done:
        return []
    result = decoder.completion
    room = min(cache.seq_len - at - len(pending),
               decoder.max_tokens - len(result.tokens) - 1,          # accept draws one token past the draft
               model.matvec_rows - len(pending))
    if room < 1:
        return []
    # the sequence from position 0 when it is known; else from the prompt (n-gram drafts still work)
    tokens = decoder.history if earlier is None else earlier + decoder.history
    return speculation.draft(tokens, room, decoder.end, ahead=len(pending))


# Greedy steps a call (model.Transformer.greedy), where the decoder's draw is the argmax: about
# GREEDY_SECONDS of them (two at least), so that streamed text still comes in small bursts, and
# GREEDY_MAX_STEPS at most.
GREEDY_SECONDS = 0.1
GREEDY_MAX_STEPS = 16


class GreedyPace:
    """How many greedy steps the next call runs, from the time a step took in the last one."""

    def __init__(self):
        self.step_seconds = None

    def steps(self, decoder: Decoder, model: Transformer, pending: list[int], at: int, cache: KVCache) -> int:
        """Steps for the next call: 1 (one forward, as without them) unless the model runs greedy steps in
        one call, the decoder's draw is the argmax, and two steps or more fit the context and max_tokens."""
        if len(pending) != 1 or not model.greedy_steps or decoder.done or not decoder.draws_argmax():
            return 1
        room = min(cache.seq_len - at, decoder.max_tokens - len(decoder.completion.tokens))
        want = 2 if self.step_seconds is None else int(GREEDY_SECONDS / max(self.step_seconds, 1e-6))
        return max(1, min(room, max(2, want), GREEDY_MAX_STEPS))

    def run(self, model: Transformer, token: int, at: int, cache: KVCache, steps: int, end, seq_id: int):
        """model.greedy, timed (a compile of the kernels left out)."""
        compiled, start = compiling.seconds(), time.perf_counter()
        ran, rows = model.greedy(token, at, cache, steps, end, seq_id)
        self.step_seconds = (time.perf_counter() - start - (compiling.seconds() - compiled)) / len(ran)
        return ran, rows
