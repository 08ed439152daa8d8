"""Q2_K and Q3_K on the exact kernels (kernels/ggml.py): they have no fast (int8) kernel, so both
arithmetics compute their products with the exact ones (a decode-sized x) or the tile decoder and
BLAS (a prompt), never with gguf's numpy dequantizer on the way.

The references are gguf's: `gguf.quants.dequantize` bit for bit for the decoded weights, and a float64
product of its dequantization for the products, within the float32 summation bound of
tests/test_kernels.py (K * 2^-24 * sum_i |x_i w_i| per output).
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

import llamarun
from llamarun import tensors
from llamarun.formats import load_checkpoint
from llamarun.kernels import ggml
from llamarun.model import Batch, Transformer, linear3, silu
from llamarun.plan import MATVEC_ROWS, choose_plan
from llamarun.tensors import GGMLTensor

from conftest import logits_tolerance
from test_gguf_format import write_model
from test_kernels import U, random_blocks, reference

TYPES = [T.Q2_K, T.Q3_K]
ids = pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)


@ids
@pytest.mark.parametrize("n_in", [256, 768])
def test_dequantize_rows_bit_for_bit(qtype, n_in):
    rng = np.random.default_rng(int(qtype) + n_in)
    raw = random_blocks(qtype, 19, n_in, rng)
    ours = np.full((19, n_in), np.nan, np.float32)
    ggml.dequantize_rows(int(qtype), raw, ours)
    theirs = quants.dequantize(raw, qtype).reshape(19, n_in)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@ids
def test_the_types_are_exact_kernel_types_only(qtype):
    """No int8 kernel and no group kernel: the one-call forward and the plan rely on KERNEL_TYPES."""
    assert qtype in tensors.EXACT_KERNEL_TYPES
    assert qtype not in tensors.KERNEL_TYPES and qtype not in tensors.GROUP_KERNEL_TYPES


@ids
@pytest.mark.parametrize("rows", [37, 100])        # 37 tasks of one row; 100 rows in 64 uneven tasks
@pytest.mark.parametrize("n", [1, 3, 4, 5, 8])     # four rows of x at a time, then the rest one by one
def test_matvec_exact_equals_dequantize_then_matmul(qtype, rows, n):
    rng = np.random.default_rng(int(qtype) * 1000 + 10 * rows + n)
    raw = random_blocks(qtype, rows, 512, rng)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    ref, magnitudes, _ = reference(qtype, raw, x)
    out = np.full((n, rows), np.nan, np.float32)
    ggml.matvec_exact(int(qtype), raw, x, out)
    assert np.all(np.abs(out - ref) <= 512 * U * magnitudes)


@ids
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("n", [1, 8, 9, 40])
def test_tensor_products_on_both_arithmetics(qtype, exact, n):
    """Up to MATVEC_ROWS rows on the exact kernels, on either arithmetic; more, tiles decoded by the
    kernels' decoder into BLAS (gguf's dequantizer would fail here)."""
    rng = np.random.default_rng(int(qtype) * 100 + n)
    rows = 1000                                 # the tiles: 512 rows at 512 inputs, and a rest
    raw = random_blocks(qtype, rows, 512, rng)
    tensor = GGMLTensor("w", qtype, (rows, 512), raw, exact=exact)
    tensor._dequantize_rows = None              # a call would fail
    assert not tensor.int8_kernels and tensor._tile_rows < rows
    x = rng.standard_normal((n, 512)).astype(np.float32)
    assert tensor.on_kernels(x) == (n <= MATVEC_ROWS)
    ref, magnitudes, _ = reference(qtype, raw, x)
    out = tensor.linear(x)
    assert out.dtype == np.float32 and out.shape == (n, rows)
    assert np.all(np.abs(out - ref) <= 512 * U * magnitudes)


def test_fused_products_on_the_fast_path():
    """A fast Q2_K / Q3_K matrix fuses with others on the exact kernels (the same values as one at a
    time, bit for bit), never with an int8 one (whose fused call would read it as an int8 type)."""
    rng = np.random.default_rng(4)
    make = lambda qtype, rows: GGMLTensor("w", qtype, (rows, 512), random_blocks(qtype, rows, 512, rng), exact=False)
    wq, wk, wv = make(T.Q3_K, 64), make(T.Q2_K, 32), make(T.Q3_K, 32)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    assert tensors.fusable(x, wq, wk, wv)
    for fused, w in zip(linear3(x, wq, wk, wv), (wq, wk, wv)):
        assert np.array_equal(fused, w.linear(x))
    w1, w3 = make(T.Q2_K, 48), make(T.Q3_K, 48)
    assert tensors.fusable(x, w1, w3)
    expected = silu(w1.linear(x)) * w3.linear(x)                  # exp's last bit may differ: a tolerance
    np.testing.assert_allclose(tensors.swiglu(x, w1, w3), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    q4k = make(T.Q4_K, 32)
    assert q4k.int8_kernels and not tensors.fusable(x, wq, q4k, wv)
    for fused, w in zip(linear3(x, wq, q4k, wv), (wq, q4k, wv)):
        assert np.array_equal(fused, w.linear(x))


# A small model in the types of a Q3_K_M file: Q3_K matrices, a Q4_K attn_v, a Q2_K ffn_down and a
# Q6_K embedding (the classifier too).
MIXED = {"blk.1.attn_v.weight": T.Q4_K, "blk.0.ffn_down.weight": T.Q2_K, "token_embd.weight": T.Q6_K}


@pytest.fixture(scope="module")
def q3_k_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("q3k") / "q3_k_m.gguf"
    write_model(path, T.Q3_K, types=MIXED)
    return path


def test_the_plan_of_a_q3_k_model(q3_k_model):
    """The one-call forward is left out (it computes with the int8 kernels only) and the plan says why;
    decode-sized batches run layer by layer on the matrix-vector kernels."""
    plan = llamarun.load(q3_k_model).plan
    assert plan.arithmetic == "fast" and plan.compiled_rows == 0
    assert "Q2_K, Q3_K matrices have no fast kernel" in plan.compiled_reason
    assert plan.forward_for(1) == "layers (matvec kernels)" and plan.forward_for(40) == "layers (BLAS)"


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_a_q3_k_model_computes_as_its_dequantized_weights(q3_k_model, exact):
    """A prompt (tiles into BLAS) then a decode step (the kernels), against a float32 model of gguf's
    dequantization of the same weights: the exact path within float32 summation error, the fast one
    within what its int8 activations (the Q4_K and Q6_K matrices) and half-precision cache move."""
    checkpoint = load_checkpoint(q3_k_model)
    def floats(tensor):
        if not isinstance(tensor, GGMLTensor):
            return tensor
        values = tensor.dequantize()
        values.flags.writeable = False    # as a file's map: the float32 forward the compile step compiled
        return values

    weights, config = checkpoint.weights, checkpoint.config
    dequantized = {name: [floats(t) for t in value] if isinstance(value, list) else floats(value)
                   for name, value in weights.items()}
    reference_model = Transformer(config, dequantized)
    model = Transformer(config, weights, choose_plan(config, weights, exact))
    tokens = [(11 * i + 5) % config.vocab_size for i in range(13)]
    results = []
    for m in (reference_model, model):
        cache = m.new_cache(seq_len=16)
        prompt = m.forward(Batch.sequence(tokens[:12], 0, all_logits=True), cache)
        step = m.forward(Batch.sequence(tokens[12:], 12), cache)
        results.append(np.concatenate([prompt, step]))
    ref, out = results
    assert np.all(np.isfinite(out))
    scale = 1e-5 if exact else 3e-2
    assert np.all(np.abs(out - ref) <= logits_tolerance(ref, scale)[:, None])
