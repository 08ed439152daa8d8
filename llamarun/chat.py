"""Chat: how a conversation is laid out for a model, and a multi-turn session on one KV cache.

- `ChatFormat` turns a list of messages ({"role": ..., "content": ...}) into text and token ids.
  `ChatFormat.from_template` renders a Hugging Face chat template (jinja2, in the environment that
  transformers' `apply_chat_template` uses, so the text is the same to the byte, within bounds of
  time and size: a template is data from a model file); `ChatFormat.llama2()` is Llama 2's [INST]
  format as llama2.c's run.c builds it in chat mode. Only a format's own markers become control
  tokens: what the messages say is tokenized as plain text, so no message can end its turn early
  or forge another one by typing "<|im_end|>".
- `ChatSession` holds a conversation with a model. Every turn renders the whole conversation, but
  only the tokens the KV cache does not hold yet are prefilled: a turn costs its new tokens only.
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import secrets
import time
from datetime import datetime
from typing import Iterator, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

from .errors import LlamarunError
from .decoding import Completion, TokenEvent, end_tokens
from .generation import generate_stream
from .speculative import make_speculation
from .sampling import make_sampler


class ContextFull(LlamarunError):
    """The conversation no longer fits the model's context: start over (ChatSession.reset)."""


# ----------------------------------------------------------------------------------------------
# Hugging Face chat templates

