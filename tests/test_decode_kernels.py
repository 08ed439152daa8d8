"""The decode step's kernels beyond single products: the fused ones (q/k/v in one call, SwiGLU's
gate and up projections in one call), llama2.c's int8 kernels, and the property the server's
batching relies on: a row's result does not depend on the other rows in the batch.

References: each fused value against the unfused product of the same weights (tests/test_kernels.py
ties those to gguf's dequantization); the int8 kernels bit for bit against GroupQuantized's numpy
statement of runq.c's arithmetic, which the golden tests tie to run.c.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llamarun import tensors
from llamarun.kernels import int8 as int8_kernels
from llamarun.model import gated_units, linear3, silu
from llamarun.tensors import GGMLTensor, GroupQuantized, quantize_groups

from test_kernels import KERNELS, random_blocks


def ggml(qtype, rows, n_in, rng, exact):
    raw = random_blocks(qtype, rows, n_in, rng)
    raw.flags.writeable = False              # as the file's map: the kernels' specialization a model takes
    return GGMLTensor("w", qtype, (rows, n_in), raw, exact=exact)


def int8_matrix(rows, n_in, group_size, rng):
    """A GroupQuantized matrix as a v2 file holds one: int8 values from runq.c's quantizer."""
    w = rng.standard_normal((rows, n_in)).astype(np.float32)
    w[0, :group_size] = 0.0                                      # an all-zero group
    g = quantize_groups(w, group_size)
    q, scale = g.q.copy(), g.scale.copy()
    q.flags.writeable = scale.flags.writeable = False            # as the file's map
    return GroupQuantized(q, scale, group_size)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("qtype", KERNELS, ids=lambda t: t.name)
