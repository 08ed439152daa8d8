"""The native quantized kernels (llamarun/kernels/ggml.py) and GGMLTensor.linear, against gguf.

Weights are random but valid blocks, built as raw bytes: random quants, and small finite f16 scales
(a random byte pair could be inf or NaN). The reference is gguf.quants.dequantize, then a float64
product, so that what is measured is only our error.

Tolerances, from the formats:
- exact: the kernels decode each weight to the same float32 value as gguf (checked bit for bit
  below), so the only difference from dequantize-then-matmul is the order and rounding of the float32
  sum. A float32 sum of K products, in any order, is within K * 2^-24 * sum_i |x_i w_i| of the true
  sum (the standard gamma_K bound, K u / (1 - K u) ~ K u here); that is the tolerance per output.
- fast: each activation block of 32 is replaced by d_x * round(x / d_x), off by at most d_x / 2 per
  value (plus float rounding of x * (1 / d_x), below 1e-4 d_x), so an output moves by at most
  sum over blocks of d_x (1/2 + 1e-4) sum_block |w|, plus the float32 summation bound as above.
  An adversarial x (every value just short of a rounding half-step, with the sign of its weight)
  reaches 98% of it: the bound is not loose.
"""
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from llamarun.kernels import ggml as kernels
from llamarun.tensors import GGMLTensor

U = 2.0 ** -24          # float32 unit roundoff

# block values, block bytes, byte offsets of the f16 scales in a block (ggml-common.h)
LAYOUTS = {
    T.Q8_0: (32, 34, [0]),
    T.Q4_0: (32, 18, [0]),
    T.Q4_1: (32, 20, [0, 2]),
    T.Q4_K: (256, 144, [0, 2]),      # d, dmin; then 12 bytes of 6-bit scales/mins, 128 of nibbles
    T.Q5_K: (256, 176, [0, 2]),      # as Q4_K, with 32 bytes of high bits before the nibbles
    T.Q6_K: (256, 210, [208]),       # 128 bytes ql, 64 qh, 16 int8 scales, then d
    T.Q2_K: (256, 84, [80, 82]),     # 16 bytes of 4-bit scales and mins, 64 of 2-bit quants, d, dmin
    T.Q3_K: (256, 110, [108]),       # 32 bytes hmask, 64 of 2-bit quants, 12 of 6-bit scales, then d
    T.Q5_0: (32, 22, [0]),           # d, 4 bytes of fifth bits, 16 of nibbles
    T.Q5_1: (32, 24, [0, 2]),        # d, m, then as Q5_0
    T.F16: (1, 2, []),
}
KERNELS = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.Q5_1]   # Q5_0's, Q5_1's repacked (TRANSCODED)


