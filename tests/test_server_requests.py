"""The server's request bodies, as OpenAI clients (and hostile ones) send them: fast, in-process.

The parsing (`Server.parse_chat`, `Server.parse_completion`, `parse_json`) is called directly where no
model needs to run; the rest goes through the ASGI app (starlette's TestClient, the scheduler's worker
in a thread) on tiny_gqa, a 3-layer random model with Llama 2's tokenizer. References are independent
of the server: the chat format's own encoding, `Llama.logits` for what greedy decoding draws.
"""
import json
import queue
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import MODELS, require, require_module

require_module("starlette")
require_module("httpx")

TINY, TOKENIZER = MODELS / "tiny_gqa.bin", MODELS / "tokenizer.bin"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny():
    import llamarun
    return llamarun.load(str(require(TINY)), tokenizer=str(require(TOKENIZER)))


@pytest.fixture(scope="module")
def app(tiny):
    from llamarun.server import create_app
    return create_app(tiny, "tiny", parallel=2, ctx=96)


@pytest.fixture(scope="module")
def server(app):
    """The parsing side, with no worker running: nothing here runs the model."""
    return app.state.server


@pytest.fixture(scope="module")
def client(app):
    """The app with its worker running (the lifespan), answering like a server."""
    from starlette.testclient import TestClient
    with TestClient(app) as c:
        yield c


def error_of(response, status=400) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def refused(parse, body) -> dict:
    """What parse(body) refuses, as its 400's error object; every one names its param and starts with it."""
    from llamarun.server.app import ApiError
    with pytest.raises(ApiError) as caught:
        parse(body)
    e = caught.value
    assert e.status == 400 and e.param and e.message.startswith(f"'{e.param}' "), (e.param, e.message)
    return {"param": e.param, "message": e.message}


# ----------------------------------------------------------------------------------------------
# bodies that are not JSON objects: 400 in OpenAI's shape, never a 500

@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"{" * 100_000, b"", b"\xff\xfe\x00garbage",
                                  b"NaN", b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": 1e999}',
                                  b'"a string"', b"null", b"[1, 2]"])
def test_unparseable_bodies_are_400(client, body):
    for path in ("/v1/chat/completions", "/v1/completions"):
        error = error_of(client.post(path, content=body, headers={"content-type": "application/json"}))
        assert error["type"] == "invalid_request_error" and error["param"] is None


def test_unknown_routes_and_methods_are_openai_errors(client):
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "invalid_request_error"
    assert error_of(client.get("/v1/completions"), 405)["message"].startswith("GET /v1/completions")


# ----------------------------------------------------------------------------------------------
# what OpenAI clients send

def test_content_parts_and_developer_role_are_plain_messages(server, tiny):
    from llamarun.chat import chat_format_for
    parts = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."},
                                                            {"type": "text", "text": "Use English."}]},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"}]}
    expected = chat_format_for(tiny).encode([{"role": "system", "content": "Be brief.\nUse English."},
                                             {"role": "user", "content": "Hi"}], tiny.tokenizer)
    assert server.parse_chat(parts).prompt == expected
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    assert refused(server.parse_chat, {"messages": [{"role": "user", "content": [image]}]})["param"] == \
        "messages[0].content[0]"


def test_openai_fields_accepted_or_named(server):
    job = server.parse_chat({"messages": USER, "max_tokens": 9, "max_completion_tokens": 5, "user": "u1",
                             "metadata": {"k": "v"}, "store": False, "response_format": {"type": "text"},
                             "stream": True, "stream_options": {"include_usage": True}})
    assert job.max_tokens == 5 and job.stream and job.include_usage
    assert server.parse_chat({"messages": USER, "max_tokens": 7}).max_tokens == 7
    for body, param in [({"response_format": {"type": "json_schema"}}, "response_format"),
                        ({"response_format": {"type": "xml"}}, "response_format"),
                        ({"json_schema": {"type": "object"}, "grammar": "root ::= \"a\""}, "json_schema"),
                        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
                        ({"tools": [{"type": "function"}]}, "tools[0]"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"frobnicate": 1}, "frobnicate"), ({"n": 99}, "n"), ({"store": "yes"}, "store"),
                        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
                        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
                        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
                        ({"top_p": 0}, "top_p"), ({"temperature": 2.5}, "temperature"), ({"top_k": -1}, "top_k"),
                        ({"seed": -1}, "seed"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
                        ({"max_tokens": 1000}, "max_tokens"), ({"logprobs": 1}, "logprobs"),
                        ({"top_logprobs": 2}, "top_logprobs"), ({"stop": ["a"] * 5}, "stop"),
                        ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"32000": 1}}, "logit_bias"),
                        ({"logit_bias": {"5": -101}}, "logit_bias"), ({"logit_bias": [[5, 1]]}, "logit_bias")]:
        assert refused(server.parse_chat, {"messages": USER, **body})["param"] == param, body
    for body, param in [({"prompt": []}, "prompt"), ({"prompt": [1, 99999]}, "prompt"), ({"echo": True}, "echo"),
                        ({"prompt": "hi", "messages": USER}, "messages"), ({"prompt": "hi", "best_of": 3}, "best_of"),
                        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"), ({"prompt": "hi", "logprobs": 21}, "logprobs"),
                        ({"prompt": "hi " * 200}, "prompt")]:
        assert refused(server.parse_completion, body)["param"] == param, body


