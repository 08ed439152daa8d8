"""Attention emphasis (--emphasize WORD:FACTOR[@LAYERS]): parsing, the word's tokens, the law
m -> F*m / (F*m + 1 - m) at the first emphasised layer, FACTOR 1 = the plain run bit for bit, and a
large factor changing the continuation."""

import numpy as np
import pytest

import llamarun
from llamarun.cli import main
from llamarun.errors import LlamarunError
from llamarun.inspect.attention import AttentionRecorder
from llamarun.inspect.emphasis import emphasize, parse_emphasis, word_positions
from llamarun.model import Batch, KVCache, Probe

from conftest import MODELS, require

PROMPT = "The capital of France is a city that many people visit. The capital of Germany is"


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path)


@pytest.fixture(scope="module")
def tiny():
    return llamarun.load(require(MODELS / "tiny_gqa.bin"), tokenizer=require(MODELS / "tokenizer.bin"))


# ----------------------------------------------------------------------------------------------
# parsing

@pytest.mark.parametrize("spec, word, factor, layers", [
    ("France:5", "France", 5.0, None),
    ("France:0.5@0-3", "France", 0.5, [0, 1, 2, 3]),
    ("France:10@3,7,9", "France", 10.0, [3, 7, 9]),
    ("France:2@0-1,5", "France", 2.0, [0, 1, 5]),
    ("a:b:3", "a:b", 3.0, None),                         # the last ':' before the factor counts
    ("me@home:2", "me@home", 2.0, None),                 # an '@' inside the word is the word's
])
def test_parse(spec, word, factor, layers):
    e = parse_emphasis(spec, n_layers=30)
    assert (e.word, e.factor, e.layers) == (word, factor, layers)


@pytest.mark.parametrize("spec, message", [
    ("France", "expected WORD:FACTOR"),
    (":5", "expected WORD:FACTOR"),
    ("France:x", "is not a number"),
    ("France:0", "positive finite"),
    ("France:-2", "positive finite"),
    ("France:inf", "positive finite"),
    ("France:2@5-3", "the first layer comes first"),
    ("France:2@30", "layer 30 does not exist"),
])
def test_parse_errors(spec, message):
    with pytest.raises(LlamarunError, match=message):
        parse_emphasis(spec, n_layers=30)


