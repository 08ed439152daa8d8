"""The fast path (int8 activations in the decode step, as llama.cpp) held to the exact path on SmolLM2:
perplexity of ../shared/golden/smollm2/ppl_text.txt within 2%, teacher-forced top-1 agreement >= 90%.

The fast path runs the text teacher-forced in steps of 8 tokens: batches that small go through the
matrix-vector kernels, where the two paths differ. The exact path runs it a chunk per forward: the
same float32 arithmetic as its own kernels (tests/test_kernels.py holds them to it), in BLAS
products, as its 8-row steps take a minute on 2 cores."""
import numpy as np
import pytest

import llamarun
from llamarun.logprobs import token_nll
from llamarun.model import Batch
from llamarun.tensors import MATVEC_ROWS

from conftest import GOLDEN, require

pytestmark = pytest.mark.slow          # a whole text on SmolLM2, twice

CTX = 128


def teacher_forced_logits(llama, ids, ctx=CTX, step=MATVEC_ROWS):
    """Logits of every position, chunk by chunk (each from an empty cache), fed `step` tokens at a time."""
    chunks = []
    for start in range(0, len(ids), ctx):
        chunk = ids[start:start + ctx]
        cache = llama.model.new_cache(seq_len=len(chunk))   # the fast path's own: half precision
        rows = [llama.model.forward(Batch.sequence(chunk[s:s + step], s, all_logits=True), cache)
                for s in range(0, len(chunk), step)]
        chunks.append((chunk, np.concatenate(rows)))
    return chunks


def perplexity_and_top1(chunks):
    nll = np.concatenate([token_nll(logits[:-1], chunk[1:]) for chunk, logits in chunks])
    top1 = np.concatenate([logits[:-1].argmax(axis=-1) for _, logits in chunks])
    return float(np.exp(nll.mean())), top1


@pytest.fixture(scope="module")
def runs(smol_path):
    exact, fast = llamarun.load(smol_path, exact=True), llamarun.load(smol_path)   # fast is the default
    ids = exact.tokenizer.encode(require(GOLDEN / "smollm2" / "ppl_text.txt").read_text(), bos=False)
    return teacher_forced_logits(exact, ids, step=CTX), teacher_forced_logits(fast, ids)


def test_the_paths_really_differ(runs):
    exact, fast = runs
    difference = max(np.abs(e - f).max() for (_, e), (_, f) in zip(exact, fast))
    assert difference > 1e-3          # int8 activations do move the logits


def test_fast_perplexity_within_2_percent_of_exact(runs):
    (ppl_exact, _), (ppl_fast, _) = perplexity_and_top1(runs[0]), perplexity_and_top1(runs[1])
    assert ppl_fast == pytest.approx(ppl_exact, rel=0.02)


def test_fast_top1_agrees_with_exact_on_90_percent_of_positions(runs):
    (_, top_exact), (_, top_fast) = perplexity_and_top1(runs[0]), perplexity_and_top1(runs[1])
    assert (top_exact == top_fast).mean() >= 0.90
