"""The K-quant writer (llamarun/kquants.py and the mixes of llamarun/quantize.py) against independent
references:

- llama.cpp itself: tests/fixtures/kquants holds float inputs and what llama.cpp's `llama-quantize`
  made of them (README.md there gives the commands); our blocks must be its bytes, and for the
  _M mixes our choice of type must be its choice, tensor by tensor;
- the `gguf` package's dequantizers: they read our blocks back (the layout is ggml's) to values
  within what each type allows;
- SmolLM2 requantized to Q4_K_M by our writer: it loads, and its fast path stays within 2%
  perplexity and 90% top-1 agreement of its exact path (slow).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from llamarun import kquants
from llamarun.quantize import fallback_type, mix_type, quantize_matrix, use_more_bits

T = gguf.GGMLQuantizationType
FIXTURES = Path(__file__).parent / "fixtures" / "kquants"
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def read_tensors(path) -> dict:
    """name -> (type, data as stored: float values for F32/F16, block bytes (rows, row bytes) otherwise)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (T(t.tensor_type), np.array(t.data)) for t in reader.tensors}


def float_inputs(path) -> dict:
    """name -> float32 values (rows, n) of a float fixture."""
    return {name: data.astype(np.float32).reshape(-1, data.shape[-1]) for name, (_, data) in read_tensors(path).items()}


# ------------------------------------------------------------------------------------------------
# llama.cpp's bytes

@pytest.mark.parametrize("type_name", K_TYPES)
def test_blocks_are_llama_cpps(type_name):
    """Every super-block of blocks.f32.gguf (normal values, heavy tails, an all-zero block, one
    outlier, negative-only, constant, integer-valued, tiny values...) as llama-quantize --pure wrote it."""
    inputs = float_inputs(FIXTURES / "blocks.f32.gguf")
    theirs = read_tensors(FIXTURES / f"blocks.{type_name.lower()}.gguf")
    assert set(theirs) == set(inputs)
    for name, values in inputs.items():
        ggml_type, data = theirs[name]
        assert ggml_type == T[type_name], name
        ours = kquants.quantize(values, type_name)
        differing = np.nonzero((ours != data.reshape(ours.shape)).any(axis=1))[0]
        assert differing.size == 0, f"{name}: rows {differing.tolist()} differ from llama.cpp's"


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k"])
@pytest.mark.parametrize("model", ["mix", "mix-tied"])
def test_mix_types_and_bytes_are_llama_cpps(mix, model):
    """The type of every tensor in an 8-layer model as llama-quantize chose it for the mix (attn_v
    and ffn_down of use_more_bits' layers, the classifier, the tied embedding, the fallbacks of
    rows of 288 and 40 values), and its bytes (Q4_K/Q5_K/Q6_K ours, Q5_0/Q5_1/Q8_0 gguf's, F16)."""
    inputs = float_inputs(FIXTURES / f"{model}.f16.gguf")
    theirs = read_tensors(FIXTURES / f"{model}.{mix}.gguf")
    assert set(theirs) == set(inputs)
    has_output = "output.weight" in inputs
    for name, values in inputs.items():
        ggml_type, data = theirs[name]
        n_in = values.shape[1]
        assert fallback_type(mix_type(mix, name, n_in, 8, has_output), n_in) == ggml_type, name
        ours = quantize_matrix(values, ggml_type)
        assert ours.tobytes() == data.tobytes(), name


def test_the_mixes_cover_each_choice():
    """The fixture is worth something only if llama.cpp's choices there differ by tensor."""
    seen = {model: {t for t, _ in read_tensors(FIXTURES / f"{model}.q4_k_m.gguf").values()}
            for model in ("mix", "mix-tied")}
    assert seen["mix"] == {T.Q4_K, T.Q6_K}
    assert seen["mix-tied"] == {T.Q5_0, T.Q8_0, T.F16}
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


# ------------------------------------------------------------------------------------------------
# gguf's dequantizers read our blocks

# the error of Gaussian values, relative to their RMS, that each type stays under (4, 5, 6 bits)
RELATIVE_RMS_ERROR = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


@pytest.mark.parametrize("type_name", K_TYPES)
def test_gguf_dequantizes_our_blocks(type_name):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((48, 1024)) * 0.02).astype(np.float32)
    blocks = kquants.quantize(x, type_name)
    assert blocks.shape == (48, 4 * gguf.GGML_QUANT_SIZES[T[type_name]][1])
    back = gguf.quants.dequantize(blocks, T[type_name])
    assert back.shape == x.shape
    assert np.sqrt(np.mean((back - x) ** 2)) < RELATIVE_RMS_ERROR[type_name] * np.sqrt(np.mean(x ** 2))


