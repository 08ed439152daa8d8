"""The generation loop for one sequence: prefill the prompt in one pass, then decode token by token.

`generate_stream` drives one sequence's `Decoder` (llamarun/decoding.py: sampling, end tokens, stop
strings, text, finish reasons, records) with forward passes of the model; every single-sequence
front end uses it (the API's `Llama.stream` and `generate`, `ChatSession`, the attention recorder,
the CLI). The server's scheduler drives the same Decoder, many sequences per forward.
It yields a `TokenEvent` per drawn token, carrying the text that token completes. Text is held back
while it is still unfinished: the bytes of a UTF-8 character split over several tokens, or the start
of what may become a stop string (which is never shown).
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

from . import compiling
from .decoding import Completion, Decoder, LogitsProcessor, TokenEvent, check_prompt
from .interrupts import ctrl_c_never_lost
from .model import Batch, KVCache, Probe, Transformer


def generate_stream(model: Transformer, tokenizer, prompt_ids: Sequence[int], sampler, *, max_tokens: int,
                    end: frozenset[int] | None = None, ignore_eos: bool = False, stop: Sequence[str] = (),
                    cache: KVCache | None = None, start_pos: int = 0, seq_id: int = 0,
                    result: Completion | None = None, confidence: bool = False, confidence_top: int = 5,
                    logprobs: int | None = None, processors: Sequence[LogitsProcessor] = (),
                    grammar=None, probe: Probe | None = None) -> Iterator[TokenEvent]:
    """An iterator of one TokenEvent per new token, filling `result` (a Completion) as it goes.

    The cache may already hold `start_pos` tokens of this sequence (a chat's earlier turns); the
    prompt continues from there. end, ignore_eos, stop, logprobs, processors, grammar (a
    structured.Matcher): as `Decoder`'s; the tokens a grammar forces run through the model together,
    in the forward of the token drawn before them (or of the prompt).
    confidence: each event (and `result.confidence`) carries the token's confidence figures, with
    the `confidence_top` most probable alternatives (llamarun/logprobs.py). probe: what inspection
    tools ask of every forward (model.Probe). Bad input is refused here, before anything runs.
    """
    cache = cache or model.new_cache()
    check_prompt(prompt_ids, start_pos, cache.seq_len, model.config.vocab_size)
    decoder = Decoder(tokenizer, sampler, list(prompt_ids), context=cache.seq_len, max_tokens=max_tokens,
                      start_pos=start_pos, end=end, ignore_eos=ignore_eos, stop=stop, logprobs=logprobs,
                      confidence_top=confidence_top if confidence else None, processors=processors,
                      grammar=grammar, completion=result)
    return _generate(model, decoder, list(prompt_ids), cache, start_pos, seq_id, probe)


def _generate(model: Transformer, decoder: Decoder, prompt_ids: list[int], cache: KVCache, start_pos: int,
              seq_id: int, probe: Probe | None) -> Iterator[TokenEvent]:
    result = decoder.completion
    # rates leave out the kernels' first compile (llamarun/compiling.py), reported on its own
    c0, t0 = compiling.seconds(), time.perf_counter()
    c1 = t1 = None
    # the ids the next forward runs, from position `at`: the prompt, then each drawn token; either
    # followed by the tokens a grammar forces after it, which run in the same forward
    pending, at = list(prompt_ids), start_pos
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
        with ctrl_c_never_lost():   # a Ctrl-C raises after the native call it lands in, never inside numba
            logits = model.forward(Batch.sequence(pending, at, seq_id), cache, probe)[-1]
        if t1 is None:
            c1, t1 = compiling.seconds(), time.perf_counter()
            result.prefill_seconds = t1 - t0 - (c1 - c0)
        else:
            result.decode_seconds = time.perf_counter() - t1 - (compiling.seconds() - c1)
        if decoder.done:            # max_tokens=0: the prompt ran, nothing is drawn
            break
        event = decoder.next_token(logits)
        if event.token is not None or event.text:     # an end token that releases no text is not shown
            yield event
        if decoder.done:
            break
        pending, at = [event.token], decoder.pos - 1
    if t1 is not None:
        result.decode_seconds = time.perf_counter() - t1 - (compiling.seconds() - c1)
    result.compile_seconds = compiling.seconds() - c0
