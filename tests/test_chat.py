"""Chat: Hugging Face templates rendered as transformers renders them, Llama 2's format as run.c builds
it, a session that reuses its KV cache from turn to turn, and the `chat` command."""
import io
import json
import time

import pytest

import llamarun
import llamarun.chat
from llamarun.chat import ChatFormat, ChatSession, ContextFull, render_chat_template
from llamarun.cli import main
from llamarun.errors import LlamarunError

from conftest import GOLDEN, MODELS, require

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML as SmolLM2 ships it (the GGUF's tokenizer.chat_template): a default system prompt unless
# the conversation brings its own
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")



def smol_chat_case() -> dict:
    cases = json.loads(require(GOLDEN / "smollm2" / "smol_hf.json").read_text())
    return next(case for case in cases if isinstance(case["input"], list))


@pytest.fixture(scope="module")
def tiny():
    return llamarun.load(require(MODELS / "tiny_gqa.bin"), tokenizer=require(MODELS / "tokenizer.bin"))


# ----------------------------------------------------------------------------------------------
# templates

def test_smollm2_template_renders_the_chat_as_transformers_did(smol_checkpoint):
    case = smol_chat_case()
    template = smol_checkpoint.metadata["tokenizer.chat_template"]
    text = render_chat_template(template, case["input"], add_generation_prompt=True,
                                bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert text == case["text"]
    assert template == CHATML      # so the hand-checked cases below test the real template


def test_chatml_hand_checked_renders():
    with_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert render_chat_template(CHATML, with_system) == \
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}]
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n")
    assert render_chat_template(CHATML, turns) == default_system + (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat_template(CHATML, turns[:2], add_generation_prompt=False) == default_system + (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")


def test_template_environment_is_transformers():
    # trim_blocks / lstrip_blocks (the newline after a tag goes, the one after {{ }} stays), loop
    # controls, tojson without ASCII escapes, strftime_now, bos/eos, tools=None
    template = ("{{ bos_token }}\n  {% for m in messages %}\n{% if loop.index > 1 %}{% break %}{% endif %}"
                "{{ m | tojson }}|{{ m | tojson(indent=1) }}\n{% endfor %}{{ eos_token }}"
                "{{ strftime_now('%Y') | length }}{{ tools is none }}")
    out = render_chat_template(template, [{"role": "user", "content": "héllo <b>"}, {"role": "user", "content": "x"}],
                               bos_token="<s>", eos_token="</s>")
    assert out == ('<s>\n{"role": "user", "content": "héllo <b>"}|{\n "role": "user",\n "content": "héllo <b>"\n}\n'
                   '</s>4True')


def test_raise_exception_and_broken_templates_are_llamarun_errors():
    refusing = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversations must start with the user') }}{% endif %}")
    with pytest.raises(LlamarunError, match="Conversations must start with the user"):
        render_chat_template(refusing, [{"role": "assistant", "content": "Hi"}])
    with pytest.raises(LlamarunError, match="does not parse"):
        ChatFormat.from_template("{% for m in messages %}")
    with pytest.raises(LlamarunError):     # the sandbox refuses to change the messages
        render_chat_template("{{ messages.append(1) }}", [])


HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "a repeated string": "{{ 'x' * 10**9 }}",
    "a huge power": "{{ 7 ** 99999999 }}",
    "a padding filter": "{{ 'x' | center(10**9) }}",
    "a padding method": "{{ 'x'.ljust(10**9) }}",
    "a doubling string": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s }}"),
    "a long rendering": "{% for i in range(999999) %}{{ messages }}{% endfor %}",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_hostile_template_is_a_clear_error_soon(template):
    start = time.perf_counter()
    with pytest.raises(LlamarunError, match="^the chat template exceeds .*: it is broken or hostile"):
        render_chat_template(template, [{"role": "user", "content": "Hi"}])
    assert time.perf_counter() - start < 1.5


def test_a_slow_template_runs_out_of_time(monkeypatch):
    monkeypatch.setattr(llamarun.chat, "TEMPLATE_SECONDS", 0.05)
    with pytest.raises(LlamarunError, match=r"exceeds 0.05 s of rendering"):
        render_chat_template("{% for i in range(999999) %}{{ i }}{% endfor %}", [])


def test_template_special_tokens_are_one_id_each():
    class CharTokenizer:          # one id per character: enough to see where the special ids fall
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=True, eos=False, special=True):
            return [1000 + ord(c) for c in text]

    case = smol_chat_case()
    chat = ChatFormat.from_template(CHATML, "<|im_start|>", "<|im_end|>")
    ids = chat.encode(case["input"], CharTokenizer())
    assert [t for t in ids if t < 1000] == [t for t in case["ids"] if t in (1, 2)]
    assert "".join(chr(t - 1000) if t >= 1000 else {1: "<|im_start|>", 2: "<|im_end|>"}[t] for t in ids) == case["text"]


