"""kernels/select.py's top_k_positions against a stable sort by descending value (numpy), the definition
of "the k largest, the lower positions among equals": random rows, rows of many ties, of -inf (a
grammar's mask) and NaN, rows in ascending and descending order (the kernel's worst and best orders)."""
import numpy as np
import pytest

from llamarun.kernels.select import top_k_positions


def reference(z, k):
    ranked = np.where(np.isnan(z), -np.inf, z)                  # NaN ranks as -inf
    return set(np.argsort(-ranked, kind="stable")[:k].tolist())


def row(rng, n, kind, dtype):
    z = rng.standard_normal(n).astype(dtype)
    if kind == "ties":
        z = np.round(z * 2) / 2
    elif kind == "masked":
        z[rng.random(n) < 0.7] = -np.inf
    elif kind == "nan":
        z[rng.random(n) < 0.2] = np.nan
        z[rng.random(n) < 0.2] = -np.inf
    elif kind == "ascending":
        z = np.sort(z)
    elif kind == "descending":
        z = np.sort(z)[::-1].copy()
    elif kind == "constant":
        z[:] = 1.5
    return z


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "masked", "nan", "ascending", "descending", "constant"])
def test_top_k_positions_are_a_stable_sorts_first_k(kind, dtype):
    rng = np.random.default_rng(abs(hash((kind, np.dtype(dtype).name))) % 2**32)
    for n in (1, 2, 15, 16, 17, 100, 1000, 5000):
        z = row(rng, n, kind, dtype)
        for k in sorted({min(n, k) for k in (1, 2, 15, 16, 40, max(1, n // 3), n)}):
            got = top_k_positions(z, k)
            assert len(got) == k and set(got.tolist()) == reference(z, k), (n, k)


def test_a_vocabulary_sized_row():
    rng = np.random.default_rng(7)
    z = (rng.standard_normal(49152) * 3).astype(np.float32)
    for k in (40, 64, 512, 4096):
        assert set(top_k_positions(z, k).tolist()) == reference(z, k)


def test_top_logprobs_are_largest_first_ties_to_the_lower_id():
    """logprobs.top_ids (the top alternatives of logprobs and of the confidence records) as its docstring
    says, on rows of many ties: a stable sort by descending value. (Its argpartition, before, kept an
    arbitrary one of the tokens tied at the k-th place in most such rows.)"""
    from llamarun.logprobs import top_ids
    rng = np.random.default_rng(11)
    for _ in range(300):
        values = np.round(rng.standard_normal(int(rng.integers(2, 80))), 0)
        k = int(rng.integers(1, values.size + 1))
        assert top_ids(values, k).tolist() == np.argsort(-values, kind="stable")[:k].tolist()
