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


# Four weight rows per task, read in lock-step: each load of x serves four rows, and each thread
# walks its share of the matrix as four neighbouring streams. On s110M's fp32 matrices four rows
# streamed faster than one or two, near numpy's sgemv, and eight no faster than four (on the Xeon of
# 2026-12-01, where s15M's short rows of 288 floats needed a software prefetch to be no slower for it;
# see below for Zen 5; docs/performance.md).
ROWS = 4

# No software prefetch here, unlike the quantized kernels (kernels/ggml.py's PREFETCH_BYTES): four
# rows of float32 weights are four long streams, which the CPU's own prefetcher follows. With each
# group's rows asked for 2 KB ahead (the distance that measured best on the Xeon), s110M's decode was
# ~7% slower on AMD EPYC Zen 5 (non-temporal prefetches; as prefetcht0 slower still), and s15M's no
# faster (docs/performance.md, 2026-12-06).


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


@numba.njit(fastmath={"reassoc", "contract", "nsz"})
def _dot4(x, j, w, o):
    """(x[j] . w[o], x[j] . w[o + 1], x[j] . w[o + 2], x[j] . w[o + 3])"""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(x.shape[1]):
        xi = x[j, i]
        s0 += xi * w[o, i]
        s1 += xi * w[o + 1, i]
        s2 += xi * w[o + 2, i]
        s3 += xi * w[o + 3, i]
    return s0, s1, s2, s3


@numba.njit(inline="always")
def _put(out, j, o, value, add):
    """out[j, o] = value, or out[j, o] += value (the residual stream)"""
    out[j, o] = out[j, o] + value if add else value


@numba.njit(inline="always")
def rows_into(x, w, out, g, add):
    """out[:, o] = x @ w[o] (or += it) for the rows o of group g: rows ROWS*g to ROWS*g + ROWS - 1,
    read once from memory, then from L1 for every row of x. The last group of a matrix whose rows do
    not divide by ROWS takes its rows one by one. Each row's value depends only on its group, never
    on how the groups are split between threads (the one-call forward splits them its own way)."""
    o = ROWS * g
    if o + ROWS <= w.shape[0]:
        for j in range(x.shape[0]):
            s0, s1, s2, s3 = _dot4(x, j, w, o)
            _put(out, j, o, s0, add)
            _put(out, j, o + 1, s1, add)
            _put(out, j, o + 2, s2, add)
            _put(out, j, o + 3, s3, add)
    else:
        for r in range(o, w.shape[0]):
            for j in range(x.shape[0]):
                _put(out, j, r, _dot(x, j, w, r), add)


@numba.njit(inline="always")
def groups(w):
    """The number of row groups of w."""
    return (w.shape[0] + ROWS - 1) // ROWS


@numba.njit(parallel=True, cache=True)
def matvec(x, w, out):
    """out = x @ w.T for a few rows of x.   x: (n, in), w: (out_features, in), out: (n, out)"""
    for g in numba.prange(groups(w)):
        rows_into(x, w, out, g, False)


@numba.njit(parallel=True, cache=True)
def matvec3(x, wa, wb, wc, a, b, c):
    """a, b, c = x @ wa.T, x @ wb.T, x @ wc.T in one parallel pass (the q, k, v projections).

    The tasks are the row groups of wa, then of wb, then of wc, split evenly between the threads.
    """
    na, nb = groups(wa), groups(wb)
    for t in numba.prange(na + nb + groups(wc)):
        if t < na:
            rows_into(x, wa, a, t, False)
        elif t < na + nb:
            rows_into(x, wb, b, t - na, False)
        else:
            rows_into(x, wc, c, t - na - nb, False)


@numba.njit(inline="always")
def gated_rows(t, tasks, x, w1, w3, out, up):
    """Task t of `tasks`' share of out = silu(x @ w1.T) * (x @ w3.T), SwiGLU's gated units: its row
    groups of w1 into out, then the same groups of w3 into up (scratch, out's shape), then the gate on
    its own rows. Why one matrix after the other rather than both at once, four rows of each in
    lock-step: on s110M (AMD EPYC Zen 5, 2 threads) those eight streams a thread read the FFN's two
    matrices markedly slower than four (docs/performance.md, 2026-12-06). Each value depends on its
    row group only, never on the split."""
    start, stop = _task_rows(t, tasks, groups(w1))
    for g in range(start, stop):
        rows_into(x, w1, out, g, False)
    for g in range(start, stop):
        rows_into(x, w3, up, g, False)
    gate(out, up, ROWS * start, min(ROWS * stop, w1.shape[0]), False)


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
