"""The HTTP side: OpenAI's routes and shapes on starlette, over the scheduler.

Routes: POST /v1/chat/completions, POST /v1/completions (each streamed as server-sent events or
not), GET /v1/models, GET /props (llama.cpp's: the defaults a request gets), GET /health, and the
chat page at /. Every request body is checked in one place (`Server.parse_chat`,
`Server.parse_completion`) before anything runs: a field llamarun does not support, or a value it
cannot use, is a 400 in OpenAI's error format ({"error": {"message", "type", "param", "code"}})
whose message starts with the field it names in `param`; never silently ignored, never a 500.

Structured output: `response_format` (OpenAI's json_object and json_schema), llama.cpp's `grammar`
(GBNF) and `json_schema` fields, and tool calls (`tools`, `tool_choice`: llamarun/tools.py) become
one compiled Grammar per request (llamarun/structured.py; compiled once for identical constraints,
`Server.grammar`), a matcher of it for each choice's sequence. `n` choices run as that many
sequences, the first one's prompt shared with the others (scheduler.py).
"""
from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
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
from ..speculative import make_speculation
from .. import tools as toolcalls
from .scheduler import Event, QueueFull, Request, Scheduler, TokenLogprob

log = logging.getLogger("llamarun.server")

MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_TOOLS = 128                 # OpenAI's limit
GRAMMARS_KEPT = 32              # compiled grammars kept for the next request that asks the same
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
    draft: object = None                 # speculative decoding: "ngram" or a loaded draft Llama (--draft); None: off
    draft_max: int | None = None


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
# response_format (OpenAI's, chat only there) is taken by both endpoints, as llama.cpp does; grammar and
# json_schema are llama.cpp's.
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
          "logprobs", "top_k", "min_p", "ignore_eos", "stream", "stream_options", "n", "user", "logit_bias",
          "response_format", "grammar", "json_schema", "speculative"}
# llama.cpp's sampler fields: the name, and the bounds of its number (None: not a plain number)
LLAMA_CPP_SAMPLING = {"dynatemp_range": (0, None), "dynatemp_exponent": (0, None), "typical_p": (0, 1),
                      "top_n_sigma": (None, None), "xtc_probability": (0, 1), "xtc_threshold": (0, 1),
                      "dry_multiplier": (0, None), "dry_base": (1, None), "dry_allowed_length": (0, None),
                      "dry_penalty_last_n": (0, None), "mirostat": (0, 2), "mirostat_tau": (0, None),
                      "mirostat_eta": (0, None), "dry_sequence_breakers": None, "samplers": None}
COMMON |= set(LLAMA_CPP_SAMPLING)
CHAT_ONLY = {"messages", "top_logprobs", "max_completion_tokens", "metadata", "store", "tools", "tool_choice",
             "parallel_tool_calls"}
