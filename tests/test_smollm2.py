"""The default model, SmolLM2-135M-Instruct Q4_1 (GGUF), against Hugging Face transformers (float32,
weights dequantized from the same GGUF): prompt ids, last-position logits, greedy continuations and
perplexity. References in ../shared/golden/smollm2."""
import json

import numpy as np
import pytest

import llamarun
from llamarun.chat import chat_format_for
from llamarun.inspect.perplexity import perplexity

from conftest import GOLDEN, require

REFERENCE = GOLDEN / "smollm2"


def cases():
    path = REFERENCE / "smol_hf.json"
    return json.loads(path.read_text()) if path.exists() else [{"i": 0}]


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path, exact=True)      # the reference arithmetic


def prompt_text(llama, case) -> str:
    """The case's input as text: a plain prompt, or chat messages rendered by the GGUF's template."""
    if isinstance(case["input"], str):
        return case["input"]
    return chat_format_for(llama).render(case["input"])


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"case{c['i']}")
def test_prompt_text_and_ids_equal_the_reference(smol, case):
    require(REFERENCE / "smol_hf.json")
    text = prompt_text(smol, case)
    assert text == case["text"]
    assert smol.encode(text) == case["ids"]


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"case{c['i']}")
def test_last_position_logits_within_2e_3(smol, case):
    ref = np.load(require(REFERENCE / f"smol_{case['i']}.last_logits.npy"))
    ours = smol.logits(case["ids"])[-1]
    assert np.abs(ours - ref).max() <= 2e-3
    assert ours.argmax() == ref.argmax()


@pytest.mark.slow          # long continuations on SmolLM2
@pytest.mark.parametrize("case", cases(), ids=lambda c: f"case{c['i']}")
def test_greedy_continuation_equals_the_reference(smol, case):
    greedy = case["greedy"]
    out = smol.generate(case["ids"], len(greedy), temperature=0)
    walked = out.tokens + ([out.end_token] if out.end_token is not None else [])
    assert walked == greedy
    if greedy[-1] == 2:          # the reference stopped at <|im_end|>, the GGUF's EOS: so must we
        assert out.finish_reason == "stop" and out.end_token == 2


@pytest.mark.parametrize("ctx", [128, 256])
def test_perplexity_within_half_a_percent(smol, ctx):
    text = require(REFERENCE / "ppl_text.txt").read_text()
    ref = json.loads((REFERENCE / "ppl_ref.json").read_text())
    ids = smol.tokenizer.encode(text, bos=False)
    assert len(ids) == ref["n_tokens"]
    result = perplexity(smol.model, ids, ctx)
    assert result.scored == ref[f"scored_ctx{ctx}"]
    assert result.ppl == pytest.approx(ref[f"ppl_ctx{ctx}"], rel=5e-3)
