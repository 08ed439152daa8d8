"""Confidence figures of generated tokens, held to an independent numpy computation on the model's
teacher-forced logits of the walked ids, and the sampling probability to a hand-computed distribution."""
import json
import re

import numpy as np
import pytest

import llamarun
from llamarun.cli import main

from conftest import MODELS, require

FIELDS = {"token", "text", "prob", "sampled_prob", "margin", "margin2", "entropy", "top"}


@pytest.fixture(scope="module")
def s260():
    return llamarun.load(require(MODELS / "stories260K.bin"))


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path, exact=True)


def decode_logits(m, out):
    """The logits each new token was drawn from, recomputed in one teacher-forced pass.  (n_new, vocab)"""
    walked = out.prompt_tokens + out.tokens
    first = len(out.prompt_tokens) - 1
    return m.logits(walked)[first:first + len(out.tokens)].astype(np.float64)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def check_model_figures(conf, row, top=5):
    """prob, margins, entropy and top-k of one token against plain numpy on its logits row."""
    p = softmax(row)
    ordered = np.sort(row)[::-1]
    assert conf.prob == pytest.approx(p[conf.token], rel=1e-4, abs=1e-7)
    assert conf.margin == pytest.approx(ordered[0] - ordered[1], abs=1e-3)
    assert conf.margin2 == pytest.approx(ordered[0] - ordered[2], abs=1e-3)
    assert conf.entropy == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4)
    assert [a.token for a in conf.top] == list(np.argsort(-row, kind="stable")[:top])
    assert [a.prob for a in conf.top] == pytest.approx(p[np.argsort(-row, kind="stable")[:top]], rel=1e-4)


def test_figures_equal_numpy_and_a_hand_made_top_k_distribution(s260):
    temperature, k = 0.9, 12
    out = s260.generate([1, 300, 400], 16, temperature=temperature, top_k=k, top_p=1.0, min_p=0.0, seed=7,
                        confidence=True)
    assert len(out.confidence) == len(out.tokens) > 0
    for conf, token, row in zip(out.confidence, out.tokens, decode_logits(s260, out)):
        assert conf.token == token
        check_model_figures(conf, row)
        # the sampler's distribution, by hand: softmax of logits / T over the k largest only
        kept = np.argsort(-row)[:k]
        sampled = np.zeros_like(row)
        sampled[kept] = softmax(row[kept] / temperature)
        assert conf.sampled_prob == pytest.approx(sampled[token], rel=1e-4)
        assert [a.sampled_prob for a in conf.top] == pytest.approx(sampled[[a.token for a in conf.top]],
                                                                   rel=1e-4, abs=1e-9)
        assert token in kept


def test_sampled_probability_follows_the_repeat_penalty(s260):
    penalty = 1.5
    out = s260.generate([1, 300, 400], 12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                        repeat_penalty=penalty, seed=3, confidence=True)
    history = list(out.prompt_tokens)
    for conf, row in zip(out.confidence, decode_logits(s260, out)):
        z = row.copy()
        for t in set(history):                          # llama.cpp: divide positive, multiply negative
            z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
        assert conf.sampled_prob == pytest.approx(softmax(z)[conf.token], rel=1e-4)
        assert conf.prob == pytest.approx(softmax(row)[conf.token], rel=1e-4)   # the model's own: unpenalised
        history.append(conf.token)


def test_greedy_is_one_hot_and_events_carry_the_figures(smol):
    stream = smol.stream("The capital of France is", 8, temperature=0, confidence=True)
    events = [e for e in stream if e.token is not None]
    out = stream.completion
    assert [e.confidence for e in events] == out.confidence
    for conf, row in zip(out.confidence, decode_logits(smol, out)):
        check_model_figures(conf, row)
        assert conf.token == int(np.argmax(row)) and conf.sampled_prob == 1.0
        assert conf.top[0].token == conf.token and conf.top[0].sampled_prob == 1.0
        assert all(a.sampled_prob == 0.0 for a in conf.top[1:])
    assert "".join(c.text for c in out.confidence) == out.text
    assert smol.generate("Hi", 3, temperature=0).confidence == []     # only when asked


def test_cli_writes_one_json_object_per_token(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "conf.json"
    assert main(["generate", "-m", str(require(MODELS / "stories260K.bin")), "--ids", "-n", "10",
                 "--seed", "5", "--confidence-json", str(target)]) == 0
    walked = json.loads(capsys.readouterr().out)
    figures = json.loads(target.read_text())
    assert [f["token"] for f in figures] == [t for t in walked[1:] if t != 2][:len(figures)]
    assert len(figures) in (len(walked) - 1, len(walked) - 2)          # minus an end token, if drawn
    for f in figures:
        assert set(f) == FIELDS and f["text"] is None                   # no tokenizer: ids only
        assert 0 < f["prob"] <= 1 and 0 < f["sampled_prob"] <= 1 and 0 <= f["margin"] <= f["margin2"]
        assert len(f["top"]) == 5 and set(f["top"][0]) == {"token", "text", "prob", "sampled_prob"}


def test_cli_colours_only_on_a_terminal(smol_path, monkeypatch, capsys):
    args = ["generate", "The capital of France is", "-m", str(smol_path), "-n", "6", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--confidence"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "\x1b[" not in captured.out   # not a TTY: the same text, no escapes
    assert "green" in captured.err                                  # the legend
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(args + ["--confidence"]) == 0
    coloured = capsys.readouterr().out
    assert "\x1b[32m" in coloured                                   # ' Paris' (p ~ 0.78) is green
    assert strip_ansi(coloured) == plain


def strip_ansi(s):
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def test_cli_refuses_an_unwritable_json_path(tmp_path, capsys):
    assert main(["generate", "-m", str(require(MODELS / "stories260K.bin")), "--ids", "-n", "2",
                 "--confidence-json", str(tmp_path / "no" / "such" / "dir.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
