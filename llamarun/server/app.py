"""The HTTP side: OpenAI's routes and shapes on starlette, over the scheduler.

Routes: POST /v1/chat/completions, POST /v1/completions (each streamed as server-sent events or
not), GET /v1/models, GET /health, and the chat page at /. Errors use OpenAI's format
({"error": {"message", "type", "param", "code"}}); a parameter llamarun does not support is a 400,
never silently ignored.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
import signal
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..chat import chat_format_for
from ..errors import LlamarunError
from ..sampling import Sampler
from .scheduler import Event, QueueFull, Request, Scheduler, TokenLogprob

MAX_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, self.status, headers=self.headers)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body: int = 1 << 20


# ----------------------------------------------------------------------------------------------
# request bodies

async def read_json(request: HttpRequest, max_body: int) -> dict:
    """The body as a JSON object; 413 past max_body bytes (counted as they arrive), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {max_body}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_body:
            raise ApiError(413, f"the request body is over {max_body} bytes, the most this server takes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def number(body, name, default, low=None, high=None, integer=False):
    """body[name] checked to be a number (an integer if asked) within [low, high]; default if absent."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value!r}", param=name)
    return value


def stop_strings(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return tuple(stop)


COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
          "logprobs", "top_k", "min_p", "ignore_eos", "stream", "stream_options", "n", "user"}
CHAT_ONLY = {"messages", "top_logprobs", "max_completion_tokens"}
COMPLETION_ONLY = {"prompt", "echo", "best_of"}


def refuse_unsupported(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported parameter '{unknown[0]}': llamarun does not implement it", param=unknown[0])
    if number(body, "n", 1, integer=True) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if number(body, "best_of", 1, integer=True) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "echo is not supported", param="echo")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "'stream_options' takes only include_usage", param="stream_options")


def sampler_of(body: dict) -> Sampler:
    """OpenAI's defaults (temperature 1, top_p 1, no top-k or min-p), with top_k and min_p as extensions."""
    return Sampler(temperature=number(body, "temperature", 1.0, 0, 2), top_p=number(body, "top_p", 1.0, 0, 1),
                   top_k=number(body, "top_k", 0, 0, integer=True), min_p=number(body, "min_p", 0.0, 0, 1),
                   presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
                   frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),
                   seed=number(body, "seed", None, 0, integer=True))


# ----------------------------------------------------------------------------------------------
# the application