def test_fused_qkv_equals_three_products(qtype, exact):
    rng = np.random.default_rng(int(qtype))
    n_in = 512
    wq, wk, wv = (ggml(qtype, rows, n_in, rng, exact) for rows in (64, 16, 16))
    for n in (1, 3, 8):
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        assert tensors.fusable(x, wq, wk, wv)
        q, k, v = linear3(x, wq, wk, wv)
        for out, w in ((q, wq), (k, wk), (v, wv)):
            assert np.array_equal(out, w.linear(x))


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q6_K], ids=lambda t: t.name)
def test_fused_swiglu_equals_silu_times_up(qtype, exact):
    rng = np.random.default_rng(7 + int(qtype))
    w1, w3 = ggml(qtype, 96, 512, rng, exact), ggml(qtype, 96, 512, rng, exact)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    gate = gated_units(x, w1, w3)
    a, b = w1.linear(x), w3.linear(x)
    assert np.any(a < -1) and np.any(a > 1)
    # the products are the same values; numba's and numpy's exp may differ in the last bit
    np.testing.assert_allclose(gate, silu(a.copy()) * b, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("qtype", KERNELS, ids=lambda t: t.name)
def test_fast_rows_do_not_depend_on_the_batch(qtype):
    """Row j of an 8-row product equals the same row computed alone, bit for bit (the server decodes
    many sequences in one batch; a request's output must not depend on who else is served)."""
    rng = np.random.default_rng(3)
    # 544 inputs: an odd count of 32-value blocks, which a one-row Q4_1 product reads two at a time
    # but for the last
    for n_in in (512, 544) if qtype in (T.Q8_0, T.Q4_0, T.Q4_1) else (512,):
        w = ggml(qtype, 40, n_in, rng, exact=False)
        x = rng.standard_normal((8, n_in)).astype(np.float32)
        batched = w.linear(x)
        for j in range(8):
            assert np.array_equal(batched[j], w.linear(x[j:j + 1])[0])


@pytest.mark.parametrize("group_size", [64, 32, 48])
@pytest.mark.parametrize("n", [1, 3, 8, 40])      # 40: a prompt's rows go to the kernels too
def test_int8_kernel_is_runq_bit_for_bit(group_size, n):
    rng = np.random.default_rng(group_size + n)
    n_in = 384
    w = int8_matrix(72, n_in, group_size, rng)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    x[0, group_size:2 * group_size] = 0.0                        # an all-zero activation group
    assert w.on_kernels(x)
    assert np.array_equal(w.linear(x), w.linear_blas(x))


def test_int8_quantize_is_runq_quantize():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[1, :64] = 0.0
    x[2, 5] = x[2, :64].max() / 127 * 2.5                      # a value on a rounding half-step
    xq, xs = np.empty(x.shape, np.int8), np.empty((3, 4), np.float32)
    int8_kernels.quantize(x, 64, xq, xs)
    ref = quantize_groups(x, 64)
    assert np.array_equal(xq, ref.q) and np.array_equal(xs, ref.scale)


def test_int8_fused_kernels():
    rng = np.random.default_rng(9)
    wq, wk, wv, w1, w3 = (int8_matrix(rows, 256, 64, rng) for rows in (64, 32, 32, 96, 96))
    x = rng.standard_normal((2, 256)).astype(np.float32)
    assert tensors.fusable(x, wq, wk, wv)
    for out, w in zip(linear3(x, wq, wk, wv), (wq, wk, wv)):
        assert np.array_equal(out, w.linear_blas(x))
    a, b = w1.linear_blas(x), w3.linear_blas(x)
    np.testing.assert_allclose(gated_units(x, w1, w3), silu(a.copy()) * b, rtol=1e-6, atol=1e-30)


# ----------------------------------------------------------------------------------------------
# the fast path's elementwise arithmetic (llama.cpp's kind): its exp and its RMSNorm

def test_exp_fast_within_two_ulp_and_finite_at_the_ends():
    import numba

    from llamarun.kernels.ggml import exp_fast

    @numba.njit
    def exps(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_fast(x[i])

    x = np.linspace(-87, 88, 200001, dtype=np.float32)
    out = np.empty_like(x)
    exps(x, out)
    truth = np.exp(x.astype(np.float64))
    ulps = np.abs(out - truth) / np.spacing(truth.astype(np.float32))
    assert ulps.max() <= 2.0
    ends = np.array([-1000, -88, 89, 1000], np.float32)           # taken as -87 and 88: never 0 or inf
    exps(ends, out[:4])
    assert np.array_equal(out[:4], [out[0], out[0], out[-1], out[-1]]) and np.isfinite(out[:4]).all()


def test_fast_rmsnorm_sums_as_ggml_and_the_exact_one_as_run_c():
    """fast: ggml's rms_norm (each square rounded to float32, the sum in float64, the mean rounded to
    float32, x times 1/sqrt(mean + eps) then times the weight); exact: run.c's float32 chain."""
    from llamarun.kernels.norm import rmsnorm

    rng = np.random.default_rng(11)
    x = (rng.standard_normal((32, 576)) * np.exp(rng.standard_normal((32, 576)))).astype(np.float32)
    x[:, 7] *= 300                                                # a large column, as real models have
    w = rng.uniform(0.5, 1.5, 576).astype(np.float32)
    eps = np.float32(1e-5)
    fast, exact = np.empty_like(x), np.empty_like(x)
    rmsnorm(x, w, eps, fast, True)
    rmsnorm(x, w, eps, exact, False)

    sums = np.array([sum(float(v) for v in row * row) for row in x])           # float64, left to right
    scale = np.float32(1) / np.sqrt((sums / x.shape[1]).astype(np.float32) + eps)
    ggml_norm = w * (x * scale[:, None])
    assert np.array_equal(fast, ggml_norm)       # the lanes' float64 sum rounds to the same float32 mean

    chain = np.zeros(x.shape[0], np.float32)
    for i in range(x.shape[1]):                                     # run.c: float32, left to right
        chain = chain + x[:, i] * x[:, i]
    run_c = w * (x * (np.float32(1) / np.sqrt(chain / np.float32(x.shape[1]) + eps))[:, None])
    assert np.array_equal(exact, run_c)
    assert not np.array_equal(fast, exact)                          # the two sums do differ here
