"""The logit lens: its last layer is the model's own logits, and the reading after layer k is the
logits of the same model cut to its first k + 1 layers."""
import dataclasses

import numpy as np
import pytest

import llamarun
from llamarun.cli import main
from llamarun.inspect.lens import logit_lens
from llamarun.model import Batch, KVCache, Transformer

from conftest import MODELS, require

IDS = [1, 300, 400, 17, 250, 90, 3]


@pytest.fixture(scope="module")
def s260():
    return llamarun.load(require(MODELS / "stories260K.bin"))


def close(a, b, scale=1e-4):
    return np.abs(a - b).max() <= scale * (1 + np.abs(b).max())


@pytest.mark.parametrize("pos", [None, 0, 3, -2])
def test_last_layer_is_the_models_logits(s260, pos):
    lens = logit_lens(s260.model, IDS, pos, top=4)
    at = len(IDS) - 1 if pos is None else pos % len(IDS)
    assert lens.pos == at and len(lens.layers) == s260.config.n_layers
    logits = s260.logits(IDS)[at]                                     # (vocab,)
    assert close(lens.logits[-1], logits)
    assert lens.layers[-1].tokens == list(np.argsort(-logits, kind="stable")[:4])
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert lens.layers[-1].probs == pytest.approx(p[lens.layers[-1].tokens], rel=1e-4)


def test_each_layer_reads_what_a_model_cut_after_it_outputs(s260):
    lens = logit_lens(s260.model, IDS)
    for layer in range(s260.config.n_layers - 1):
        cut = Transformer(dataclasses.replace(s260.config, n_layers=layer + 1), s260.model.w)
        truncated = cut.forward(Batch.sequence(IDS), KVCache(cut.config, seq_len=len(IDS)))[-1]
        assert close(lens.logits[layer], truncated)
    assert not close(lens.logits[0], lens.logits[-1])                  # the layers do differ


@pytest.mark.slow          # the CLI on SmolLM2
def test_smollm2_lens_cli_table(smol_path, capsys):
    m = llamarun.load(smol_path, exact=True)
    ids = m.encode("The capital of France is")
    lens = logit_lens(m.model, ids)
    assert close(lens.logits[-1], m.logits(ids)[-1], 1e-3)
    assert main(["lens", "The capital of France is", "-m", str(smol_path), "--exact", "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == m.config.n_layers                              # one row per layer, none wrapped
    best = m.tokenizer.token_bytes(int(np.argmax(m.logits(ids)[-1]))).decode()
    assert rows[-1].split("│")[2].strip().startswith(repr(best))


@pytest.mark.parametrize("args, words", [
    (["--pos", "5"], "position 5 is outside the prompt's 5 tokens"),
    (["--pos", "-6"], "position -6"),
    (["--top", "0"], "--top"),
])
def test_lens_errors_are_one_line(smol_path, capsys, args, words):
    assert main(["lens", "The capital of France is", "-m", str(smol_path), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
