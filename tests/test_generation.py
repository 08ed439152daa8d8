"""The generation loop: streamed text, stop conditions, finish reasons, and bad prompts."""
import numpy as np
import pytest

import llamarun
from llamarun.errors import LlamarunError
from llamarun.decoding import Completion, TextAssembler
from llamarun import generation
from llamarun.generation import generate_stream

from conftest import MODELS, require


@pytest.fixture(scope="module")
def llama():
    return llamarun.load(str(require(MODELS / "tiny_gqa.bin")), tokenizer=str(require(MODELS / "tokenizer.bin")))


class Scripted:
    """A sampler that plays back a fixed list of token ids (to drive the loop deterministically)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def sample(self, logits, history=()):
        assert logits.shape == (32000,)
        return self.ids.pop(0)


def run_scripted(llama, prompt, ids, max_tokens=50, stop=()):
    result = Completion("", [])
    events = list(generate_stream(llama.model, llama.tokenizer, llama.encode(prompt), Scripted(ids),
                                  max_tokens=max_tokens, end=llama.tokenizer.eog_ids, stop=stop,
                                  result=result))
    return events, result


def ids_of(llama, text):
    return llama.tokenizer.encode(text, bos=False)[1:]   # without the dummy-prefix space token


# -- text assembly ------------------------------------------------------------------------------

def test_a_character_split_over_tokens_waits_for_its_last_byte():
    text = TextAssembler()
    euro = "€".encode()
    assert text.push(euro[:1]) == ""
    assert text.push(euro[1:2]) == ""
    assert text.push(euro[2:] + b"!") == "€!"


def test_a_stop_string_is_held_back_while_forming_and_never_shown():
    text = TextAssembler(stop=["<END>"])
    assert text.push(b"Hello <") == "Hello "
    assert text.push(b"EN") == ""
    assert not text.stopped
    assert text.push(b"D> more") == ""
    assert text.stopped


def test_held_text_that_turns_out_not_to_stop_is_released():
    text = TextAssembler(stop=["<END>"])
    assert text.push(b"a <E") == "a "
    assert text.push(b"X") == "<EX"
    assert text.push(b"<") == ""
    assert text.flush() == "<"


# -- the loop -----------------------------------------------------------------------------------

def test_streamed_pieces_add_up_to_the_completion_text(llama):
    stream = llama.stream("Once upon a time", 30, temperature=0.9, seed=5)
    pieces = "".join(ev.text for ev in stream)
    out = stream.completion
    assert pieces == out.text and len(out.tokens) == 30 and out.finish_reason == "length"
    assert not out.context_full
    again = llama.generate("Once upon a time", 30, temperature=0.9, seed=5)
    assert again.tokens == out.tokens         # a seed reproduces the run


def test_end_token_stops_and_is_not_part_of_the_output(llama):
    events, out = run_scripted(llama, "Hi", ids_of(llama, " there friend") + [2, 500, 600])
    assert out.finish_reason == "stop" and out.end_token == 2
    assert out.text == " there friend" and 2 not in out.tokens
    assert "".join(e.text for e in events) == out.text


def test_stop_string_ends_generation_without_being_printed(llama):
    script = ids_of(llama, " one two three four five")
    events, out = run_scripted(llama, "Count:", script, stop=["three"])
    assert out.finish_reason == "stop"
    assert out.text == " one two "
    assert "three" not in "".join(e.text for e in events)


def test_max_tokens_ends_with_length(llama):
    events, out = run_scripted(llama, "Hi", ids_of(llama, " a b c d e f"), max_tokens=3)
    assert out.finish_reason == "length" and len(out.tokens) == 3 and not out.context_full


def test_a_full_context_ends_with_length_and_says_so(llama):
    prompt = [1] + [450] * 120                       # the context is 128 tokens
    out = llama.generate(prompt, 50, temperature=0)
    assert out.finish_reason == "length" and out.context_full
    assert len(prompt) + len(out.tokens) == 128 + 1  # the last token is drawn from position 127's logits


def one_forward_a_step(monkeypatch):
    """The generation loop with no greedy steps run ahead (one forward a token)."""
    monkeypatch.setattr(generation.GreedyPace, "steps", lambda self, *args: 1)


@pytest.mark.parametrize("options", [dict(max_tokens=37), dict(max_tokens=60, stop=None), dict(max_tokens=300)],
                         ids=["max_tokens", "stop string", "full context"])
def test_greedy_generation_runs_steps_ahead_and_gives_what_one_step_at_a_time_gives(llama, monkeypatch, options):
    """Greedy decoding of a float32 model runs several steps a call (Transformer.greedy) and hands their
    rows to the decoder as a draft's: the events, text and finish are those of one forward a token, also
    where a stop string, max_tokens or the context ends the run inside a call's steps."""
    calls = []
    greedy = llama.model.greedy
    monkeypatch.setattr(llama.model, "greedy", lambda *a, **k: calls.append(a[3]) or greedy(*a, **k))
    prompt = "Once upon a time, there was"
    with monkeypatch.context() as m:
        one_forward_a_step(m)
        plain = llama.stream(prompt, options["max_tokens"], temperature=0)
        plain_events = [(e.token, e.text, e.finish_reason) for e in plain]
    assert not calls
    stop = ()
    if "stop" in options:            # a stop string from the middle of the text, ending inside some call's steps
        text = plain.completion.text
        stop = [text[len(text) // 2:len(text) // 2 + 6]]
        with monkeypatch.context() as m:
            one_forward_a_step(m)
            plain = llama.stream(prompt, options["max_tokens"], temperature=0, stop=stop)
            plain_events = [(e.token, e.text, e.finish_reason) for e in plain]
    ahead = llama.stream(prompt, options["max_tokens"], temperature=0, stop=stop)
    assert [(e.token, e.text, e.finish_reason) for e in ahead] == plain_events
    a, b = ahead.completion, plain.completion
    assert (a.text, a.tokens, a.finish_reason, a.context_full) == (b.text, b.tokens, b.finish_reason, b.context_full)
    assert calls and max(calls) > 2 and a.drafted == a.accepted == 0
    assert b.context_full == (options["max_tokens"] == 300)


def test_greedy_steps_only_where_the_draw_is_the_argmax(llama, monkeypatch):
    calls = []
    monkeypatch.setattr(llama.model, "greedy", lambda *a, **k: calls.append(a) or pytest.fail("not greedy"))
    llama.generate("Once upon a time", 8, temperature=0.9, seed=1)
    llama.generate("Once upon a time", 8, temperature=0, repeat_penalty=1.3)
    llama.generate("Once upon a time", 8, temperature=0, ignore_eos=True)
    assert not calls


def test_a_prompt_longer_than_the_context_is_an_error(llama):
    with pytest.raises(LlamarunError, match="prompt is 200 tokens but the context holds 128"):
        llama.generate([1] + [450] * 199, 5)


def test_empty_prompt_and_bad_ids_are_errors(llama):
    with pytest.raises(LlamarunError, match="empty"):
        llama.generate([], 5)
    with pytest.raises(LlamarunError, match="outside the model's vocabulary"):
        llama.generate([1, 40000], 5)
    with pytest.raises(LlamarunError):
        llama.generate("Hi", -1)


def test_nonsense_sampling_values_are_errors(llama):
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=3), dict(repeat_penalty=0)):
        with pytest.raises(LlamarunError):
            llama.generate("Hi", 5, **bad)


def test_llama2c_sampler_stops_only_at_bos(llama):
    events, out = run_scripted(llama, "Hi", [2, 1], max_tokens=10)
    assert out.end_token == 2                        # the default stop rule: EOS ends it
    result = Completion("", [])
    list(generate_stream(llama.model, llama.tokenizer, [1, 500], Scripted([2, 300, 1]), max_tokens=10,
                         end=frozenset({1}), result=result))
    assert result.tokens == [2, 300] and result.end_token == 1 and result.walked == [1, 500, 2, 300, 1]


def test_logits_api_is_one_batched_teacher_forced_pass(llama):
    ids = llama.tokenizer.encode("Once upon a time", bos=True)
    logits = llama.logits(ids)
    assert logits.shape == (len(ids), 32000) and logits.dtype == np.float32
    assert np.array_equal(llama.logits("Once upon a time"), logits)