@pytest.mark.parametrize("type_name", K_TYPES)
def test_hard_blocks_read_back_sensibly(type_name):
    """An all-zero super-block reads back as zeros, a constant one as about that constant, one with
    an outlier keeps the outlier, a negative-only one stays at or (within the rounding of its stored
    min) below zero."""
    from fixtures.kquants.make_inputs import hard_rows
    x = hard_rows(np.random.default_rng(5))
    back = gguf.quants.dequantize(kquants.quantize(x, type_name), T[type_name])
    assert np.all(back[0] == 0)
    assert np.allclose(back[4], 0.25, rtol=0.01)
    assert abs(back[2, 37] - 1.5) < 0.01 * 1.5 * 4
    assert back[1].max() <= 0.001 * np.abs(x[1]).max()      # up to the rounding of the stored min
    assert np.all(np.isfinite(back))


def test_a_q6_k_zero_block_is_all_zero_bytes():
    x = np.zeros((1, 512), np.float32)
    x[0, 256:] = 1.0
    blocks = kquants.quantize(x, "Q6_K").reshape(2, 210)
    assert not blocks[0].any() and blocks[1].any()


# ------------------------------------------------------------------------------------------------
# the float32 arithmetic the bit-exactness rests on

def test_nearest_int_rounds_half_to_even():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 7.5, -7.5, 1e6 + 0.5], np.float32)
    assert kquants.nearest_int(v).tolist() == [0, 2, 2, 0, -2, 2, 8, -8, 1000000]


def test_running_sum_adds_in_index_order():
    terms = np.random.default_rng(0).standard_normal((32, 500)).astype(np.float32) * 1e3
    expected = np.zeros(500, np.float32)
    for row in terms:
        expected = expected + row          # C's `s += t`, float32
    assert np.array_equal(kquants.running_sum(terms), expected)


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(np.zeros((2, 288), np.float32), "Q4_K")


# ------------------------------------------------------------------------------------------------
# SmolLM2 requantized to Q4_K_M by our writer: fast and exact paths agree

@pytest.fixture(scope="module")
def smol_q4_k_m(smol_path, tmp_path_factory):
    from llamarun.quantize import quantize
    out = tmp_path_factory.mktemp("kquants") / "smol.q4_k_m.gguf"
    # rows of 576 are not whole super-blocks: Q5_0 (Q4_K's fallback) there, Q8_0 for the tied
    # embedding and the attn_v Q6_K would have been; ffn_down (rows of 1536) Q4_K and Q6_K
    assert quantize(smol_path, out, "q4_k_m") == "GGUF, Q5_0 (166), Q4_K (16), Q8_0 (15), Q6_K (14), F32 (61)"
    return out


@pytest.mark.slow
def test_smol_q4_k_m_fast_path_stays_near_its_exact_path(smol_q4_k_m):
    import llamarun
    from conftest import GOLDEN, require
    from test_fast_path import perplexity_and_top1, teacher_forced_logits

    exact, fast = llamarun.load(smol_q4_k_m, exact=True), llamarun.load(smol_q4_k_m)
    # the fast path layer by layer: its one-call forward computes the same, bit for bit (test_step.py, whose
    # model has a Q5_0 matrix too), and compiling one for this mix of types would take a minute of CI
    assert fast.model.compiled_forward() is not None
    fast.model._compiled = None
    ids = exact.tokenizer.encode(require(GOLDEN / "smollm2" / "ppl_text.txt").read_text(), bos=False)
    # fed 128 tokens a forward: still the kernels' batches on the fast path (up to 128 rows), and few
    # forwards on the exact one
    (ppl_exact, top_exact) = perplexity_and_top1(teacher_forced_logits(exact, ids, step=128))
    (ppl_fast, top_fast) = perplexity_and_top1(teacher_forced_logits(fast, ids, step=128))
    assert ppl_fast == pytest.approx(ppl_exact, rel=0.02)
    assert (top_exact == top_fast).mean() >= 0.90
    # still the model it was: near the Q4_1 original's perplexity on this text, in chunks of 128
    original = json.loads(require(GOLDEN / "smollm2" / "ppl_ref.json").read_text())["ppl_ctx128"]
    assert ppl_exact < 1.15 * original
