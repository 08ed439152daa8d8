"""The decoding core: one sequence's sampling, end tokens, stop strings, records and processors,
alike in every front end (Llama.stream and the server's scheduler), and speculative verification."""
import numpy as np
import pytest

import llamarun
from llamarun.decoding import LLAMA2C_BOS, LLAMA2C_EOS, Decoder, end_tokens, first_token
from llamarun.errors import LlamarunError
from llamarun.model import Batch
from llamarun.sampling import Llama2cSampler, Sampler

from conftest import MODELS, require


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path)


@pytest.fixture(scope="module")
def chat_prompts(smol):
    from llamarun.chat import chat_format_for
    fmt = chat_format_for(smol)
    return [fmt.encode([{"role": "user", "content": text}], smol.tokenizer)
            for text in ("Say hello.", "Name three colours.", "Write a haiku about the sea.")]


# ----------------------------------------------------------------------------------------------
# the end-token policy

def test_end_tokens_follow_the_sampler_and_the_tokenizer(smol):
    tiny = llamarun.load(str(require(MODELS / "tiny_gqa.bin")), tokenizer=str(require(MODELS / "tokenizer.bin")))
    assert end_tokens(tiny.tokenizer, Llama2cSampler(0.0)) == {LLAMA2C_BOS}     # run.c stops when it draws BOS
    assert end_tokens(tiny.tokenizer, Sampler()) == {LLAMA2C_EOS}
    assert end_tokens(None) == {LLAMA2C_EOS} and first_token(None) == LLAMA2C_BOS
    assert end_tokens(smol.tokenizer) == smol.tokenizer.eog_ids == {0, 2}         # <|endoftext|>, <|im_end|>
    assert first_token(smol.tokenizer) == smol.tokenizer.bos_id


# ----------------------------------------------------------------------------------------------
# the scheduler and Llama.stream: the same requests give the same events

def served(smol, prompt, max_tokens, sampler, **options):
    """One request through the server's scheduler, in this thread, with one slot. -> its events"""
    from llamarun.server.scheduler import Request, Scheduler
    scheduler = Scheduler(smol, parallel=1, ctx=512)
    events = []
    scheduler.submit(Request(prompt, max_tokens, sampler, events.append, logprobs=3, **options))
    steps = 0
    while not (events and events[-1].finish_reason):
        scheduler.admit()
        scheduler.step()
        steps += 1
        assert steps < 1000, "the scheduler did not finish the request"
    return events


def streamed(smol, prompt, max_tokens, sampler, **options):
    """The same request through Llama.stream. -> (events, completion)"""
    stream = smol.stream(prompt, max_tokens, logprobs=3, **options, **sampler)
    return list(stream), stream.completion


def comparable(events):
    """(text, token, logprob, top) per token; an event that only ends the sequence with no text is dropped."""
    return [(e.text, e.logprob.token if e.logprob else None, e.logprob.logprob if e.logprob else None,
             e.logprob.top if e.logprob else None) for e in events if e.text or e.logprob]


@pytest.mark.parametrize("case", ["greedy", "seeded", "stop string", "ignore_eos"])
def test_the_scheduler_and_llama_stream_give_the_same_events(smol, chat_prompts, case):
    settings = {"greedy": (dict(temperature=0), {}, 0),
                "seeded": (dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=7), {}, 1),
                "stop string": (dict(temperature=0), dict(stop=("e",)), 1),
                "ignore_eos": (dict(temperature=0), dict(ignore_eos=True), 0)}
    sampling, options, which = settings[case]
    # room for the greedy reply to end by itself (its length moves with the fast path's rounding: 22-29
    # tokens), and for ignore_eos to run past where it would have ended
    prompt, max_tokens = chat_prompts[which], 24 if case in ("seeded", "stop string") else 48
    events, completion = streamed(smol, prompt, max_tokens, sampling, **options)
    served_events = served(smol, prompt, max_tokens, Sampler(**sampling), **options)

    assert comparable(served_events) == comparable(events)
    assert served_events[-1].finish_reason == completion.finish_reason
    assert served_events[-1].completion_tokens == len(completion.tokens)
    assert [e.logprob.token for e in served_events if e.logprob] == completion.tokens
    if case == "greedy":
        assert completion.end_token == 2 and completion.finish_reason == "stop"   # it ends by itself...
    if case == "ignore_eos":
        assert completion.finish_reason == "length" and len(completion.tokens) == max_tokens   # ...not here
        assert not set(completion.tokens) & smol.tokenizer.eog_ids
    if case == "stop string":
        assert completion.finish_reason == "stop" and "e" not in completion.text
    if case == "seeded":
        greedy, _ = streamed(smol, prompt, max_tokens, dict(temperature=0))
        assert comparable(greedy) != comparable(events)                            # it did sample