class Server:
    def __init__(self, llama, scheduler: Scheduler, config: ServerConfig):
        self.llama, self.scheduler, self.config = llama, scheduler, config
        self.tokenizer = llama.tokenizer
        self.chat_format = chat_format_for(llama)
        self.created = int(time.time())

    def check_key(self, request: HttpRequest) -> None:
        if self.config.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.config.api_key}":
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    # -- routes

    async def health(self, request):
        s = self.scheduler
        if not s.ready.is_set():        # as llama.cpp's server: 503 until the model can answer
            raise ApiError(503, "loading model: the kernels are compiling or loading", "unavailable_error")
        return JSONResponse({"status": "ok", "slots": s.parallel, "slots_busy": s.parallel - len(s.free),
                             "waiting": len(s.waiting)})

    async def page(self, request):
        return HTMLResponse(resources.files(__package__).joinpath("chat.html").read_text("utf-8"))

    async def models(self, request):
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "llamarun"}

    async def chat_completions(self, request):
        self.check_key(request)
        body = await read_json(request, self.config.max_body)
        refuse_unsupported(body, COMMON | CHAT_ONLY)
        prompt = self.chat_prompt(body)
        logprobs = body.get("logprobs")
        if logprobs not in (None, True, False):
            raise ApiError(400, "'logprobs' must be true or false for chat", param="logprobs")
        top = number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs logprobs=true", param="top_logprobs")
        max_tokens = number(body, "max_completion_tokens", None, 1, integer=True)
        return await self.complete(request, body, "chat", prompt, (top or 0) if logprobs else None,
                                   max_tokens or number(body, "max_tokens", None, 1, integer=True))

    async def completions(self, request):
        self.check_key(request)
        body = await read_json(request, self.config.max_body)
        refuse_unsupported(body, COMMON | COMPLETION_ONLY)
        prompt = self.completion_prompt(body.get("prompt"))
        logprobs = number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        return await self.complete(request, body, "text", prompt, logprobs,
                                   number(body, "max_tokens", 16, 1, integer=True))

    # -- prompts

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        plain = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str) or set(m) - {"role", "content", "name"}:
                raise ApiError(400, "each message must be {'role': 'system'|'user'|'assistant', 'content': a string}",
                               param="messages")
            plain.append({"role": m["role"], "content": m["content"]})
        try:
            return self.chat_format.encode(plain, self.tokenizer, add_generation_prompt=True)
        except Exception as e:               # a template that refuses the conversation (raise_exception)
            raise ApiError(400, f"the model's chat template refused the messages: {e}", param="messages") from None

    def completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
            if not all(0 <= t < self.llama.config.vocab_size for t in ids):
                raise ApiError(400, f"token ids must lie in [0, {self.llama.config.vocab_size})", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt)", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return list(ids)

    # -- running a request

    async def complete(self, http: HttpRequest, body: dict, kind: str, prompt: list[int], logprobs: int | None,
                       max_tokens: int | None):
        ctx = self.scheduler.ctx
        if max_tokens is None:
            max_tokens = ctx - len(prompt)
        if len(prompt) + max_tokens > ctx:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is more than the "
                                f"context of a slot ({ctx} tokens): shorten the prompt or lower max_tokens",
                           param="max_tokens")
        try:
            sampler = sampler_of(body)
        except LlamarunError as e:
            raise ApiError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be true or false", param="ignore_eos")
        request = Request(prompt, max_tokens, sampler, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                          stop=stop_strings(body), logprobs=logprobs, ignore_eos=ignore_eos)
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); try again shortly", "server_error",
                           headers={"Retry-After": "1"}) from None
        reply = Reply(kind, self.config.model_name, self.tokenizer, logprobs)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self.stream(request, events, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                event = await events.get()
                reply.add(event)
                if event.finish_reason:
                    break
        finally:
            request.cancel()                     # a client gone mid-request frees its slot (no-op when done)
        if event.finish_reason in ("error", "cancelled"):
            raise ApiError(500 if event.finish_reason == "error" else 503, f"the request was {event.finish_reason}"
                           if event.finish_reason == "cancelled" else "generation failed", "server_error")
        return JSONResponse(reply.whole())

    async def stream(self, request: Request, events: asyncio.Queue, reply: "Reply", usage: bool):
        try:
            yield sse(reply.chunk_start())
            while True:
                event = await events.get()
                if event.finish_reason in ("error", "cancelled"):
                    yield sse({"error": {"message": f"generation {event.finish_reason}", "type": "server_error"}})
                    return
                if event.text or event.logprob:
                    yield sse(reply.chunk(event))
                if event.finish_reason:
                    yield sse(reply.chunk_end(event))
                    if usage:
                        yield sse(reply.chunk_usage(event))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            request.cancel()                     # the client went away (or we are done): free the slot


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """One response in OpenAI's shapes: chat ("chat.completion") or text ("text_completion")."""

    def __init__(self, kind: str, model: str, tokenizer, logprobs: int | None):
        self.kind, self.model, self.tokenizer, self.logprobs = kind, model, tokenizer, logprobs
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text: list[str] = []
        self.token_logprobs: list[TokenLogprob] = []
        self.offset = 0                          # text offset of the next token (completions' logprobs)
        self.finish_reason = None
        self.usage = None

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        if event.logprob:
            self.token_logprobs.append(event.logprob)
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            self.usage = usage_of(event)

    def piece(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def logprobs_of(self, items: list[TokenLogprob]):
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            def entry(token, lp):
                data = self.tokenizer.token_bytes(token)
                return {"token": data.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(data)}
            return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                                for t in items]}
        offsets = []
        for t in items:
            offsets.append(self.offset)
            self.offset += len(self.piece(t.token))
        return {"tokens": [self.piece(t.token) for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{self.piece(i): lp for i, lp in t.top} for t in items], "text_offset": offsets}

    def head(self, streamed: bool) -> dict:
        kind = {"chat": "chat.completion", "text": "text_completion"}[self.kind] + (".chunk" if streamed and
                                                                                  self.kind == "chat" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, text: str, logprobs, finish_reason, streamed: bool) -> dict:
        if self.kind == "chat":
            key = "delta" if streamed else "message"
            content = {"role": "assistant", "content": text} if not streamed or text else {}
            return {"index": 0, key: content, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def whole(self) -> dict:
        return {**self.head(False), "choices": [self.choice("".join(self.text), self.logprobs_of(self.token_logprobs),
                                                            self.finish_reason, False)], "usage": self.usage}

    def chunk_start(self) -> dict:
        if self.kind == "chat":
            return {**self.head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]}
        return {**self.head(True), "choices": [self.choice("", None, None, True)]}

    def chunk(self, event: Event) -> dict:
        logprobs = self.logprobs_of([event.logprob]) if event.logprob else None
        return {**self.head(True), "choices": [self.choice(event.text, logprobs, None, True)]}

    def chunk_end(self, event: Event) -> dict:
        return {**self.head(True), "choices": [self.choice("", None, event.finish_reason, True)]}

    def chunk_usage(self, event: Event) -> dict:
        return {**self.head(True), "choices": [], "usage": usage_of(event)}


def usage_of(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


def create_app(llama, model_name: str, parallel: int = 4, ctx: int = 2048, queue: int = 64,
               api_key: str | None = None, max_body: int = 1 << 20) -> Starlette:
    """The ASGI application; its lifespan starts the scheduler's worker thread and stops it."""
    if llama.tokenizer is None:
        raise LlamarunError("serving needs the model's tokenizer: pass one with -z PATH")
    if ctx > llama.config.seq_len:
        raise LlamarunError(f"--ctx {ctx} is beyond the model's context of {llama.config.seq_len} tokens")
    scheduler = Scheduler(llama, parallel=parallel, ctx=ctx, queue=queue)
    server = Server(llama, scheduler, ServerConfig(model_name, api_key, max_body))

    def guarded(handler):
        async def route(request):
            try:
                return await handler(request)
            except ApiError as e:
                return e.response()
            except ClientDisconnect:
                return ApiError(400, "the client went away").response()
        return route

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    routes = [Route("/", guarded(server.page)), Route("/health", guarded(server.health)),
              Route("/v1/models", guarded(server.models)),
              Route("/v1/chat/completions", guarded(server.chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(server.completions), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def serve(llama, model_name: str, host: str = "127.0.0.1", port: int = 8080, **options) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn lets in-flight requests finish, then stops the worker)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after its graceful shutdown (exit status -15);
            # a server told to stop that stopped cleanly exits 0
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

    app = create_app(llama, model_name, **options)
    Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)).run()