def test_cli_errors_are_one_line(capsys, tiny):
    argv = ["generate", PROMPT, "-m", str(MODELS / "tiny_gqa.bin"), "-z", str(MODELS / "tokenizer.bin"), "-n", "2"]
    for spec, message in [("Paris:5", "'Paris' does not occur in the prompt"),
                          ("France:5@0-9", "layer 9 does not exist: the model has layers 0-2"),
                          ("France", "expected WORD:FACTOR")]:
        assert main(argv + ["--emphasize", spec]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llamarun: error:") and message in err


# ----------------------------------------------------------------------------------------------
# the word's tokens

@pytest.mark.parametrize("model", ["smol", "tiny"])
def test_word_positions(model, request):
    """The tokens found are exactly those whose text overlaps an occurrence of the word."""
    llama = request.getfixturevalue(model)
    ids = llama.encode(PROMPT)
    texts = [llama.decode([t]) if t != llama.tokenizer.bos_id else "" for t in ids]
    for word in ["capital", "France", "ital of Fr", "is"]:
        positions = word_positions(llama.tokenizer, ids, word)
        # every occurrence of the word in the text lies within the found tokens' texts, and each found
        # token shares characters with one: checked on character offsets of the plain concatenation
        starts = np.cumsum([0] + [len(t) for t in texts])
        text = "".join(texts)
        assert text.strip() == PROMPT
        occurrences = [i for i in range(len(text)) if text.startswith(word, i)]
        expected = [p for p in range(len(ids))
                    if any(starts[p] < at + len(word) and starts[p + 1] > at for at in occurrences)]
        assert positions == expected and positions
        assert "".join(texts[p] for p in positions).count(word.strip()) >= 1
    assert word_positions(llama.tokenizer, ids, "France") == [p for p, t in enumerate(texts) if "France" in t]


# ----------------------------------------------------------------------------------------------
# the law, FACTOR 1, the continuation

def run_recorded(llama, ids, n_prompt, emphasis: Probe | None = None):
    """Prefill ids[:n_prompt] in one batch (the serial kernel), then feed the rest one token per
    forward (the decode kernel), as generation does; record every attention weight (with the
    emphasis's bias, if given). -> ((L, H, T, T) weights, logits of every step)"""
    c = llama.config
    recorder = AttentionRecorder(c.n_layers, c.n_heads, len(ids))
    cache = KVCache(c)
    probe = Probe(attention=recorder, bias=emphasis.bias if emphasis is not None else None)
    logits = [llama.model.forward(Batch.sequence(ids[:n_prompt]), cache, probe)]
    for pos in range(n_prompt, len(ids)):
        logits.append(llama.model.forward(Batch.sequence(ids[pos:pos + 1], pos), cache, probe))
    return recorder.probs, np.concatenate(logits)


@pytest.fixture(scope="module")
def plain_runs():
    """Per model: the prompt, prompt + its greedy continuation, and the plain run's (weights, logits)."""
    runs = {}

    def plain_run(llama):
        if id(llama) not in runs:
            prompt = llama.encode(PROMPT)
            ids = prompt + llama.generate(prompt, 4, temperature=0).tokens   # rows from prefill and decoding
            runs[id(llama)] = prompt, ids, run_recorded(llama, ids, len(prompt))
        return runs[id(llama)]
    return plain_run


@pytest.mark.parametrize("model, spec, first", [("smol", "France:5@3-5", 3), ("tiny", "capital:0.2", 0),
                                                ("tiny", "France:20@1,2", 1)])
def test_emphasised_mass_follows_the_law(model, spec, first, request, plain_runs):
    llama = request.getfixturevalue(model)
    prompt, ids, (plain, _) = plain_runs(llama)
    emphasis, found = emphasize(llama, prompt, [spec])
    (e, positions), = found
    assert emphasis.bias[first].shape[0] > 0
    assert all(b.shape[0] == 0 for b in emphasis.bias[:first])
    emph, _ = run_recorded(llama, ids, len(prompt), emphasis)
    np.testing.assert_array_equal(emph[:first], plain[:first])         # layers before: untouched
    F = e.factor
    m = plain[first][..., positions].sum(-1)                            # (H, T): mass on the word, every head and query
    m_new = emph[first][..., positions].sum(-1)
    np.testing.assert_allclose(m_new, F * m / (F * m + 1 - m), rtol=0, atol=1e-5)
    after = np.arange(len(ids)) >= positions[0]
    assert np.abs(m_new - m)[:, after].max() > 0.01                     # and it did move the mass


@pytest.mark.parametrize("model", ["smol", "tiny"])
def test_factor_one_is_the_plain_run_bit_for_bit(model, request, plain_runs):
    llama = request.getfixturevalue(model)
    prompt, ids, (plain, plain_logits) = plain_runs(llama)
    ones, _ = emphasize(llama, prompt, ["France:1", "capital:1@0"])
    assert all(b.shape[0] > 0 for b in ones.bias)                      # the bias is added: zeros
    same, same_logits = run_recorded(llama, ids, len(prompt), ones)
    nearby, _ = emphasize(llama, prompt, ["France:1.001"])
    _, nearby_logits = run_recorded(llama, ids, len(prompt), nearby)
    assert np.array_equal(same_logits, plain_logits) and np.array_equal(same, plain)
    assert not np.array_equal(nearby_logits, plain_logits)             # the comparison can tell a tiny change


@pytest.mark.slow          # continuations on SmolLM2, layer by layer
def test_large_factor_changes_the_continuation(smol_path, capsys):
    """Through the command line, as a user runs it: greedy, with and without a strong emphasis."""
    argv = ["generate", "The capital of France is", "-n", "6", "--temperature", "0"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--emphasize", "France:1000"]) == 0
    emphasised = capsys.readouterr().out
    assert main(argv + ["--emphasize", "France:1"]) == 0
    assert capsys.readouterr().out == plain
    assert emphasised != plain and emphasised.startswith("The capital of France is")