def test_template_uses_the_drawn_tokens_of_a_reply(tiny):
    tok = tiny.tokenizer
    chat = ChatFormat.from_template(CHATML)
    reply = {"role": "assistant", "content": "Hello", "tokens": [15043, 29871]}    # not how "Hello" encodes
    ids = chat.encode([{"role": "user", "content": "Hi"}, reply, {"role": "user", "content": "Bye"}], tok)
    assert [15043, 29871] == ids[ids.index(15043):ids.index(15043) + 2]
    # a template that edits the reply cannot take its tokens: the edited text is tokenized
    trimming = ChatFormat.from_template("{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}")
    spaced = dict(reply, content=" Hello ")
    assert trimming.encode([spaced], tok) == tok.encode("[Hello]", bos=False)


# ----------------------------------------------------------------------------------------------
# Llama 2's format (llama2.c run.c's chat mode)

def test_llama2_format_is_runc_chat(tiny):
    tok = tiny.tokenizer
    llama2 = ChatFormat.llama2()
    conversation = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": " Hello!", "tokens": [15043, 29991]},
                    {"role": "user", "content": "Bye"}]
    first = "[INST] <<SYS>>\nYou are kind.\n<</SYS>>\n\nHi there [/INST]"
    assert llama2.render(conversation) == f"<s>{first} Hello! </s><s>[INST] Bye [/INST]"
    assert llama2.encode(conversation, tok) == (tok.encode(first, bos=True) + [15043, 29991, tok.eos_id]
                                                + tok.encode("[INST] Bye [/INST]", bos=True))
    # without a system prompt; a reply without tokens is encoded from its text
    no_system = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello!"}]
    assert llama2.render(no_system[:1]) == "<s>[INST] Hi [/INST]"
    assert llama2.encode(no_system, tok) == (tok.encode("[INST] Hi [/INST]", bos=True)
                                             + tok.encode("Hello!", bos=False) + [tok.eos_id])
    with pytest.raises(LlamarunError, match="in turn"):
        llama2.encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tok)


# ----------------------------------------------------------------------------------------------
# the session

def reply_of(stream):
    for _ in stream:
        pass
    return stream.completion


@pytest.mark.parametrize("chat", [ChatFormat.llama2(), ChatFormat.from_template(CHATML)], ids=["llama2", "chatml"])
def test_second_turn_prefills_only_its_new_tokens_and_matches_a_fresh_run(tiny, chat):
    session = ChatSession(tiny, chat, system="Be brief.", max_tokens=6, temperature=0)
    reply_of(session.send("Hello there"))
    old = list(session.cached_ids)
    second = reply_of(session.send("How are you?"))
    new = chat.encode(session.messages[:-1], tiny.tokenizer)          # the conversation as the 2nd turn saw it
    assert new[:len(old)] == old
    assert session.last_prefill_tokens == len(new) - len(old)
    assert session.messages[-1]["tokens"] == second.tokens
    # The same conversation from an empty cache, in one prefill: the cached turns were exact.
    fresh = ChatSession(tiny, chat, max_tokens=6, temperature=0, history=session.messages[:-2])
    again = reply_of(fresh.send("How are you?"))
    assert fresh.last_prefill_tokens == len(new)
    assert again.tokens == second.tokens
    assert tiny.generate(new, max_tokens=6, temperature=0).tokens == second.tokens


