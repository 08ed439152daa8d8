"""Structured output: constraints on what a sequence may generate, enforced token by token.

A `Grammar` is a compiled constraint -- a JSON Schema, any JSON object, a GBNF grammar (llama.cpp's
format), a regular expression or a Lark grammar -- over one tokenizer's vocabulary; each sequence
walks it with its own `Matcher`. The work is llguidance's (its Earley parser and lexer compute the
set of allowed tokens from a trie of the vocabulary's bytes); this module turns our tokenizers into
its tokenizer, our errors into one line, and its bitmasks into the boolean rows the decoder masks
logits with.

    grammar = Grammar.from_json_schema({"type": "object", ...}, tokenizer)   # once per request
    matcher = grammar.matcher()                                              # once per sequence
    forced = matcher.forced()          # tokens the grammar decides alone: appended without sampling
    row[~matcher.allowed()] = -inf     # before the sampler draws
    matcher.consume(token)             # each token taken, drawn or forced
    matcher.finished                   # the grammar is complete: the sequence ends ("stop")

Nothing is ever silently unconstrained: a schema keyword llguidance does not implement, a GBNF
line it cannot read, a regex that does not compile -- each is a LlamarunError naming it.

The decoder (llamarun/decoding.py) is where a matcher meets the logits; the server computes the
masks of a whole batch with `fill_masks`, in llguidance's own threads, while the forward runs.
"""
from __future__ import annotations

import json
import threading
import weakref

import numpy as np

from .errors import LlamarunError

# How JSON is written under a schema: no free whitespace (a model at temperature 0.8 could otherwise
# fill its budget with spaces and newlines), and the separators of Python's json.dumps, the form
# models have seen most. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def import_llguidance():
    try:
        import llguidance
    except ImportError:
        raise LlamarunError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


# ----------------------------------------------------------------------------------------------
# our tokenizers as llguidance sees them

class TokenizerView:
    """What llguidance's TokenizerWrapper asks of a tokenizer: every token's bytes, the special
    tokens, and an encoder (it tokenizes the bytes a grammar forces, to fast-forward them)."""

    def __init__(self, tokenizer):
        specials = special_token_names(tokenizer)
        # token_bytes without a previous token: the piece as it reads inside a text (SentencePiece
        # pieces keep their leading space). A special token is named by its vocabulary text, which
        # llguidance marks as special (a Lark grammar can then write <|im_end|>).
        self.tokens = [specials.get(t) or tokenizer.token_bytes(t) for t in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(specials)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, special=False)


def special_token_names(tokenizer) -> dict[int, bytes]:
    """id -> name of the tokens that are markers rather than text (BOS, EOS, end of turn, control
    tokens), from whichever vocabulary the tokenizer keeps."""
    ids = set(tokenizer.eog_ids) | {t for t in (tokenizer.bos_id, tokenizer.eos_id) if t is not None}
    names: dict[int, str] = {}
    vocab = getattr(tokenizer, "vocab", None)            # GGUF tokenizers: token types
    added = getattr(tokenizer, "added", None)            # Hugging Face tokenizer.json: added tokens
    sp = getattr(tokenizer, "sp", None)                  # SentencePiece
    if vocab is not None:
        from .tokenizers.gguf import CONTROL, UNKNOWN
        ids |= {t for t, kind in enumerate(vocab.types) if kind in (CONTROL, UNKNOWN)}
        names = {t: vocab.tokens[t] for t in ids}
    elif added is not None:
        ids |= {t for t, token in added.items() if token.special}
        names = {t: tokenizer.hf.id_to_token(t) or "" for t in ids}
    elif sp is not None:
        ids |= {t for t in range(tokenizer.vocab_size) if sp.IsControl(t) or sp.IsUnknown(t)}
        names = {t: sp.IdToPiece(t) for t in ids}
    else:                                                # llama2.c's tokenizer.bin: "\n<s>\n"
        names = {t: tokenizer.pieces[t].decode("utf-8", "replace").strip() for t in ids}
    return {t: (names.get(t) or f"<[{t}]>").encode("utf-8") for t in ids if 0 <= t < tokenizer.vocab_size}


_llg_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_llg_tokenizers_lock = threading.Lock()


