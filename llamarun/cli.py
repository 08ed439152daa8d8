"""The command line: `llamarun generate | run | chat | tokenize | pull | models | info | bench | quantize |
convert | perplexity | lens | attention | serve`.

One rule for every command: the model is -m/--model, the prompt is positional or --prompt, -n is the
number of new tokens. The exception is `run`, which takes llama2.c's run.c arguments unchanged.
User errors print one line and exit 1; Ctrl-C keeps what was printed and exits 130, and a second
Ctrl-C ends any command at once (llamarun/interrupts.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time

from .config import DEFAULT_CONTEXT_LIMIT
from .errors import LlamarunError
from .interrupts import raise_where_safe, second_press_kills

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------------------------
# shared helpers

def open_model(model_path: str | None, tokenizer_path: str | None, need_tokenizer: bool, exact: bool = False,
               ctx: int | None = None, ids_only: bool = False, quantize: str | None = None):
    """Load the model (the default one when no path is given) and its tokenizer: the one given with
    -z, else the one a GGUF file embeds, else one found beside the model whose size fits. ctx: --ctx.
    ids_only: the command can run without one (--ids with an empty prompt), which the error then says."""
    from .api import find_tokenizer, load
    from .tokenizers import load_tokenizer

    llama = load(model_path, tokenizer_path, exact=exact, n_ctx=ctx, quantize=quantize)
    vocab = llama.config.vocab_size
    if llama.tokenizer is None:
        found = find_tokenizer(llama.checkpoint.path, vocab)
        llama.tokenizer = load_tokenizer(found, vocab_size=vocab) if found else None
    if quantize is not None:
        report_quantization(llama, quantize)
    if llama.tokenizer is None and need_tokenizer:
        raise LlamarunError(f"no tokenizer of {vocab} tokens found beside {llama.checkpoint.path}: pass one with "
                            "-z PATH" + (" (or use --ids with an empty prompt for ids-only output)" if ids_only else ""))
    return llama


QUANTIZE_REPORT_TOKENS = 64     # --quantize's quality report scores this many tokens: seconds, not minutes


def report_quantization(llama, qtype: str) -> None:
    """--quantize: what quantizing at load cost, on stderr, measured as `llamarun quantize` measures it."""
    quality = llama.quantization_quality(max_tokens=QUANTIZE_REPORT_TOKENS)
    change = (quality.ppl_after / quality.ppl_before - 1) * 100
    print(f"quantized to {qtype.upper()} in memory: {quality.bytes_before / 1e6:.1f} MB -> {quality.bytes_after / 1e6:.1f} MB; "
          f"on {quality.tokens} tokens of {quality.scored_on}: perplexity {quality.ppl_before:.3f} -> "
          f"{quality.ppl_after:.3f} ({change:+.2f}%), top-1 agreement {quality.top1_agreement * 100:.1f}%",
          file=sys.stderr, flush=True)


class Output:
    """Writes text as it streams, flushed, and tolerates a closed pipe (`llamarun ... | head`)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def text(self, s: str) -> None:
        self.bytes(s.encode("utf-8", errors="surrogateescape"))

    def end(self, result, ids: bool) -> None:
        """Close a generation: the walked ids as one JSON list (--ids), else the final newline."""
        self.text(json.dumps(result.walked) + "\n" if ids else "\n")

    def bytes(self, b: bytes) -> None:
        if b:
            self.stream.buffer.write(b)
            self.stream.buffer.flush()


class CtrlC:
    """Ctrl-C while tokens stream: a flag the loop reads after each token, and a KeyboardInterrupt
    where one cannot be lost (interrupts.raise_where_safe), which cuts a long prompt's prefill short.

    The flag is what stops the loop when the exception is swallowed on its way (by code that catches
    everything): the loop still stops after the token it is on. The block takes the KeyboardInterrupt
    as a press. A second Ctrl-C, even during a native call that holds Python up, ends the process at
    once (interrupts.second_press_kills, armed here as in main). The handler it replaces comes back
    when the block ends (a chat goes back to its prompt, where Ctrl-C exits). A SIGINT ignored at
    start (a background job) stays ignored.
    """

    def __enter__(self) -> "CtrlC":
        self.pressed = False
        self.previous = signal.getsignal(signal.SIGINT)
        if self.previous is not signal.SIG_IGN:
            on_ctrl_c(self._press)
        return self

    def _press(self, signum, frame) -> None:
        self.pressed = True
        raise_where_safe(signum, frame)

    def __exit__(self, kind, value, traceback) -> bool:
        if self.previous is not signal.SIG_IGN:
            on_ctrl_c(self.previous)
        if kind is KeyboardInterrupt:
            self.pressed = True
            return True
        return False


def on_ctrl_c(handler) -> None:
    """Install a SIGINT handler, and make a second press end the process at once (interrupts.py)."""
    signal.signal(signal.SIGINT, handler)
    second_press_kills()


def prompt_of(args) -> str:
    if args.prompt is not None and args.prompt_flag is not None:
        raise LlamarunError("give the prompt once: either as the positional argument or with --prompt")
    return args.prompt if args.prompt is not None else (args.prompt_flag or "")


# ----------------------------------------------------------------------------------------------
# llamarun generate

class ColouredOutput:
    """--confidence: each token's text coloured by its probability under the model (rich writes plain
    text when stdout is not a terminal). Text held back (a split UTF-8 character, a possible stop
    string) takes the colour of the token that releases it."""

    def __init__(self):
        from rich.console import Console
        self.console = Console(highlight=False, emoji=False, markup=False, soft_wrap=True)

    def text(self, s: str, confidence) -> None:
        from rich.text import Text
        from .inspect.confidence import colour
        if s:
            self.console.print(Text(s, style=colour(confidence) or ""), end="")


def check_writable(path: str) -> None:
    """Fail before a long generation, not after it, when an output file cannot be written."""
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise LlamarunError(f"cannot write {path}: {e.strerror}") from None


def write_confidence_json(path: str, figures) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump([c.as_dict() for c in figures], f, ensure_ascii=False, indent=1)
    except OSError as e:
        raise LlamarunError(f"cannot write {path}: {e.strerror}") from None


