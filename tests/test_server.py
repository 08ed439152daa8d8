"""`llamarun serve`, driven by the official `openai` client (and httpx for malformed input).

The server runs in-process (uvicorn in a thread, on a free loopback port) on SmolLM2; the SIGTERM
test starts `python -m llamarun serve` as a subprocess. References are independent of the server:
`Llama.generate` (generation.py's loop) for greedy text, `Llama.logits` (one teacher-forced pass) for
log probabilities.
"""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import require_module

pytestmark = pytest.mark.slow          # servers in subprocesses

openai = require_module("openai")
httpx = require_module("httpx")
uvicorn = require_module("uvicorn")

KEY = "sekret"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class Running:
    """A uvicorn server in a thread, on port 0 (the system picks a free one); unless told not to,
    it waits for the warm-up step too (/health 503 while the kernels compile or load)."""

    def __init__(self, app, wait_ready: bool = True):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300        # a fresh numba cache compiles the kernels in the warm-up
        while wait_ready and httpx.get(self.url + "/health").status_code == 503:
            assert time.time() < deadline, "the model did not finish loading"
            time.sleep(0.05)

    def client(self, key=KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def llama(smol_path):
    import llamarun
    return llamarun.load(smol_path, exact=True)     # float32 activations: decode rows match a prefill pass


@pytest.fixture(scope="module")
def server(llama):
    from llamarun.server import create_app
    running = Running(create_app(llama, "smollm2", parallel=4, ctx=512, queue=64, api_key=KEY, max_body=20_000))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def one_slot(llama):
    """One slot and a queue of one: for the busy and disconnect tests."""
    from llamarun.server import create_app
    running = Running(create_app(llama, "smollm2", parallel=1, ctx=512, queue=1))
    yield running
    running.stop()


def chat_ids(llama, messages):
    from llamarun.chat import chat_format_for
    return chat_format_for(llama).encode(messages, llama.tokenizer, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# the endpoints

def test_chat_greedy_matches_generate(server, llama):
    reply = server.client().chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=12,
                                                    temperature=0)
    ids = chat_ids(llama, MESSAGES)
    expected = llama.generate(ids, 12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == len(ids) + len(expected.tokens)
    assert reply.object == "chat.completion" and reply.model == "smollm2"


def test_usage_counts_the_cached_prompt_tokens(server, llama):
    """The same conversation again finds its prompt in a slot's cache: all of it but the last token,
    which is run for its logits (OpenAI's usage.prompt_tokens_details.cached_tokens)."""
    client = server.client()
    messages = [{"role": "user", "content": "Say something about prompt caches."}]
    first = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
    n = len(chat_ids(llama, messages))
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == n
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_chat_stream_is_the_same_text(server):
    client = server.client()
    whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1    # it streamed
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_logprobs_are_the_models(server, llama):
    prompt = "The capital of France is"
    reply = server.client().completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0,
                                               logprobs=3)
    choice = reply.choices[0]
    ids = llama.encode(prompt)
    drawn = [llama.tokenizer.encode(t, bos=False) for t in choice.logprobs.tokens]
    tokens = llama.generate(ids, 6, temperature=0).tokens
    assert "".join(choice.logprobs.tokens) == choice.text == llama.decode(tokens)
    # the reference: log-softmax of one teacher-forced pass over prompt + reply
    logits = llama.logits(ids + tokens).astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    for i, token in enumerate(tokens):
        row = ref[len(ids) - 1 + i]
        assert choice.logprobs.token_logprobs[i] == pytest.approx(row[token], abs=2e-3)
        top = choice.logprobs.top_logprobs[i]
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(row.max(), abs=2e-3)
    assert choice.logprobs.text_offset[0] == 0 and drawn


def test_chat_logprobs_shape(server):
    reply = server.client().chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4, temperature=0,
                                                    logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-9     # greedy: the drawn one is the top


def test_stop_string_and_seed(server):
    client = server.client()
    plain = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    stop = plain.choices[0].text.strip()[:2] or "5"
    cut = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    a, b = (client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                      seed=7, presence_penalty=0.5, frequency_penalty=0.5,
                                      extra_body={"top_k": 40, "min_p": 0.05}) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == "length"


def test_ignore_eos_generates_max_tokens(server, llama):
    """llama.cpp's `ignore_eos` extension: the end-of-turn token no longer ends the reply, max_tokens
    does; the text up to it is the plain reply's (greedy)."""
    client = server.client()
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 24
    forced = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 24
    assert forced.choices[0].message.content.startswith(plain.choices[0].message.content)
    expected = llama.generate(chat_ids(llama, messages), 24, temperature=0, ignore_eos=True)
    assert forced.choices[0].message.content == expected.text
    # as llama.cpp's: the end tokens are never drawn (not drawn and shown as text)
    assert not set(expected.tokens) & llama.tokenizer.eog_ids and "<|im_end|>" not in expected.text


def test_health_says_503_until_the_warm_up_step_has_run(llama, monkeypatch):
    """The server listens at once but answers /health 503 (OpenAI's error shape, as llama.cpp's
    "Loading model") while its worker runs the warm-up step; a request sent meanwhile waits for it:
    it reaches the scheduler before the warm-up runs, and the model runs it after the warm-up."""
    from llamarun.model import Transformer
    from llamarun.server import create_app
    from llamarun.server.scheduler import Scheduler

    order, release, submitted = [], threading.Event(), threading.Event()
    warm_up, submit, forward = Scheduler.warm_up, Scheduler.submit, Transformer.forward

    def held_warm_up(self):
        release.wait(60)
        order.append("warm-up")
        warm_up(self)
        order.append("warmed up")

    def recorded_submit(self, request):
        order.append("submitted")
        submit(self, request)
        submitted.set()

    def recorded_forward(self, *args):
        order.append("forward")
        return forward(self, *args)
    monkeypatch.setattr(Scheduler, "warm_up", held_warm_up)
    monkeypatch.setattr(Scheduler, "submit", recorded_submit)
    monkeypatch.setattr(Transformer, "forward", recorded_forward)
    running = Running(create_app(llama, "smollm2", parallel=1, ctx=256), wait_ready=False)
    url = running.url
    try:
        loading = httpx.get(url + "/health")
        assert loading.status_code == 503
        assert loading.json()["error"]["type"] == "unavailable_error"
        assert "loading" in loading.json()["error"]["message"]
        body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=120)
            assert submitted.wait(60), "the request did not reach the scheduler within 60 s"
            assert not answer.done()                                  # held by the warm-up
            release.set()
            assert answer.result().status_code == 200
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        release.set()
        running.stop()
    assert order[:2] == ["submitted", "warm-up"]
    assert "forward" in order[order.index("warmed up"):]             # the request ran after the warm-up


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


