"""The k largest values of a row, for the samplers' top-k (and top-p's heaviest candidates).

Why a kernel: numpy's argpartition, which the samplers used, reads and copies the whole row and runs
an introselect over it; on SmolLM2's 49152 logits it took as long as a tenth of a decode step, paid by
every sampled token in top-k, and in top-p as well when top-k was off. Here one pass keeps the k best
values seen so far in a heap whose root is the worst of them: a value that does not beat the root,
nearly every value, costs one comparison (docs/performance.md, 2026-12-06 20:05).
"""
import numba
import numpy as np


@numba.njit(inline="always")
def _value(z, i):
    """z[i] as ranked: NaN as -inf (a NaN logit is never drawn before a number)."""
    return -np.inf if np.isnan(z[i]) else z[i]


@numba.njit(inline="always")
def _worse(z, a, b):
    """Whether position a ranks below position b: a smaller value, or an equal one further on (the
    lower position wins a tie, as a stable sort by descending value orders them)."""
    va, vb = _value(z, a), _value(z, b)
    return va < vb or (va == vb and a > b)


@numba.njit(inline="always")
def _sift_down(z, heap, i, k):
    """Restore the heap (the worst at heap[0]) below node i."""
    while True:
        worst, left = i, 2 * i + 1
        if left < k and _worse(z, heap[left], heap[worst]):
            worst = left
        if left + 1 < k and _worse(z, heap[left + 1], heap[worst]):
            worst = left + 1
        if worst == i:
            return
        heap[i], heap[worst] = heap[worst], heap[i]
        i = worst


STRIDE = 16     # top_k_positions's threshold: the k-th largest of every STRIDE-th value


@numba.njit(cache=True)
def top_k_positions(z, k):
    """The positions of the k largest values of the 1-D array z (0 < k <= len(z)), in no particular order;
    among equal values the lower positions; NaN ranks as -inf.

    A heap of the k best so far, the worst at its root: a value that does not beat the root costs one
    comparison. The root starts at a threshold that k values reach: the k-th largest of every STRIDE-th
    value (found the same way), so that few values beat it, whatever the row's order (a row sorted
    ascending would otherwise replace the root at every value)."""
    sample = z[::STRIDE]
    threshold = -np.inf
    if k <= sample.shape[0]:
        threshold = _value(sample, _heap_select(sample, k, -np.inf)[0])
    return _heap_select(z, k, threshold)


@numba.njit(inline="always")
def _heap_select(z, k, threshold):
    """top_k_positions's heap, the root (heap[0]) the worst of the k: the first k positions, then every
    later one that ranks above the root, if its value is at least `threshold` (no value under it is
    among the k largest: k values reach it)."""
    heap = np.arange(k)
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(z, heap, i, k)
    root = _value(z, heap[0])
    least = max(root, threshold)
    for i in range(k, z.shape[0]):
        v = z[i]            # (NaN compares false: it ranks as -inf, and a later position loses a tie)
        # i lies after every position in the heap, so it ranks above the root only with a larger value
        if v >= least and v > root:
            heap[0] = i
            _sift_down(z, heap, 0, k)
            root = _value(z, heap[0])
            least = max(root, threshold)
    return heap
