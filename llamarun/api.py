"""The Python API: `llamarun.load(path)` gives a `Llama` that encodes, scores and generates."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .config import with_context
from .decoding import Completion, LogitBias, LogitsProcessor, TokenEvent, check_token_ids
from .errors import LlamarunError
from .formats import load_checkpoint
from .generation import generate_stream
from .model import Batch, Probe, Transformer
from .plan import ExecutionPlan, choose_plan
from .sampling import make_sampler
from .speculative import make_speculation
from .structured import Grammar
from .tokenizers import load_tokenizer, tokenizer_from_gguf


def load(path: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
         exact: bool = False, n_ctx: int | None = None, quantize: str | None = None) -> "Llama":
    """Load a model (memory-mapped) with its tokenizer.

    path: a GGUF file, a llama2.c .bin, or a Meta (params.json) or Hugging Face (config.json) checkpoint
    directory; None loads the default model (SmolLM2-135M-Instruct, downloaded once into $LLAMARUN_HOME).
    tokenizer: tokenizer.bin or tokenizer.model; without one a GGUF file uses the tokenizer it embeds, a
    directory its own tokenizer file, and a llama2.c model works on token ids only.
    exact: quantized GGUF weights multiply float32 activations (the reference arithmetic, what the
    parity tests check); the default, fast, quantizes the activations of a decode step to int8
    blocks as llama.cpp does (held to: perplexity within 2% of exact, tests/test_fast_path.py).
    The choice, and every other of how the model computes, is its plan (`Llama.plan`, llamarun/plan.py),
    made here once: another arithmetic is another load.
    n_ctx: the context in tokens (CLI: --ctx), at most the one the model was trained for; default: the
    trained one up to config.DEFAULT_CONTEXT_LIMIT. `Llama.config.seq_len` is then the context used.
    quantize: "q8_0", "q4_0" or "q4_1" (CLI: --quantize): every matrix quantized in memory at load, as
    `llamarun quantize` would write it (a float or bf16 checkpoint then runs on the quantized kernels);
    `Llama.quantization_quality()` measures what it cost, as `llamarun quantize` reports it.
    """
    if path is None:
        from .hub import ensure_default_model
        path = ensure_default_model()
    checkpoint = load_checkpoint(path)
    vocab = checkpoint.config.vocab_size
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, vocab_size=vocab)
    else:
        tok = embedded_tokenizer(checkpoint)
        # The BPE merges now live in the tokenizer's own tables; the checkpoint's copy (SmolLM2: 48900
        # Python strings) is the largest value of the metadata and nothing reads it again. Dropping
        # it lowers a loaded model's peak memory by a few MiB, which keeps it under the budget of
        # file + KV cache + 200 MB (docs/performance.md).
        getattr(checkpoint, "metadata", {}).pop("tokenizer.ggml.merges", None)
    if quantize is None:
        return Llama(checkpoint, tok, exact=exact, n_ctx=n_ctx)
    from .quantize import quantize_weights
    source = checkpoint.weights
    checkpoint.weights = quantize_weights(checkpoint.config, source, quantize)
    llama = Llama(checkpoint, tok, exact=exact, n_ctx=n_ctx)
    llama.unquantized = source
    return llama


def embedded_tokenizer(checkpoint):
    """The tokenizer a checkpoint brings: its own tokenizer file (a directory's), else the one a GGUF
    file carries in its metadata, else None."""
    if getattr(checkpoint, "tokenizer", None) is not None:
        return checkpoint.tokenizer
    metadata = getattr(checkpoint, "metadata", {})
    if "tokenizer.ggml.model" not in metadata:
        return None
    tok = tokenizer_from_gguf(metadata)
    if tok.vocab_size != checkpoint.config.vocab_size:
        raise LlamarunError(f"{checkpoint.path} embeds a tokenizer of {tok.vocab_size} tokens for a vocabulary of "
                            f"{checkpoint.config.vocab_size}: the file is inconsistent; convert it again")
    return tok


def find_tokenizer(model_path: str | os.PathLike, vocab_size: int) -> str | None:
    """A tokenizer beside the model (or in the working directory) whose size fits the model, if any."""
    model_path = Path(model_path).resolve()
    for folder in (model_path if model_path.is_dir() else model_path.parent, Path.cwd()):
        for name in ("tokenizer.model", "tokenizer.bin"):
            candidate = folder / name
            if candidate.is_file():
                try:
                    load_tokenizer(candidate, vocab_size=vocab_size)
                except LlamarunError:
                    continue
                return str(candidate)
    return None


class Llama:
    """A loaded model with its tokenizer: the object the API and the CLI work with."""

    def __init__(self, checkpoint, tokenizer=None, exact: bool = False, n_ctx: int | None = None):
        """exact: as `load`'s (the default, fast, where the weights have it: GGUF; llama2.c checkpoints
        compute as run.c does either way, their reference). n_ctx: as `load`'s; `config` is the
        checkpoint's with the context used as its seq_len (checkpoint.config keeps the trained one)."""
        self.checkpoint = checkpoint
        self.config = with_context(checkpoint.config, n_ctx)
        self.model = Transformer(self.config, checkpoint.weights, choose_plan(self.config, checkpoint.weights, exact))
        self.tokenizer = tokenizer
        self.unquantized = None      # the weights as stored, when load quantized them (quantization_quality)

    @property
    def plan(self) -> ExecutionPlan:
        """How this model computes: arithmetic, KV cache, the forward of each batch size (llamarun/plan.py)."""
        return self.model.plan

    def __repr__(self) -> str:
        return f"Llama({self.checkpoint.path!r}, {self.checkpoint.description}, {self.config})"

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int], bos: bool | None = None, special: bool = True) -> list[int]:
        """Text -> ids (BOS as the tokenizer's convention has it, unless `bos` says); ids pass through,
        checked to be tokens of the vocabulary.

        special: a special token's text in the prompt ("<|im_start|>") is that one token, as in a chat
        prompt written by hand; special=False reads it as plain text, as text from someone else must
        be read (Tokenizer.encode). Chat messages need neither: ChatFormat keeps their content plain.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LlamarunError("this model was loaded without a tokenizer: pass token ids, or load it with "
                                    "tokenizer=PATH (CLI: -z PATH)")
            if bos is None:
                return self.tokenizer.encode(prompt, special=special)
            return self.tokenizer.encode(prompt, bos=bos, special=special)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
            raise LlamarunError(f"a prompt is text (str) or a sequence of token ids, not {type(prompt).__name__} "
                                f"{prompt!r:.40}")
        return check_token_ids(prompt, self.config.vocab_size)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise LlamarunError("this model was loaded without a tokenizer, so it cannot turn ids into text")
        return self.tokenizer.decode(check_token_ids(ids, self.config.vocab_size))

    # -- scoring ------------------------------------------------------------------------------

    def logits(self, ids: Sequence[int] | str) -> np.ndarray:
        """Teacher-forced logits of every position, in one batched pass.   -> (len(ids), vocab) float32"""
        ids = self.encode(ids)
        if not ids:
            raise LlamarunError("there are no tokens to score: give some text or token ids")
        if len(ids) > self.config.seq_len:
            raise LlamarunError(f"{len(ids)} tokens do not fit the model's context of {self.config.seq_len}")
        return self.model.forward(Batch.sequence(ids, all_logits=True), self.model.new_cache(seq_len=len(ids)))

    def quantization_quality(self, max_tokens: int | None = 256):
        """For a model quantized at load (load(quantize=...)): its perplexity, logits and top-1 token
        against the weights as stored, on the first max_tokens tokens of the text `llamarun quantize`
        scores (llamarun.quantize.Quality; .lines() as that command prints it)."""
        from .quantize import compare_quality
        if getattr(self, "unquantized", None) is None:
            raise LlamarunError("this model was not quantized at load: load it with quantize=TYPE")
        stored = _Stored(self.checkpoint, self.unquantized)
        return compare_quality(Llama(stored, self.tokenizer, exact=True), Llama(self.checkpoint, self.tokenizer, exact=True),
                               max_tokens=max_tokens)

    # -- generation ---------------------------------------------------------------------------

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, *, sampler: str = "default",
               stop: Sequence[str] = (), confidence: bool = False, confidence_top: int = 5,
               logprobs: int | None = None, ignore_eos: bool = False, logit_bias: dict[int, float] | None = None,
               processors: Sequence[LogitsProcessor] = (), probe: Probe | None = None, special: bool = True,
               json_schema: dict | str | None = None, grammar: "str | Grammar | None" = None, regex: str | None = None,
               lark: str | None = None, json_object: bool = False, draft=None, draft_max: int | None = None,
               **sampling) -> "Stream":
        """Generate lazily: iterate for TokenEvents (ev.token, ev.text); `.completion` holds the result.

        sampling: temperature, top_p, top_k, min_p, repeat_penalty, presence_penalty, frequency_penalty,
        seed, and llama.cpp's dynatemp_range, dynatemp_exponent, typical_p, top_n_sigma, xtc_probability,
        xtc_threshold, dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n,
        dry_sequence_breakers, mirostat, mirostat_tau, mirostat_eta and samplers (the order; see
        llamarun.sampling.Sampler). sampler="llama2c" draws exactly as llama2.c's run.c and, as run.c,
        stops only when BOS is drawn. confidence=True: each event's `.confidence` (and the completion's
        `.confidence` list) holds the token's probability, sampling probability, logit margins,
        entropy and `confidence_top` alternatives (llamarun.logprobs.TokenConfidence); logprobs=k:
        each event's `.logprob` holds its log probability and the k most probable tokens' (OpenAI's).
        ignore_eos=True (llama.cpp's --ignore-eos): the end tokens are never drawn (their logits are
        -inf, as llama.cpp biases them), so only max_tokens or a stop string ends it.
        logit_bias: {token id: bias} added to the logits before each draw (-inf or -100 bans).
        processors: further logits processors, `f(ids, logits_row)` changing the row in place
        (llamarun.decoding). probe: what inspection tools ask of each forward (llamarun.model.Probe).
        special: how a text prompt reads special tokens' texts, as `encode`'s.
        Structured output (llamarun.structured), at most one of: json_schema (a dict or its JSON
        text), grammar (llama.cpp's GBNF text, or a compiled llamarun.structured.Grammar to reuse),
        regex, lark (llguidance's Lark dialect), json_object=True (any JSON object). The output then
        follows it token by token; the tokens it forces are appended without sampling, and the
        completion ends with finish_reason "stop" as soon as it is complete. A constraint that
        cannot be compiled raises LlamarunError before anything runs.
        Speculative decoding (llamarun.speculative): draft="ngram" (prompt lookup), a Llama with this
        model's vocabulary, or a path to load one; each drawn token then runs with a draft of up to
        draft_max tokens (default 8) behind it, and the tokens the model's own draws agree with are
        taken from that one forward. The output is what decoding without it gives (greedy: token for
        token; sampled: the same distribution); the completion's `.drafted` and `.accepted` count them.
        """
        ids = self.encode(prompt, special=special)
        if isinstance(grammar, Grammar):
            compiled = grammar
            if json_schema is not None or regex is not None or lark is not None or json_object:
                raise LlamarunError("give one constraint: a compiled grammar and another")
        else:
            compiled = Grammar.from_request(self.tokenizer, json_schema=json_schema, grammar=grammar, regex=regex,
                                            lark=lark, json_object=json_object)
        chosen = make_sampler(sampler, tokenizer=self.tokenizer, **sampling)
        speculation = make_speculation(draft, draft_max, self)
        if logit_bias:
            check_logit_bias(logit_bias, self.config.vocab_size)
        processors = ([LogitBias(logit_bias)] if logit_bias else []) + list(processors)
        result = Completion("", [])
        events = generate_stream(self.model, self.tokenizer, ids, chosen, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                 stop=stop, result=result, confidence=confidence, confidence_top=confidence_top,
                                 logprobs=logprobs, processors=processors, probe=probe,
                                 grammar=compiled.matcher() if compiled is not None else None,
                                 speculation=speculation)
        return Stream(events, result)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **options) -> Completion:
        """Generate to the end: `.text`, `.tokens`, `.finish_reason` ("stop" or "length")."""
        s = self.stream(prompt, max_tokens, **options)
        for _ in s:
            pass
        return s.completion


class _Stored:
    """A checkpoint with other weights (the same file's, as stored, beside a copy quantized at load)."""

    def __init__(self, checkpoint, weights: dict):
        self.path, self.config, self.weights = checkpoint.path, checkpoint.config, weights
        self.description = checkpoint.description
        self.metadata = getattr(checkpoint, "metadata", {})


def check_logit_bias(bias, vocab_size: int) -> None:
    if not isinstance(bias, Mapping):
        raise LlamarunError(f"logit_bias must be a dict of token id -> bias, not {type(bias).__name__}")
    check_token_ids(list(bias), vocab_size)
    for token, value in bias.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise LlamarunError(f"logit_bias[{token}] must be a number, not {type(value).__name__} {value!r:.40}")


class Stream:
    """An iterator of TokenEvents, and in `.completion` their result.

    `.completion` is what a caller who asks for the result expects: read before the stream was
    iterated at all, it runs the stream to its end first (as `Llama.generate` does); once iteration
    has begun it is the result so far, whole when the stream is exhausted, partial when the loop
    left it early (a break, close(), Ctrl-C), and readable while it runs.
    """

    def __init__(self, events: Iterator[TokenEvent], completion: Completion):
        self._events = events
        self._completion = completion
        self._started = False

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        self._started = True
        return next(self._events)

    @property
    def completion(self) -> Completion:
        if not self._started:
            for _ in self:
                pass
        return self._completion

    def close(self) -> None:
        self._started = True
        self._events.close()