def cmd_generate(args) -> int:
    from .decoding import first_token
    from .inspect.confidence import LEGEND
    from .inspect.emphasis import emphasize
    prompt = prompt_of(args)
    if args.confidence_json is not None:
        check_writable(args.confidence_json)
    llama = open_model(args.model, args.tokenizer, need_tokenizer=bool(prompt) or not args.ids, exact=args.exact, quantize=args.quantize,
                       ctx=args.ctx, ids_only=True)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.sampler != "llama2c":
        sampling.update(top_k=args.top_k, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                        penalty_last_n=args.repeat_last_n, **llama_cpp_sampling(args))
    else:
        given = [f for f, v in (("--top-k", args.top_k), ("--min-p", args.min_p),
                                ("--repeat-penalty", args.repeat_penalty),
                                ("--presence-penalty", args.presence_penalty),
                                ("--frequency-penalty", args.frequency_penalty)) if v is not None]
        given += [SAMPLING_FLAGS.get(name, "--" + name.replace("_", "-"))
                  for name, v in llama_cpp_sampling(args).items() if v is not None]
        if given:
            raise LlamarunError(f"--sampler llama2c uses only --temperature, --top-p and --seed, not {given[0]}")
    # a prompt of no text starts from BOS alone (run.c without -i), also where the tokenizer adds no BOS
    ids = (llama.encode(prompt) if llama.tokenizer else []) or [first_token(llama.tokenizer)]
    probe, _ = emphasize(llama, ids, args.emphasize or [])
    measured = args.confidence or args.confidence_json is not None
    stream = llama.stream(ids, args.n, sampler=args.sampler, stop=args.stop or (), confidence=measured,
                          ignore_eos=args.ignore_eos, probe=probe, grammar=grammar_of(args, llama.tokenizer),
                          draft=args.draft, draft_max=args.draft_max, **sampling)
    out = Output()
    coloured = ColouredOutput() if args.confidence and not args.ids else None
    if coloured:
        print(LEGEND, file=sys.stderr)
    with CtrlC() as ctrl_c:
        if not args.ids:
            out.text(prompt)
        for event in stream:
            if coloured:
                coloured.text(event.text, event.confidence)
            elif not args.ids:
                out.text(event.text)
            if ctrl_c.pressed:
                break
    interrupted = ctrl_c.pressed
    result = stream.completion
    if args.confidence_json is not None:
        write_confidence_json(args.confidence_json, result.confidence)
    out.end(result, args.ids)
    reason = "interrupted" if interrupted else result.finish_reason
    if result.context_full:
        reason += f" (context full: {llama.config.seq_len} tokens)"
    compiled = f" | kernels compiled: {result.compile_seconds:.1f} s" if result.compile_seconds >= 0.05 else ""
    drafts = f" | drafted: {result.drafted}, accepted: {result.accepted}" if args.draft is not None else ""
    print(f"prompt: {len(result.prompt_tokens)} tokens, {result.prefill_tok_s:.1f} tok/s | "
          f"generated: {len(result.tokens)} tokens, {result.decode_tok_s:.1f} tok/s{drafts} | finish: {reason}{compiled}",
          file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0


def grammar_of(args, tokenizer):
    """The structured-output constraint the flags name (--json-schema, --grammar(-file), --regex,
    --json), compiled for the tokenizer; None without one."""
    from .structured import Grammar
    schema, gbnf = args.json_schema, args.grammar
    if schema is not None and not schema.lstrip().startswith("{"):
        schema = read_flag_file(schema, "--json-schema")      # a path; JSON text starts with {
    if args.grammar_file is not None:
        if gbnf is not None:
            raise LlamarunError("give --grammar or --grammar-file, not both")
        gbnf = read_flag_file(args.grammar_file, "--grammar-file")
    return Grammar.from_request(tokenizer, json_schema=schema, grammar=gbnf, regex=args.regex,
                                json_object=args.json)


def read_flag_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LlamarunError(f"{flag}: no such file: {path} (give a file, or the JSON itself)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlamarunError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# ----------------------------------------------------------------------------------------------
# llamarun run: llama2.c's run.c, argument for argument

def runc_piece(tokenizer, prev: int, token: int) -> bytes:
    """What run.c prints for `token` after `prev`: its decode() piece through safe_printf."""
    from .decoding import LLAMA2C_BOS, LLAMA2C_EOS
    from .tokenizers import Llama2cTokenizer
    if isinstance(tokenizer, Llama2cTokenizer) and token in (LLAMA2C_BOS, LLAMA2C_EOS):
        piece = tokenizer.pieces[token]           # run.c prints "\n</s>\n" for EOS as it is
    else:
        piece = tokenizer.token_bytes(token, prev)
    # safe_printf: a lone byte that is neither printable nor whitespace (a stray UTF-8 fragment) is dropped
    if len(piece) == 1 and not (0x20 <= piece[0] < 0x7F or piece[0] in b" \t\n\v\f\r"):
        return b""
    return piece


RUNC_MODES = ("generate", "chat")


def cmd_run(args) -> int:
    from .decoding import first_token
    if args.mode not in RUNC_MODES:
        raise LlamarunError(f"unknown mode {args.mode!r}: run.c's modes are -m generate and -m chat")
    if args.temperature < 0 or not 0 <= args.topp <= 1:
        raise LlamarunError("run.c needs -t >= 0 and -p in [0, 1]")
    if args.mode == "chat" and args.ids:
        raise LlamarunError("--ids is for -m generate: a chat prints its text")
    need_tokenizer = args.mode == "chat" or bool(args.input) or not args.ids
    llama = open_model(args.checkpoint, args.tokenizer, need_tokenizer, ctx=args.ctx, ids_only=args.mode == "generate")
    seq_len = llama.config.seq_len
    steps = seq_len if args.steps <= 0 or args.steps > seq_len else args.steps   # run.c's clamp
    seed = args.seed if args.seed > 0 else None                                 # run.c: <= 0 seeds from the clock
    if args.mode == "chat":
        return run_chat(llama, args.system, args.input, steps, args.temperature, args.topp, seed)
    prompt_ids = llama.encode(args.input or "") if llama.tokenizer else [first_token(None)]
    if steps < len(prompt_ids):
        prompt_ids = prompt_ids[:steps]
        max_new = 0
    else:
        max_new = steps - len(prompt_ids) + 1      # run.c samples at positions len(prompt)-1 .. steps-1
    stream = llama.stream(prompt_ids, max_new, sampler="llama2c", temperature=args.temperature,
                          top_p=args.topp, seed=seed)
    out = Output()
    prev = prompt_ids[0]

    def show(token):
        nonlocal prev
        if not args.ids:
            out.bytes(runc_piece(llama.tokenizer, prev, token))
        prev = token

    start = time.perf_counter()
    with CtrlC() as ctrl_c:
        for token in prompt_ids[1:]:
            show(token)
        for event in stream:
            if event.token is not None:
                show(event.token)
            if ctrl_c.pressed:
                break
    interrupted = ctrl_c.pressed
    result = stream.completion
    out.end(result, args.ids)
    walked = len(result.walked) - 1
    if walked > 1:
        print(f"achieved tok/s: {walked / (time.perf_counter() - start):f}", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0


def read_line(out: Output, guide: str) -> str | None:
    """run.c's read_stdin: print the guide, read one line of stdin (without its newline); None at its end."""
    out.text(guide)
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else (line or None)


def run_chat(llama, system: str | None, first_message: str | None, steps: int, temperature: float,
             top_p: float, seed: int | None) -> int:
    """run.c's chat mode: Llama 2's [INST] <<SYS>> format (ChatFormat.llama2), the whole conversation
    one sequence of at most `steps` positions in one KV cache, drawn by one run.c sampler. The system
    prompt and the first message come from -y and -i, else from stdin as run.c asks for them; later
    messages from stdin, a line each, until stdin ends or the steps are spent."""
    from .chat import ChatFormat, ChatSession, ContextFull
    from .sampling import Llama2cSampler
    sampler = Llama2cSampler(temperature, top_p, seed)
    out = Output()
    if system is None:
        system = read_line(out, "Enter system prompt (optional): ") or ""
    session = ChatSession(llama, ChatFormat.llama2(), system=system or None, sampler=sampler)
    user = first_message if first_message is not None else read_line(out, "User: ")
    interrupted = False
    while user is not None:
        ids = session.chat_format.encode(session.messages + [{"role": "user", "content": user}], llama.tokenizer)
        room = steps - len(ids) + 1          # run.c's forwards stop at position steps - 1
        out.text("Assistant: ")
        if room < 1:
            break
        session.max_tokens = room
        try:
            stream = session.send(user)
        except ContextFull:
            break
        skip_draws(sampler, session.last_prefill_tokens - 1)
        prev = ids[-1]
        with CtrlC() as ctrl_c:
            for event in stream:
                if event.token is not None:
                    out.bytes(runc_piece(llama.tokenizer, prev, event.token))
                    prev = event.token
                if ctrl_c.pressed:
                    break
        interrupted = ctrl_c.pressed
        if interrupted or stream.completion.end_token is None:     # Ctrl-C, or the steps are spent
            break
        out.text("\n")
        if len(ids) + len(stream.completion.tokens) + 1 >= steps:   # no position left past the EOS
            break
        user = read_line(out, "User: ")        # Ctrl-C here: KeyboardInterrupt, exit 130 (main)
    out.text("\n")
    return EXIT_INTERRUPTED if interrupted else 0


def skip_draws(sampler, n: int) -> None:
    """Advance run.c's sampler as n discarded draws would: run.c's chat draws a token at every
    position it runs, prompt positions too (and the one after a reply's EOS), and keeps only the
    reply's. We run a prompt in one batch and draw nothing there, so the coins are skipped here."""
    import numpy as np
    if np.float32(sampler.temperature) != 0:      # greedy draws no coin
        for _ in range(n):
            sampler.rng.next_u32()


# ----------------------------------------------------------------------------------------------
# llamarun chat

CONTEXT_FULL_HINT = "context full: /reset to start over"
CHAT_COMMANDS = {"/help": "list these commands", "/reset": "start the conversation over (the system prompt stays)",
                 "/exit": "end the chat (as Ctrl-D does)"}


def chat_command(session, line: str) -> bool | None:
    """Run `line` if it is a chat command (a first word like /reset): True to go on, False to end the
    chat; None when it is a message for the model. An unknown command is answered here, never sent."""
    words = line.split()
    if not words or not re.fullmatch(r"/[A-Za-z][\w-]*", words[0]):
        return None
    command = words[0]
    if command == "/exit":
        return False
    if command == "/reset":
        session.reset()
    else:
        if command != "/help":
            print(f"llamarun: unknown command {command}", file=sys.stderr)
        print("commands: " + "; ".join(f"{name}: {what}" for name, what in CHAT_COMMANDS.items()), file=sys.stderr)
    return True


def cmd_chat(args) -> int:
    """Interactive on a terminal (a `> ` prompt, /help, /reset, /exit); otherwise each stdin line is a
    message or one of those commands.

    Ctrl-C while a reply streams stops that reply (it stays in the conversation) and returns to the
    prompt; Ctrl-C at the prompt exits with 130, as llama.cpp does.
    """
    from .chat import ChatSession, chat_format_for

    llama = open_model(args.model, args.tokenizer, need_tokenizer=True, exact=args.exact, quantize=args.quantize, ctx=args.ctx)
    session = ChatSession(llama, chat_format_for(llama), system=args.system, max_tokens=args.n,
                          grammar=grammar_of(args, llama.tokenizer), temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                          draft=args.draft, draft_max=args.draft_max, **llama_cpp_sampling(args))
    out = Output()
    if args.prompt is not None:
        finished = chat_turn(session, args.prompt, out)
        return 0 if finished else EXIT_INTERRUPTED
    if sys.stdin.isatty():
        return chat_interactive(session, out)
    return chat_lines(session, out)


def chat_interactive(session, out: Output) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input("> ")
        except EOFError:
            out.text("\n")
            return 0
        # a KeyboardInterrupt here (Ctrl-C at the prompt) ends the program: main() exits with 130
        if not line.strip():
            continue
        went_on = chat_command(session, line)
        if went_on is False:
            return 0
        if went_on:
            continue
        try:
            chat_turn(session, line, out)      # False (Ctrl-C stopped the reply): back to the prompt
        except LlamarunError as e:
            report_chat_error(e)


def chat_lines(session, out: Output) -> int:
    """Each non-empty line of stdin is one user message; each reply is printed on its own line."""
    failed = False
    for line in sys.stdin:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        went_on = chat_command(session, line)
        if went_on is False:
            break
        if went_on:
            failed = failed or line.split()[0] not in CHAT_COMMANDS      # an unknown command: a user error
            continue
        try:
            if not chat_turn(session, line, out):
                return EXIT_INTERRUPTED
        except LlamarunError as e:
            report_chat_error(e)               # and go on: a later line may be /reset
            failed = True
    return EXIT_USER_ERROR if failed else 0


def report_chat_error(e: LlamarunError) -> None:
    from .chat import ContextFull
    if isinstance(e, ContextFull):
        print(f"llamarun: {CONTEXT_FULL_HINT} ({e})", file=sys.stderr)
    else:
        print(f"llamarun: error: {e}", file=sys.stderr)


def chat_turn(session, text: str, out: Output) -> bool:
    """Stream one reply to `text`, then end its line. False when Ctrl-C stopped it (it stays in the
    conversation, cut where it was)."""
    stream = session.send(text)
    started = False
    with CtrlC() as ctrl_c:
        for event in stream:
            piece = event.text if started else event.text.lstrip()   # the reply's leading space is the
            started = started or bool(piece)                         # tokenizer's, not the model's words
            out.text(piece)
            if ctrl_c.pressed:
                break
    if ctrl_c.pressed:
        stream.close()
        out.text("\n")
        return False
    out.text("\n")
    if stream.completion.context_full:
        print(f"llamarun: {CONTEXT_FULL_HINT}", file=sys.stderr)
    return True


# ----------------------------------------------------------------------------------------------
# llamarun attention

def cmd_attention(args) -> int:
    """Generate greedily (by default) and write every layer's and head's attention map: --out HTML
    page, --png folder of one image per layer."""
    from .inspect.attention import record_attention
    from .inspect.report import write_html, write_pngs
    if not args.out and not args.png:
        raise LlamarunError("say where to write the maps: --out report.html and/or --png DIR")
    if args.out:
        check_writable(args.out)
    prompt = prompt_of(args)
    if not prompt:
        raise LlamarunError("attention needs a prompt")
    llama = open_model(args.model, args.tokenizer, need_tokenizer=True, exact=args.exact, quantize=args.quantize, ctx=args.ctx)
    record = record_attention(llama, prompt, args.n, emphasis=args.emphasize or [], temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty, seed=args.seed, **llama_cpp_sampling(args))
    print(prompt + record.generated)
    if args.out:
        print(f"wrote {write_html(record, args.out)}", file=sys.stderr)
    if args.png:
        try:
            written = write_pngs(record, args.png)
        except OSError as e:
            raise LlamarunError(f"cannot write the PNG files to {args.png}: {e.strerror}") from None
        print(f"wrote {len(written)} PNG files to {args.png}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun tokenize

def cmd_tokenize(args) -> int:
    from .tokenizers import load_tokenizer
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = open_model(args.model, None, need_tokenizer=True).tokenizer
    text = prompt_of(args)
    ids = tokenizer.encode(text, bos=False) if args.no_bos else tokenizer.encode(text)
    print(json.dumps(ids))
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun pull | models

def cmd_pull(args) -> int:
    from . import hub
    name = args.name or hub.DEFAULT_MODEL
    print(hub.pull(name) if args.force else hub.ensure_model(name))
    return 0


def cmd_models(args) -> int:
    from . import hub
    folder = hub.models_dir()
    models = hub.cached_models()
    if not models:
        print(f"no models in {folder} (empty): `llamarun pull` downloads the default model")
        return 0
    print(f"models in {folder}:")
    failed = 0
    for path, size, name in models:
        label = name or ""
        if name == hub.DEFAULT_MODEL:
            label += " (default)"
        if args.verify:        # the sha256 of every known model, hashed again now
            model = hub.known_by_filename(path.name)
            problem = hub.verify_cached(model, path) if model else None
            failed += problem is not None
            label += "  " + ("no checksum known" if model is None else f"FAILED: {problem}" if problem else "sha256 ok")
        print(f"  {path}  {size / 1e6:8.1f} MB  {label.strip()}".rstrip())
    if failed:
        raise LlamarunError(f"{failed} cached model{'s' if failed > 1 else ''} failed verification: "
                            "`llamarun pull --force NAME` downloads one again")
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun info

def cmd_info(args) -> int:
    """The model (file, format, config, tensor types, size), its plan, and the CPU the kernels run on."""
    from .api import load
    from .plan import cpu_description
    llama = load(args.model, exact=args.exact, quantize=args.quantize)
    for section, lines in (("model", model_lines(llama.checkpoint)), ("plan", llama.plan.describe()),
                           ("cpu", cpu_description())):
        print(f"{section}:")
        for line in lines:
            print(f"  {line}")
    return 0


def model_lines(checkpoint) -> list[str]:
    c, metadata = checkpoint.config, getattr(checkpoint, "metadata", None) or {}
    if hasattr(checkpoint, "type_counts"):                          # GGUF: the file's own type table
        name = metadata.get("general.name")
        kind = f"GGUF v{checkpoint.version} {metadata.get('general.architecture', 'llama')}"
        kind += f" ({name})" if name else ""
        counts = checkpoint.type_counts
    else:
        kind, counts = checkpoint.description, tensor_types(c, checkpoint.weights)
    size = path_size(checkpoint.path)
    config = (f"dim {c.dim}, hidden {c.hidden_dim}, layers {c.n_layers}, heads {c.n_heads}, kv heads {c.n_kv_heads}, "
              f"head dim {c.head_dim}, vocab {c.vocab_size}, context {c.seq_len}, rope theta {c.rope_theta:g}, "
              f"norm eps {c.norm_eps:g}, classifier {'the embeddings' if c.shared_classifier else 'its own'}")
    types = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return [f"file: {checkpoint.path}", f"format: {kind}", f"size: {size / 1e6:.1f} MB ({size} bytes)",
            f"config: {config}", f"tensors: {types}", f"parameters: {parameter_count(checkpoint.weights):,}"]


def path_size(path: str) -> int:
    """Bytes in a model file, or in the files of a checkpoint directory."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


def tensor_types(config, weights: dict) -> dict[str, int]:
    """Tensors by type, a shared classifier once: "F32", or "INT8/<group size>" (llama2.c's int8 groups)."""
    from collections import Counter
    from .model import LAYER_WEIGHTS
    from .tensors import GroupQuantized

    def type_of(tensor) -> str:
        if isinstance(tensor, GroupQuantized):
            return f"INT8/{tensor.group_size}"
        if hasattr(tensor, "ggml_type"):                            # F16, BF16 from a checkpoint directory
            return tensor.ggml_type
        return {"float32": "F32", "float16": "F16"}.get(str(tensor.dtype), str(tensor.dtype))

    counts, seen = Counter(), set()
    for name, value in weights.items():
        if id(value) not in seen:
            seen.add(id(value))
            layers = range(config.n_layers) if name in LAYER_WEIGHTS else [None]
            counts.update(type_of(value if layer is None else value[layer]) for layer in layers)
    return counts


def parameter_count(weights: dict) -> int:
    """The numbers in the model's tensors, a shared classifier once."""
    import math
    tensors = {id(t): t for value in weights.values() for t in (value if isinstance(value, list) else [value])}
    return sum(math.prod(t.shape) for t in tensors.values())


# ----------------------------------------------------------------------------------------------
# llamarun quantize

def cmd_quantize(args) -> int:
    from .quantize import measure_quality, quantize
    written = quantize(args.input, args.output, args.type, args.group_size)
    print(f"wrote {args.output}: {written}")
    for line in measure_quality(args.input, args.output).lines():
        print(line)
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun convert

def cmd_convert(args) -> int:
    from .convert import convert
    written = convert(args.input, args.output, args.type, force=args.force)
    print(f"wrote {args.output}: {written.description}")
    for note in written.notes:
        print(f"note: {note}")
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun bench

def cmd_bench(args) -> int:
    """llama-bench's tests on one model (and llama.cpp beside it when llama_cpp is installed)."""
    from .api import load
    from .bench import check_settings, format_report, run_bench
    check_settings(args.n_prompt, args.n_gen, args.depth, args.repetitions)   # before the model loads
    llama = load(args.model, exact=args.exact, quantize=args.quantize, n_ctx=args.ctx)
    report = run_bench(llama, n_prompt=args.n_prompt, n_gen=args.n_gen, depth=args.depth,
                       repetitions=args.repetitions,
                       progress=lambda message: print(f"  {message} ...", file=sys.stderr, flush=True))
    print(format_report(report))
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun perplexity | lens

def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise LlamarunError(f"no such file: {path}") from None
    except UnicodeDecodeError:
        raise LlamarunError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise LlamarunError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise LlamarunError(f"{path} is empty: there is no text to score")
    return text


def cmd_perplexity(args) -> int:
    """PPL of a text file: chunks of --ctx tokens, each one batched pass (llamarun/inspect/perplexity.py)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from .inspect.perplexity import check_inputs, perplexity

    text = read_text_file(args.file)
    if args.ctx is not None and args.ctx < 2:
        raise LlamarunError(f"--ctx must be at least 2 tokens, not {args.ctx}")
    llama = open_model(args.model, args.tokenizer, need_tokenizer=True, exact=args.exact, quantize=args.quantize, ctx=args.ctx)
    ctx = args.ctx if args.ctx is not None else min(512, llama.config.seq_len)
    ids = llama.tokenizer.encode(text, bos=False)     # no special tokens, as the reference scores text
    check_inputs(llama.model, ids, ctx)               # before the progress bar takes the terminal
    columns = (TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("perplexity", total=None)
        result = perplexity(llama.model, ids, ctx,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(f"{len(ids)} tokens, {result.scored} scored in {result.chunks} chunks of up to {ctx}; "
          f"mean NLL {result.nll:.4f} nats/token", file=sys.stderr)
    print(f"PPL = {result.ppl:.4f}")
    return 0


# The most tokens per layer `llamarun lens` shows: its table has a column per rank, and a table of
# thousands of columns takes minutes and gigabytes to lay out (--top 100000: 118 s, 1.56 GB) for no reader.
LENS_TABLE_TOP = 100


def cmd_lens(args) -> int:
    """The logit lens as a table: per layer, the top tokens the final norm and classifier read."""
    from rich.console import Console
    from rich.table import Table
    from .logprobs import token_text
    from .inspect.lens import logit_lens

    if args.top < 1:
        raise LlamarunError(f"--top must be at least 1, not {args.top}")
    top = min(args.top, LENS_TABLE_TOP)
    if top < args.top:
        print(f"llamarun: --top {args.top} shows the top {top}, the most the table holds", file=sys.stderr)
    llama = open_model(args.model, args.tokenizer, need_tokenizer=True, exact=args.exact, quantize=args.quantize, ctx=args.ctx)
    ids = llama.encode(prompt_of(args))
    lens = logit_lens(llama.model, ids, args.pos, top)
    here = ids[lens.pos]
    shown = token_text(llama.tokenizer, here, ids[lens.pos - 1] if lens.pos else None)
    table = Table(title=f"logit lens at position {lens.pos} ({shown!r}): the next token read after each layer")
    table.add_column("layer", justify="right")
    for rank in range(1, len(lens.layers[0].tokens) + 1):
        table.add_column(f"#{rank}")
    for row in lens.layers:
        table.add_row(str(row.layer), *(f"{token_text(llama.tokenizer, t, here)!r} {p:.3f}"
                                        for t, p in zip(row.tokens, row.probs)))
    # piped output is not cut to 80 columns: a wide table stays one row per layer
    Console(highlight=False, width=None if sys.stdout.isatty() else 40 + 24 * len(lens.layers[0].tokens)).print(table)
    return 0


# ----------------------------------------------------------------------------------------------
# llamarun serve

def cmd_serve(args) -> int:
    """An OpenAI-compatible HTTP server with continuous batching (llamarun/server/)."""
    from pathlib import Path
    from .server import serve
    from .server.app import check_port
    for flag, value, low in (("--parallel", args.parallel, 1), ("--ctx", args.ctx, 2), ("--queue", args.queue, 0),
                             ("--max-body", args.max_body, 1)):
        if value is not None and value < low:
            raise LlamarunError(f"{flag} must be at least {low}, not {value}")
    check_port(args.port)                  # before the model loads
    llama = open_model(args.model, args.tokenizer, need_tokenizer=True, exact=args.exact, quantize=args.quantize, ctx=args.ctx)
    ctx = args.ctx if args.ctx is not None else min(2048, llama.config.seq_len)
    serve(llama, Path(llama.checkpoint.path).stem, host=args.host, port=args.port, parallel=args.parallel,
          ctx=ctx, queue=args.queue, api_key=args.api_key, max_body=args.max_body, draft=args.draft,
          draft_max=args.draft_max)
    return 0


# ----------------------------------------------------------------------------------------------
# --threads: one size for numba's thread pool and BLAS's

POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def apply_threads(n: int | None) -> None:
    """Make numba's kernels and BLAS's products use n threads (None: leave both at all cores).

    Thread pools take their size from the environment when their library loads, so the variables are
    set for the libraries still to load (numba itself when it is not imported yet; OpenBLAS and
    OpenMP runtimes that load later, e.g. scipy's OpenBLAS, which numba brings in on first use).
    Those already loaded are limited at run time: numba with set_num_threads (at most the pool it
    was imported with), numpy's OpenBLAS (and any OpenMP runtime) with threadpoolctl. NUMBA_NUM_THREADS
    is left alone once numba is imported: changing it after numba's threads started makes numba
    refuse to compile.
    """
    if n is None:
        return
    if n < 1:
        raise LlamarunError(f"--threads must be at least 1, not {n}")
    numba = sys.modules.get("numba")
    if numba is not None and n > numba.config.NUMBA_NUM_THREADS:
        raise LlamarunError(f"--threads {n}: numba started with {numba.config.NUMBA_NUM_THREADS} threads; set "
                            f"NUMBA_NUM_THREADS={n} in the environment to use more")
    if numba is None:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    for var in POOL_VARIABLES:
        os.environ[var] = str(n)
    if numba is not None:
        numba.set_num_threads(n)
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)        # BLAS and OpenMP


def add_threads(p: argparse.ArgumentParser) -> None:
    """--threads for a command that runs a model."""
    p.add_argument("--threads", type=int, metavar="N", help="threads for numba and BLAS (default: all cores)")


# ----------------------------------------------------------------------------------------------
# argument parsing

def add_ctx(p: argparse.ArgumentParser) -> None:
    """--ctx for a command that runs a model (perplexity and serve have their own, which means it too)."""
    p.add_argument("--ctx", type=int, metavar="N", help="context in tokens (default: the model's trained context, "
                                                        f"at most {DEFAULT_CONTEXT_LIMIT})")


def add_exact(p: argparse.ArgumentParser) -> None:
    """--exact, and --quantize: how a command's model computes."""
    p.add_argument("--exact", action="store_true",
                   help="float32 activations for quantized GGUF weights (the reference arithmetic); "
                        "default: int8 activations in the decode step, as llama.cpp")
    p.add_argument("--quantize", choices=("q8_0", "q4_0", "q4_1"), metavar="TYPE",
                   help="quantize every matrix in memory at load (q8_0, q4_0, q4_1), reporting the quality cost "
                        "on stderr; the file is not changed")


def add_speculation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="ngram|PATH",
                   help="speculative decoding: drafts from earlier text (ngram: prompt lookup) or from a smaller "
                        "model with the same vocabulary (PATH); the output is the same, faster where drafts hold")
    p.add_argument("--draft-max", type=int, metavar="N", help="the longest draft, in tokens (default 8)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    """The sampler's flags (None = the sampler's default, see llamarun/sampling.py)."""
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, help="keep the K most likely tokens, 0 = all (default 40)")
    p.add_argument("--min-p", type=float, help="drop tokens below MIN_P x the top probability (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, help="llama.cpp repetition penalty (default 1.0 = off)")
    # llama.cpp's samplers, with its flags (each off by default; see the README's sampler table)
    p.add_argument("--dynatemp-range", type=float, metavar="N",
                   help="dynamic temperature: within temperature +- N, by the entropy of the candidates left "
                        "(default 0 = off)")
    p.add_argument("--dynatemp-exp", dest="dynatemp_exponent", type=float, metavar="N",
                   help="dynamic temperature exponent (default 1.0)")
    p.add_argument("--typical", "--typical-p", dest="typical_p", type=float, metavar="P",
                   help="locally typical sampling (default 1.0 = off)")
    p.add_argument("--top-n-sigma", "--top-nsigma", dest="top_n_sigma", type=float, metavar="N",
                   help="keep logits within N standard deviations of the top one (default -1 = off)")
    p.add_argument("--xtc-probability", type=float, metavar="P",
                   help="XTC: chance of removing the top choices (default 0 = off)")
    p.add_argument("--xtc-threshold", type=float, metavar="P",
                   help="XTC: the probability a top choice has (default 0.1; > 0.5 = off)")
    p.add_argument("--dry-multiplier", type=float, metavar="N", help="DRY repetition penalty (default 0 = off)")
    p.add_argument("--dry-base", type=float, metavar="N", help="DRY base (default 1.75)")
    p.add_argument("--dry-allowed-length", type=int, metavar="N",
                   help="DRY: repeats longer than N tokens are penalised (default 2)")
    p.add_argument("--dry-penalty-last-n", type=int, metavar="N", help="DRY: tokens scanned for repeats (default 64)")
    p.add_argument("--dry-sequence-breaker", dest="dry_sequence_breakers", action="append", metavar="TEXT",
                   help="a DRY sequence breaker, replacing the defaults ('\\n', ':', '\"', '*'); repeatable; "
                        "'none' for none")
    p.add_argument("--mirostat", type=int, metavar="N",
                   help="Mirostat in place of the other samplers: 1 = Mirostat, 2 = Mirostat 2.0 (default 0 = off)")
    p.add_argument("--mirostat-lr", dest="mirostat_eta", type=float, metavar="N",
                   help="Mirostat learning rate, eta (default 0.1)")
    p.add_argument("--mirostat-ent", dest="mirostat_tau", type=float, metavar="N",
                   help="Mirostat target entropy, tau (default 5.0)")
    p.add_argument("--samplers", metavar="ORDER",
                   help="the samplers' order: llama.cpp's names separated by ';' (penalties;dry;top_n_sigma;top_k;"
                        "typ_p;top_p;min_p;xtc;temperature) or its letters (edskypmxt)")


LLAMA_CPP_SAMPLING = ("dynatemp_range", "dynatemp_exponent", "typical_p", "top_n_sigma", "xtc_probability",
                      "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                      "dry_sequence_breakers", "mirostat", "mirostat_eta", "mirostat_tau", "samplers")


# the flags whose names are not the parameter's (llama.cpp's spelling)
SAMPLING_FLAGS = {"dynatemp_exponent": "--dynatemp-exp", "typical_p": "--typical", "mirostat_eta": "--mirostat-lr",
                  "mirostat_tau": "--mirostat-ent", "dry_sequence_breakers": "--dry-sequence-breaker"}
C_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def llama_cpp_sampling(args) -> dict:
    """The llama.cpp sampler flags given (None = the sampler's default). The breakers take the escapes
    llama.cpp reads (\\n, \\t, \\", \\\\, \\xHH), and 'none' clears them, as its --dry-sequence-breaker."""
    given = {name: getattr(args, name) for name in LLAMA_CPP_SAMPLING}
    breakers = given["dry_sequence_breakers"]
    if breakers is not None:
        given["dry_sequence_breakers"] = [] if "none" in breakers else [unescape(b) for b in breakers]
    return given


def unescape(text: str) -> str:
    return re.sub(r"\\(x[0-9a-fA-F]{2}|[nrt'\"\\])",
                  lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" else C_ESCAPES[m[1]], text)


def add_structured(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("structured output (one of)")
    s.add_argument("--json-schema", metavar="FILE_OR_JSON",
                   help="the output is JSON valid under this JSON Schema (a file, or the schema's JSON text)")
    s.add_argument("--grammar-file", metavar="FILE", help="the output follows this GBNF grammar (llama.cpp's format)")
    s.add_argument("--grammar", metavar="TEXT", help="the output follows this GBNF grammar, given as text")
    s.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    s.add_argument("--json", action="store_true", help="the output is a JSON object")


def add_emphasize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--emphasize", action="append", metavar="WORD:FACTOR[@LAYERS]",
                   help="multiply the attention paid to the prompt's tokens of WORD by FACTOR (log(FACTOR) added "
                        "to their attention scores), in LAYERS (e.g. @0-5 or @3,7,9; default all); repeatable")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="model file: GGUF or llama2.c .bin (default: SmolLM2-135M-Instruct)")
    p.add_argument("-z", "--tokenizer", help="tokenizer.bin or tokenizer.model (default: one beside the model)")


def add_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text")
    p.add_argument("--prompt", dest="prompt_flag", metavar="TEXT", help="the prompt (instead of the positional)")


class UsageError(LlamarunError):
    """A command line argparse refuses (an unknown flag, a missing or malformed value)."""


class Parser(argparse.ArgumentParser):
    """argparse with the user-error rule: one line saying what is wrong and where the help is, exit 1
    (argparse's own error() prints the usage block and exits 2). Its subcommands' parsers are Parsers too."""

    def error(self, message: str, prog: str | None = None):
        raise UsageError(f"{' '.join(message.split())} (see `{prog or self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        # as argparse's, but an unknown flag of a command points at that command's help
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extras)}", f"{self.prog} {command}" if command else None)
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = Parser(prog="llamarun", description="A readable, fast Llama inference engine.")
    parser.add_argument("--version", action="version", version=f"llamarun {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    add_prompt(g)
    add_model(g)
    g.add_argument("-n", type=int, default=256, help="number of new tokens (default 256)")
    add_sampling(g)
    add_speculation(g)
    g.add_argument("--repeat-last-n", type=int, help="how many recent tokens the penalties look at (default 64)")
    g.add_argument("--presence-penalty", type=float, help="OpenAI presence penalty (default 0)")
    g.add_argument("--frequency-penalty", type=float, help="OpenAI frequency penalty (default 0)")
    g.add_argument("--stop", action="append", metavar="S", help="stop before this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="never draw end-of-generation tokens, as llama.cpp (only -n or --stop ends)")
    g.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    g.add_argument("--sampler", choices=["default", "llama2c"], default="default",
                   help="llama2c = run.c's exact sampling and stop rule")
    g.add_argument("--ids", action="store_true", help="print the walked token ids as JSON instead of text")
    g.add_argument("--confidence", action="store_true",
                   help="colour each token by its probability under the model: green >= 0.5, yellow >= 0.2, "
                        "red below (plain text when stdout is not a terminal)")
    g.add_argument("--confidence-json", metavar="FILE",
                   help="write one JSON object per generated token: token (id), text, prob (softmax of the raw "
                        "logits), sampled_prob (under the distribution sampled from: after penalties, "
                        "temperature, top-k/p, min-p; 1 when greedy), margin (1st - 2nd largest logit), "
                        "margin2 (1st - 3rd), entropy (of the model's distribution, nats), top (the 5 most "
                        "probable tokens: token, text, prob, sampled_prob)")
    add_structured(g)
    add_emphasize(g)
    add_ctx(g)
    add_threads(g)
    add_exact(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="llama2.c's run.c, same arguments: run checkpoint [-t -p -s -n -i -z -m -y]")
    r.add_argument("checkpoint", help="llama2.c checkpoint (.bin)")
    r.add_argument("-t", dest="temperature", type=float, default=1.0, help="temperature (default 1.0)")
    r.add_argument("-p", dest="topp", type=float, default=0.9, help="top-p (default 0.9)")
    r.add_argument("-s", dest="seed", type=int, default=0, help="random seed (default: time)")
    r.add_argument("-n", dest="steps", type=int, default=256, help="steps, prompt included (0 = seq_len)")
    r.add_argument("-i", dest="input", default=None, help="input prompt")
    r.add_argument("-z", dest="tokenizer", default=None, help="tokenizer (default: tokenizer.bin beside it)")
    r.add_argument("-m", dest="mode", default="generate", help="mode: generate|chat (default generate)")
    r.add_argument("-y", dest="system", default=None, help="system prompt in chat mode (default: asked on stdin)")
    r.add_argument("--ids", action="store_true", help="print the walked token ids as JSON instead of text")
    add_ctx(r)
    add_threads(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="chat with an instruction-tuned model (interactive, or one message per stdin line)")
    add_model(c)
    c.add_argument("--system", metavar="TEXT", help="system prompt")
    c.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit")
    c.add_argument("-n", type=int, default=512, help="at most N tokens per reply (default 512)")
    add_sampling(c)
    c.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    add_structured(c)
    add_speculation(c)
    add_ctx(c)
    add_threads(c)
    add_exact(c)
    c.set_defaults(func=cmd_chat)

    at = sub.add_parser("attention", help="write every layer's and head's attention over the prompt and its "
                                          "continuation: an HTML page (--out) and/or PNG files (--png)")
    add_prompt(at)
    add_model(at)
    at.add_argument("-n", type=int, default=16, help="number of new tokens (default 16)")
    at.add_argument("--out", metavar="FILE", help="write the self-contained HTML report here")
    at.add_argument("--png", metavar="DIR", help="write one PNG per layer (mean over heads, then each head) here")
    add_sampling(at)
    at.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    at.set_defaults(temperature=0.0)                    # greedy unless asked: a map one can reproduce
    add_emphasize(at)
    add_ctx(at)
    add_threads(at)
    add_exact(at)
    at.set_defaults(func=cmd_attention)

    t = sub.add_parser("tokenize", help="print the token ids of a text as JSON (BOS as the tokenizer adds it)")
    add_prompt(t)
    t.add_argument("-z", "--tokenizer", help="tokenizer.bin or tokenizer.model")
    t.add_argument("-m", "--model", help="a model whose tokenizer to use (default: the default model)")
    t.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    t.set_defaults(func=cmd_tokenize)

    pl = sub.add_parser("pull", help="download a known model (default: the default model) and print its path")
    pl.add_argument("name", nargs="?", default=None, help="model name (default: smollm2-135m-instruct-q4_1)")
    pl.add_argument("--force", action="store_true", help="download again even if the model is cached")
    pl.set_defaults(func=cmd_pull)

    ms = sub.add_parser("models", help="list the cached models")
    ms.add_argument("--verify", action="store_true", help="check the sha256 of every cached model llamarun knows")
    ms.set_defaults(func=cmd_models)

    inf = sub.add_parser("info", help="what a model file holds, how llamarun will run it (the plan), and the "
                                      "CPU features its kernels use")
    inf.add_argument("-m", "--model", help="model file: GGUF or llama2.c .bin (default: SmolLM2-135M-Instruct)")
    add_exact(inf)
    inf.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="prompt processing and generation speed, as llama.cpp's llama-bench "
                                     "(and llama.cpp beside it when llama_cpp is installed)")
    b.add_argument("-m", "--model", help="model file: GGUF or llama2.c .bin (default: SmolLM2-135M-Instruct)")
    b.add_argument("-p", dest="n_prompt", type=int, default=512, metavar="N",
                   help="prompt processing: tok/s of one batched forward of N tokens (default 512; 0 = skip)")
    b.add_argument("-n", dest="n_gen", type=int, default=128, metavar="N",
                   help="text generation: tok/s of N single-token forwards (default 128; 0 = skip)")
    b.add_argument("-d", dest="depth", type=int, default=0, metavar="N",
                   help="depth: N tokens already in the cache before each test (default 0)")
    b.add_argument("-r", dest="repetitions", type=int, default=5, metavar="N",
                   help="timed runs of each test, after one warm-up (default 5)")
    add_ctx(b)
    add_threads(b)
    add_exact(b)
    b.set_defaults(func=cmd_bench)

    qz = sub.add_parser("quantize", help="write a quantized copy of a model (GGUF q8_0/q4_0/q4_1/q4_k_m/q5_k_m/q6_k, "
                                         "llama2.c int8) "
                                         "and print what it costs in perplexity")
    qz.add_argument("input", help="model to quantize: GGUF (for .gguf output) or float32 llama2.c .bin (for .bin)")
    qz.add_argument("output", help="the file to write: OUT.gguf or OUT.bin (llama2.c version 2)")
    qz.add_argument("--type", required=True, help="q8_0, q4_0, q4_1, q4_k_m, q5_k_m, q6_k (GGUF output; the K-quant "
                                                 "mixes as llama-quantize makes them) or int8 (llama2.c output)")
    qz.add_argument("--group-size", type=int, metavar="G", help="int8 group size (default 64; must divide dim "
                                                                "and hidden_dim)")
    add_threads(qz)
    qz.set_defaults(func=cmd_quantize)

    cv = sub.add_parser("convert", help="write a model in another format: GGUF, llama2.c or a Hugging Face "
                                        "directory, from any model llamarun reads")
    cv.add_argument("input", help="the model: a GGUF file, a llama2.c .bin, a Meta or Hugging Face directory")
    cv.add_argument("output", help="OUT.gguf (llama.cpp), OUT.bin (llama2.c) or OUT/ (a Hugging Face directory)")
    cv.add_argument("--type", default="f32", help="the matrices' type: f32 (default), f16, bf16, q8_0, q4_0, "
                                                  "q4_1 (GGUF); f32 or bf16/f16 (Hugging Face); f32 (llama2.c "
                                                  "version 1) or int8 (version 2)")
    cv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cv.set_defaults(func=cmd_convert)

    pp = sub.add_parser("perplexity", help="perplexity of a text file (consecutive chunks of --ctx tokens, "
                                           "each scored from an empty cache); prints PPL = <value>")
    pp.add_argument("file", help="a UTF-8 text file (tokenized without BOS/EOS)")
    add_model(pp)
    pp.add_argument("--ctx", type=int, metavar="N", help="tokens per chunk, and the model's context (default: "
                                                         "512 or the model's context if shorter)")
    add_threads(pp)
    add_exact(pp)
    pp.set_defaults(func=cmd_perplexity)

    ln = sub.add_parser("lens", help="logit lens: per layer, the next tokens the final norm and classifier "
                                     "read from the residual stream at one position")
    add_prompt(ln)
    add_model(ln)
    ln.add_argument("--pos", type=int, metavar="P", help="the position to read, 0-based; negative counts "
                                                         "from the end (default: the last)")
    ln.add_argument("--top", type=int, default=5, metavar="K", help="tokens shown per layer (default 5; at most "
                                                                f"{LENS_TABLE_TOP} and the vocabulary)")
    add_ctx(ln)
    add_threads(ln)
    add_exact(ln)
    ln.set_defaults(func=cmd_lens)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions, streamed "
                                      "or not) that decodes concurrent requests together; a chat page at /")
    add_model(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    sv.add_argument("--parallel", type=int, default=4, metavar="N", help="sequence slots decoded together (default 4)")
    sv.add_argument("--ctx", type=int, metavar="N", help="context of each slot (default 2048, or the model's if shorter)")
    sv.add_argument("--queue", type=int, default=64, metavar="N",
                    help="requests that may wait for a slot; more get 503 (default 64)")
    sv.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                    help="largest request body; larger gets 413 (default 1 MiB)")
    add_speculation(sv)
    add_threads(sv)
    add_exact(sv)
    sv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    original = signal.getsignal(signal.SIGINT)
    catch = original not in (signal.SIG_IGN, None) and threading.current_thread() is threading.main_thread()
    try:
        parser = build_parser()
        if not (sys.argv[1:] if argv is None else argv):
            parser.print_help()             # bare `llamarun`: what it can do
            return 0
        args = parser.parse_args(argv)
        apply_threads(getattr(args, "threads", None))    # before numpy or numba do any work
        from . import compiling
        compiling.announce(sys.stderr)                   # a first run's compile says so, and how long
        if catch:
            on_ctrl_c(raise_where_safe)     # Ctrl-C: KeyboardInterrupt, never lost; a second one ends it
        return args.func(args)
    except LlamarunError as e:
        print(f"llamarun: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()   # the reader went away (`| head`): not an error
        return 0
    finally:
        if catch:
            signal.signal(signal.SIGINT, original)     # for a caller that runs main() in its own process
        if "llamarun.compiling" in sys.modules:
            sys.modules["llamarun.compiling"].announce(None)


if __name__ == "__main__":
    sys.exit(main())