COMPLETION_ONLY = {"prompt", "echo", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")     # OpenAI's rule for a function's name


def check_fields(body: dict, allowed: set[str]) -> None:
    """Unknown fields, and the known ones llamarun takes only one value of."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], "is not supported by llamarun")
    n = number(body, "n", 1, integer=True) or 1
    if number(body, "best_of", integer=True) not in (None, n):
        raise invalid("best_of", f"must equal n ({n}): llamarun does not rank candidates, got {shown(body['best_of'])}")
    if flag(body, "echo"):
        raise invalid("echo", "is not supported by llamarun (it must be false)")
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise invalid(name, f"must be a string, got {shown(body[name])}")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise invalid("metadata", f"must be an object of strings, got {shown(metadata)}")
    flag(body, "store")


RESPONSE_FORMATS = ("{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
                    "{'name': ..., 'schema': {...}}}")


def response_format(body: dict) -> dict | None:
    """OpenAI's response_format as Grammar.from_request's keywords (None: free text)."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema") or set(value) - {"type", kind}:
        raise invalid("response_format", f"must be {RESPONSE_FORMATS}, got {shown(value)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict) or \
            set(spec) - {"name", "schema", "strict", "description"}:
        raise invalid("response_format", f"must be {RESPONSE_FORMATS} (the schema a JSON schema object), "
                                         f"got {shown(value)}")
    if spec.get("name") is not None:
        text(spec["name"], "response_format")
    flag(spec, "strict", "response_format")     # strict or not, the schema is enforced
    return {"json_schema": spec["schema"]}


def constraint(body: dict) -> tuple[str, dict] | None:
    """What the output is held to: (the field that asks, Grammar.from_request's keywords), or None.
    One field at most; an empty grammar is none (llama.cpp's default)."""
    asked = []
    rf = response_format(body)
    if rf is not None:
        asked.append(("response_format", rf))
    if body.get("grammar") not in (None, ""):
        asked.append(("grammar", {"grammar": text(body["grammar"], "grammar")}))
    if body.get("json_schema") is not None:
        if not isinstance(body["json_schema"], dict):
            raise invalid("json_schema", f"must be a JSON schema object, got {shown(body['json_schema'])}")
        asked.append(("json_schema", {"json_schema": body["json_schema"]}))
    if len(asked) > 1:
        raise invalid(asked[1][0], f"cannot be combined with '{asked[0][0]}': give one constraint")
    return asked[0] if asked else None


TOOL_SHAPE = "must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"


def tool_functions(body: dict) -> list[dict]:
    """The functions of `tools` (OpenAI's [{"type": "function", "function": {name, description,
    parameters, strict}}]), each as {name, description?, parameters?}."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid("tools", f"must be a list of up to {MAX_TOOLS} tools, got {shown(tools)}")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict) \
                or set(tool) - {"type", "function"}:
            raise invalid(where, f"{TOOL_SHAPE}, got {shown(tool)}")
        f = tool["function"]
        unknown = sorted(set(f) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise invalid(f"{where}.function.{unknown[0]}", "is not supported by llamarun")
        name = f.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise invalid(f"{where}.function.name", f"must be 1 to 64 letters, digits, _ or -, got {shown(name)}")
        if name in names:
            raise invalid(f"{where}.function.name", f"names {name} twice: function names must differ")
        names.add(name)
        if f.get("description") is not None:
            text(f["description"], f"{where}.function.description")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise invalid(f"{where}.function.parameters", f"must be a JSON schema object, got {shown(f['parameters'])}")
        flag(f, "strict", f"{where}.function.strict")
        functions.append({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None})
    return functions


def tool_choice(body: dict, functions: list[dict]) -> str:
    """OpenAI's tool_choice: "none", "auto" (the default with tools), "required", or a function's name."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if functions else "none"
    if choice == "none":
        return choice
    if not functions:
        raise invalid("tool_choice", "needs 'tools': the functions to choose from")
    if choice in ("auto", "required"):
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in {f["name"] for f in functions}:
        raise invalid("tool_choice", f"must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                                     f"{{'name': NAME}}}} naming one of 'tools', got {shown(choice)}")
    return name