def test_a_template_that_rewrites_history_is_refilled_from_the_first_difference(tiny):
    # marks the last message: every turn changes what an earlier render said
    marking = ChatFormat.from_template("{% for m in messages %}{% if loop.last %}NOW {% endif %}"
                                       "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    session = ChatSession(tiny, marking, max_tokens=5, temperature=0)
    reply_of(session.send("one"))
    old = list(session.cached_ids)
    second = reply_of(session.send("two"))
    new = marking.encode(session.messages[:-1], tiny.tokenizer)
    assert new[:len(old)] != old
    assert len(new) - len(old) < session.last_prefill_tokens <= len(new)
    assert tiny.generate(new, max_tokens=5, temperature=0).tokens == second.tokens


def test_reset_starts_over_with_the_system_prompt(tiny):
    session = ChatSession(tiny, ChatFormat.llama2(), system="Be brief.", max_tokens=5, temperature=0)
    first = reply_of(session.send("Hello"))
    reply_of(session.send("More"))
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.cached_ids == []
    again = reply_of(session.send("Hello"))
    assert again.tokens == first.tokens
    assert session.last_prefill_tokens == len(ChatFormat.llama2().encode(session.messages[:-1], tiny.tokenizer))


def test_a_full_context_is_a_clear_error_and_the_session_goes_on(tiny):
    session = ChatSession(tiny, ChatFormat.llama2(), max_tokens=4, temperature=0)   # tiny_gqa: 128 positions
    with pytest.raises(ContextFull, match="context holds 128"):
        for _ in range(20):
            reply_of(session.send("tell me a long story about a cat"))
    turns = len(session.messages)
    with pytest.raises(ContextFull):
        session.send("again")
    assert len(session.messages) == turns         # the refused message is not in the conversation
    session.reset()
    reply_of(session.send("hello"))


def test_an_interrupted_reply_stays_in_the_conversation(tiny, monkeypatch):
    real = llamarun.chat.generate_stream

    def interrupted_after_3(*args, **kwargs):       # Ctrl-C while the 4th token is being computed
        def events():
            for n, event in enumerate(real(*args, **kwargs)):
                if n == 3:
                    raise KeyboardInterrupt
                yield event
        return events()

    session = ChatSession(tiny, ChatFormat.llama2(), max_tokens=8, temperature=0)
    monkeypatch.setattr(llamarun.chat, "generate_stream", interrupted_after_3)
    stream = session.send("Hello")
    with pytest.raises(KeyboardInterrupt):
        reply_of(stream)
    monkeypatch.undo()
    assert len(session.messages[-1]["tokens"]) == 3       # shown before the interrupt (greedy steps ran ahead)
    second = reply_of(session.send("Go on"))
    new = ChatFormat.llama2().encode(session.messages[:-1], tiny.tokenizer)
    assert tiny.generate(new, max_tokens=8, temperature=0).tokens == second.tokens


def test_a_reply_left_unfinished_is_recorded_before_the_next_turn(tiny):
    session = ChatSession(tiny, ChatFormat.llama2(), max_tokens=8, temperature=0)
    stream = session.send("Hello")
    next(iter(stream)), next(iter(stream))
    second = reply_of(session.send("Go on"))            # the first stream is closed and recorded first
    assert len(session.messages) == 4 and len(session.messages[1]["tokens"]) == 2
    new = ChatFormat.llama2().encode(session.messages[:-1], tiny.tokenizer)
    assert tiny.generate(new, max_tokens=8, temperature=0).tokens == second.tokens


# ----------------------------------------------------------------------------------------------
# the command

def chat_args(*extra):
    return ["chat", "-m", str(require(MODELS / "tiny_gqa.bin")), "-z", str(require(MODELS / "tokenizer.bin")),
            "-n", "6", "--temperature", "0", *extra]


def expected_reply(tiny, *messages, n=6):
    session = ChatSession(tiny, ChatFormat.llama2(), max_tokens=n, temperature=0)
    for message in messages:
        text = reply_of(session.send(message)).text
    return text.lstrip()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_chat_prompt_answers_one_message(tiny, capsys):
    assert main(chat_args("--prompt", "Hello")) == 0
    assert capsys.readouterr().out == expected_reply(tiny, "Hello") + "\n"


def test_chat_reads_one_message_per_stdin_line(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n  \nHow are you?\n/reset\nHello\n/exit\nignored\n"))
    assert main(chat_args()) == 0
    out = capsys.readouterr().out
    assert out.split("\n") == [expected_reply(tiny, "Hello"), expected_reply(tiny, "Hello", "How are you?"),
                               expected_reply(tiny, "Hello"), ""]
    assert "> " not in out


def test_chat_interactive_prompt_and_ctrl_c(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", Terminal("Hello\n/reset\nHello\n"))
    assert main(chat_args()) == 0                      # EOF ends the chat
    reply = expected_reply(tiny, "Hello")
    assert capsys.readouterr().out == f"> {reply}\n> > {reply}\n> \n"

    class CtrlCAtPrompt(Terminal):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", CtrlCAtPrompt())
    assert main(chat_args()) == 130


def test_chat_ctrl_c_during_a_reply_returns_to_the_prompt(tiny, capsys, monkeypatch):
    real = llamarun.chat.generate_stream
    calls = []

    def first_reply_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            return real(*args, **kwargs)

        def events():
            for n, event in enumerate(real(*args, **kwargs)):
                if n == 2:
                    raise KeyboardInterrupt
                yield event
        return events()

    monkeypatch.setattr(llamarun.chat, "generate_stream", first_reply_interrupted)
    monkeypatch.setattr("sys.stdin", Terminal("Hello\nGo on\n/exit\n"))
    assert main(chat_args()) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 3 and lines[0].startswith("> ") and lines[1].startswith("> ") and lines[2] == "> "
    assert lines[1] != "> "                           # the second message got its reply


def test_chat_context_full_says_reset_and_goes_on(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me a long story about a cat\n" * 12 + "/reset\nHi\n"))
    assert main(chat_args()) == 1                      # a message was refused: the script learns of it
    captured = capsys.readouterr()
    assert "context full: /reset to start over" in captured.err
    assert captured.out.count("\n") < 13 and captured.out.endswith("\n")