def llg_tokenizer(tokenizer):
    """llguidance's tokenizer for ours, built once per tokenizer object (its token trie takes
    ~0.1-1 s for a large vocabulary) and kept as long as the tokenizer lives."""
    if tokenizer is None:
        raise LlamarunError("structured output needs the model's tokenizer: load it with tokenizer=PATH (CLI: -z PATH)")
    with _llg_tokenizers_lock:
        cached = _llg_tokenizers.get(tokenizer)
        if cached is None:
            llg = import_llguidance()
            end = sorted(tokenizer.eog_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else None)
            cached = llg.LLTokenizer(llg.TokenizerWrapper(TokenizerView(tokenizer)),
                                     n_vocab=tokenizer.vocab_size, eos_token=end)
            _llg_tokenizers[tokenizer] = cached
        return cached


# ----------------------------------------------------------------------------------------------
# grammars

def one_line(message: str) -> str:
    """llguidance's message on one line: its source excerpts and caret lines dropped."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not set(line) <= set("^ ") and not line[:1].isdigit()]
    return " ".join(kept) or message.strip()


class Grammar:
    """A compiled constraint (llguidance's grammar + its tokenizer view), reusable by many sequences.
    Every constructor raises LlamarunError (one line naming the problem: the unsupported keyword, the
    GBNF line) when the grammar/schema can't be compiled -- never silently unconstrained."""

    def __init__(self, source: str, tokenizer, what: str, advice: str):
        """source: llguidance's grammar text (from its grammar_from_* functions); what: how the
        user calls it, for errors ("the JSON schema"); advice: what to do when it fails."""
        llg = import_llguidance()
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size if tokenizer is not None else 0
        self.source = source
        # The first matcher compiles the grammar; every sequence's matcher is a copy of it, which
        # costs no second compile.
        self._start = llg.LLMatcher(llg_tokenizer(tokenizer), source, log_level=0)
        if self._start.is_error():
            raise LlamarunError(f"{what} cannot be enforced: {one_line(self._start.get_error())}; {advice}")

    @classmethod
    def from_json_schema(cls, schema: dict | str, tokenizer) -> "Grammar":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise LlamarunError(f"the JSON schema is not valid JSON ({e}): give a JSON object") from None
        if not isinstance(schema, dict):
            raise LlamarunError(f"a JSON schema is a JSON object, not {type(schema).__name__} {schema!r:.40}")
        llg = import_llguidance()
        try:
            source = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise LlamarunError(f"the JSON schema cannot be read: {one_line(str(e))}") from None
        return cls(source, tokenizer, "the JSON schema",
                   "remove or rewrite that part of the schema (llguidance's supported keywords: "
                   "https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md)")

    @classmethod
    def json_object(cls, tokenizer) -> "Grammar":
        """Any JSON object (--json, response_format json_object)."""
        return cls.from_json_schema({"type": "object"}, tokenizer)

    @classmethod
    def from_gbnf(cls, text: str, tokenizer) -> "Grammar":
        """llama.cpp's GBNF (its `root` rule is the start), through llguidance's converter to Lark."""
        llg = import_llguidance()
        from llguidance.gbnf_to_lark import gbnf_to_lark
        check_text("grammar", text)
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:            # the converter raises plain Exceptions for unknown rules
            raise LlamarunError(f"the GBNF grammar cannot be read: {one_line(str(e))}; fix it (llama.cpp's "
                                "grammars/README.md describes the format)") from None
        return cls(llg.LLMatcher.grammar_from_lark(lark), tokenizer, "the GBNF grammar",
                   "fix it (llama.cpp's grammars/README.md describes the format)")

    @classmethod
    def from_regex(cls, pattern: str, tokenizer) -> "Grammar":
        """The whole output matches `pattern` (Rust regex syntax: no look-around, no backreferences)."""
        llg = import_llguidance()
        check_text("regex", pattern)
        return cls(llg.LLMatcher.grammar_from_regex(pattern), tokenizer, "the regex",
                   "rewrite it without look-around or backreferences")

    @classmethod
    def from_lark(cls, text: str, tokenizer) -> "Grammar":
        """A Lark grammar in llguidance's dialect (`start` is the start rule)."""
        llg = import_llguidance()
        check_text("lark grammar", text)
        return cls(llg.LLMatcher.grammar_from_lark(text), tokenizer, "the Lark grammar",
                   "fix it (llguidance's docs/syntax.md describes the dialect)")

    @classmethod
    def from_request(cls, tokenizer, *, json_schema=None, grammar=None, regex=None, lark=None,
                     json_object=False) -> "Grammar | None":
        """The one constraint a request names (json_schema, grammar = GBNF, regex, lark,
        json_object=True: any JSON object); None when it names none; an error for two."""
        given = [name for name, value in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex),
                                          ("lark", lark), ("json_object", json_object or None))
                 if value is not None]
        if len(given) > 1:
            raise LlamarunError(f"give one constraint, not {' and '.join(given)}")
        if not given:
            return None
        if json_schema is not None:
            return cls.from_json_schema(json_schema, tokenizer)
        if grammar is not None:
            return cls.from_gbnf(grammar, tokenizer)
        if regex is not None:
            return cls.from_regex(regex, tokenizer)
        if lark is not None:
            return cls.from_lark(lark, tokenizer)
        return cls.json_object(tokenizer)

    def matcher(self) -> "Matcher":
        return Matcher(self._start.deep_copy(), self.vocab_size)


