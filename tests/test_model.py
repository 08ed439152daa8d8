"""The forward pass: batches of several sequences, logits where asked, and MQA against the float64
reference forward (tests/reference.py)."""
import subprocess
import sys

import numpy as np
import pytest

import llamarun
from llamarun.model import Batch, KVCache, apply_rope, rope_tables

import reference
from conftest import SHARED, MODELS, logits_tolerance, require


@pytest.fixture(scope="module")
def gqa():
    return llamarun.load(str(require(MODELS / "tiny_gqa.bin")))


@pytest.fixture(scope="module")
def mqa_path(tmp_path_factory):
    """A random multi-query model (4 heads sharing 1 kv head) written by ../shared/tools/mkmodel.py."""
    path = tmp_path_factory.mktemp("models") / "tiny_mqa.bin"
    tool = require(SHARED / "tools" / "mkmodel.py")
    subprocess.run([sys.executable, str(tool), "tiny_mqa", str(path), "3"], check=True)
    return str(path)


def alone(llama, ids):
    return llama.model.forward(Batch.sequence(ids, all_logits=True), KVCache(llama.config))


def test_two_sequences_in_one_batch_give_the_logits_each_gives_alone(gqa):
    a = [1, 512, 278, 14089, 29892, 727, 471]
    b = [1, 15043, 3186, 29991, 450]
    ref_a, ref_b = alone(gqa, a), alone(gqa, b)

    cache = KVCache(gqa.config, n_seqs=2)
    # prefill both prompts in one batch, interleaved, then decode one token of each together
    prompt = Batch.of(tokens=a[:4] + b[:3], pos=[0, 1, 2, 3, 0, 1, 2], seq_ids=[0] * 4 + [1] * 3)
    prefill = gqa.model.forward(prompt, cache)
    rows = {0: list(prefill[:4]), 1: list(prefill[4:])}
    for step in range(2):
        batch = Batch.of(tokens=[a[4 + step], b[3 + step]], pos=[4 + step, 3 + step], seq_ids=[0, 1])
        out = gqa.model.forward(batch, cache)
        rows[0].append(out[0])
        rows[1].append(out[1])
    tol = logits_tolerance(ref_a[:6], 2e-5)[:, None]
    assert (np.abs(np.array(rows[0]) - ref_a[:6]) <= tol).all()
    tol = logits_tolerance(ref_b, 2e-5)[:, None]
    assert (np.abs(np.array(rows[1]) - ref_b) <= tol).all()


def test_logits_are_computed_only_where_asked(gqa):
    ids = [1, 512, 278, 14089, 29892]
    full = alone(gqa, ids)
    batch = Batch.of(ids, range(5), [0] * 5, logits=[False, True, False, False, True])
    some = gqa.model.forward(batch, KVCache(gqa.config))
    assert some.shape == (2, 32000)
    np.testing.assert_allclose(some, full[[1, 4]], atol=1e-5)
    last = gqa.model.forward(Batch.sequence(ids), KVCache(gqa.config))
    assert last.shape == (1, 32000)


def test_positions_outside_the_cache_are_refused(gqa):
    with pytest.raises(ValueError):
        gqa.model.forward(Batch.sequence([1, 2], start_pos=127), KVCache(gqa.config))


def test_rope_rotates_interleaved_pairs_by_position_times_frequency():
    config = llamarun.config.ModelConfig(8, 16, 1, 1, 1, 10, 16, rope_theta=500.0)
    cos, sin = rope_tables(config)
    x = np.arange(1, 9, dtype=np.float32).reshape(1, 1, 8)
    pos = 5
    out = apply_rope(x, cos[[pos]], sin[[pos]])[0, 0]
    for i in range(4):
        angle = pos / 500.0 ** (2 * i / 8)
        x0, x1 = x[0, 0, 2 * i], x[0, 0, 2 * i + 1]
        assert out[2 * i] == pytest.approx(x0 * np.cos(angle) - x1 * np.sin(angle), rel=1e-5)
        assert out[2 * i + 1] == pytest.approx(x0 * np.sin(angle) + x1 * np.cos(angle), rel=1e-5)


def test_the_prefill_rope_kernel_is_apply_rope_bit_for_bit():
    """kernels/attention.rope (the fast prefill's RoPE) against apply_rope, checked above by its angles."""
    from llamarun.kernels.attention import rope
    rng = np.random.default_rng(4)
    x = rng.standard_normal((37, 3, 64)).astype(np.float32)
    cos, sin = (rng.uniform(-1, 1, (37, 32)).astype(np.float32) for _ in range(2))
    out = np.empty_like(x)
    rope(x, cos, sin, out)
    assert np.array_equal(out, apply_rope(x, cos, sin))


def test_rope_in_hugging_face_layout_rotates_halves_and_scaling_divides_the_frequencies():
    """rope_halves: pair i is (x[i], x[i + D/2]); rope_factors and rope_scale divide pair i's frequency
    (Llama 3's and linear scaling, as transformers divides its inv_freq)."""
    from dataclasses import replace
    factors = (1.0, 2.0, 3.0, 8.0)
    config = replace(llamarun.config.ModelConfig(8, 16, 1, 1, 1, 10, 16, rope_theta=500.0), rope_halves=True,
                     rope_factors=factors, rope_scale=2.0)
    cos, sin = rope_tables(config)
    assert cos.shape == (16, 8)
    x = np.arange(1, 9, dtype=np.float32).reshape(1, 1, 8)
    pos = 5
    out = apply_rope(x, cos[[pos]], sin[[pos]])[0, 0]
    for i in range(4):
        angle = pos / 500.0 ** (2 * i / 8) / factors[i] / 2.0
        x0, x1 = x[0, 0, i], x[0, 0, i + 4]
        assert out[i] == pytest.approx(x0 * np.cos(angle) - x1 * np.sin(angle), rel=1e-5)
        assert out[i + 4] == pytest.approx(x0 * np.sin(angle) + x1 * np.cos(angle), rel=1e-5)
    from llamarun.kernels.attention import rope
    kernel_out = np.empty_like(x)
    rope(x, cos[[pos]], sin[[pos]], kernel_out)
    assert np.array_equal(kernel_out, apply_rope(x, cos[[pos]], sin[[pos]]))