# ----------------------------------------------------------------------------------------------
# bad input, keys, limits

def post(server, path, content, key=KEY):
    return httpx.post(server.url + path, content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


@pytest.mark.parametrize("body", ['{"messages": [', '[1, 2]', '{"messages": "hi"}',
                                  '{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
                                  '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
                                  '{"messages": [{"role": "wizard", "content": "hi"}]}',
                                  '{"messages": [{"role": "user", "content": "hi"}], "ignore_eos": 1}'])
def test_malformed_or_wrong_types_are_400(server, body):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unsupported_values_are_400(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="'n' must be at most 4"):      # a slot per choice
        client.chat.completions.create(model="smollm2", messages=MESSAGES, n=5)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="smollm2", messages=MESSAGES,
                                       tools=[{"type": "function", "function": {"name": "no spaces"}}])


def test_prompt_beyond_the_context_is_400(server):
    with pytest.raises(openai.BadRequestError, match="context of a slot"):
        server.client().completions.create(model="smollm2", prompt="hello " * 100, max_tokens=500)


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert post(server, "/v1/completions", '{"prompt": "hi"}', key="nope").status_code == 401


def test_body_over_max_body_is_413(server):
    big = json.dumps({"prompt": "x" * 30_000, "max_tokens": 1})
    assert post(server, "/v1/completions", big).status_code == 413


def long_stream(running, max_tokens=400):
    """A streaming request that runs for a while; returns the open response (a context manager)."""
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": max_tokens, "temperature": 0, "stream": True}  # counts on
    return httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60)


