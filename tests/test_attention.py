"""The attention kernel's two sums, scores and weighted values, against plain loops in the same order:
bit for bit, for every number of heads per kv head (the kernel sums up to HEADS of them at once, two
key blocks at once for one head), head sizes that are and are not multiples of its vectors, and
depths inside a key block, across blocks and past a block's end. On a float32 cache each term is a
float32 multiply then a float32 add (run.c's); on a half one, the fast path's, a fused multiply-add."""
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


def fused(a, b, c):
    """float32 a * b + c rounded once (a fused multiply-add), exactly: a * b is exact in float64, the sum
    is rounded to odd there (its error, by TwoSum, nudges an even last bit), and a round-to-odd float64
    rounds to the nearest float32 as the exact value would (53 bits >= 24 + 2)."""
    p, c = a.astype(np.float64) * b.astype(np.float64), c.astype(np.float64)
    s = p + c
    bb = s - p
    error = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    nudge = (error != 0) & even
    s = np.where(nudge, np.nextafter(s, np.where(error > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def term(acc, a, b, half):
    """acc + a * b as the kernel adds a term: fused on a half cache, else a multiply then an add."""
    return fused(a, b, acc) if half else acc + a * b


def scores_in_order(qr, keys, half):
    """s[g, t] = sum over d = 0, 1, ... of qr[g, d] * keys[t, d], term by term in float32."""
    s = np.zeros((qr.shape[0], keys.shape[0]), np.float32)
    for d in range(qr.shape[1]):
        s = term(s, np.broadcast_to(qr[:, d:d + 1], s.shape), np.broadcast_to(keys[None, :, d], s.shape), half)
    return s


def weighted_in_order(probs, values, half):
    """acc[g, d] = sum over t = 0, 1, ... of probs[g, t] * values[t, d], term by term in float32."""
    acc = np.zeros((probs.shape[0], values.shape[1]), np.float32)
    for t in range(values.shape[0]):
        acc = term(acc, np.broadcast_to(probs[:, t:t + 1], acc.shape), np.broadcast_to(values[None, t], acc.shape), half)
    return acc


def test_fused_is_a_fused_multiply_add():
    """The reference's fused term: one rounding, where a multiply then an add rounds twice."""
    a = np.float32(1 + 2 ** -12)                 # a * a = 1 + 2^-11 + 2^-24, a tie between two float32s
    c = np.float32(-(1 + 2 ** -11))
    assert fused(np.array([a]), np.array([a]), np.array([c]))[0] == np.float32(2.0 ** -24)
    assert (a * a + c) == 0                      # rounded twice: the product to even, 1 + 2^-11
    rng = np.random.default_rng(0)
    x, y, z = (rng.standard_normal(10000).astype(np.float32) for _ in range(3))
    exact = x.astype(np.float64) * y + z                            # no float32 tie is near: plain rounding
    assert np.array_equal(fused(x, y, z), exact.astype(np.float32))


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
        assert np.array_equal(scores[:, :T], scores_in_order(qr, keys, half)), T

        probs = rng.random((G, T + 3)).astype(np.float32)        # wider than T: only :T is read
        acc = np.full((G, D), np.nan, np.float32)
        _weighted_values(probs, G, v_cache, layer, seq, kv, T, acc)
        assert np.array_equal(acc, weighted_in_order(probs[:, :T], widened(v_cache[layer, seq, kv, :T]), half)), T
