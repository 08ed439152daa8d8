"""llama2.c's int8 groups (version-2 checkpoints): runq.c's matrix-vector product, in numba.

runq.c quantizes the activations per group of G values (scale = max|x| / 127, q = round(x / scale))
and computes each output as

    out[o] = sum over groups g, in order, of  float(sum_i x_q[gG + i] * w_q[o, gG + i]) * w_s[o, g] * x_s[g]

with the integer sum exact in int32 and the rest float32, left to right. These kernels compute
exactly that, so they agree with runq.c (and with GroupQuantized.linear's numpy statement of it,
tests/test_kernels.py) bit for bit, but read the int8 weights as stored, parallel over output rows,
without the float32 copy of the matrix the numpy form makes. For a decode step, q, k and v read one
quantized x (as runq.c quantizes x once for them), and so do the FFN's w1 and w3 (`swiglu`).

The integer sum of a group is LLVM vector code (kernels/ggml.py's signed byte dot product: 32
products per step into 8 int32 lanes, pmaddubsw/pmaddwd on AVX2), summed across lanes once per group;
a group size that is not a multiple of 32 takes a plain loop.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ggml import TASKS, _contiguous_bytes, _data, _dot8_signed, _function, _load, _task_rows, _vector

_I8, _I32 = ir.IntType(8), ir.IntType(32)


@intrinsic
def _isum_run(typingctx, w, p, x, c, n):
    """sum over i < n of w[p + i] * x[c + i] as int32, for int8 rows w and x, n a multiple of 32."""
    if not _contiguous_bytes(w, x):
        return None

    def codegen(context, builder, sig, args):
        w_data, x_data = _data(context, builder, sig.args[0], args[0]), _data(context, builder, sig.args[2], args[2])
        p, c, n = args[1], args[3], args[4]
        lanes = cgutils.alloca_once_value(builder, ir.Constant(_vector(_I32, 8), [0] * 8))
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, 32))) as loop:
            k = builder.mul(loop.index, ir.Constant(n.type, 32))
            w_k = _load(builder, w_data, builder.add(p, k), _vector(_I8, 32))
            x_k = _load(builder, x_data, builder.add(c, k), _vector(_I8, 32))
            builder.store(builder.add(builder.load(lanes), _dot8_signed(builder, w_k, x_k)), lanes)
        reduce_add = _function(builder, "llvm.vector.reduce.add.v8i32", _I32, [_vector(_I32, 8)])
        return builder.call(reduce_add, [builder.load(lanes)])
    return types.int32(w, p, x, c, n), codegen


def _isum_fixed(blocks):
    """An intrinsic for sum over i < 32 * blocks of w[p + i] * x[c + i] as int32, with no loop: the
    common group sizes (32, 64) as straight-line code. (Through _isum_run's loop of one or two trips,
    s15M's 32000 x 288 classifier ran markedly slower: docs/performance.md.)"""
    def typer(typingctx, w, p, x, c):
        if not _contiguous_bytes(w, x):
            return None

        def codegen(context, builder, sig, args):
            w_data, x_data = _data(context, builder, sig.args[0], args[0]), _data(context, builder, sig.args[2], args[2])
            lanes = None
            for b in range(blocks):
                k = ir.Constant(args[1].type, 32 * b)
                w_k = _load(builder, w_data, builder.add(args[1], k), _vector(_I8, 32))
                x_k = _load(builder, x_data, builder.add(args[3], k), _vector(_I8, 32))
                part = _dot8_signed(builder, w_k, x_k)
                lanes = part if lanes is None else builder.add(lanes, part)
            reduce_add = _function(builder, "llvm.vector.reduce.add.v8i32", _I32, [_vector(_I32, 8)])
            return builder.call(reduce_add, [lanes])
        return types.int32(w, p, x, c), codegen
    return intrinsic(typer)


_isum32, _isum64 = _isum_fixed(1), _isum_fixed(2)


@numba.njit(inline="always")
def _isum_at(w, p, x, c, gs):
    """sum over i < G of w[p + i] * x[c + i], in integers: one group's integer dot product."""
    if gs == 32:
        return _isum32(w, p, x, c)
    if gs == 64:
        return _isum64(w, p, x, c)
    if gs % 32 == 0:
        return _isum_run(w, p, x, c, gs)
    total = 0
    for i in range(gs):
        total += np.int32(w[p + i]) * np.int32(x[c + i])
    return np.int32(total)


@numba.njit(inline="always")
def row_at(w, p, ws, s, x, c, xs, xg, gs, groups):
    """_row on flat arrays, with no views made: the weight row at w[p:], its scales at ws[s:], the
    quantized x row at x[c:] and its scales at xs[xg:]. (A view made in compiled code counts a
    reference to its array, an atomic add that every thread of a parallel loop shares.)"""
    val = np.float32(0.0)
    for g in range(groups):
        val += np.float32(_isum_at(w, p + g * gs, x, c + g * gs, gs)) * ws[s + g] * xs[xg + g]
    return val


@numba.njit(inline="always")
def _row(wq, ws, xq, xs, gs):
    """One output of runq.c's matmul: a weight row (wq (in,) int8, ws (G,)) times one quantized x row."""
    return row_at(wq, 0, ws, 0, xq, 0, xs, 0, gs, ws.shape[0])


@numba.njit(cache=True)
def quantize(x, gs, xq, xs):
    """runq.c's quantize(): per group of gs values of each row of x (n, in) float32, xs = max|x| / 127
    and xq = round(x / xs) (C's round of the float32 quotient: halves away from zero; an all-zero group
    quantizes to zeros)."""
    for j in range(x.shape[0]):
        for g in range(x.shape[1] // gs):
            c = g * gs
            wmax = np.float32(0.0)
            for i in range(c, c + gs):
                wmax = max(wmax, abs(x[j, i]))
            scale = wmax / np.float32(127.0)
            safe = scale if scale != 0 else np.float32(1.0)
            for i in range(c, c + gs):
                ratio = np.float64(x[j, i] / safe)                  # float32 quotient, rounded in double
                q = np.floor(abs(ratio) + 0.5)
                xq[j, i] = np.int8(-q if ratio < 0 else q)
            xs[j, g] = scale


@numba.njit(inline="always")
def _quantized(x, gs):
    xq = np.empty(x.shape, np.int8)
    xs = np.empty((x.shape[0], x.shape[1] // gs), np.float32)
    quantize(x, gs, xq, xs)
    return xq, xs


@numba.njit(parallel=True, cache=True)
def matvec(wq, ws, gs, x, out):
    """out = x @ W.T for W given as int8 values wq (out, in) and group scales ws (out, in / gs);
    x (n, in) float32 is quantized here as runq.c quantizes it."""
    xq, xs = _quantized(x, gs)
    rows, n = wq.shape[0], x.shape[0]
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            for j in range(n):
                out[j, o] = _row(wq[o], ws[o], xq[j], xs[j], gs)


@numba.njit(parallel=True, cache=True)
def matvec3(wqs, wss, gs, x, out_a, out_b, out_c):
    """out_a, out_b, out_c = x @ A.T, x @ B.T, x @ C.T (A, B, C = wqs with scales wss), x quantized
    once, all their rows in one parallel loop (as kernels/ggml.matvec3)."""
    xq, xs = _quantized(x, gs)
    n = x.shape[0]
    ra, rb, rc = wqs[0].shape[0], wqs[1].shape[0], wqs[2].shape[0]
    total = ra + rb + rc
    tasks = min(TASKS, total)
    for t in numba.prange(tasks):
        start, stop = _task_rows(t, tasks, total)
        for r in range(start, stop):
            for j in range(n):
                if r < ra:
                    out_a[j, r] = _row(wqs[0][r], wss[0][r], xq[j], xs[j], gs)
                elif r < ra + rb:
                    out_b[j, r - ra] = _row(wqs[1][r - ra], wss[1][r - ra], xq[j], xs[j], gs)
                else:
                    out_c[j, r - ra - rb] = _row(wqs[2][r - ra - rb], wss[2][r - ra - rb], xq[j], xs[j], gs)


@numba.njit(parallel=True, cache=True)
def swiglu(wq1, ws1, wq3, ws3, gs, x, out):
    """out = silu(x @ W1.T) * (x @ W3.T), x quantized once; silu(a) = a * (1 / (1 + exp(-a))) as runq.c."""
    xq, xs = _quantized(x, gs)
    rows, n = wq1.shape[0], x.shape[0]
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            for j in range(n):
                a = _row(wq1[o], ws1[o], xq[j], xs[j], gs)
                b = _row(wq3[o], ws3[o], xq[j], xs[j], gs)
                out[j, o] = a * (np.float32(1.0) / (np.float32(1.0) + np.exp(-a))) * b
