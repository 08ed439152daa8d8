"""The attention kernel's two sums, scores and weighted values, against plain float32 loops in the same
order: bit for bit, for every number of heads per kv head (the kernel sums up to HEADS of them at once,
two key blocks at once for one head), head sizes that are and are not multiples of its vectors, and
depths inside a key block, across blocks and past a block's end; on a float32 cache and a half one."""
import numpy as np
import pytest

from llamarun.kernels.attention import BLOCK, _scores, _weighted_values, key_blocks

LAYERS, SEQS, KV, POSITIONS = 2, 2, 3, 128


def cache_values(rng, shape, half):
    """Random cache contents: float32, or half bits (uint16) as the fast path's cache holds them."""
    values = rng.standard_normal(shape).astype(np.float16)
    return values.view(np.uint16) if half else values.astype(np.float32)


def widened(a):
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


def scores_in_order(qr, keys):
    """s[g, t] = sum over d = 0, 1, ... of qr[g, d] * keys[t, d], a float32 multiply then a float32 add."""
    s = np.zeros((qr.shape[0], keys.shape[0]), np.float32)
    for d in range(qr.shape[1]):
        s = s + qr[:, d:d + 1] * keys[None, :, d]
    return s


def weighted_in_order(probs, values):
    """acc[g, d] = sum over t = 0, 1, ... of probs[g, t] * values[t, d], in float32, in order."""
    acc = np.zeros((probs.shape[0], values.shape[1]), np.float32)
    for t in range(values.shape[0]):
        acc = acc + probs[:, t:t + 1] * values[None, t]
    return acc


@pytest.mark.parametrize("half", [False, True], ids=["f32_cache", "half_cache"])
@pytest.mark.parametrize("D", [16, 64, 72, 128])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5, 9])
def test_scores_and_weighted_values_are_the_plain_loops_bit_for_bit(half, D, G):
    rng = np.random.default_rng(D * 10 + G)
    k_cache = cache_values(rng, (LAYERS, SEQS, KV, key_blocks(POSITIONS), D, BLOCK), half)
    v_cache = cache_values(rng, (LAYERS, SEQS, KV, POSITIONS, D), half)
    layer, seq, kv = 1, 1, 2
    qr = rng.standard_normal((G, D)).astype(np.float32)
    for T in (1, 31, 33, 64, 100):
        scores = np.full((G, key_blocks(T) * BLOCK), np.nan, np.float32)
        _scores(qr, G, k_cache, layer, seq, kv, T, scores)
        keys = widened(k_cache[layer, seq, kv]).transpose(0, 2, 1).reshape(-1, D)[:T]     # (T, D)
        assert np.array_equal(scores[:, :T], scores_in_order(qr, keys)), T

        probs = rng.random((G, T + 3)).astype(np.float32)        # wider than T: only :T is read
        acc = np.full((G, D), np.nan, np.float32)
        _weighted_values(probs, G, v_cache, layer, seq, kv, T, acc)
        assert np.array_equal(acc, weighted_in_order(probs[:, :T], widened(v_cache[layer, seq, kv, :T]))), T
