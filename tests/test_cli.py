"""The command line as a user meets it: output, exit codes, one-line errors, Ctrl-C."""
import io
import re
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from llamarun.cli import main

from conftest import MODELS, require


def model(name):
    return str(require(MODELS / name))


def llamarun(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llamarun", *args], capture_output=True, text=True, **kw)


def test_generate_streams_text_and_reports_speed():
    r = llamarun("generate", "Once upon a time", "-m", model("tiny_gqa.bin"), "-n", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time ")
    assert "tok/s" in r.stderr and "generated: 12 tokens" in r.stderr


def test_generate_ids_with_llama2c_sampler_walks_like_runc(capsysbinary):
    case = json.loads(require(MODELS.parent / "golden" / "tiny_untied_greedy.json").read_text())
    steps = case["steps"] - len(case["prompt_tokens"]) + 1
    assert main(["generate", case["prompt"], "-m", model("tiny_untied.bin"), "-n", str(steps),
                 "--sampler", "llama2c", "--temperature", "0", "--ids"]) == 0
    assert json.loads(capsysbinary.readouterr().out) == case["tokens"]


def test_tokenize_prints_ids_with_bos(capsys):
    assert main(["tokenize", "-z", model("tokenizer.bin"), "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == [1, 15043, 3186]
    assert main(["tokenize", "-z", model("tokenizer.bin"), "--no-bos", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == [15043, 3186]


@pytest.mark.parametrize("args, words", [
    (["generate", "Hi", "-m", "/nonexistent/model.bin"], "not found"),
    (["generate", "Hi", "-m", "{tiny}", "--temperature", "-1"], "temperature"),
    (["generate", "Hi", "-m", "{tiny}", "--top-p", "1.5"], "top_p"),
    (["generate", "Hi", "-m", "{tiny}", "--top-k", "-3"], "top_k"),
    (["generate", "Hi", "-m", "{s260}", "-z", "{tok}"], "512"),
    (["generate", "Hi", "-m", "{s260}"], "no tokenizer"),
    (["generate", "Hi", "-m", "{tiny}", "-n", "-4"], "new tokens"),
    (["generate", "Hi " * 300, "-m", "{tiny}"], "context holds 128"),
    (["generate", "Hi", "-m", "{tiny}", "--sampler", "llama2c", "--top-k", "5"], "--top-k"),
    (["run", "{tiny}", "-t", "-2"], "-t"),
    (["run", "{tiny}", "-m", "story"], "mode"),
])
def test_user_errors_are_one_line(args, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)     # no tokenizer.bin in the working directory to be found
    names = {"{tiny}": model("tiny_gqa.bin"), "{s260}": model("stories260K.bin"), "{tok}": model("tokenizer.bin")}
    assert main([names.get(a, a) for a in args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamarun: error:") and words in lines[0], lines


def test_a_user_error_exits_1_without_traceback():
    r = llamarun("generate", "Hi", "-m", model("tiny_gqa.bin"), "--top-p", "7")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "top_p" in r.stderr


def test_ctrl_c_lands_as_a_flag_between_tokens(capsysbinary, monkeypatch):
    # A real SIGINT while the 3rd token is computed, landing in code that swallows exceptions, as numba's
    # dispatcher does with one raised in the Python it calls back to unbox a typed list: a
    # KeyboardInterrupt would be lost there and the run would go on to 20 tokens. The loop must stop
    # after printing the 3rd, and the command's handler is gone afterwards.
    import os
    import llamarun.api
    real = llamarun.api.generate_stream

    def unboxing_with_sigint():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(3):                          # Python runs the handler at its next instruction
                pass
        except BaseException:
            pass

    def signalled_at_the_third(*args, **kwargs):
        def events():
            for n, event in enumerate(real(*args, **kwargs)):
                if n == 2:
                    unboxing_with_sigint()
                yield event
        return events()

    monkeypatch.setattr(llamarun.api, "generate_stream", signalled_at_the_third)
    # Python's own Ctrl-C handler, as an interactive run has it (a test run started in the background
    # by a non-interactive shell inherits SIGINT ignored, and CtrlC leaves an ignored SIGINT alone)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["generate", "Once upon a time", "-m", model("tiny_gqa.bin"), "-n", "20", "--seed", "3"])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and after is signal.default_int_handler
    err = capsysbinary.readouterr().err.decode()
    assert "generated: 3 tokens" in err and "finish: interrupted" in err, err


def test_ctrl_c_keeps_the_output_and_exits_130(tmp_path):
    # mkmodel's s42M shape: its 1024-token context keeps generation going for seconds, so a signal that
    # is lost (as it was, about one run in ten, while it raised KeyboardInterrupt; see CtrlC in cli.py)
    # shows as a run to the end rather than as a race with a short model
    path = tmp_path / "s42M.bin"
    mkmodel = require(MODELS.parent / "tools" / "mkmodel.py")
    subprocess.run([sys.executable, str(mkmodel), "s42M", str(path)], check=True)
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive
    # shell (`pytest &`) ignores SIGINT, a child inherits that, and Python then installs no Ctrl-C handler
    proc = subprocess.Popen([sys.executable, "-m", "llamarun", "generate", "Once upon a time", "-m", str(path),
                             "-z", model("tokenizer.bin"), "-n", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    prompt = proc.stdout.read(len("Once upon a time"))
    first = proc.stdout.read1(100)                                # generated text is streaming
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert prompt == b"Once upon a time" and first
    assert b"Traceback" not in err and b"interrupted" in err


@pytest.mark.parametrize("args, words, command", [
    (["speak"], "invalid choice: 'speak'", "llamarun"),
    (["generate", "-n", "many"], "argument -n: invalid int value: 'many'", "llamarun generate"),
    (["generate", "Hi", "--colour"], "unrecognized arguments: --colour", "llamarun generate"),
    (["generate", "--sampler", "run.c"], "argument --sampler: invalid choice", "llamarun generate"),
    (["run"], "required: checkpoint", "llamarun run"),
    (["run", "model.bin", "-t"], "argument -t: expected one argument", "llamarun run"),
])
def test_usage_errors_are_one_line_and_exit_1(args, words, command, capsys):
    # argparse's own rule is the usage block and exit 2; the README's is one line and exit 1
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, lines
    assert lines[0].startswith("llamarun: error:") and words in lines[0], lines
    assert lines[0].endswith(f"(see `{command} --help`)"), lines


def test_a_usage_error_exits_1_in_a_process():
    r = llamarun("generate", "--top-k", "few")
    assert r.returncode == 1 and r.stdout == "" and "usage:" not in r.stderr
    assert r.stderr.count("\n") == 1 and "--top-k" in r.stderr and "llamarun generate --help" in r.stderr


# `llamarun run -m chat` against llama2.c's run.c (karpathy/llama2.c 350e04f, `gcc -O2 run.c -lm`), run in
# ../shared/models with the arguments below: its stdout, byte for byte. tiny_gqa's random weights never
# draw EOS, so each chat is one reply that runs to the end of the steps. run.c draws (and discards) a token
# at every prompt position: a sampled reply matches only if those coins are spent too.
RUNC_CHATS = [
    (["-t", "1", "-p", "0.9", "-s", "42", "-n", "40", "-m", "chat", "-i", "Hi there", "-y", "Be brief."], "",
     b"Assistant:  encrypted geometricstats saved\xe4\xba\x8b accessingG roce Athlet Cubatempissenschaft "
     b"divislou something\n"),
    (["-t", "0.8", "-p", "1", "-s", "7", "-n", "45", "-m", "chat"], "You are a bot.\nHello, who are you?\n",
     b"Enter system prompt (optional): User: Assistant:  England bru Administr einmal Much\xe4\xbb\x8b\xc2\xba "
     b"Archives Company urb\xd1\x82\xd0\xb5\xd0\xbb\xd0\xb5\xd0\xbc cryptIME\n"),
]


@pytest.mark.parametrize("flags, stdin, expected", RUNC_CHATS)
def test_run_chat_prints_what_runc_prints(flags, stdin, expected, monkeypatch, capsysbinary):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["run", model("tiny_gqa.bin"), "-z", model("tokenizer.bin"), *flags]) == 0
    assert capsysbinary.readouterr().out == expected


def test_run_chat_takes_turns_as_runc(tmp_path, monkeypatch, capsysbinary):
    # tiny_gqa with token 2's embedding (the classifier's row too: it is shared) scaled by 40, so that
    # EOS ends replies and the chat takes turns. Expected: run.c's stdout (as above, `printf 'sys\nsecond
    # message\nthird one\nfourth\n' | run eosy.bin -z tokenizer.bin -t 1 -s 11 -n 60 -m chat`) with its
    # three quirks patched out, where llamarun differs on purpose (README, `llamarun run`): a newline for
    # every EOS drawn and discarded at a prompt position, the token drawn after a reply's EOS printed, and
    # at the end of stdin the last message sent again until the steps are spent (here: run.c exits).
    raw = bytearray(require(MODELS / "tiny_gqa.bin").read_bytes())
    dim, vocab = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[20:24], "little")
    table = np.frombuffer(raw, np.float32, vocab * dim, 28).reshape(vocab, dim).copy()
    table[2] *= 40
    raw[28:28 + table.nbytes] = table.tobytes()
    (tmp_path / "eosy.bin").write_bytes(raw)
    monkeypatch.setattr(sys, "stdin", io.StringIO("sys\nsecond message\nthird one\nfourth\n"))
    assert main(["run", str(tmp_path / "eosy.bin"), "-z", model("tokenizer.bin"), "-t", "1", "-s", "11",
                 "-n", "60", "-m", "chat"]) == 0
    assert capsysbinary.readouterr().out == (
        b"Enter system prompt (optional): User: Assistant: \nUser: Assistant: \xd0\xb5\xd0\xb9vie photos} peuvent "
        b"Representatives\xd1\x92river voceElement\nUser: Assistant: \nUser: \n")


# ----------------------------------------------------------------------------------------------
# the first contact: bare `llamarun`, --version, chat's own commands, hints, an empty prompt

def test_bare_llamarun_prints_the_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llamarun") and "generate" in out and "chat" in out and "--version" in out


def test_version():
    import llamarun as package
    r = llamarun("--version")
    assert r.returncode == 0 and r.stdout == f"llamarun {package.__version__}\n" and r.stderr == "", r


def chat_args(*extra):
    return ["chat", "-m", model("tiny_gqa.bin"), "-z", model("tokenizer.bin"), "-n", "4", "--temperature", "0", *extra]


def test_chat_answers_help_and_unknown_commands_itself(monkeypatch, capsys):
    import llamarun.chat
    sent = []
    real = llamarun.chat.ChatSession.send
    monkeypatch.setattr(llamarun.chat.ChatSession, "send", lambda self, text: sent.append(text) or real(self, text))
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n/model big\n  /reset\n/usr/bin is a folder\nHi\n/exit\n"))
    assert main(chat_args()) == 1                  # an unknown command, as an unknown flag, is a user error
    err = capsys.readouterr().err
    assert sent == ["/usr/bin is a folder", "Hi"]   # a path is a message; the commands never reach the model
    assert "unknown command /model" in err
    listings = [line for line in err.splitlines() if line.startswith("commands:")]
    assert len(listings) == 2 and all(c in listings[0] for c in ("/help", "/reset", "/exit"))


def parser_flags() -> set[str]:
    """Every --flag that `llamarun` or one of its commands accepts."""
    import argparse
    from llamarun.cli import build_parser
    parser = build_parser()
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    return {s for p in parsers for a in p._actions for s in a.option_strings if s.startswith("--")}


def test_every_flag_an_error_names_exists():
    # each --flag that a user-facing error of llamarun's names (LlamarunError and its kinds, hints)
    import ast
    import re
    from pathlib import Path
    package = Path(__file__).resolve().parents[1] / "llamarun"
    named = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            is_error = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("LlamarunError", "UsageError", "ContextFull"))
            is_hint = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("HINT")
                                                             for t in node.targets)
            if is_error or is_hint:
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        for flag in re.findall(r"--[a-z][a-z0-9-]*", part.value):
                            named.setdefault(flag, f"{path.name}:{part.lineno}")
    assert len(named) >= 5                         # the scan finds the errors' flags
    missing = {flag: where for flag, where in named.items() if flag not in parser_flags()}
    assert not missing


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat", "--prompt", "Hi"], ["lens", "Hi"],
                                     ["perplexity", "{text}"], ["attention", "Hi", "--out", "{html}"],
                                     ["run", "{s260}", "-i", "Hi"], ["run", "{s260}", "-m", "chat", "-y", "", "-i", "Hi"]])
def test_the_no_tokenizer_hint_names_only_the_commands_flags(command, tmp_path, monkeypatch, capsys):
    import argparse
    from llamarun.cli import build_parser
    monkeypatch.chdir(tmp_path)                    # no tokenizer.bin in the working directory to be found
    (tmp_path / "text.txt").write_text("Some text.")
    names = {"{s260}": model("stories260K.bin"), "{text}": "text.txt", "{html}": "map.html"}
    args = [names.get(a, a) for a in command] + ([] if command[0] == "run" else ["-m", model("stories260K.bin")])
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "no tokenizer" in error and "-z" in error
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command[0]]
    accepted = {s for a in sub._actions for s in a.option_strings}
    assert set(re.findall(r"--[a-z][a-z0-9-]*", error)) <= accepted, error


def test_an_empty_prompt_starts_from_bos_in_generate_and_is_a_message_in_chat(smol_path, capsysbinary):
    # the default model's tokenizer adds no BOS: "" used to be an error there ("enable BOS", no such flag)
    assert main(["generate", "", "-m", str(smol_path), "-n", "3", "--temperature", "0", "--ids"]) == 0
    walked = json.loads(capsysbinary.readouterr().out)
    assert walked[0] == 1 and len(walked) == 4     # <|im_start|>, SmolLM2's BOS, then 3 drawn tokens
    assert main(["chat", "--prompt", "", "-m", str(smol_path), "-n", "3", "--temperature", "0"]) == 0
    assert capsysbinary.readouterr().out.strip()   # a reply to the empty message
