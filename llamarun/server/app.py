"""The HTTP side: OpenAI's routes and shapes on starlette, over the scheduler.

Routes: POST /v1/chat/completions, POST /v1/completions (each streamed as server-sent events or
not), GET /v1/models, GET /props (llama.cpp's: the defaults a request gets), GET /health, and the
chat page at /. Every request body is checked in one place (`Server.parse_chat`,
`Server.parse_completion`) before anything runs: a field llamarun does not support, or a value it
cannot use, is a 400 in OpenAI's error format ({"error": {"message", "type", "param", "code"}})
whose message starts with the field it names in `param`; never silently ignored, never a 500.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
import reprlib
import time
import uuid
import signal
import socket
import sys
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..chat import chat_format_for
from ..decoding import LogitBias, end_tokens
from ..errors import LlamarunError
from ..sampling import Sampler
from .scheduler import Event, QueueFull, Request, Scheduler, TokenLogprob

log = logging.getLogger("llamarun.server")

MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_SEED = (1 << 64) - 1
BAN = -100                      # OpenAI: a logit_bias of -100 bans the token (here: -inf, never drawn)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": sendable(self.message), "type": self.kind,
                          "param": None if self.param is None else sendable(self.param), "code": None}}
        return JSONResponse(body, self.status, headers=self.headers)


def invalid(param: str, what: str) -> ApiError:
    """A 400 about one field, in the one message style: "'param' <what is wrong>"."""
    if len(param) > 64:                  # a client's unknown field name, echoed back: not all of it
        param = param[:61] + "..."
    return ApiError(400, f"'{param}' {what}", param=param)


def sendable(s: str) -> str:
    """s as UTF-8 can carry it: a client's lone surrogates (JSON's "\\ud800"), echoed back, as escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlevel = 3


def shown(value) -> str:
    """A client's value in a message: cut short (a megabyte string, a list nested a thousand deep)."""
    return _SHORT.repr(value)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body: int = 1 << 20


# ----------------------------------------------------------------------------------------------
# request bodies

