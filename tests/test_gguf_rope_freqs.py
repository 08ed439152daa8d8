"""Llama 3.1's RoPE scaling in GGUF files as llama.cpp's converter writes them (a rope_freqs tensor),
and linear scaling (llama.rope.scaling.*), against transformers.

tests/fixtures/rope_freqs/llama3-rope.f16.gguf was made by llama.cpp's convert_hf_to_gguf.py from a
tiny LlamaForCausalLM with "llama3" scaling (README.md there). The reference model is rebuilt here
from the fixture's own tensors, read with the gguf package's GGUFReader and un-permuted (the inverse
of the converter's permute), under the HF config the fixture was made with: its weights are then the
file's exactly (F16 values widened to float32), whatever torch's initialisers do in another version,
and no HF checkpoint needs to be stored beside the fixture.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import logits_tolerance, require_module

torch = require_module("torch")
transformers = require_module("transformers")
gguf = require_module("gguf")

import llamarun                                                   # noqa: E402
from llamarun.config import llama3_rope_factors                  # noqa: E402
from llamarun.errors import LlamarunError                        # noqa: E402
from llamarun.formats import load_checkpoint                     # noqa: E402
from llamarun.formats.gguf import rope_scale                     # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "rope_freqs"
FIXTURE = FIXTURES / "llama3-rope.f16.gguf"
sys.path.insert(0, str(FIXTURES))
from make_hf_model import HPARAMS, ROPE_SCALING, VOCAB           # noqa: E402

N_TOKENS = 40          # past the original context of 32 the scaling was made for

HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from llama.cpp's
    interleaved pairs (x0, x_{D/2}, x1, ...) back to Hugging Face's halves."""
    return w.reshape(n_heads, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(path) -> dict:
    """The fixture's tensors under transformers' names, as float32 (rope_freqs left out: transformers
    computes its frequencies from the config)."""
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = values
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = values
        elif t.name.startswith("blk."):
            _, layer, kind, _ = t.name.split(".")
            if kind == "attn_q":
                values = unpermute(values, HPARAMS["num_attention_heads"])
            elif kind == "attn_k":
                values = unpermute(values, HPARAMS["num_key_value_heads"])
            state[f"model.layers.{layer}.{HF_NAMES[kind]}.weight"] = values
        else:
            assert t.name == "rope_freqs.weight", t.name
    return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in state.items()}


@pytest.fixture(scope="module")
def reference():
    config = transformers.LlamaConfig(vocab_size=VOCAB, rope_scaling=dict(ROPE_SCALING), **HPARAMS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").float().eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(FIXTURE), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}      # tied to the embedding
    return model


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(3).integers(0, VOCAB, N_TOKENS).tolist()


def test_rope_freqs_is_read_into_the_config(reference):
    config = load_checkpoint(FIXTURE).config
    factors = np.array(config.rope_factors)
    # transformers' own llama3 frequencies: default ones divided by the factors
    base = 1.0 / HPARAMS["rope_theta"] ** (np.arange(0, 16, 2) / 16)
    hf_factors = base / reference.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(factors, hf_factors, rtol=1e-6)
    np.testing.assert_allclose(factors, llama3_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 32), rtol=1e-6)
    assert factors[0] == 1.0 and 1.0 < factors[1] < 8.0 and set(factors[2:]) == {8.0}
    assert config.rope_scale == 1.0 and not config.rope_halves


def test_logits_equal_transformers(reference, ids):
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    got = llamarun.load(FIXTURE, exact=True).logits(ids)
    error = np.abs(got - expected).max(axis=-1)
    assert np.all(error <= logits_tolerance(expected, 1e-4)), error.max()
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("meta, scale", [
    ({}, 1.0),
    ({"llama.rope.scaling.type": "none"}, 1.0),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, 4.0),
    ({"llama.rope.scaling.factor": 2.0}, 2.0),                   # llama.cpp's default type is linear
    ({"llama.rope.scale_linear": 8.0}, 8.0),                     # the older key
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 1.0}, 1.0),
])
def test_linear_scaling(meta, scale):
    assert rope_scale("m.gguf", meta) == scale


@pytest.mark.parametrize("meta, words", [
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "'yarn'"),
    ({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 2.0}, "'longrope'"),
    ({"llama.rope.scaling.factor": -1.0}, "positive"),
])
def test_other_scaling_is_refused(meta, words):
    with pytest.raises(LlamarunError, match=words) as e:
        rope_scale("m.gguf", meta)
    assert "\n" not in str(e.value)


def test_quantize_keeps_rope_freqs(tmp_path):
    """llamarun quantize of a Llama 3.1-style file: rope_freqs goes through as F32, unchanged."""
    from llamarun.quantize import quantize
    out = tmp_path / "q8.gguf"
    quantize(FIXTURE, out, "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    source = {t.name: t for t in gguf.GGUFReader(FIXTURE).tensors}
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(tensors["rope_freqs.weight"].data, source["rope_freqs.weight"].data)
    assert load_checkpoint(out).config.rope_factors == load_checkpoint(FIXTURE).config.rope_factors