class _TemplateRaised(jinja2.TemplateError):
    """What a template's `raise_exception(...)` throws: the template refuses the conversation."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: jinja's own tojson escapes non-ASCII and HTML characters, which the
    # models never saw in training
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


# A template comes with the model file: its rendering must end, soon and small, whatever it says.
# Real templates render in milliseconds, in a few loops over the messages.
TEMPLATE_SECONDS = 2.0           # wall time of one rendering
TEMPLATE_ITEMS = 1_000_000       # items of all its range()s and repetitions (seq * n) in one rendering
TEMPLATE_SIZE = 16 << 20         # length of any string or list it builds (the rendering included),
                                 # and the largest width it may pass to what pads (WIDTH_TAKING)
# the filters and str methods whose integer arguments are widths or counts of what they build
WIDTH_TAKING = frozenset({"center", "indent", "truncate", "wordwrap", "ljust", "rjust", "zfill", "expandtabs"})


class TemplateTooCostly(LlamarunError):
    """A chat template that would run too long or build too much: it is broken or hostile."""


def _too_costly(what: str) -> TemplateTooCostly:
    return TemplateTooCostly(f"the chat template exceeds {what}: it is broken or hostile; use a model file "
                             f"with another template")


class TemplateBudget:
    """What one rendering may still spend. Loops with empty bodies are bounded by the items of what
    they loop over (range() and seq * n are the ways to make a long sequence from nothing); every
    other step of a template (an attribute, an item, a call, a filter, a piece of output) checks the
    clock and the size of what it takes and gives."""

    def __init__(self):
        self.deadline = time.monotonic() + TEMPLATE_SECONDS
        self.items = TEMPLATE_ITEMS

    def spend(self, items: int) -> None:
        self.items -= items
        if self.items < 0:
            raise _too_costly(f"{TEMPLATE_ITEMS} items of range() and repetition in one rendering")

    def check(self, value=None):
        """`value`, once the clock and its size are checked."""
        if time.monotonic() > self.deadline:
            raise _too_costly(f"{TEMPLATE_SECONDS:g} s of rendering")
        if isinstance(value, (str, list, tuple, dict)) and len(value) > TEMPLATE_SIZE:
            raise _too_costly(f"{TEMPLATE_SIZE} items in one value (a {type(value).__name__} of {len(value)})")
        return value


# the budget of the rendering under way in this thread (render_chat_template sets it)
_budget: contextvars.ContextVar[TemplateBudget | None] = contextvars.ContextVar("template_budget", default=None)


def _check(value=None):
    budget = _budget.get()
    return value if budget is None else budget.check(value)


def _check_widths(name: str, args, kwargs) -> None:
    """Refuse "x".ljust(10**9) before it runs: it would build its gigabyte in one step."""
    if name in WIDTH_TAKING and any(isinstance(v, int) and v > TEMPLATE_SIZE for v in (*args, *kwargs.values())):
        raise _too_costly(f"a width of {TEMPLATE_SIZE} in {name}()")


def _bounded_range(*args):
    r = range(*args)
    budget = _budget.get()
    if budget is not None:
        budget.spend(len(r))
    return r


def _bounded_filter(name: str, f):
    """The filter `f`, checking the budget on its widths and on what it gives."""
    @functools.wraps(f)               # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_widths(name, args, kwargs)
        return _check(f(*args, **kwargs))
    return bounded


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox (nothing a template does changes its arguments or reaches Python's
    internals), with every rendering held to a TemplateBudget of time, items and size."""

    intercepted_binops = frozenset({"*", "**"})     # "x" * 10**9, 9**9**9: refused before they run

    def __init__(self, **options):
        super().__init__(**options)
        self.globals["range"] = _bounded_range
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        budget = _budget.get()
        if budget is not None and operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    budget.spend(len(seq) * max(n, 0))
        if budget is not None and operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * abs(left).bit_length() > 4096:
                raise _too_costly("4096 bits in a power")
        return _check(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):
        _check_widths(getattr(__obj, "__name__", ""), args, kwargs)
        return _check(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        return _check(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        return _check(super().getitem(obj, argument))


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers' apply_chat_template uses (bounded:
    BoundedSandbox)."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LlamarunError(f"the chat template does not parse: {e.message} (template line {e.lineno})") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The text of `messages` under a Hugging Face chat template, as apply_chat_template renders it.

    `extra` are further template variables (transformers passes the tokenizer's special tokens and
    any keyword arguments; `tools` and `documents` are None unless given). A template that runs
    past its TemplateBudget is a TemplateTooCostly error.
    """
    compiled = compile_chat_template(template)
    variables = dict(tools=None, documents=None, bos_token=bos_token, eos_token=eos_token)
    variables.update(extra)
    budget = TemplateBudget()
    token = _budget.set(budget)
    try:
        out, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            budget.check()
            size += len(piece)
            if size > TEMPLATE_SIZE:
                raise _too_costly(f"{TEMPLATE_SIZE} characters of rendering")
            out.append(piece)
        return "".join(out)
    except _TemplateRaised as e:
        raise LlamarunError(f"the chat template refused the conversation: {e.message}") from None
    except LlamarunError:
        raise
    except Exception as e:   # the template is data from the model file: any failure is its own
        raise LlamarunError(f"the chat template failed to render: {type(e).__name__}: {e}") from None
    finally:
        _budget.reset(token)


# ----------------------------------------------------------------------------------------------
# chat formats

class ChatFormat:
    """How a model wants a conversation laid out.

    `render` gives the text (for people and for tests); `encode` gives the token ids the model reads.
    An assistant message may carry "tokens": the ids the model drew for it. Encoding uses them as they
    are instead of tokenizing the reply's text again, which could give other ids for the same text
    (and so a different sequence than the one in the KV cache).
    """

    # whether the format lays out tools itself (OpenAI's `tools`, as a template's `tools` variable);
    # a format that does not gets them in a system message (llamarun/tools.py)
    takes_tools = False

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        raise NotImplementedError

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        raise NotImplementedError

    @staticmethod
    def from_template(template: str, bos: str = "", eos: str = "",
                      special_tokens: dict[str, int] | None = None) -> "TemplateChatFormat":
        return TemplateChatFormat(template, bos, eos, special_tokens)

    @staticmethod
    def llama2() -> "Llama2ChatFormat":
        return Llama2ChatFormat()


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as a template sees them: without the "tokens" llamarun keeps beside a reply."""
    return [{k: v for k, v in m.items() if k != "tokens"} for m in messages]


class TemplateChatFormat(ChatFormat):
    """A Hugging Face (jinja2) chat template, e.g. the `tokenizer.chat_template` of a GGUF file.

    The rendered text holds special tokens as text ("<|im_start|>"); `special_tokens` maps those texts
    to their ids, so they become one id each rather than being spelled out by the tokenizer. Without
    it, the tokenizer's own special tokens (a GGUF tokenizer's `special_ids`) and the BOS and EOS
    texts map to their ids. Only the template's own text gives special ids: what the messages say
    is plain text, however it is spelled.
    """

    def __init__(self, template: str, bos: str = "", eos: str = "", special_tokens: dict[str, int] | None = None):
        self.template = template
        self.bos, self.eos = bos or "", eos or ""
        self.special_tokens = special_tokens
        self._protected: tuple[object, frozenset[str]] | None = None    # (tokenizer, its protected_texts)
        compile_chat_template(template)     # a template that does not parse is refused now, not mid-chat

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        return render_chat_template(self.template, template_messages(messages), add_generation_prompt,
                                    bos_token=self.bos, eos_token=self.eos, tools=tools)

    @functools.cached_property
    def takes_tools(self) -> bool:
        """Does the template render `tools`? (Asked of the template: rendered with a tool, does its
        name show? Templates that mention tools only to refuse them, or ignore them, do not.)"""
        probe = "llamarun_probe_tool_" + secrets.token_hex(4)
        tools = [{"type": "function", "function": {"name": probe, "description": "",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            return probe in self.render([{"role": "user", "content": "hi"}], True, tools)
        except LlamarunError:
            return False

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """The conversation's ids: a special token's text that the template writes is its one id, a
        reply whose drawn tokens are known is those tokens, and all other text (the template's and the
        messages', run together between ids, as the rendered text runs) is tokenized as plain text.
        A message that says "<|im_end|>" gets those characters in ordinary pieces, not the end of its turn."""
        specials = self.specials_of(tokenizer)
        ids: list[int] = []
        plain: list[str] = []            # text waiting to be tokenized: it runs up to the next id

        def flush():
            text = "".join(plain)
            if text:
                ids.extend(tokenizer.encode(text, bos=False, special=False))
            plain.clear()

        for kind, value in self.pieces(messages, add_generation_prompt, self.protected_texts(tokenizer, specials),
                                       tools):
            if kind == "template":
                for n, part in enumerate(split_at_specials(value, specials)):
                    if n % 2:
                        flush()
                        ids.append(specials[part])
                    else:
                        plain.append(part)
            elif kind == "content":
                plain.append(value)
            else:                        # "tokens"
                flush()
                ids += value
        flush()
        return ids

    def specials_of(self, tokenizer) -> dict[str, int]:
        if self.special_tokens is not None:
            return self.special_tokens
        specials = dict(getattr(tokenizer, "special_ids", {}))
        for text, token in ((self.bos, tokenizer.bos_id), (self.eos, tokenizer.eos_id)):
            if text and token is not None:
                specials.setdefault(text, token)
        return specials

    def protected_texts(self, tokenizer, specials: dict[str, int]) -> frozenset[str]:
        """The special texts that plain tokenization does not read as their token (control tokens:
        "<|im_end|>"): a message must not write them. A user-defined token, which plain text gives
        anyway, may stay in a message, where the template can see it (a "</think>" it splits at)."""
        if self._protected is None or self._protected[0] is not tokenizer:
            texts = frozenset(text for text, token in specials.items()
                              if tokenizer.encode(text, bos=False, special=False) != [token])
            self._protected = (tokenizer, texts)
        return self._protected[1]

    def pieces(self, messages: list[dict], add_generation_prompt: bool, protected: frozenset[str],
               tools: list[dict] | None = None) -> list[tuple[str, str | list[int]]]:
        """The rendering cut into ("template", text), ("content", text) and ("tokens", ids) pieces.

        The template renders the messages with markers in place of what they bring: each message's
        content as a whole (or, for a reply whose drawn tokens are known, those tokens), and every
        protected text in their other strings. The cut is used if putting the contents back gives
        the real rendering exactly. A template that edits content (trims it, splits it) renders it
        instead with markers in place of the protected texts only, wherever they are: the rest of
        the content then reads as template text, and holds no special text to mistake.
        """
        real = self.render(messages, add_generation_prompt, tools)
        replies = any(m.get("tokens") is not None for m in messages)
        attempts = [(True, True)] + ([(False, True)] if replies else []) + [(False, False)]
        for n, (whole_content, drawn_tokens) in enumerate(attempts):
            markers = ContentMarkers(protected)
            marked = [markers.message(m, whole_content, drawn_tokens) for m in messages]
            rendered = self.render(marked, add_generation_prompt, markers.masked(tools))
            if n == len(attempts) - 1 or markers.restore(rendered) == real:
                return markers.split(rendered)


class ContentMarkers:
    """Stand-ins, in a rendering, for what the messages bring: each marker is a run of private-use
    characters around a number no message can guess, and names the piece it stands for."""

    def __init__(self, protected: frozenset[str]):
        self.nonce = secrets.token_hex(8)
        self.pieces: list[tuple[str, str | list[int], str]] = []     # (kind, value, its text)
        self.pattern = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")
        # longest first, so that a protected text that begins another one does not cut it
        self.protected = re.compile("|".join(map(re.escape, sorted(protected, key=len, reverse=True)))) \
            if protected else None

    def add(self, kind: str, value, text: str) -> str:
        self.pieces.append((kind, value, text))
        return f"\ue000{self.nonce}:{len(self.pieces) - 1}\ue001"

    def masked(self, value):
        """`value` (a string, or lists and dicts of them) with a marker for each protected text."""
        if isinstance(value, str):
            return value if self.protected is None else \
                self.protected.sub(lambda m: self.add("content", m.group(), m.group()), value)
        if isinstance(value, dict):
            return {k: self.masked(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.masked(v) for v in value]
        return value

    def message(self, message: dict, whole_content: bool, drawn_tokens: bool) -> dict:
        """The message as the template sees it, with markers."""
        marked = {k: self.masked(v) for k, v in message.items() if k not in ("tokens", "content")}
        content = message.get("content")
        if isinstance(content, str) and drawn_tokens and message.get("tokens") is not None:
            marked["content"] = self.add("tokens", list(message["tokens"]), content)
        elif isinstance(content, str) and whole_content:
            marked["content"] = self.add("content", content, content)
        elif "content" in message:
            marked["content"] = self.masked(content)
        return marked

    def restore(self, rendered: str) -> str:
        """The rendering with each marker replaced by the text it stands for."""
        return self.pattern.sub(lambda m: self.pieces[int(m.group(1))][2], rendered)

    def split(self, rendered: str) -> list[tuple[str, str | list[int]]]:
        parts = self.pattern.split(rendered)
        if any(self.nonce in part for part in parts[::2]):
            raise LlamarunError("the chat template cuts into the text of a message that holds a special token: "
                                "llamarun cannot tell the message from the template; use another template")
        return [("template", part) if n % 2 == 0 else self.pieces[int(part)][:2] for n, part in enumerate(parts)]


def split_at_specials(text: str, specials: dict[str, int]) -> list[str]:
    """[text, special, text, special, ..., text]: `text` cut at each special token's text."""
    if not specials:
        return [text]
    # longest first, so that a special token that begins another one does not cut it
    return re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text)


LLAMA2_SYSTEM_TURN = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
LLAMA2_USER_TURN = "[INST] {user} [/INST]"


class Llama2ChatFormat(ChatFormat):
    """Llama 2 chat, as llama2.c's run.c runs it: per turn BOS "[INST] {user} [/INST]", the reply, EOS.

    The system prompt goes into the first turn only: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]".
    run.c encodes each turn's text on its own (with BOS and the dummy-prefix space) and keeps the
    reply's drawn tokens and the EOS that ended it in the cache; `encode` gives that same sequence.
    BOS and EOS are the only special ids: the text of a turn is tokenized as plain text, so a
    message that says "</s>" does not end it.
    """

    def turns(self, messages: list[dict]) -> tuple[str, list[tuple[str, dict | None]]]:
        """(system prompt, [(user text, assistant message or None), ...]); roles must alternate."""
        system = ""
        if messages and messages[0].get("role") == "system":
            system, messages = messages[0]["content"], messages[1:]
        turns = []
        for n, message in enumerate(messages):
            expected = "user" if n % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise LlamarunError(f"Llama 2 chat needs an optional system message, then user and assistant "
                                    f"messages in turn; message {n + 1} is {message.get('role')!r}, not {expected!r}")
            if expected == "user":
                turns.append((message["content"], None))
            else:
                turns[-1] = (turns[-1][0], message)
        return system, turns

    @staticmethod
    def instruction(user: str, system: str, first: bool) -> str:
        if first and system:
            return LLAMA2_SYSTEM_TURN.format(system=system, user=user)
        return LLAMA2_USER_TURN.format(user=user)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        # written with <s> and </s> for BOS and EOS, as Llama 2's Hugging Face template writes them
        system, turns = self.turns(messages)
        out = []
        for n, (user, reply) in enumerate(turns):
            out.append("<s>" + self.instruction(user, system, n == 0))
            if reply is not None:
                out.append(" " + reply["content"].strip() + " </s>")
        return "".join(out)

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        system, turns = self.turns(messages)
        ids: list[int] = []
        for n, (user, reply) in enumerate(turns):
            ids += tokenizer.encode(self.instruction(user, system, n == 0), bos=True, special=False)
            if reply is not None:
                ids += self.reply_ids(reply, tokenizer) + [tokenizer.eos_id]
        return ids

    @staticmethod
    def reply_ids(reply: dict, tokenizer) -> list[int]:
        if reply.get("tokens") is not None:
            return list(reply["tokens"])
        # the model writes its reply as "▁word ...": the dummy-prefix space of encode() is that space
        return tokenizer.encode(reply["content"].strip(), bos=False, special=False)


# ----------------------------------------------------------------------------------------------
# the format a model asks for

def _metadata(llama) -> dict:
    return getattr(llama.checkpoint, "metadata", None) or {}


def _as_text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def special_token_text(llama, token_id: int | None) -> str:
    """How templates write a special token (e.g. "<|im_start|>"): from the model file's vocabulary
    when it has one, else from the tokenizer."""
    if token_id is None:
        return ""
    tokens = _metadata(llama).get("tokenizer.ggml.tokens")
    if tokens is not None and 0 <= token_id < len(tokens):
        return _as_text(tokens[token_id])
    tokenizer = llama.tokenizer
    if hasattr(tokenizer, "token_text"):
        return tokenizer.token_text(token_id)
    if hasattr(tokenizer, "sp"):                          # SentencePiece: "<s>", "</s>"
        return tokenizer.sp.IdToPiece(token_id)
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4     # gguf token types of special tokens


def special_tokens_of(llama) -> dict[str, int]:
    """Text -> id of every special token the model file lists (control and user-defined tokens),
    plus BOS and EOS."""
    metadata = _metadata(llama)
    tokens, types = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
    specials = {}
    if tokens is not None and types is not None:
        specials = {_as_text(text): token for token, (text, kind) in enumerate(zip(tokens, types))
                    if int(kind) in (GGUF_CONTROL, GGUF_USER_DEFINED) and text}
    for token in (llama.tokenizer.bos_id, llama.tokenizer.eos_id):
        if token is not None and special_token_text(llama, token):
            specials.setdefault(special_token_text(llama, token), token)
    return specials


def chat_format_for(llama) -> ChatFormat:
    """The model's own chat template when its file carries one (GGUF `tokenizer.chat_template`),
    else Llama 2's format (llama2.c checkpoints have no template: run.c chats in Llama 2's format)."""
    template = _metadata(llama).get("tokenizer.chat_template")
    if not template:
        return ChatFormat.llama2()
    tokenizer = llama.tokenizer
    return ChatFormat.from_template(_as_text(template), special_token_text(llama, tokenizer.bos_id),
                                    special_token_text(llama, tokenizer.eos_id), special_tokens_of(llama))


# ----------------------------------------------------------------------------------------------
# a conversation on one KV cache

def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with a model that keeps its KV cache from turn to turn.

    `send(text)` renders the whole conversation with the new user message, tokenizes it, and compares
    the ids with those already in the cache (`cached_ids`). They are normally a prefix of the new ids,
    and only the rest is prefilled (`last_prefill_tokens`). Where they differ (a template that rewrites
    earlier turns), the cache is used up to the first difference and refilled from there: still exact.
    A reply's drawn tokens are kept with it, so the next render holds exactly the ids the cache holds.
    """

    def __init__(self, llama, chat_format: ChatFormat | None = None, system: str | None = None,
                 max_tokens: int = 512, history: Sequence[dict] = (), sampler=None, grammar=None, draft=None,
                 draft_max: int | None = None, **sampling):
        """grammar: a llamarun.structured.Grammar that every reply follows (each its own Matcher).
        draft, draft_max: speculative decoding, as `Llama.stream`'s (one draft source for the whole
        conversation: a draft model's cache follows it turn by turn, as the model's does)."""
        if llama.tokenizer is None:
            raise LlamarunError("chat needs the model's tokenizer: load it with tokenizer=PATH (CLI: -z PATH)")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise LlamarunError(f"a reply needs room for at least one token, not max_tokens={max_tokens!r}")
        self.llama = llama
        self.tokenizer = llama.tokenizer
        self.chat_format = chat_format or chat_format_for(llama)
        self.system = system
        self.max_tokens = max_tokens
        # one sampler: a seeded chat is repeatable (`sampler`: one made by the caller, e.g. run.c's)
        self.sampler = sampler if sampler is not None else make_sampler("default", tokenizer=llama.tokenizer, **sampling)
        # a reply ends at the end of its turn whatever the sampler (run.c's chat too ends the
        # assistant's turn at EOS, where its generate mode stops only at BOS)
        self.end = end_tokens(self.tokenizer)
        self.grammar = grammar
        self.speculation = make_speculation(draft, draft_max, llama)
        self.cache = llama.model.new_cache()
        self._active: Iterator[TokenEvent] | None = None
        self.reset(history)

    @property
    def context(self) -> int:
        return self.cache.seq_len

    def reset(self, history: Sequence[dict] = ()) -> None:
        """Forget the conversation (the system prompt stays) and start again at cache position 0."""
        self._close_active()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.messages += [dict(m) for m in history]
        self.cached_ids: list[int] = []       # the ids whose keys and values the cache holds, position by position
        self.last_prefill_tokens = 0

    def send(self, user_text: str):
        """Add a user message and stream the reply: an `llamarun.api.Stream` of TokenEvents.

        The reply joins the conversation when the stream ends, is closed, or is interrupted (Ctrl-C):
        then with what was drawn so far. Raises ContextFull, before anything runs, when the
        conversation no longer fits the context.
        """
        from .api import Stream
        self._close_active()
        messages = self.messages + [{"role": "user", "content": user_text}]
        ids = self.chat_format.encode(messages, self.tokenizer, add_generation_prompt=True)
        if len(ids) >= self.context:
            raise ContextFull(f"the conversation is {len(ids)} tokens and the context holds {self.context}: "
                              "start over (reset) to go on")
        # Reuse the cache up to the first id that differs; at least one id must run to give logits.
        start = min(common_prefix_length(self.cached_ids, ids), len(ids) - 1)
        # Positions from `start` on are about to be overwritten: until the turn ends, trust only those before.
        self.cached_ids = ids[:start]
        self.last_prefill_tokens = len(ids) - start
        result = Completion("", [])
        events = generate_stream(self.llama.model, self.tokenizer, ids[start:], self.sampler,
                                 max_tokens=self.max_tokens, end=self.end,
                                 cache=self.cache, start_pos=start, result=result,
                                 grammar=self.grammar.matcher() if self.grammar is not None else None,
                                 speculation=self.speculation, earlier_ids=ids[:start])
        self._active = self._turn(events, messages, ids, result)
        return Stream(self._active, result)

    def _turn(self, events, messages, ids, result: Completion) -> Iterator[TokenEvent]:
        finished, shown = False, 0
        try:
            for event in events:
                shown += event.token is not None
                yield event
            finished = True
        finally:
            # runs when the reply ends, and also when it is closed or interrupted part way
            self._record_turn(messages, ids, result, finished, shown)

    def _record_turn(self, messages, ids, result: Completion, finished: bool, shown: int) -> None:
        tokens = result.tokens
        if not finished:
            # Cut part way: the reply is what the stream had shown. The generation loop may have drawn
            # more (a draft's tokens, greedy steps run ahead: generation.py), which the user never saw.
            tokens = tokens[:shown]
        drawn = tokens + ([result.end_token] if result.end_token is not None and finished else [])
        if drawn or finished:
            # The prompt ran through, and every drawn token but the last was fed back to draw the
            # next one; the last (often the end token) never ran, and the next turn prefills it.
            self.cached_ids = ids + drawn[:-1]
        # else: interrupted inside the prefill; the cache holds ids[:start] as send() recorded
        reply = {"role": "assistant", "content": self.reply_text(tokens, prev=ids[-1]), "tokens": list(tokens)}
        self.messages = messages + [reply]
        self._active = None

    def reply_text(self, tokens: Sequence[int], prev: int) -> str:
        """The text of the drawn tokens, as the stream showed it (the end token adds nothing)."""
        data = bytearray()
        for token in tokens:
            data += self.tokenizer.token_bytes(token, prev)
            prev = token
        return data.decode("utf-8", errors="replace")

    def _close_active(self) -> None:
        """End a reply that is still streaming, so that it is recorded before the next turn."""
        if self._active is not None:
            active, self._active = self._active, None
            active.close()