def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):       # 1e999: Python's float reads it as inf
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def parse_json(body: bytes) -> dict:
    """The body as a JSON object, or a 400. Python's json reads NaN, Infinity and 1e999 (as inf), which
    JSON has not; it recurses once per nesting level, so "[" * 100000 raises RecursionError."""
    try:
        data = json.loads(body, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: it nests deeper than this server reads") from None
    except ValueError as e:                             # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


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
    return parse_json(bytes(body))


def number(body: dict, name: str, low=None, high=None, *, integer=False, above=False):
    """body[name] checked to be a number (an integer if asked) in [low, high] ((low, high] if `above`);
    None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise invalid(name, f"must be {'an integer' if integer else 'a number'}, got {shown(value)}")
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        lower = f"> {low}" if above else f">= {low}"
        raise invalid(name, f"must be {lower}" + ("" if high is None else f" and <= {high}") + f", got {shown(value)}")
    return value


def flag(body: dict, name: str, param: str | None = None) -> bool:
    """body[name] checked to be true or false; false when absent or null. param: where body is in the request."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(param or name, f"must be true or false, got {shown(value)}")
    return value


def text(value, param: str) -> str:
    """A string the tokenizer can read: JSON's "\\ud800" escapes give lone surrogates, which are not text."""
    if not isinstance(value, str):
        raise invalid(param, f"must be a string, got {shown(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(param, "holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise invalid("stop", f"must be a string or a list of up to {MAX_STOP} strings, got {shown(stop)}")
    return tuple(text(s, "stop") for s in stop if s)        # an empty stop string would end every reply at once


# The fields each endpoint takes. user, metadata and store are OpenAI's bookkeeping: checked, then
# ignored. top_k, min_p and ignore_eos are llama.cpp's extensions.
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
          "logprobs", "top_k", "min_p", "ignore_eos", "stream", "stream_options", "n", "user", "logit_bias"}
# llama.cpp's sampler fields: the name, and the bounds of its number (None: not a plain number)
LLAMA_CPP_SAMPLING = {"dynatemp_range": (0, None), "dynatemp_exponent": (0, None), "typical_p": (0, 1),
                      "top_n_sigma": (None, None), "xtc_probability": (0, 1), "xtc_threshold": (0, 1),
                      "dry_multiplier": (0, None), "dry_base": (1, None), "dry_allowed_length": (0, None),
                      "dry_penalty_last_n": (0, None), "mirostat": (0, 2), "mirostat_tau": (0, None),
                      "mirostat_eta": (0, None), "dry_sequence_breakers": None, "samplers": None}
COMMON |= set(LLAMA_CPP_SAMPLING)
CHAT_ONLY = {"messages", "top_logprobs", "max_completion_tokens", "response_format", "metadata", "store"}
COMPLETION_ONLY = {"prompt", "echo", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def check_fields(body: dict, allowed: set[str]) -> None:
    """Unknown fields, and the known ones llamarun takes only one value of."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], "is not supported by llamarun")
    for name in ("n", "best_of"):
        if number(body, name, integer=True) not in (None, 1):
            raise invalid(name, f"must be 1 (llamarun draws one choice per request), got {shown(body[name])}")
    if flag(body, "echo"):
        raise invalid("echo", "is not supported by llamarun (it must be false)")
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise invalid(name, f"must be a string, got {shown(body[name])}")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise invalid("metadata", f"must be an object of strings, got {shown(metadata)}")
    flag(body, "store")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("response_format", f"must be {{'type': 'text'}} (llamarun has no JSON mode), "
                                         f"got {shown(response_format)}")


def include_usage(body: dict) -> bool:
    """stream_options.include_usage: a last chunk with the usage (only streams have chunks)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options", f"takes only include_usage, got {shown(options)}")
    return flag(options, "include_usage", "stream_options.include_usage")


# The engine's sampling defaults (llama.cpp's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) are
# Sampler's own; a GGUF may carry its authors' recommended ones (llama.cpp reads the same keys).
ENGINE_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "penalty_last_n")
RECOMMENDED_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                    "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                    "general.sampling.penalty_repeat": "repeat_penalty",
                    "general.sampling.penalty_last_n": "penalty_last_n"}


def sampling_defaults(llama) -> dict:
    """What a request that leaves sampling unset gets: the model's recommended values where its file
    carries them (each checked: one the sampler refuses is skipped, with a warning), else the engine's."""
    signature = inspect.signature(Sampler).parameters
    defaults = {name: signature[name].default for name in ENGINE_SAMPLING}
    metadata = getattr(llama.checkpoint, "metadata", None) or {}
    for key, name in RECOMMENDED_KEYS.items():
        if key in metadata:
            try:
                Sampler(**{name: metadata[key]})
            except LlamarunError as e:
                log.warning("ignoring the model's %s: %s", key, e)
                continue
            defaults[name] = metadata[key]
    return defaults


@dataclass
class Job:
    """A request's body, checked: what the scheduler is to run and how the reply is shaped."""
    kind: str                            # "chat" or "text"
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    stop: tuple[str, ...] = ()
    logprobs: int | None = None          # None: none; k: the drawn token's and the top k
    ignore_eos: bool = False
    logit_bias: dict | None = None       # token id -> bias (-inf bans)
    stream: bool = False
    include_usage: bool = False


# ----------------------------------------------------------------------------------------------
# the application

