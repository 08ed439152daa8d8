"""Property-based tests of the server's request parsing (issue 19, point 10): any body gives a valid
job or a 400 in OpenAI's error shape naming its field, never another exception, a 500 or a hang.

The parsing functions are called directly (no model runs); a few dozen bodies also go through the ASGI
app with tiny_gqa answering. Bounded and reproducible: a fixed number of examples, derandomized, no
example database.
"""
import json

import pytest

from conftest import MODELS, require, require_module

hypothesis = require_module("hypothesis")
require_module("starlette")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from llamarun.server.app import ApiError, Job, parse_json  # noqa: E402

CTX = 96
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# any text, lone surrogates included (JSON's "\ud800" escapes give them)
strings = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | \
    st.floats(allow_nan=False, allow_infinity=False) | strings
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(strings, inner, max_size=4), max_leaves=10)

# Bodies as clients mean them: each field with a value it takes (a valid body, for the parse to go all
# the way), then now and then one field's value replaced by any JSON, or a field no endpoint knows.
words = st.text(st.characters(codec="utf-8"), max_size=12)
floats = st.floats(allow_nan=False, allow_infinity=False)
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), min_size=1, max_size=3)


def message(role: str):
    return st.fixed_dictionaries({"role": st.just(role), "content": words | text_parts}, optional={"name": words})


@st.composite
def conversations(draw):
    """A system (or developer) message or not, then user and assistant turns ending with the user's: a
    conversation every chat format takes (Llama 2's refuses other orders)."""
    opening = draw(st.lists(message(draw(st.sampled_from(["system", "developer"]))), max_size=1))
    turns = draw(st.integers(0, 2))
    return opening + [draw(message(role)) for _ in range(turns) for role in ("user", "assistant")] + [draw(message("user"))]


messages = conversations() | st.lists(message("user") | message("assistant") | message("system"), min_size=1, max_size=3)
COMMON_VALUES = {
    "model": words, "max_tokens": st.integers(1, 60), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50), "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(0, 2 ** 64 - 1), "stop": words | st.lists(words, max_size=4),
    "ignore_eos": st.booleans(), "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans()}), "n": st.just(1), "user": words,
    "logit_bias": st.dictionaries(st.integers(0, 31999).map(str), st.floats(-100, 100) | st.just(-100), max_size=4)}
CHAT_VALUES = {**COMMON_VALUES, "messages": messages, "logprobs": st.booleans(), "max_completion_tokens": st.integers(1, 60),
               "response_format": st.just({"type": "text"}), "metadata": st.dictionaries(words, words, max_size=3),
               "store": st.booleans()}
COMPLETION_VALUES = {**COMMON_VALUES, "prompt": words.filter(bool) | st.lists(st.integers(0, 31999), min_size=1, max_size=8),
                     "logprobs": st.integers(0, 20), "echo": st.just(False), "best_of": st.just(1)}


@st.composite
def bodies(draw, values: dict, required: str):
    """A body of some of the fields (always `required`); perturbed now and then: a value replaced by any
    JSON, by a near miss (a message, a number), or a field added that no endpoint takes."""
    names = [required] + draw(st.lists(st.sampled_from(sorted(set(values) - {required})), max_size=8, unique=True))
    body = {name: draw(values[name]) for name in names}
    change = draw(st.sampled_from(["none", "none", "value", "number", "message", "field"]))
    name = draw(st.sampled_from(names))
    if change == "value":
        body[name] = draw(json_values)
    elif change == "number":
        body[name] = draw(st.integers() | floats | st.sampled_from([0, -1, 2 ** 64, 1e300, True]))
    elif change == "message" and isinstance(body.get("messages"), list):
        body["messages"][draw(st.integers(0, len(body["messages"]) - 1))] = draw(
            json_values | st.fixed_dictionaries({"role": json_values | words, "content": json_values}))
    elif change == "field":
        body[draw(strings)] = draw(json_values)
    return body


def chat_bodies():
    return bodies(CHAT_VALUES, "messages")