# ----------------------------------------------------------------------------------------------
# logits processors

def test_logit_bias_bans_and_processors_see_the_sequence(smol, chat_prompts):
    prompt = chat_prompts[1]
    plain = smol.generate(prompt, 8, temperature=0)
    first = plain.tokens[0]
    banned = smol.generate(prompt, 8, temperature=0, logit_bias={first: -np.inf})
    assert banned.tokens[0] != first and first not in banned.tokens

    seen = []

    def record(ids, logits):
        seen.append(list(ids))
        logits[first] += 1000.0                     # force the first token everywhere
    forced = smol.generate(prompt, 3, temperature=0, processors=[record])
    assert forced.tokens == [first] * 3
    assert seen == [prompt, prompt + [first], prompt + [first, first]]


# ----------------------------------------------------------------------------------------------
# several tokens at once: speculative verification

def verify_with_drafts(smol, prompt, drafts, max_tokens):
    """Greedy decoding where each step verifies a draft in one forward ([last token] + draft) and goes
    on from the decoder's position, writing over the rejected tokens' keys and values."""
    cache = smol.model.new_cache()
    decoder = Decoder(smol.tokenizer, Sampler(temperature=0), prompt, context=cache.seq_len, max_tokens=max_tokens,
                      ignore_eos=True)
    logits = smol.model.forward(Batch.sequence(prompt), cache)[-1]
    last = decoder.next_token(logits).token
    for draft in drafts:
        if decoder.done:
            break
        rows = smol.model.forward(Batch.sequence([last] + draft, decoder.pos - 1, all_logits=True), cache)
        events = decoder.accept(rows, draft)
        last = events[-1].token
    return decoder.completion


def test_accepting_drafts_gives_the_tokens_of_one_at_a_time_decoding(smol, chat_prompts):
    prompt = chat_prompts[2]
    alone = smol.generate(prompt, 20, temperature=0, ignore_eos=True)
    want = alone.tokens
    wrong = [(t + 1) % smol.config.vocab_size for t in want]
    # after the prefill's want[0]: a right draft (4 kept, then want[5] drawn past it), one wrong at its
    # second token (want[6] kept, want[7] drawn in place of the wrong one), a wholly wrong one (want[8]
    # drawn), right ones again, and the last token
    drafts = [want[1:5], [want[6], wrong[7], want[8]], wrong[8:11], want[9:13], want[14:18], want[19:23]]
    done = verify_with_drafts(smol, prompt, drafts, 20)
    assert done.tokens == want and done.finish_reason == "length"
    assert (done.drafted, done.accepted) == (4 + 3 + 3 + 4 + 4 + 1, 4 + 1 + 0 + 4 + 4 + 1)


def test_a_finished_decoder_refuses_more_tokens(smol, chat_prompts):
    decoder = Decoder(smol.tokenizer, Sampler(temperature=0), chat_prompts[0], context=512, max_tokens=1)
    row = np.zeros(smol.config.vocab_size, np.float32)
    row[5] = 1.0
    event = decoder.next_token(row)
    assert event.token == 5 and event.finish_reason == "length" and decoder.done
    with pytest.raises(RuntimeError):
        decoder.next_token(row)
    with pytest.raises(LlamarunError):
        Decoder(smol.tokenizer, Sampler(), chat_prompts[0], context=512, max_tokens=-1)


def test_the_context_ends_a_sequence_whose_next_token_has_no_position(smol, chat_prompts):
    prompt = chat_prompts[0]
    decoder = Decoder(smol.tokenizer, Sampler(temperature=0), prompt, context=len(prompt) + 2, max_tokens=10)
    row = np.zeros(smol.config.vocab_size, np.float32)
    row[300] = 1.0
    reasons = [decoder.next_token(row).finish_reason for _ in range(3)]
    assert reasons == [None, None, "length"] and decoder.completion.context_full
