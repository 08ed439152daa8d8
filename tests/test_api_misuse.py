"""The Python API, called wrongly (issue 19, point 6): every mistake is one LlamarunError that says
what is wrong, never a TypeError or IndexError from inside, and never a silent wrong answer (an id of
-1 read as the last row of the embedding table, 1.5 read as 1)."""
import numpy as np
import pytest

import llamarun
from llamarun.errors import LlamarunError

from conftest import MODELS, require

VOCAB = 32000


@pytest.fixture(scope="module")
def tiny():
    return llamarun.load(require(MODELS / "tiny_gqa.bin"), tokenizer=require(MODELS / "tokenizer.bin"))


MISUSES = {
    "generate(123)": (lambda m: m.generate(123), "a prompt is text .* or a sequence of token ids, not int 123"),
    "generate(None)": (lambda m: m.generate(None), "not NoneType"),
    "generate(b'Hi')": (lambda m: m.generate(b"Hi"), "not bytes"),
    "max_tokens='5'": (lambda m: m.generate("Hi", max_tokens="5"), "max_tokens .* must be an integer >= 0, not str '5'"),
    "max_tokens=-1": (lambda m: m.generate("Hi", max_tokens=-1), "max_tokens .* must be an integer >= 0"),
    "logprobs='3'": (lambda m: m.generate("Hi", 2, logprobs="3"), "logprobs .* must be an integer >= 0"),
    "stop=5": (lambda m: m.generate("Hi", 2, stop=5), "stop must be a string or a list of strings"),
    "logits([-1])": (lambda m: m.logits([-1]), rf"token id -1 \(item 0\) is outside the model's vocabulary \[0, {VOCAB}\)"),
    "logits([10**9])": (lambda m: m.logits([1, 10**9]), r"token id 1000000000 \(item 1\) is outside"),
    "logits([])": (lambda m: m.logits([]), "no tokens to score"),
    "decode([10**9])": (lambda m: m.decode([10**9]), "token id 1000000000 .* is outside"),
    "decode([-1])": (lambda m: m.decode([-1]), "token id -1 .* is outside"),
    "generate([1.5])": (lambda m: m.generate([1.5]), "token ids must be integers: item 0 is float 1.5"),
    "generate([True])": (lambda m: m.generate([True]), "item 0 is bool"),
    "generate(float array)": (lambda m: m.generate(np.array([1.0, 2.0])), "item 0 is float64"),
    "stream([[1, 2]])": (lambda m: m.stream([[1, 2]]), "item 0 is list"),
    "encode([VOCAB])": (lambda m: m.encode([VOCAB]), "outside"),
    "logit_bias={-1: 5}": (lambda m: m.generate("Hi", 2, logit_bias={-1: 5.0}), "token id -1 .* is outside"),
    "logit_bias={5: 'x'}": (lambda m: m.generate("Hi", 2, logit_bias={5: "x"}), r"logit_bias\[5\] must be a number"),
}


@pytest.mark.parametrize("call, message", MISUSES.values(), ids=MISUSES.keys())
def test_misuse_is_one_clear_llamarun_error(tiny, call, message):
    with pytest.raises(LlamarunError, match=message) as caught:
        call(tiny)
    assert "\n" not in str(caught.value)


def test_token_ids_of_every_integer_kind_pass(tiny):
    assert tiny.encode(np.array([1, 2, 3], np.int32)) == tiny.encode((1, 2, 3)) == tiny.encode(range(1, 4)) == [1, 2, 3]
    assert all(type(t) is int for t in tiny.encode(np.array([1, 2])))
    assert tiny.decode([1, 15043]) == tiny.decode(np.array([1, 15043])) == "Hello"


def test_completion_before_iterating_runs_the_stream(tiny):
    whole = tiny.generate([1, 15043], 4, temperature=0)
    # read first: the stream runs to its end, as generate does
    assert tiny.stream([1, 15043], 4, temperature=0).completion.tokens == whole.tokens
    # read after a break: the result so far, as a loop that stops early wants it
    stream = tiny.stream([1, 15043], 4, temperature=0)
    first = next(iter(stream))
    assert stream.completion.tokens == [first.token] == whole.tokens[:1]
    # closed unread: nothing more runs
    closed = tiny.stream([1, 15043], 4, temperature=0)
    closed.close()
    assert closed.completion.tokens == []