def check_text(what: str, text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise LlamarunError(f"the {what} must be non-empty text, not {type(text).__name__} {text!r:.40}")


# ----------------------------------------------------------------------------------------------
# one sequence's walk through a grammar

def mask_words(vocab_size: int) -> int:
    """int32 words of a bitmask of `vocab_size` tokens (llguidance's layout: token t is bit t % 32
    of word t // 32)."""
    return (vocab_size + 31) // 32


class Matcher:
    """One sequence's position in a grammar."""

    def __init__(self, llg_matcher, vocab_size: int):
        self.llg = llg_matcher
        self.vocab_size = vocab_size
        self.bits = np.zeros(mask_words(vocab_size), np.int32)   # (words,) llguidance's bitmask
        self.mask: np.ndarray | None = None     # (vocab,) bool: the allowed tokens of the current state, once known

    def allowed(self, out: np.ndarray | None = None) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar allows next (an end token once it may end)."""
        if self.mask is None:
            self.llg.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)     # releases the GIL
            self.mask = unpack(self.bits, self.vocab_size)
        if out is not None:
            out[:] = self.mask
            return out
        return self.mask

    def forced(self) -> list[int]:
        """Tokens the grammar forces now (may be []): appended without sampling."""
        if self.llg.is_stopped():
            return []
        return self.llg.compute_ff_tokens()

    def consume(self, token: int) -> None:
        """Advance by a drawn or forced token (LlamarunError if the grammar does not allow it)."""
        if not self.llg.consume_token(int(token)):
            raise LlamarunError(f"token {token} is not allowed by the grammar here: {one_line(self.llg.get_error())}")
        self.mask = None

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but an end token could follow (generation ends, "stop")."""
        return self.llg.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the grammar (though it may go on)."""
        return self.llg.is_accepting()


def unpack(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """llguidance's (words,) int32 bitmask -> (vocab_size,) bool. The words are little-endian, so
    their bytes unpacked least significant bit first are the tokens in order."""
    return np.unpackbits(bits.view(np.uint8), count=vocab_size, bitorder="little").view(bool)


def apply_mask(row: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of the logits row (vocab,) with every token the mask does not allow at -inf. Rows
    longer than the tokenizer's vocabulary (a model's padded classifier) lose the tail too."""
    out = np.full(row.shape, -np.inf, np.float32)
    n = min(len(allowed), len(row))
    np.copyto(out[:n], row[:n], where=allowed[:n])
    return out


_executor = None
_executor_lock = threading.Lock()


def fill_masks(matchers, out: np.ndarray | None = None) -> np.ndarray:
    """The allowed tokens of many sequences at once: out[i] = matchers[i].allowed(), (n, vocab)
    bool. The rows are computed in parallel by llguidance's own threads with the GIL released, so a
    server can call this in a thread while the forward of the same step runs. Each matcher keeps
    its row: its next `allowed()` costs nothing until it consumes a token."""
    global _executor
    matchers = list(matchers)
    if not matchers:
        return np.zeros((0, 0), bool) if out is None else out
    vocab = matchers[0].vocab_size
    if out is None:
        out = np.zeros((len(matchers), vocab), bool)
    with _executor_lock:
        if _executor is None:
            _executor = import_llguidance().LLExecutor()
    bits = np.zeros((len(matchers), mask_words(vocab)), np.int32)    # (n, words)
    pending = [(m.llg, i) for i, m in enumerate(matchers) if m.mask is None]
    if pending:
        _executor.unsafe_compute_mask_ptr(pending, bits.ctypes.data, bits.shape[1] * 4, len(matchers))
    for i, m in enumerate(matchers):
        if m.mask is None:
            m.bits[:] = bits[i]
            m.mask = unpack(m.bits, vocab)
        out[i] = m.mask
    return out
