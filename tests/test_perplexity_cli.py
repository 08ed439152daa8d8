"""`llamarun perplexity FILE`: the reference's figure on SmolLM2, its chunking rule checked against an
independent computation, and one-line errors."""
import json
import re

import numpy as np
import pytest

import llamarun
from llamarun.cli import main

from conftest import GOLDEN, MODELS, require

REFERENCE = GOLDEN / "smollm2"


def ppl_printed(out: str) -> float:
    match = re.fullmatch(r"PPL = (\d+\.\d+)\n", out)       # stdout holds that line and nothing else
    assert match, out
    return float(match.group(1))


@pytest.mark.slow          # a whole text on SmolLM2 (one context: test_smollm2.py takes the API through both)
@pytest.mark.parametrize("ctx", [128])
def test_smollm2_matches_the_reference_within_half_a_percent(smol_path, capsys, ctx):
    text = require(REFERENCE / "ppl_text.txt")
    ref = json.loads((REFERENCE / "ppl_ref.json").read_text())
    assert main(["perplexity", str(text), "-m", str(smol_path), "--ctx", str(ctx), "--exact"]) == 0
    captured = capsys.readouterr()
    assert ppl_printed(captured.out) == pytest.approx(ref[f"ppl_ctx{ctx}"], rel=5e-3)
    assert f"{ref['n_tokens']} tokens, {ref[f'scored_ctx{ctx}']} scored" in captured.err


def test_chunks_are_scored_each_from_an_empty_cache(tmp_path, capsys):
    """Random weights, so the figure is only what the chunking rule makes it: recompute it with numpy
    from teacher-forced logits of each chunk (ctx 50 leaves a short last chunk)."""
    path = str(require(MODELS / "tiny_gqa.bin"))
    text = require(REFERENCE / "ppl_text.txt").read_text()[:600]
    m = llamarun.load(path, tokenizer=str(require(MODELS / "tokenizer.bin")))
    ids = m.tokenizer.encode(text, bos=False)
    assert len(ids) % 50 > 1
    nll = []
    for start in range(0, len(ids), 50):
        chunk = ids[start:start + 50]
        z = m.logits(chunk).astype(np.float64)[:-1]
        logp = z - z.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nll += list(-logp[np.arange(len(chunk) - 1), chunk[1:]])
    (tmp_path / "t.txt").write_text(text)
    assert main(["perplexity", str(tmp_path / "t.txt"), "-m", path, "-z", str(MODELS / "tokenizer.bin"),
                 "--ctx", "50"]) == 0
    assert ppl_printed(capsys.readouterr().out) == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)


@pytest.mark.parametrize("content, args, words", [
    (None, [], "no such file"),
    ("", [], "is empty"),
    ("  \n", [], "is empty"),
    ("Some text to score.", ["--ctx", "1"], "at least 2"),
    ("Some text to score.", ["--ctx", "129"], "exceeds the model's 128"),
    ("Hi", [], "too short"),
])
def test_errors_are_one_line(tmp_path, capsys, content, args, words):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content)
    assert main(["perplexity", str(path), "-m", str(require(MODELS / "tiny_gqa.bin")),
                 "-z", str(MODELS / "tokenizer.bin"), *args]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and words in err[0], captured.err