class Server:
    def __init__(self, llama, scheduler: Scheduler, config: ServerConfig):
        self.llama, self.scheduler, self.config = llama, scheduler, config
        self.tokenizer = llama.tokenizer
        self.vocab_size = llama.config.vocab_size
        self.chat_format = chat_format_for(llama)
        self.sampling = sampling_defaults(llama)
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

    async def props(self, request):
        """llama.cpp's /props: the sampling a request gets by default, the slots, the model and its template."""
        self.check_key(request)
        params = {name: self.sampling[name] for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")}
        params.update(repeat_last_n=self.sampling["penalty_last_n"], presence_penalty=0.0, frequency_penalty=0.0)
        return JSONResponse({"default_generation_settings": {"n_ctx": self.scheduler.ctx, "params": params},
                             "total_slots": self.scheduler.parallel, "model_path": str(self.llama.checkpoint.path),
                             "model_alias": self.config.model_name,
                             "chat_template": getattr(self.chat_format, "template", ""),
                             "modalities": {"vision": False, "audio": False}, "build_info": f"llamarun {__version__}"})

    async def chat_completions(self, request):
        self.check_key(request)
        return await self.complete(request, self.parse_chat(await read_json(request, self.config.max_body)))

    async def completions(self, request):
        self.check_key(request)
        return await self.complete(request, self.parse_completion(await read_json(request, self.config.max_body)))

    # -- request bodies: every check, before anything runs

    def parse_chat(self, body: dict) -> Job:
        """A /v1/chat/completions body as the job it asks for, or an ApiError (400 naming the field)."""
        check_fields(body, COMMON | CHAT_ONLY)
        prompt = self.chat_prompt(body.get("messages"))
        logprobs = flag(body, "logprobs")
        top = number(body, "top_logprobs", 0, MAX_LOGPROBS, integer=True)
        if top is not None and not logprobs:
            raise invalid("top_logprobs", "needs 'logprobs': true")
        max_tokens = number(body, "max_completion_tokens", 1, integer=True)     # OpenAI's newer name wins
        if max_tokens is None:
            max_tokens = number(body, "max_tokens", 1, integer=True)
        return self.job(body, "chat", prompt, (top or 0) if logprobs else None, max_tokens)

    def parse_completion(self, body: dict) -> Job:
        """A /v1/completions body as the job it asks for, or an ApiError (400 naming the field)."""
        check_fields(body, COMMON | COMPLETION_ONLY)
        prompt = self.completion_prompt(body.get("prompt"))
        logprobs = number(body, "logprobs", 0, MAX_LOGPROBS, integer=True)
        max_tokens = number(body, "max_tokens", 1, integer=True)
        return self.job(body, "text", prompt, logprobs, max_tokens, default=16)     # OpenAI's default

    def job(self, body: dict, kind: str, prompt: list[int], logprobs: int | None, max_tokens: int | None,
            default: int | None = None) -> Job:
        """The checks both endpoints share. max_tokens None: `default`, or (None) up to the end of the slot."""
        if not prompt:              # a prompt of no tokens has no logits to draw the first from
            raise invalid("messages" if kind == "chat" else "prompt", "make an empty prompt" if kind == "chat"
                          else "is empty")
        ctx, asked = self.scheduler.ctx, max_tokens is not None
        if not asked:
            max_tokens = ctx - len(prompt) if default is None else default
        if len(prompt) + max(max_tokens, 1) > ctx:
            if asked:
                param, what = ("max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"), "too large"
            else:
                param, what = ("messages" if kind == "chat" else "prompt"), "too long"
            raise invalid(param, f"is {what}: the prompt ({len(prompt)} tokens) plus max_tokens ({max(max_tokens, 1)}) "
                                 f"is more than the context of a slot ({ctx} tokens): shorten the prompt or lower "
                                 "max_tokens")
        stream = flag(body, "stream")
        usage = include_usage(body)
        ignore_eos = flag(body, "ignore_eos")
        sampler = self.sampler(body)
        return Job(kind, prompt, max_tokens, sampler, stop_strings(body), logprobs, ignore_eos,
                   self.logit_bias(body, end_tokens(self.tokenizer, sampler) if ignore_eos else frozenset()),
                   stream, usage and stream)

    def sampler(self, body: dict) -> Sampler:
        """The request's sampler: its own values, checked here (so the sampler never refuses one), over
        the defaults (`sampling_defaults`). top_k and min_p are llama.cpp's extensions."""
        given = {"temperature": number(body, "temperature", 0, 2), "top_p": number(body, "top_p", 0, 1, above=True),
                 "top_k": number(body, "top_k", 0, integer=True), "min_p": number(body, "min_p", 0, 1),
                 "presence_penalty": number(body, "presence_penalty", -2, 2),
                 "frequency_penalty": number(body, "frequency_penalty", -2, 2),
                 "seed": number(body, "seed", 0, MAX_SEED, integer=True)}
        for name, bounds in LLAMA_CPP_SAMPLING.items():
            integer = name in ("dry_allowed_length", "dry_penalty_last_n", "mirostat")
            given[name] = body.get(name) if bounds is None else number(body, name, *bounds, integer=integer)
        try:        # the breakers and the order: the sampler's own checks, named by their field
            return Sampler(**{**self.sampling, **{name: value for name, value in given.items() if value is not None}},
                           tokenizer=self.tokenizer)
        except LlamarunError as e:
            field = str(e).split()[0].rstrip(":")
            raise invalid(field, str(e).removeprefix(field).lstrip(": ")) from None

    def logit_bias(self, body: dict, banned: frozenset[int]) -> dict[int, float]:
        """OpenAI's logit_bias, {"token id": bias from -100 to 100}; -100 bans the token. `banned`: the
        tokens already banned (ignore_eos's end tokens); something must be left to draw."""
        bias = body.get("logit_bias")
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise invalid("logit_bias", f"must be an object mapping token ids to biases, got {shown(bias)}")
        out = {}
        for key, value in bias.items():
            if not re.fullmatch(r"[0-9]{1,10}", key) or int(key) >= self.vocab_size:
                raise invalid("logit_bias", f"has the key {shown(key)}: keys are token ids in [0, {self.vocab_size})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not BAN <= value <= -BAN:
                raise invalid("logit_bias", f"maps {key} to {shown(value)}: a bias is a number from {BAN} to {-BAN}")
            out[int(key)] = -math.inf if value == BAN else float(value)
        if len(banned | {t for t, b in out.items() if b == -math.inf}) >= self.vocab_size:
            raise invalid("logit_bias", "bans every token: leave at least one that can be drawn")
        return out

    def chat_prompt(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", f"must be a non-empty list of messages, got {shown(messages)}")
        plain = [self.message(m, f"messages[{i}]") for i, m in enumerate(messages)]
        try:
            return self.chat_format.encode(plain, self.tokenizer, add_generation_prompt=True)
        except Exception as e:               # a template that refuses the conversation (raise_exception)
            raise invalid("messages", f"were refused by the model's chat template: {e}") from None

    @staticmethod
    def message(m, param: str) -> dict:
        """One message as the chat format takes it: developer is system (OpenAI's newer name), content
        given as a list of text parts is their text, one part a line; name is accepted and unused."""
        if not isinstance(m, dict):
            raise invalid(param, f"must be an object with 'role' and 'content', got {shown(m)}")
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise invalid(f"{param}.{unknown[0]}", "is not supported by llamarun")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"{param}.role", f"must be one of {', '.join(ROLES)}, got {shown(role)}")
        if m.get("name") is not None:
            text(m["name"], f"{param}.name")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"{param}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text" or set(part) - {"type", "text"}:
                    raise invalid(where, f"must be a text part {{'type': 'text', 'text': ...}} (llamarun reads "
                                         f"text only), got {shown(part)}")
                parts.append(text(part.get("text"), f"{where}.text"))
            content = "\n".join(parts)
        return {"role": ROLES[role], "content": text(content, f"{param}.content")}

    def completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(text(prompt, "prompt"))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
            if not all(0 <= t < self.vocab_size for t in ids):
                raise invalid("prompt", f"holds token ids outside [0, {self.vocab_size})")
        else:
            raise invalid("prompt", f"must be a string or a list of token ids (one prompt), got {shown(prompt)}")
        return list(ids)

    # -- running a request

    async def complete(self, http: HttpRequest, job: Job):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        processors = (LogitBias(job.logit_bias),) if job.logit_bias else ()
        request = Request(job.prompt, job.max_tokens, job.sampler,
                          lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), stop=job.stop,
                          logprobs=job.logprobs, ignore_eos=job.ignore_eos, processors=processors)
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); try again shortly", "server_error",
                           headers={"Retry-After": "1"}) from None
        reply = Reply(job.kind, self.config.model_name, self.tokenizer, job.logprobs, job.include_usage)
        if job.stream:
            return StreamingResponse(self.stream(request, events, reply), media_type="text/event-stream",
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

    async def stream(self, request: Request, events: asyncio.Queue, reply: "Reply"):
        try:
            yield sse(reply.chunk_start())
            while True:
                event = await events.get()
                if event.finish_reason in ("error", "cancelled"):
                    yield sse({"error": {"message": f"generation {event.finish_reason}", "type": "server_error",
                                         "param": None, "code": None}})
                    return
                if event.text or event.logprob:
                    yield sse(reply.chunk(event))
                if event.finish_reason:
                    yield sse(reply.chunk_end(event))
                    if reply.include_usage:
                        yield sse(reply.chunk_usage(event))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            request.cancel()                     # the client went away (or we are done): free the slot


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """One response in OpenAI's shapes: chat ("chat.completion") or text ("text_completion")."""

    def __init__(self, kind: str, model: str, tokenizer, logprobs: int | None, include_usage: bool = False):
        self.kind, self.model, self.tokenizer, self.logprobs = kind, model, tokenizer, logprobs
        self.include_usage = include_usage      # a stream's last chunk carries the usage; the others null
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
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if streamed and self.include_usage:
            head["usage"] = None
        return head

    def choice(self, text: str, logprobs, finish_reason, streamed: bool) -> dict:
        if self.kind == "chat":
            if streamed:        # as OpenAI's: the role comes once, in chunk_start
                return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                        "finish_reason": finish_reason}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
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
        return {**self.head(True), "choices": [], "usage": usage_of(event)}     # after head's null


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
            except Exception:           # a bug: still OpenAI's shape, and the connection stays usable
                log.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, "internal error: the server's log says more", "server_error").response()
        return route

    async def http_error(request, exc: HTTPException):      # 404, 405: OpenAI's shape too
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        headers=exc.headers).response()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    routes = [Route("/", guarded(server.page)), Route("/health", guarded(server.health)),
              Route("/v1/models", guarded(server.models)), Route("/props", guarded(server.props)),
              Route("/v1/chat/completions", guarded(server.chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(server.completions), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise LlamarunError(f"--port must be between 0 and 65535, not {port}")


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything starts: a port out of range or taken, or an address
    that is not this machine's, is one line (uvicorn would log a traceback or two)."""
    check_port(port)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise LlamarunError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                            "choose another --port (or --host)") from None
    return sock


def serve(llama, model_name: str, host: str = "127.0.0.1", port: int = 8080, **options) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn lets in-flight requests finish, then stops the worker)."""
    import uvicorn

    sock = listening_socket(host, port)
    app = create_app(llama, model_name, **options)
    scheduler = app.state.server.scheduler

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after its graceful shutdown (exit status -15);
            # a server told to stop that stopped cleanly exits 0
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                address = sock.getsockname()
                url = f"http://{'[' + address[0] + ']' if sock.family == socket.AF_INET6 else address[0]}:{address[1]}"
                print(f"llamarun: serving {model_name} at {url} ({scheduler.parallel} slots of {scheduler.ctx} "
                      f"tokens; OpenAI API at {url}/v1, chat page at {url}/)", file=sys.stderr, flush=True)

    with sock:
        Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)).run(sockets=[sock])
