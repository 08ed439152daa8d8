"""RMSNorm, row by row, with run.c's arithmetic (a numba loop: one call instead of six numpy ones)."""
import math

import numba
import numpy as np


@numba.njit(cache=True)
def rmsnorm(x, weight, eps, out):
    """out[j] = weight * (x[j] / sqrt(mean(x[j]^2) + eps)).   x, out: (n, dim); weight: (dim,)

    The sum of squares runs left to right in float32, as run.c's loop does: with int8 activations
    (runq.c) a value that lands within an ulp of a rounding boundary is otherwise quantized one step
    off, and the logits move by ~1e-2.
    """
    rmsnorm_layer(x, weight[None], 0, eps, out)


@numba.njit(inline="always")
def rmsnorm_layer(x, weights, layer, eps, out):
    """rmsnorm with the weight weights[layer] of stacked weights (n_layers, dim), read in place (the
    one-call forward's threads: a view of one layer's row would count a reference both share)."""
    n, dim = x.shape
    eps32 = np.float32(eps)
    for j in range(n):
        ss = np.float32(0.0)
        for i in range(dim):
            ss += x[j, i] * x[j, i]
        ss = ss / np.float32(dim) + eps32
        inv = np.float32(1.0) / np.float32(math.sqrt(ss))
        for i in range(dim):
            out[j, i] = weights[layer, i] * (inv * x[j, i])