def test_busy_server_says_503_with_retry_after(one_slot, monkeypatch):
    """One slot, a queue of one: with the slot taken and one request waiting, the next is refused (503,
    Retry-After). Each state is waited for as the scheduler holds it, not inferred from the HTTP side:
    a stream's first chunk is sent before its request is even admitted, and /health's `waiting` counts
    the first request too until it is (the test used to read both, under load wrongly)."""
    from llamarun.server.scheduler import Scheduler

    # The first request holds the slot until the test lets it go: its steps wait once it has drawn a
    # token (however fast the machine would otherwise finish its 400 tokens).
    release, holding, step = threading.Event(), threading.Event(), Scheduler.step
    scheduler = one_slot.app.state.server.scheduler

    def held_step(self):
        if any(seq.generated for seq in self.active):
            holding.set()
            assert release.wait(120), "the test never let the first request go on"
        step(self)
    monkeypatch.setattr(Scheduler, "step", held_step)
    with long_stream(one_slot) as first:                       # takes the slot
        lines = first.iter_lines()
        started = [next(lines)]
        assert holding.wait(120), f"the first request did not draw a token within 120 s: {started}"
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, one_slot.url + "/v1/completions", timeout=120,
                                  json={"prompt": "Hi", "max_tokens": 1})
            deadline = time.time() + 120
            while len(scheduler.waiting) < 1:
                assert time.time() < deadline, "the second request was not queued within 120 s"
                assert not waiting.done(), f"the second request was answered, not queued: {waiting.result().text}"
                time.sleep(0.02)
            refused = httpx.post(one_slot.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "server_error"
            first.close()                                    # the waiting one now gets the slot
            release.set()
            assert waiting.result().status_code == 200


def test_disconnect_frees_the_slot(one_slot, monkeypatch):
    """A client that goes away mid-stream frees its slot: its request ends "cancelled" long before its
    480 tokens, and the next request (one slot: it waits for that one) is then served."""
    from llamarun.server.scheduler import Scheduler

    ends, submit = [], Scheduler.submit

    def recorded_submit(self, request):        # each request's last event, with its max_tokens
        emit = request.emit
        request.emit = lambda ev: (ev.finish_reason and ends.append((request.max_tokens, ev)), emit(ev))
        submit(self, request)
    monkeypatch.setattr(Scheduler, "submit", recorded_submit)
    with long_stream(one_slot, max_tokens=480) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    reply = one_slot.client().completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    assert reply.choices[0].text is not None
    (first, abandoned), (second, served) = ends
    assert (first, second) == (480, 2)
    assert abandoned.finish_reason == "cancelled" and abandoned.completion_tokens < 480
    assert served.finish_reason in ("stop", "length")
    assert httpx.get(one_slot.url + "/health").json()["slots_busy"] == 0


def test_bounded_load(server):
    """32 requests, 16 at a time on 4 slots, mixed lengths, every fourth abandoned mid-stream: no 5xx,
    whole streams."""
    def one(i):
        body = {"messages": [{"role": "user", "content": f"Count to {i % 7 + 1}."}], "max_tokens": 1 + i % 6,
                "temperature": 0.7, "seed": i, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            if response.status_code != 200:
                return response.status_code, None
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if i % 4 == 3 and len(events) == 2:
                        return 200, "cancelled"
            return 200, events

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert all(status == 200 for status, _ in results)
    for status, events in results:
        if events == "cancelled":
            continue
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    deadline = time.time() + 20
    while (health := httpx.get(server.url + "/health").json())["slots_busy"]:
        assert time.time() < deadline, f"slots still busy 20 s after the load: {health}"
        time.sleep(0.05)
    assert health["status"] == "ok" and health["waiting"] == 0


# ----------------------------------------------------------------------------------------------
# the process: command line, SIGTERM

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, seconds: float) -> None:
    """Poll /health until it says 200 (not listening yet, or 503 while the warm-up runs, is waiting),
    a tenth of a second apart; fail if the process exits or the deadline passes."""
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass                                # not listening yet
        assert proc.poll() is None, f"the server exited with {proc.returncode} before it was ready"
        assert time.time() < deadline, f"the server was not ready within {seconds:.0f} s"
        time.sleep(0.1)


def test_sigterm_finishes_in_flight_work_and_exits(smol_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamarun", "serve", "-m", str(smol_path), "--port", str(port),
                             "--parallel", "2", "--ctx", "256"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, 300)       # on a fresh numba cache the warm-up compiles the kernels
        body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"                    # the in-flight stream was finished whole
        assert proc.wait(30) == 0
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_rejects_bad_flags():
    out = subprocess.run([sys.executable, "-m", "llamarun", "serve", "--parallel", "0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == "llamarun: error: --parallel must be at least 1, not 0"