def random_blocks(qtype, rows: int, n_in: int, rng, scale: float = 0.01) -> np.ndarray:
    """(rows, bytes per row) uint8 of valid random blocks: random bytes for the quants, small finite
    f16 scales of either sign (ggml's mins are negative as often as not)."""
    values, size, scale_offsets = LAYOUTS[qtype]
    blocks = rng.integers(0, 256, (rows, n_in // values, size), dtype=np.uint8)
    if qtype == T.F16:
        blocks[...] = rng.standard_normal((rows, n_in, 1)).astype(np.float16).view(np.uint8).reshape(blocks.shape)
    for offset in scale_offsets:
        d = (rng.uniform(-1, 1, blocks.shape[:2]) * scale).astype(np.float16)
        blocks[..., offset:offset + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    raw = blocks.reshape(rows, -1)
    raw.flags.writeable = False             # as a file's map (and GGMLTensor's view): one compilation
    return raw


def reference(qtype, raw, x):
    """x @ W.T with W = gguf's dequantization, in float64, and sum_i |x_i| |w_i| per output."""
    w = quants.dequantize(raw, qtype).reshape(raw.shape[0], -1).astype(np.float64)
    return x.astype(np.float64) @ w.T, np.abs(x).astype(np.float64) @ np.abs(w).T, w


def quantized_activations(x):
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    xsum = np.empty(xd.shape, np.int32)
    kernels.quantize_activations(x, xq, xd, xsum)
    return xq, xd, xsum


def fast_bound(x, w, magnitudes):
    """The bound of the module docstring on |fast - exact| per output (n, out)."""
    n, n_in = x.shape
    xd = np.abs(x).reshape(n, -1, 32).max(axis=-1) / 127                      # (n, blocks)
    w_block = np.abs(w).reshape(w.shape[0], -1, 32).sum(axis=-1)              # (out, blocks)
    return xd @ w_block.T * (0.5 + 1e-4) + 2 * n_in * U * magnitudes


@pytest.mark.parametrize("qtype", KERNELS, ids=lambda t: t.name)
def test_dequantize_rows_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 19, 512, rng)
    ours = np.full((19, 512), np.nan, np.float32)
    kernels.dequantize_rows(int(qtype), raw, ours)
    theirs = quants.dequantize(raw, qtype).reshape(19, 512)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("n", [1, 3, 8, 40])
@pytest.mark.parametrize("qtype", KERNELS, ids=lambda t: t.name)
def test_exact_equals_dequantize_then_matmul(qtype, n):
    rng = np.random.default_rng(int(qtype) * 100 + n)
    raw = random_blocks(qtype, 37, 512, rng)                 # an odd row count: uneven tasks
    x = rng.standard_normal((n, 512)).astype(np.float32)
    ref, magnitudes, _ = reference(qtype, raw, x)
    out = GGMLTensor("w", qtype, (37, 512), raw, exact=True).linear(x)
    assert out.dtype == np.float32 and out.shape == (n, 37)
    assert np.all(np.abs(out - ref) <= 512 * U * magnitudes)


@pytest.mark.parametrize("n", [1, 3, 40])
@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_half_precision_matrices_multiply_as_stored(qtype, n):
    """F16 and BF16 matrices stay 2 bytes a weight: a decode step's product (kernels/matvec.py's
    matvec_half, n = 1, 3) and a prompt's (tiles widened for BLAS, n = 40) equal x @ W.T with W as
    gguf's dequantizer widens it, to float32's rounding of the sum, each row of x as it would be alone
    (speculative decoding's verify forward relies on it); `rows` is gguf's bit for bit."""
    rng = np.random.default_rng(int(qtype) + n)
    w = rng.standard_normal((37, 512)).astype(np.float32)
    if qtype == T.F16:
        raw = w.astype(np.float16).view(np.uint8)
    else:
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)      # truncated to bf16
    raw.flags.writeable = False
    x = rng.standard_normal((n, 512)).astype(np.float32)
    ref, magnitudes, _ = reference(qtype, raw, x)
    tensor = GGMLTensor("w", qtype, (37, 512), raw)
    assert tensor.on_kernels(x) == (n <= 8) and tensor.nbytes == 37 * 512 * 2
    out = tensor.linear(x)
    assert out.dtype == np.float32 and out.shape == (n, 37)
    assert np.all(np.abs(out - ref) <= 512 * U * magnitudes)
    if n <= 8:                              # a row's result does not depend on the rows beside it
        assert np.array_equal(out, np.concatenate([tensor.linear(x[j:j + 1]) for j in range(n)]))
    theirs = quants.dequantize(raw, qtype).reshape(37, 512)
    assert np.array_equal(tensor.rows(np.arange(37)), theirs)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("qtype", KERNELS, ids=lambda t: t.name)
def test_fast_within_activation_rounding(qtype, n):
    rng = np.random.default_rng(int(qtype) * 1000 + n)
    raw = random_blocks(qtype, 37, 512, rng)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    ref, magnitudes, w = reference(qtype, raw, x)
    out = GGMLTensor("w", qtype, (37, 512), raw, exact=False).linear(x)
    bound = fast_bound(x, w, magnitudes)
    assert np.all(np.abs(out - ref) <= bound)
    # and the int8 activations are what moved it: the fast path equals the product of the
    # dequantized int8 activations within float32 summation error
    xq, xd, _ = quantized_activations(x)
    x_dq = (xq.reshape(n, -1, 32) * xd[..., None].astype(np.float64)).reshape(n, 512)
    assert np.all(np.abs(out - x_dq @ w.T) <= 2 * 512 * U * (np.abs(x_dq) @ np.abs(w).T))


@pytest.mark.parametrize("qtype", KERNELS, ids=lambda t: t.name)
def test_fast_bound_is_reached_by_adversarial_activations(qtype):
    """x chosen against output row 0: every value 0.49 step off the int8 grid, towards the sign of its
    weight, so every rounding error adds up. The error then reaches ~98% of the bound."""
    rng = np.random.default_rng(7)
    raw = random_blocks(qtype, 5, 512, rng)
    w0 = quants.dequantize(raw, qtype).reshape(5, 512)[0].astype(np.float64)
    d = np.float32(0.01)
    steps = rng.integers(-100, 100, 512).astype(np.float64)
    x = (d * (steps + 0.49 * np.sign(w0))).astype(np.float32)
    x[::32] = 127 * d                          # each block's max sets d_x = d (its error is 0)
    ref, magnitudes, w = reference(qtype, raw, x[None])
    out = GGMLTensor("w", qtype, (5, 512), raw, exact=False).linear(x[None])
    bound = fast_bound(x[None], w, magnitudes)
    assert abs(out[0, 0] - ref[0, 0]) <= bound[0, 0]
    assert abs(out[0, 0] - ref[0, 0]) >= 0.9 * bound[0, 0]


def test_q5_1_packs_its_values_a_byte_each():
    """TRANSCODED: Q5_1's blocks rewritten as d, m and the 32 values a byte each: d * v + m gives gguf's
    weights, bit for bit (the product rounded to float32, then m added)."""
    rng = np.random.default_rng(12)
    raw = random_blocks(T.Q5_1, 21, 512, rng)
    blocks = kernels._q5_1_as_bytes(raw).reshape(21, 16, 36)
    d, m = (blocks[..., k:k + 2].copy().view(np.float16)[..., 0].astype(np.float32) for k in (0, 2))
    weights = (blocks[..., 4:].astype(np.float32) * d[..., None] + m[..., None]).reshape(21, 512)
    assert np.array_equal(weights.view(np.uint32), quants.dequantize(raw, T.Q5_1).view(np.uint32))
    assert blocks[..., 4:].max() <= 31


def test_q5_0_packs_as_the_q8_0_blocks_of_the_same_weights():
    """TRANSCODED: Q5_0's blocks rewritten as Q8_0 ones hold the same weights, bit for bit as gguf
    dequantizes each (every bit pattern of the quants and of qh), and pack as those Q8_0 blocks do."""
    rng = np.random.default_rng(11)
    raw = random_blocks(T.Q5_0, 21, 512, rng)
    as_q8_0 = kernels._q5_0_as_q8_0(raw)
    assert as_q8_0.shape == (21, 16 * 34)
    assert np.array_equal(quants.dequantize(as_q8_0, T.Q8_0).view(np.uint32), quants.dequantize(raw, T.Q5_0).view(np.uint32))
    rows = kernels.packed_rows(21)
    packed, expected = (np.empty((rows, kernels.packed_row_bytes(int(T.Q5_0), raw.shape[1])), np.uint8),
                        np.empty((rows, as_q8_0.shape[1]), np.uint8))
    kernels.pack_groups(int(T.Q5_0), raw, packed)
    kernels.pack_groups(int(T.Q8_0), as_q8_0, expected)
    assert np.array_equal(packed, expected)


def test_quantize_activations_as_llama_cpp():
    """d = max|x| / 127, q = roundf(x * (1 / d)), halves away from zero; a zero block stays zero."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[1, 32:64] = 0
    x[2, :32] = np.float32(0.5) * np.arange(-16, 16, dtype=np.float32)      # exact halves: 127 * k / 15.5
    xq, xd, xsum = quantized_activations(x)
    blocks = x.reshape(3, 4, 32)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = (blocks * inv[..., None]).astype(np.float32)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    assert np.array_equal(xd, d) and np.array_equal(xq, q.reshape(3, 128))
    assert np.array_equal(xsum, q.astype(np.int32).sum(axis=-1))
    assert not xq[1, 32:64].any() and xd[1, 1] == 0


@pytest.mark.parametrize("n", [1, 40])
@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.F16, T.Q4_1], ids=lambda t: t.name)
def test_products_never_dequantize_the_whole_matrix(qtype, n, monkeypatch):
    """A decode-sized x goes to the kernels, which read the blocks; a longer one through BLAS, one tile
    of rows at a time decoded by numba's decoders (F16: matvec.widen_rows): never the whole matrix as
    float32, and never numpy's dequantizer."""
    rng = np.random.default_rng(5)
    rows = 1000                                 # several tiles of 448 rows (1 MiB at 576), and a rest
    raw = random_blocks(qtype, rows, 576, rng)
    tensor = GGMLTensor("w", qtype, (rows, 576), raw)
    assert tensor._tile_rows < rows
    decoded = []
    tile_decoder = kernels.dequantize_rows
    monkeypatch.setattr(kernels, "dequantize_rows", lambda qt, r, out: decoded.append(len(r)) or tile_decoder(qt, r, out))
    tensor._dequantize_rows = tensor.dequantize = None       # a call would fail
    x = rng.standard_normal((n, 576)).astype(np.float32)
    ref, magnitudes, _ = reference(qtype, raw, x)
    out = tensor.linear(x)
    assert np.all(np.abs(out - ref) <= 576 * U * magnitudes)
    if n == 1 or qtype == T.F16:
        assert decoded == []
    else:
        assert len(decoded) > 2 and max(decoded) <= tensor._tile_rows


def test_smollm2_tensors(smol_checkpoint):
    """The real thing: a Q4_1 FFN matrix and the Q8_0 token embedding (SmolLM2's classifier), exact and
    fast, one and eight rows, against gguf's dequantization."""
    rng = np.random.default_rng(11)
    w2 = smol_checkpoint.weights["w2"][5]
    embeddings = smol_checkpoint.weights["tok_embeddings"]
    assert (w2.ggml_type, embeddings.ggml_type) == ("Q4_1", "Q8_0")
    classifier = GGMLTensor("output", embeddings.qtype, (4096, embeddings.shape[1]), embeddings.raw[:4096])
    for tensor in (w2, classifier):
        for n in (1, 8):
            x = rng.standard_normal((n, tensor.shape[1])).astype(np.float32)
            ref, magnitudes, w = reference(tensor.qtype, tensor.raw, x)
            exact = GGMLTensor("w", tensor.qtype, tensor.shape, tensor.raw, exact=True).linear(x)
            assert np.all(np.abs(exact - ref) <= tensor.shape[1] * U * magnitudes)
            fast = GGMLTensor("w", tensor.qtype, tensor.shape, tensor.raw, exact=False).linear(x)
            assert np.all(np.abs(fast - ref) <= fast_bound(x, w, magnitudes))


def test_the_compiled_kernels_cache_is_named_for_every_kernel_source(tmp_path):
    """numba checks a cached function against its own file only: step.py's cached forward would outlive
    an edit of ggml.py, whose kernels it inlines. The cache folder changes with any kernel source."""
    import shutil
    from pathlib import Path

    import llamarun.kernels as kernels
    from llamarun.kernels import ggml as ggml_kernels, step

    folder = kernels._cache_dir()
    for dispatcher in (step.forward_fast_for(ggml_kernels.Q4_1_BIT, ggml_kernels.Q8_0_BIT), ggml_kernels.matvec_fast):
        assert dispatcher._cache._cache_path.startswith(folder + os.sep)
    copy = tmp_path / "kernels"
    shutil.copytree(Path(kernels.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert os.path.basename(kernels._cache_dir(copy)) == os.path.basename(folder)
    with open(copy / "ggml.py", "a") as f:
        f.write("\n# an edit\n")
    assert os.path.basename(kernels._cache_dir(copy)) != os.path.basename(folder)


SAVER = """
import sys
import llamarun.kernels as kernels
from numba.core.caching import IndexDataCacheFile
kernels.CACHE_DIR = sys.argv[1]               # the lock applies to the package's cache folder only
cache = IndexDataCacheFile(sys.argv[1], "kernel", "stamp")
for i in range(60):
    cache.save((sys.argv[2], i), (sys.argv[2], i))
"""


def test_processes_compiling_at_once_keep_every_cache_entry(tmp_path):
    """Two processes saving compiled kernels into one cache folder at once (the compile step's workers):
    numba alone reads the index, picks a free data file name and writes both back, so one process's
    entries could be lost or point at the other's code. Each entry must load as what was saved."""
    import subprocess
    import sys

    from numba.core.caching import IndexDataCacheFile

    folder = str(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, folder, name]) for name in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    cache = IndexDataCacheFile(folder, "kernel", "stamp")
    for name in ("a", "b"):
        for i in range(60):
            assert cache.load((name, i)) == (name, i)