def test_top_p_zero_is_refused_once_naming_top_p(client):
    error = error_of(client.post("/v1/completions", json={"prompt": "Hi", "top_p": 0}))
    assert error["param"] == "top_p" and error["message"] == "'top_p' must be > 0 and <= 1, got 0"


def test_sampling_defaults_are_the_engines_or_the_models(server, tiny, monkeypatch):
    """A request that leaves sampling unset gets llama.cpp's defaults (not OpenAI's temperature 1, top-p 1),
    or those the model's file recommends (GGUF general.sampling.*); /props shows them."""
    from llamarun.server import create_app
    sampler = server.parse_completion({"prompt": "Hi"}).sampler
    assert (sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p) == (0.8, 40, 0.95, 0.05)
    given = server.parse_completion({"prompt": "Hi", "temperature": 0, "top_k": 3}).sampler
    assert (given.temperature, given.top_k, given.top_p) == (0, 3, 0.95)

    metadata = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 7.0}
    monkeypatch.setattr(tiny.checkpoint, "metadata", metadata, raising=False)
    from starlette.testclient import TestClient
    app = create_app(tiny, "tiny", parallel=3, ctx=64)
    sampler = app.state.server.parse_completion({"prompt": "Hi"}).sampler
    assert (sampler.temperature, sampler.top_k, sampler.top_p) == (0.6, 20, 0.95)     # top_p 7: not a top-p
    props = TestClient(app).get("/props").json()                 # no lifespan: /props needs no worker
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == 64 and props["total_slots"] == 3
    assert {k: settings["params"][k] for k in ("temperature", "top_k", "top_p", "min_p")} == \
        {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.05}
    assert props["model_path"].endswith("tiny_gqa.bin") and "chat_template" in props


# ----------------------------------------------------------------------------------------------
# through the app, the model running

def greedy_first_token(tiny, prompt: str, banned=()) -> int:
    row = tiny.logits(tiny.encode(prompt))[-1].astype(np.float64)
    row[list(banned)] = -np.inf
    return int(np.argmax(row))


def test_logit_bias_bans_and_forces_tokens(client, tiny):
    body = {"prompt": "Once upon a time", "max_tokens": 1, "temperature": 0, "logprobs": 0}

    first = greedy_first_token(tiny, body["prompt"])
    second = greedy_first_token(tiny, body["prompt"], banned=[first])
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    banned = client.post("/v1/completions", json={**body, "logit_bias": {str(first): -100}}).json()
    assert plain == tiny.decode([first]) != banned["choices"][0]["text"]
    assert banned["choices"][0]["text"] == tiny.decode([second])
    forced = client.post("/v1/completions", json={**body, "max_tokens": 4, "logit_bias": {"3681": 100}}).json()
    assert forced["choices"][0]["text"] == tiny.decode([3681] * 4)
    again = client.post("/v1/completions", json=body).json()["choices"][0]["text"]     # per request: gone again
    assert again == plain


def sse_chunks(response) -> list:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_stream_role_once_and_usage_last(client):
    body = {"messages": USER, "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    chunks = sse_chunks(client.post("/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant" and not any("role" in d for d in deltas[1:])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    plain = sse_chunks(client.post("/v1/chat/completions", json=body))
    assert all("usage" not in c for c in plain) and plain[-1]["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------------------------
# the command line

def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llamarun", *args], capture_output=True, text=True, timeout=60, **kw)


def test_serve_port_out_of_range_is_one_line():
    out = run_cli("serve", "--port", "99999")
    assert out.returncode == 1
    assert out.stderr == "llamarun: error: --port must be between 0 and 65535, not 99999\n"


def test_serve_says_what_it_serves_where():
    """The start-up line names the model, the slots, the context and the address (the port the system
    picked for --port 0); SIGINT then stops it cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "llamarun", "serve", "-m", str(require(TINY)), "-z",
                             str(require(TOKENIZER)), "--port", "0", "--parallel", "3", "--ctx", "64"],
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    try:
        seen = []
        while not (seen and seen[-1].startswith("llamarun:")):
            seen.append(lines.get(timeout=60))          # queue.Empty: no start-up line within a minute
        line = seen[-1]
        assert line.startswith("llamarun: serving tiny_gqa at http://127.0.0.1:") and "3 slots of 64 tokens" in line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert 0 < port < 65536
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        reader.join(10)
        assert not any("Traceback" in line for line in seen + list(lines.queue))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