def completion_bodies():
    return bodies(COMPLETION_VALUES, "prompt")


@pytest.fixture(scope="module")
def tiny_app():
    import llamarun
    from llamarun.server import create_app
    tiny = llamarun.load(str(require(MODELS / "tiny_gqa.bin")), tokenizer=str(require(MODELS / "tokenizer.bin")))
    return create_app(tiny, "tiny", parallel=2, ctx=CTX)


@pytest.fixture(scope="module")
def client(tiny_app):
    """An app with its worker running (the lifespan), answering like a server; slots of 40 tokens, so
    that no reply takes long."""
    from llamarun.server import create_app
    from starlette.testclient import TestClient
    with TestClient(create_app(tiny_app.state.server.llama, "tiny", parallel=2, ctx=40)) as c:
        yield c


@pytest.fixture(scope="module")
def smol_server(smol_path):
    """SmolLM2: its chat template (jinja) renders the fuzzed messages."""
    import llamarun
    from llamarun.server import create_app
    return create_app(llamarun.load(smol_path), "smollm2", parallel=1, ctx=CTX).state.server


def check_outcome(parse, body, vocab_size: int) -> None:
    """parse(body) is a job that fits a slot, or a 400 that names its field and starts with it."""
    try:
        job = parse(body)
    except ApiError as e:
        assert e.status == 400 and isinstance(e.param, str) and e.message.startswith(f"'{e.param}' "), \
            (e.status, e.param, e.message)
        json.dumps(e.response().body.decode())                      # the error itself can be sent
        return
    assert isinstance(job, Job)
    assert job.prompt and all(0 <= t < vocab_size for t in job.prompt)
    assert 1 <= job.max_tokens and len(job.prompt) + job.max_tokens <= CTX
    assert all(-100 <= b <= 100 or b == float("-inf") for b in (job.logit_bias or {}).values())


@FUZZ
@given(body=chat_bodies())
def test_chat_bodies_parse_or_are_400(tiny_app, body):
    server = tiny_app.state.server
    check_outcome(server.parse_chat, body, server.vocab_size)


@FUZZ
@given(body=completion_bodies())
def test_completion_bodies_parse_or_are_400(tiny_app, body):
    server = tiny_app.state.server
    check_outcome(server.parse_completion, body, server.vocab_size)


@settings(FUZZ, max_examples=100)
@given(body=chat_bodies())
def test_chat_template_renders_any_messages_or_is_400(smol_server, body):
    check_outcome(smol_server.parse_chat, body, smol_server.vocab_size)


@st.composite
def raw_bodies(draw):
    """Bytes a client might send: any bytes, JSON text cut short, deep nests, JSON's non-values."""
    text = json.dumps(draw(json_values))
    return draw(st.binary(max_size=40) | st.just(text.encode()) | st.just(text[:draw(st.integers(0, len(text)))].encode())
                | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * draw(st.integers(0, n)))
                | st.sampled_from([b"NaN", b"-Infinity", b'{"a": 1e999}', b'{"a": NaN}']))


@FUZZ
@given(raw=raw_bodies())
def test_any_bytes_are_an_object_or_400(raw):
    try:
        data = parse_json(raw)
    except ApiError as e:
        assert e.status == 400 and e.param is None and e.message.startswith("the body ")
        return
    assert isinstance(data, dict)


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
requests = (st.tuples(st.just(CHAT), chat_bodies().map(lambda body: json.dumps(body).encode()))
            | st.tuples(st.just(COMPLETIONS), completion_bodies().map(lambda body: json.dumps(body).encode()))
            | st.tuples(st.sampled_from([CHAT, COMPLETIONS]), raw_bodies()))


@settings(FUZZ, max_examples=40)
@given(request=requests)
def test_through_the_app_any_body_is_answered_or_400(client, request):
    """The whole route, the model running for the bodies that parse: a 200 (whole, or a stream that ends
    with [DONE]) or a 4xx in OpenAI's shape; never a 500."""
    path, content = request
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    event(f"{response.status_code} {response.headers['content-type'].split(';')[0]}")
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"

