"""RMSNorm, row by row: run.c's arithmetic or llama.cpp's (a numba loop: one call instead of six numpy ones)."""
import math

import numba
import numpy as np


@numba.njit(cache=True)
def rmsnorm(x, weight, eps, out, fast):
    """out[j] = weight * (x[j] / sqrt(mean(x[j]^2) + eps)).   x, out: (n, dim); weight: (dim,)

    The sum of squares, exact (fast=False): left to right in float32, as run.c's loop runs. With int8
    activations (runq.c) a value that lands within an ulp of a rounding boundary is otherwise quantized
    one step off, and the logits move by ~1e-2. Fast: llama.cpp's (ggml's rms_norm), see _sum_of_squares.
    """
    rmsnorm_layer(x, weight[None], 0, eps, out, fast)


@numba.njit(inline="always")
def rmsnorm_layer(x, weights, layer, eps, out, fast):
    """rmsnorm with the weight weights[layer] of stacked weights (n_layers, dim), read in place (the
    one-call forward's threads: a view of one layer's row would count a reference both share)."""
    n, dim = x.shape
    eps32 = np.float32(eps)
    for j in range(n):
        if fast:
            mean = np.float32(_sum_of_squares(x, j) / dim)
        else:
            ss = np.float32(0.0)
            for i in range(dim):
                ss += x[j, i] * x[j, i]
            mean = ss / np.float32(dim)
        inv = np.float32(1.0) / np.float32(math.sqrt(mean + eps32))
        for i in range(dim):
            out[j, i] = weights[layer, i] * (inv * x[j, i])


@numba.njit(fastmath={"reassoc"})
def _sum_of_squares(x, j):
    """sum over i of x[j, i]^2 as ggml's rms_norm sums it: each square rounded to float32, the sum kept
    in float64. ggml adds them left to right; here in SIMD lanes (`reassoc`, on this function's own
    instructions: LLVM inlines it and keeps the flag), which moves the float64 sum by a few of its ulps,
    far below the float32 rounding of the mean that follows. Run.c's float32 chain of 576 dependent adds
    was most of a decode step's norms (docs/performance.md)."""
    s = 0.0
    for i in range(x.shape[1]):
        s += np.float64(x[j, i] * x[j, i])
    return s
