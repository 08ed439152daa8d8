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
  call and one fork/join instead of two or three.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .ggml import _half_to_float, _task_rows, gate


# One weight row at a time, each thread walking its share of the matrix as one stream (run.c's order):
# for several rows of x, the row is read from memory once, then from L1 for each. Four rows in lock-step
# (each load of x serving four rows) measured faster on the Xeon of 2026-12-01, but four interleaved
# streams a thread read memory at half the rate of one on AMD EPYC Zen 4 (2026-12-06: s15M's decode
# 1.6-1.9x faster one row at a time, s110M's 1.1-1.2x; docs/performance.md); on Zen 5 the half-precision
# kernel below measured the same. No software prefetch: one long stream is what the CPU's own
# prefetcher follows best (on Zen 5, prefetches 2 KB ahead made s110M's decode ~7% slower).


# fastmath's `reassoc` lets LLVM split the dot product over SIMD lanes and several accumulators
# (the sum is reordered, as BLAS reorders it); `contract` fuses the multiply-adds. Only the dot
# products get these flags: they are separate functions (LLVM inlines them, keeping the flags on
# their own instructions), so the code around them keeps plain float32 arithmetic.
@numba.njit(fastmath={"reassoc", "contract", "nsz"})
def _dot(x, j, w, o):
    """x[j] . w[o]"""
    s = np.float32(0.0)
    for i in range(x.shape[1]):
        s += x[j, i] * w[o, i]
    return s


@numba.njit(inline="always")
def _put(out, j, o, value, add):
    """out[j, o] = value, or out[j, o] += value (the residual stream)"""
    out[j, o] = out[j, o] + value if add else value


@numba.njit(inline="always")
def row_into(x, w, out, o, add):
    """out[:, o] = x @ w[o] (or += it): weight row o times every row of x. Each value depends on its
    row alone, never on the batch or on how the rows are split between threads (the one-call forward
    splits them its own way)."""
    for j in range(x.shape[0]):
        _put(out, j, o, _dot(x, j, w, o), add)


@numba.njit(parallel=True, cache=True)
def matvec(x, w, out):
    """out = x @ w.T for a few rows of x.   x: (n, in), w: (out_features, in), out: (n, out)"""
    for o in numba.prange(w.shape[0]):
        row_into(x, w, out, o, False)


@numba.njit(parallel=True, cache=True)
def matvec3(x, wa, wb, wc, a, b, c):
    """a, b, c = x @ wa.T, x @ wb.T, x @ wc.T in one parallel pass (the q, k, v projections).

    The tasks are the rows of wa, then of wb, then of wc, split evenly between the threads.
    """
    na, nb = wa.shape[0], wb.shape[0]
    for t in numba.prange(na + nb + wc.shape[0]):
        if t < na:
            row_into(x, wa, a, t, False)
        elif t < na + nb:
            row_into(x, wb, b, t - na, False)
        else:
            row_into(x, wc, c, t - na - nb, False)


@numba.njit(inline="always")
def gated_rows(t, tasks, x, w1, w3, out, up):
    """Task t of `tasks`' share of out = silu(x @ w1.T) * (x @ w3.T), SwiGLU's gated units: its rows
    of w1 into out, then the same rows of w3 into up (scratch, out's shape), then the gate on them.
    Why one matrix after the other rather than both at once: more streams a thread read memory slower
    (AMD EPYC Zen 5: eight against four; Zen 4: four against one; docs/performance.md, 2026-12-06).
    Each value depends on its row only, never on the split."""
    start, stop = _task_rows(t, tasks, w1.shape[0])
    for o in range(start, stop):
        row_into(x, w1, out, o, False)
    for o in range(start, stop):
        row_into(x, w3, up, o, False)
    gate(out, up, start, stop, False)


@numba.njit(parallel=True, cache=True)
def swiglu(x, w1, w3, out, tasks):
    """out[j, o] = silu(x[j] . w1[o]) * (x[j] . w3[o]): SwiGLU's gate, w1 and w3 in one parallel pass,
    `tasks` shares (one per thread: numba.get_num_threads() of the caller).

    x: (n, dim), w1, w3: (hidden, dim), out: (n, hidden)."""
    up = np.empty_like(out)
    for t in numba.prange(tasks):
        gated_rows(t, tasks, x, w1, w3, out, up)


# ----------------------------------------------------------------------------------------------
# half-precision weights (F16, BF16): 2 bytes a weight, as stored
#
# A Hugging Face or Meta checkpoint in bfloat16 (or float16), and a GGUF file of F16 or BF16 matrices,
# is read where it lies, 2 bytes a weight, never widened to a float32 copy: a decode step then streams
# half the bytes, and a model takes the memory its file takes. Each weight is widened in registers as
# it is read (bf16: its 16 bits are a float32's top half; f16: vcvtph2ps where the CPU has F16C, see
# half.py) and multiplied by float32 activations: the same products as the weights widened to float32
# first, summed as the float kernels sum (reassociated over SIMD lanes).

@intrinsic
def _bf16_to_float(typingctx, bits):
    """The float32 whose top 16 bits these are (a bfloat16 number), exactly."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        word = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


@numba.njit(inline="always")
def _widen(bits, bf16):
    """The float32 value of a half-precision number's 16 bits: bfloat16 (bf16) or float16. (A flag
    rather than two functions: bf16 is the same for a whole call, and LLVM takes the branch out of
    the loops, so each loop is one type's.)"""
    return _bf16_to_float(bits) if bf16 else _half_to_float(bits)


@numba.njit(fastmath={"reassoc", "contract", "nsz"})
def _half_dot(x, j, w, o, bf16):
    """x[j] . w[o], w's numbers half-precision bits"""
    s = np.float32(0.0)
    for i in range(x.shape[1]):
        s += x[j, i] * _widen(w[o, i], bf16)
    return s


@numba.njit(parallel=True, cache=True)
def matvec_half(x, w, bf16, out):
    """out = x @ w.T for a few rows of x, w of half-precision numbers given as their bits.

    x: (n, in) float32; w: (out_features, in) uint16, float16 bits or (bf16) bfloat16 bits;
    out: (n, out_features) float32.

    One weight row per task, not the float kernels' four in lock-step: on 2 threads (AMD EPYC Zen 5)
    one row at a time streamed half-precision rows at numpy's fp32 sgemv rate, four rows at 75-80% of
    it, with or without prefetching (docs/performance.md). For several rows of x the row is read from
    L1 for each, by the same dot product: a row's result never depends on how many rows came with it,
    so a speculative verify forward agrees bit for bit with plain decoding."""
    for o in numba.prange(w.shape[0]):
        for j in range(x.shape[0]):
            out[j, o] = _half_dot(x, j, w, o, bf16)


@numba.njit(cache=True)
def widen_rows(w, bf16, out):
    """out[o] = row o of w (half-precision bits) as float32, for o < w.shape[0]: a prompt's tile for
    BLAS. Single-threaded, as ggml.dequantize_rows: it runs between BLAS calls, whose threads need the
    cores. (numpy's float16 -> float32 conversion took longer than the tile's product.)"""
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            out[o, i] = _widen(w[o, i], bf16)
