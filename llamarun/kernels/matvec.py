"""Matrix-vector products for the decode step: a few rows of activations times weight matrices.

A decoded token reads every weight once and does two FLOPs per weight, so the decode step is bound
by memory bandwidth: what matters is streaming the weights at full speed on every core, with as
little fixed cost per call as possible (a small model makes ~30 of these calls per token).

Why numba rather than numpy's `w @ x` (OpenBLAS sgemv), which streams about as fast:
- One thread pool. OpenBLAS's threads spin for a while after every call, and so do numba's OpenMP
  threads after every parallel region. When the decode step alternated between the two (BLAS
  matvecs, numba attention), each pool's spinning thread held a core the other pool's thread needed,
  and on a 2-core machine every hand-over waited for a scheduler time slice (~10 ms). Decoding
  with numba kernels only leaves OpenBLAS to the prefill's large matrix products.
- Products that read the same input go in one parallel pass (q, k and v; SwiGLU's w1 and w3): one
  call and one fork/join instead of two or three, and the gate is computed as it streams.
"""
import math

import numba
import numpy as np

from .ggml import PREFETCH_BYTES, prefetch_bytes


# One weight row per task, read start to end: each thread then walks its share of the matrix as
# one sequential stream, which the hardware prefetcher follows. (Four rows at a time in lock-step,
# sharing each load of x, measured 25% slower on the small models: rows of 288 floats make four
# streams of 18 cache lines each, too short for the prefetcher to pick up before they end.)


# fastmath's `reassoc` lets LLVM split the dot product over SIMD lanes and several accumulators
# (the sum is reordered, as BLAS reorders it); `contract` fuses the multiply-adds. Only the dot
# product gets these flags: it is a separate function (LLVM inlines it, keeping the flags on its
# own instructions), so the code around it keeps plain float32 arithmetic.
@numba.njit(fastmath={"reassoc", "contract", "nsz"})
def _dot(x, j, w, o):
    """x[j] . w[o]"""
    s = np.float32(0.0)
    for i in range(x.shape[1]):
        s += x[j, i] * w[o, i]
    return s


@numba.njit
def _row(x, w, out, o):
    """out[:, o] = x @ w[o]: row o of w, read once from memory, then from L1 for every row of x.
    The rows PREFETCH_BYTES ahead are asked for meanwhile (why: kernels/ggml.py's _prefetch_ahead)."""
    row_bytes = 4 * w.shape[1]
    prefetch_bytes(w, o * row_bytes + PREFETCH_BYTES, row_bytes)
    for j in range(x.shape[0]):
        out[j, o] = _dot(x, j, w, o)


@numba.njit(parallel=True, cache=True)
def matvec(x, w, out):
    """out = x @ w.T for a few rows of x.   x: (n, in), w: (out_features, in), out: (n, out)"""
    for o in numba.prange(w.shape[0]):
        _row(x, w, out, o)


@numba.njit(parallel=True, cache=True)
def matvec3(x, wa, wb, wc, a, b, c):
    """a, b, c = x @ wa.T, x @ wb.T, x @ wc.T in one parallel pass (the q, k, v projections).

    The tasks are the rows of wa, then of wb, then of wc, split evenly between the threads.
    """
    na, nb = wa.shape[0], wb.shape[0]
    for t in numba.prange(na + nb + wc.shape[0]):
        if t < na:
            _row(x, wa, a, t)
        elif t < na + nb:
            _row(x, wb, b, t - na)
        else:
            _row(x, wc, c, t - na - nb)


@numba.njit
def _silu(a):
    """a * sigmoid(a), as run.c rounds it: a multiply by the reciprocal, not a division."""
    return a * (np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-a))))


@numba.njit(parallel=True, cache=True)
def swiglu(x, w1, w3, out):
    """out[j, o] = silu(x[j] . w1[o]) * (x[j] . w3[o]): SwiGLU's gate, w1 and w3 in one pass.

    x: (n, dim), w1, w3: (hidden, dim), out: (n, hidden). Each thread streams its share of both.
    """
    row_bytes = 4 * w1.shape[1]
    for o in numba.prange(w1.shape[0]):
        prefetch_bytes(w1, o * row_bytes + PREFETCH_BYTES, row_bytes)
        prefetch_bytes(w3, o * row_bytes + PREFETCH_BYTES, row_bytes)
        for j in range(x.shape[0]):
            out[j, o] = _silu(_dot(x, j, w1, o)) * _dot(x, j, w3, o)