class _Checkpoint:
    def __init__(self, config, weights):
        self.path, self.config, self.weights, self.description, self.metadata = "test", config, weights, "test", {}


def _to_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """Q or K rows from interleaved pairs to Hugging Face's halves: row 2i of a head to i, 2i+1 to i + D/2."""
    out_features, dim = w.shape
    D = out_features // heads
    rows = np.ascontiguousarray(w.reshape(heads, D // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out_features, dim))
    rows.flags.writeable = False        # as a file's map: the float32 forward the compile step compiled
    return rows


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_a_model_in_hugging_face_pair_layout_gives_the_logits_of_its_interleaved_twin(gqa, exact):
    """The same model with its Q and K rows in halves order and config.rope_halves: every path (the
    prefill's attention kernel or BLAS attention, the decode steps) gives the interleaved model's logits."""
    from dataclasses import replace
    c = gqa.config
    weights = dict(gqa.checkpoint.weights)
    weights["wq"] = [_to_halves(w, c.n_heads) for w in weights["wq"]]
    weights["wk"] = [_to_halves(w, c.n_kv_heads) for w in weights["wk"]]
    twin = llamarun.Llama(_Checkpoint(replace(gqa.checkpoint.config, rope_halves=True), weights), exact=exact)
    base = llamarun.Llama(gqa.checkpoint, exact=exact)
    ids = [1, 512, 278, 14089, 29892, 727, 471, 263, 2217]
    ref = alone(base, ids)
    tol = logits_tolerance(ref, 2e-5)[:, None]
    assert (np.abs(alone(twin, ids) - ref) <= tol).all()
    cache = twin.model.new_cache()
    decoded = np.array([twin.model.forward(Batch.sequence([t], p), cache)[0] for p, t in enumerate(ids)])
    assert (np.abs(decoded - ref) <= tol).all()


def test_multi_query_attention_matches_a_naive_reference(mqa_path):
    llama = llamarun.load(mqa_path)
    assert (llama.config.n_heads, llama.config.n_kv_heads) == (4, 1)
    ids = [1, 450, 4996, 17354, 1701, 432, 17204, 975]
    ref = reference.forward(llama.checkpoint.weights, llama.config, ids).logits
    tol = logits_tolerance(ref, 2e-5)[:, None]
    assert (np.abs(alone(llama, ids) - ref) <= tol).all()
    cache = KVCache(llama.config)
    decoded = np.array([llama.model.forward(Batch.sequence([t], p), cache)[0] for p, t in enumerate(ids)])
    assert (np.abs(decoded - ref) <= tol).all()


@pytest.mark.parametrize("half", [False, True], ids=["f32_cache", "half_cache"])
def test_the_attention_kernel_matches_numpy_on_either_cache(half):
    """The decode kernel (kernels/attention.py) on a float32 cache and on a half-precision one (the fast
    path's, with its vectorized exp and lane sums) against attention written in numpy, float64: on a
    half cache every cached key and value is numpy's float16 rounding of it, then the arithmetic
    agrees as closely as float32's. Two sequences, 3 query heads per kv head, 40 cached positions."""
    from llamarun.config import ModelConfig
    from llamarun.kernels.attention import attention_parallel
    from llamarun.model import widened
    c = ModelConfig(dim=192, hidden_dim=256, n_layers=1, n_heads=6, n_kv_heads=2, vocab_size=10, seq_len=64)
    H, KV, D, n = c.n_heads, c.n_kv_heads, c.head_dim, 40
    rng = np.random.default_rng(5)
    cos_all, sin_all = rope_tables(c)
    cache = KVCache(c, n_seqs=2, seq_len=64, half=half)
    assert cache.half == half and cache.k.dtype == (np.uint16 if half else np.float32)
    q, k, v = (rng.standard_normal((2 * n, h, D)).astype(np.float32) for h in (H, KV, KV))
    pos, seq = np.tile(np.arange(n), 2), np.repeat([0, 1], n)
    out = np.empty((2 * n, H, D), np.float32)
    no_probs, no_bias = np.zeros((1, 1, 1), np.float32), np.zeros(0, np.float32)
    attention_parallel(q, k, v, cos_all[pos], sin_all[pos], cache.k[0], cache.v[0], seq, pos, out, no_probs, False,
                       no_bias)

    kr = apply_rope(k, cos_all[pos], sin_all[pos])                       # what the cache must hold
    stored = (lambda a: a.astype(np.float16).astype(np.float64)) if half else (lambda a: a.astype(np.float64))
    keys, values = stored(kr), stored(v)
    cached_v = widened(cache.v[0])[seq, :, pos].astype(np.float64)         # (2n, KV, D)
    assert np.array_equal(cached_v, values)
    qr = apply_rope(q, cos_all[pos], sin_all[pos]).astype(np.float64)
    for i in range(2 * n):
        same = np.flatnonzero((seq == seq[i]) & (pos <= pos[i]))            # the keys token i sees
        for h in range(H):
            kv = h // (H // KV)
            scores = keys[same, kv] @ qr[i, h] / np.sqrt(D)
            p = np.exp(scores - scores.max())
            expected = (p / p.sum()) @ values[same, kv]
            assert np.allclose(out[i, h], expected, rtol=1e-4, atol=1e-5), (i, h)