def tool_calls_of(calls, param: str) -> list[dict]:
    """An assistant message's tool_calls, checked: [{id, type: "function", function: {name, arguments}}]."""
    if not isinstance(calls, list):
        raise invalid(param, f"must be a list of tool calls, got {shown(calls)}")
    out = []
    for i, call in enumerate(calls):
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or call.get("type", "function") != "function" or set(call) - {"id", "type", "function"} \
                or set(f) - {"name", "arguments"} or not isinstance(f.get("name"), str) \
                or not isinstance(f.get("arguments"), str):
            raise invalid(f"{param}[{i}]", "must be {'id': ..., 'type': 'function', 'function': {'name': ..., "
                                           f"'arguments': JSON text}}}}, got {shown(call)}")
        out.append({"id": text(call.get("id") or toolcalls.call_id(), f"{param}[{i}].id"), "type": "function",
                    "function": {"name": text(f["name"], f"{param}[{i}].function.name"),
                                 "arguments": text(f["arguments"], f"{param}[{i}].function.arguments")}})
    return out


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
    samplers: list[Sampler]              # one per choice (n), each with its own seed
    stop: tuple[str, ...] = ()
    logprobs: int | None = None          # None: none; k: the drawn token's and the top k
    ignore_eos: bool = False
    logit_bias: dict | None = None       # token id -> bias (-inf bans)
    stream: bool = False
    include_usage: bool = False
    grammar: object | None = None        # llamarun.structured.Grammar: what every choice is held to
    tools: bool = False                  # tools were offered: the output is read for tool calls
    speculative: bool = False            # drafts are verified (the server has --draft; the request did not opt out)

    @property
    def sampler(self) -> Sampler:
        return self.samplers[0]

    @property
    def n(self) -> int:
        return len(self.samplers)


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
        self.grammars: OrderedDict[str, object] = OrderedDict()     # the recent compiled grammars

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
        functions = tool_functions(body)
        choice = tool_choice(body, functions)
        parallel = body.get("parallel_tool_calls") is None or flag(body, "parallel_tool_calls")
        offered = functions if choice != "none" else []
        prompt = self.chat_prompt(body.get("messages"), offered, parallel)
        asked = constraint(body)
        if offered:
            if asked is not None:
                raise invalid(asked[0], "cannot be combined with 'tools' (unless 'tool_choice' is 'none')")
            if choice == "auto":
                asked = ("tools", {"lark": toolcalls.auto_grammar(offered, parallel)})
            else:
                listed = offered if choice == "required" else [f for f in offered if f["name"] == choice]
                asked = ("tools", {"json_schema": toolcalls.call_schema(listed, parallel)})
        logprobs = flag(body, "logprobs")
        top = number(body, "top_logprobs", 0, MAX_LOGPROBS, integer=True)
        if top is not None and not logprobs:
            raise invalid("top_logprobs", "needs 'logprobs': true")
        max_tokens = number(body, "max_completion_tokens", 1, integer=True)     # OpenAI's newer name wins
        if max_tokens is None:
            max_tokens = number(body, "max_tokens", 1, integer=True)
        return self.job(body, "chat", prompt, (top or 0) if logprobs else None, max_tokens, constrained=asked,
                        tools=bool(offered))

    def parse_completion(self, body: dict) -> Job:
        """A /v1/completions body as the job it asks for, or an ApiError (400 naming the field)."""
        check_fields(body, COMMON | COMPLETION_ONLY)
        prompt = self.completion_prompt(body.get("prompt"))
        logprobs = number(body, "logprobs", 0, MAX_LOGPROBS, integer=True)
        max_tokens = number(body, "max_tokens", 1, integer=True)
        return self.job(body, "text", prompt, logprobs, max_tokens, default=16,      # OpenAI's default
                        constrained=constraint(body))

    def job(self, body: dict, kind: str, prompt: list[int], logprobs: int | None, max_tokens: int | None,
            default: int | None = None, constrained: tuple[str, dict] | None = None, tools: bool = False) -> Job:
        """The checks both endpoints share. max_tokens None: `default`, or (None) up to the end of the slot.
        constrained: the constraint on the output (`constraint`), compiled last: every cheaper check first."""
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
        n = number(body, "n", 1, integer=True) or 1
        if n > self.scheduler.parallel:     # a request's choices run together, a slot each
            raise invalid("n", f"must be at most {self.scheduler.parallel}, the server's slots (--parallel), "
                               f"got {n}")
        stream = flag(body, "stream")
        usage = include_usage(body)
        ignore_eos = flag(body, "ignore_eos")
        samplers = self.samplers(body, n)
        bias = self.logit_bias(body, end_tokens(self.tokenizer, samplers[0]) if ignore_eos else frozenset())
        # "speculative": false turns the server's drafts off for this request (llamarun's extension)
        speculative = self.config.draft is not None and (body.get("speculative") is None or flag(body, "speculative"))
        return Job(kind, prompt, max_tokens, samplers, stop_strings(body), logprobs, ignore_eos, bias,
                   stream, usage and stream, self.grammar(constrained), tools, speculative)

    def samplers(self, body: dict, n: int) -> list[Sampler]:
        """One sampler per choice: the request's seed for the first, seed + 1 for the second, ...
        (choices drawn alike from one prompt would be the same choice); unseeded, each its own."""
        first = self.sampler(body)
        seed = number(body, "seed", 0, MAX_SEED, integer=True)
        return [first] + [self.sampler(body, None if seed is None else (seed + i) % (MAX_SEED + 1))
                          for i in range(1, n)]

    def grammar(self, asked: tuple[str, dict] | None):
        """The compiled Grammar of a constraint (None for none); one that does not compile is a 400
        with its one-line reason. Kept for the next requests that ask the same (benchmarks, agents
        sending one schema again and again)."""
        if asked is None:
            return None
        param, request = asked
        key = json.dumps(request, sort_keys=True)
        if key in self.grammars:
            self.grammars.move_to_end(key)
            return self.grammars[key]
        from ..structured import Grammar        # llguidance loads with the first constrained request
        try:
            grammar = Grammar.from_request(self.tokenizer, **request)
        except LlamarunError as e:
            raise invalid(param, f"cannot be used: {e}") from None
        self.grammars[key] = grammar
        while len(self.grammars) > GRAMMARS_KEPT:
            self.grammars.popitem(last=False)
        return grammar

    def sampler(self, body: dict, seed: int | None = ...) -> Sampler:
        """The request's sampler: its own values, checked here (so the sampler never refuses one), over
        the defaults (`sampling_defaults`). top_k and min_p are llama.cpp's extensions. seed: in place
        of the body's (another choice's)."""
        given = {"temperature": number(body, "temperature", 0, 2), "top_p": number(body, "top_p", 0, 1, above=True),
                 "top_k": number(body, "top_k", 0, integer=True), "min_p": number(body, "min_p", 0, 1),
                 "presence_penalty": number(body, "presence_penalty", -2, 2),
                 "frequency_penalty": number(body, "frequency_penalty", -2, 2),
                 "seed": number(body, "seed", 0, MAX_SEED, integer=True) if seed is ... else seed}
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

    def chat_prompt(self, messages, functions: list[dict] = (), parallel: bool = True) -> list[int]:
        """The conversation's ids, with the tools offered (`functions`) where it has any: in the
        template where it takes them, else in llama.cpp's generic format (llamarun/tools.py)."""
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", f"must be a non-empty list of messages, got {shown(messages)}")
        plain = [self.message(m, f"messages[{i}]") for i, m in enumerate(messages)]
        tools = None
        if functions or any(m["role"] == "tool" or m.get("tool_calls") for m in plain):
            if self.chat_format.takes_tools:
                plain = toolcalls.native_messages(plain)
                tools = [{"type": "function", "function": f} for f in functions] or None
            else:
                plain = toolcalls.generic_messages(plain, functions, parallel)
        try:
            return self.chat_format.encode(plain, self.tokenizer, add_generation_prompt=True, tools=tools)
        except Exception as e:               # a template that refuses the conversation (raise_exception)
            raise invalid("messages", f"were refused by the model's chat template: {e}") from None

    @staticmethod
    def message(m, param: str) -> dict:
        """One message as the chat format takes it: developer is system (OpenAI's newer name), content
        given as a list of text parts is their text, one part a line; name is accepted and unused
        (but for a tool's result). An assistant's tool_calls (its content then may be null) and a
        tool's tool_call_id are kept for the template (or llama.cpp's generic format)."""
        if not isinstance(m, dict):
            raise invalid(param, f"must be an object with 'role' and 'content', got {shown(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"{param}.role", f"must be one of {', '.join(ROLES)}, got {shown(role)}")
        extra = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}.get(role, set())
        unknown = sorted(set(m) - {"role", "content", "name"} - extra)
        if unknown:
            raise invalid(f"{param}.{unknown[0]}", "is not supported by llamarun")
        if m.get("name") is not None:
            text(m["name"], f"{param}.name")
        out = {"role": ROLES[role]}
        if role == "tool":
            out["tool_call_id"] = text(m.get("tool_call_id"), f"{param}.tool_call_id")
            if m.get("name") is not None:
                out["name"] = m["name"]
        if m.get("tool_calls"):
            out["tool_calls"] = tool_calls_of(m["tool_calls"], f"{param}.tool_calls")
            if m.get("content") is None:
                return {**out, "content": None}
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
        return {**out, "content": text(content, f"{param}.content")}

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
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()     # (choice index, event)
        processors = (LogitBias(job.logit_bias),) if job.logit_bias else ()

        def emitter(index: int):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev))

        requests = [Request(job.prompt, job.max_tokens, sampler, emitter(i), stop=job.stop, logprobs=job.logprobs,
                            ignore_eos=job.ignore_eos, processors=processors,
                            grammar=None if job.grammar is None else job.grammar.matcher(),
                            speculation=make_speculation(self.config.draft, self.config.draft_max, self.llama)
                            if job.speculative else None)
                    for i, sampler in enumerate(job.samplers)]
        requests[0].followers = requests[1:]         # the first choice runs the prompt for all
        try:
            self.scheduler.submit(requests[0])
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); try again shortly", "server_error",
                           headers={"Retry-After": "1"}) from None
        reply = Reply(job.kind, self.config.model_name, self.tokenizer, job.logprobs, job.include_usage, job.n,
                      job.tools)
        reply.speculative = job.speculative
        if job.stream:
            return StreamingResponse(self.stream(requests, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        failed = None
        try:
            while not reply.done:
                index, event = await events.get()
                reply.add(index, event)
                if event.finish_reason in ("error", "cancelled"):
                    failed = event.finish_reason
                    break
        finally:
            for request in requests:
                request.cancel()                 # a client gone mid-request frees its slots (no-op when done)
        if failed:
            raise ApiError(500 if failed == "error" else 503, f"the request was {failed}"
                           if failed == "cancelled" else "generation failed", "server_error")
        return JSONResponse(reply.whole())

    async def stream(self, requests: list[Request], events: asyncio.Queue, reply: "Reply"):
        try:
            for chunk in reply.chunks_start():
                yield sse(chunk)
            while True:
                index, event = await events.get()
                if event.finish_reason in ("error", "cancelled"):
                    yield sse({"error": {"message": f"generation {event.finish_reason}", "type": "server_error",
                                         "param": None, "code": None}})
                    return
                for chunk in reply.chunks(index, event):
                    yield sse(chunk)
                if reply.done:
                    if reply.include_usage:
                        yield sse(reply.chunk_usage())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            for request in requests:
                request.cancel()                 # the client went away (or we are done): free the slots


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Choice:
    """One choice of a reply as it comes in: its text, logprobs, end, and (with tools offered) the
    text held back while it may still be a tool call."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.token_logprobs: list[TokenLogprob] = []
        self.offset = 0                          # text offset of the next token (completions' logprobs)
        self.finish_reason: str | None = None
        self.last: Event | None = None           # the event that ended it (its usage)
        self.held = ""                           # streamed text not yet sent: it may be a tool call
        self.deciding = True                     # (tools offered) no text yet shows it is not a call
        self.calls: list[dict] | None = None     # OpenAI's tool_calls, once read from the finished text

    def read_calls(self) -> None:
        """The finished text read for tool calls: if it is one, the choice ends with "tool_calls"."""
        calls = toolcalls.parse_calls("".join(self.text)) if self.finish_reason == "stop" else None
        if calls:
            self.calls, self.finish_reason = toolcalls.openai_calls(calls), "tool_calls"


class Reply:
    """One response in OpenAI's shapes: chat ("chat.completion") or text ("text_completion"), with
    n choices; with tools offered, a choice whose text is a call (llamarun/tools.py) is answered as
    message.tool_calls (streamed: its text held back, then delta.tool_calls chunks)."""

    def __init__(self, kind: str, model: str, tokenizer, logprobs: int | None, include_usage: bool = False,
                 n: int = 1, tools: bool = False):
        self.kind, self.model, self.tokenizer, self.logprobs = kind, model, tokenizer, logprobs
        self.include_usage = include_usage      # a stream's last chunk carries the usage; the others null
        self.tools = tools
        self.speculative = False                # drafts were verified: the usage counts them
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(n)]

    @property
    def done(self) -> bool:
        return all(c.finish_reason for c in self.choices)

    def add(self, index: int, event: Event) -> None:
        choice = self.choices[index]
        choice.text.append(event.text)
        if event.logprob:
            choice.token_logprobs.append(event.logprob)
        if event.finish_reason:
            choice.finish_reason, choice.last = event.finish_reason, event
            if self.tools:
                choice.read_calls()

    def usage(self) -> dict:
        """The request's usage: the prompt once (the choices share it), the tokens of every choice."""
        first = self.choices[0].last
        completion = sum(c.last.completion_tokens for c in self.choices if c.last)
        usage = {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": first.prompt_tokens + completion,
                 "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}
        if self.speculative:
            # speculative decoding's drafts, in the fields OpenAI's predicted outputs report them in
            drafted = sum(c.last.drafted for c in self.choices if c.last)
            accepted = sum(c.last.accepted for c in self.choices if c.last)
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                                  "rejected_prediction_tokens": drafted - accepted}
        return usage

    def piece(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def logprobs_of(self, choice: Choice, items: list[TokenLogprob]):
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
            offsets.append(choice.offset)
            choice.offset += len(self.piece(t.token))
        return {"tokens": [self.piece(t.token) for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{self.piece(i): lp for i, lp in t.top} for t in items], "text_offset": offsets}

    def head(self, streamed: bool) -> dict:
        kind = {"chat": "chat.completion", "text": "text_completion"}[self.kind] + (".chunk" if streamed and
                                                                                  self.kind == "chat" else "")
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if streamed and self.include_usage:
            head["usage"] = None
        return head

    def whole(self) -> dict:
        choices = []
        for c in self.choices:
            text, logprobs = "".join(c.text), self.logprobs_of(c, c.token_logprobs)
            if self.kind == "text":
                choices.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
                continue
            message = {"role": "assistant", "content": text}
            if c.calls:
                message = {"role": "assistant", "content": None, "tool_calls": c.calls}
            choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return {**self.head(False), "choices": choices, "usage": self.usage()}

    # -- streamed

    def delta(self, index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        """A chunk of one choice: a chat delta, or a completion's text (delta's "content")."""
        if self.kind == "chat":
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta.get("content", ""), "logprobs": logprobs,
                      "finish_reason": finish_reason}
        return {**self.head(True), "choices": [choice]}

    def chunks_start(self) -> list[dict]:
        # as OpenAI's: the role comes once per choice, first
        delta = {"role": "assistant", "content": ""} if self.kind == "chat" else {}
        return [self.delta(c.index, delta) for c in self.choices]

    def chunks(self, index: int, event: Event) -> list[dict]:
        """The chunks an event of choice `index` gives: its text (held back while it may be a tool
        call), then at its end whatever was held (as content or as tool calls) and the finish."""
        choice = self.choices[index]
        self.add(index, event)
        out = []
        text = event.text
        if self.tools and choice.deciding:
            choice.held += text
            text = ""
            if not toolcalls.maybe_call(choice.held):       # an answer in words: sent from here on
                text, choice.held, choice.deciding = choice.held, "", False
        logprobs = self.logprobs_of(choice, [event.logprob]) if event.logprob else None
        if text or logprobs:
            out.append(self.delta(index, {"content": text} if text else {}, logprobs))
        if event.finish_reason:
            if choice.calls:
                for i, call in enumerate(choice.calls):      # as OpenAI's: id, type and name, then the arguments
                    function = call["function"]
                    out.append(self.delta(index, {"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                                  "function": {"name": function["name"],
                                                                               "arguments": ""}}]}))
                    out.append(self.delta(index, {"tool_calls": [{"index": i, "function": {
                        "arguments": function["arguments"]}}]}))
            elif choice.held:
                out.append(self.delta(index, {"content": choice.held}))
            choice.held = ""
            out.append(self.delta(index, {}, None, choice.finish_reason))
        return out

    def chunk_usage(self) -> dict:
        return {**self.head(True), "choices": [], "usage": self.usage()}     # after head's null


def create_app(llama, model_name: str, parallel: int = 4, ctx: int = 2048, queue: int = 64,
               api_key: str | None = None, max_body: int = 1 << 20, draft=None, draft_max: int | None = None) -> Starlette:
    """The ASGI application; its lifespan starts the scheduler's worker thread and stops it.
    draft, draft_max: speculative decoding for every request (as `Llama.stream`'s; a path is loaded
    once, each request drafting on its own cache), unless a request says "speculative": false."""
    if llama.tokenizer is None:
        raise LlamarunError("serving needs the model's tokenizer: pass one with -z PATH")
    if ctx > llama.config.seq_len:
        raise LlamarunError(f"--ctx {ctx} is beyond the model's context of {llama.config.seq_len} tokens")
    from ..api import Llama, load
    if draft is not None and draft != "ngram" and not isinstance(draft, Llama):
        draft = load(draft)                                     # once: each request drafts on its own cache
    make_speculation(draft, draft_max, llama)                   # a bad draft is refused before serving
    scheduler = Scheduler(llama, parallel=parallel, ctx=ctx, queue=queue)
    server = Server(llama, scheduler, ServerConfig(model_name, api_key, max_body, draft, draft_max))

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
