"""Matrix-vector products with ggml's quantized block formats, reading the weights as the file stores them.

out = x @ W.T for a decode-sized x (up to 8 rows) and W in Q8_0, Q4_0, Q4_1, Q4_K or Q6_K: each
kernel reads the raw bytes of the matrix (a view of the memory-mapped GGUF file) once, in parallel
over output rows, and keeps no float32 copy of it. Two ways to do the arithmetic:

- exact (`matvec_exact`): every weight is decoded to the float32 value gguf's `dequantize` gives it
  (bit for bit: tests/test_kernels.py), and dotted with the float32 activations. Only the order of
  the float32 sum differs from dequantize-then-BLAS (BLAS reorders it too): the parity tests run this.
- fast (`matvec_fast`): activations quantized as llama.cpp quantizes them for these types (Q8_0 /
  Q8_1 blocks of 32: d_x = max|x| / 127, q_x = round(x * (1 / d_x)) halves away from zero, and
  s_x = d_x * sum(q_x)); per block, a sum of integer products, exact in int32, scaled once:
      Q8_0  d_w d_x sum(q_w q_x)                 Q4_0  d_w d_x sum((n_w - 8) q_x)
      Q4_1  d_w d_x sum(n_w q_x) + m_w s_x       Q4_K  (d sc) d_x sum(n_w q_x) - (dmin m) s_x
      Q6_K  d_x (d sc_a sum_a(q_w q_x) + d sc_b sum_b(q_w q_x))   (its two 16-value sub-blocks)
  The K-quants take the same 32-value activation blocks as the others (llama.cpp gives them 256-value
  Q8_K super-blocks, a float scale and integer sums per 16): one quantization of x serves every
  type, and a Q4_K sub-block (32 values, one scale and min) lines up with one activation block.

Speed (why the code looks as it does; figures for one core of the 2-core dev machine, SmolLM2 shapes,
from benchmarks/bench_kernels.py):
- Lane-wise accumulators (exact). A dot product summed into one float32 scalar is a chain of
  dependent adds, which LLVM may not reorder (that would change the rounding). Summing into 32 lanes
  instead (acc[i] += w[i] * x[c + i], lane i of every group of 32), added up once per output row,
  gives 32 independent sums, four AVX2 vectors: measured 2.9x faster (Q4_1: ~3.5 G weights/s).
- The weights are decoded inside that multiply-add loop, not into a buffer of floats first: through
  a buffer LLVM emitted scalar code, 3-5x slower. With 4+ rows of x, four rows share each decode.
- Integer dot products (fast) are LLVM vector intrinsics (see the fast section): ~7 G weights/s.
- Parallel over output rows, in TASKS contiguous ranges, so each thread reads its share of the
  matrix as one sequential stream; a task's scratch is allocated once per call, not per row.
- f16 scales are read as two bytes and converted by the CPU's vcvtph2ps (`_f16`).
- No BLAS here: a decode step must stay on numba's thread pool (see kernels/matvec.py).

More rows of x (a prompt) go to BLAS instead: `dequantize_rows` decodes a tile of rows of W into a
reused float32 buffer (single-threaded, between BLAS calls); see GGMLTensor.linear.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 32          # float32 partial sums per row of x: one per value of a 32-value block
QK = 32             # values per block (Q8_0, Q4_0, Q4_1, and the activations' blocks)
QK_K = 256          # values per super-block (Q4_K, Q6_K)

# bytes per block, as ggml-common.h lays them out
Q8_0_BYTES = 34     # f16 d, int8 qs[32]                           w = d * q
Q4_0_BYTES = 18     # f16 d, u8 qs[16]                             w = d * (nibble - 8)
Q4_1_BYTES = 20     # f16 d, f16 m, u8 qs[16]                      w = d * nibble + m
Q4_K_BYTES = 144    # f16 d, f16 dmin, u8 scales[12], u8 qs[128]   w = (d sc_s) nibble - (dmin m_s)
Q6_K_BYTES = 210    # u8 ql[128], u8 qh[64], i8 scales[16], f16 d  w = (d sc_s) (q6 - 32)


# ----------------------------------------------------------------------------------------------
# reading blocks

@intrinsic
def _half_to_float(typingctx, bits):
    """The float32 value of the IEEE half-precision number with these 16 bits (numba has no float16)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 16:
            v = builder.trunc(v, ir.IntType(16))
        elif bits.bitwidth < 16:
            v = builder.zext(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())   # exact, any value

    return types.float32(bits), codegen


@numba.njit(inline="always")
def _f16(row, p):
    """The little-endian f16 at byte p of a row, as float32."""
    return _half_to_float(np.uint16(row[p]) | (np.uint16(row[p + 1]) << np.uint16(8)))


@numba.njit(inline="always")
def _bits(row, k, shift, mask):
    """(row[k] >> shift) & mask, in unsigned 32-bit arithmetic. (numba computes integers in int64,
    and LLVM then vectorizes the unpacking with 64-bit lanes: measured 25% slower.)"""
    return (np.uint32(row[k]) >> np.uint32(shift)) & np.uint32(mask)


@numba.njit(inline="always")
def _q4_k_scale_min(row, p, s):
    """The 6-bit scale and min of sub-block s of the Q4_K super-block at p (gguf's Q4_K.get_scale_min:
    bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7 have
    their low 4 bits in bytes 8-11 and their high 2 bits in the top bits of bytes 0-3 and 4-7)."""
    k = p + 4
    if s < 4:
        return np.int32(row[k + s]) & 63, np.int32(row[k + 4 + s]) & 63
    lo = np.int32(row[k + s + 4])
    return (lo & 15) | ((np.int32(row[k + s - 4]) >> 6) << 4), (lo >> 4) | ((np.int32(row[k + s]) >> 6) << 4)


# ----------------------------------------------------------------------------------------------
# exact: each 32-value group of weights decoded to float32 as gguf does, times float32 activations
#
# Every type is read in groups of 32 values (a Q8_0/Q4_0/Q4_1 block; an eighth of a Q4_K or Q6_K
# super-block). For each type: `_<type>_dot` adds one group's products with one row of x to 32
# lane accumulators, and `_<type>_dot4` with four rows of x at once, decoding each value once for
# the four. The values are bit for bit gguf's: in every type the product of scale and quant is exact
# in float32 (an 11-bit f16 mantissa times at most 8+6 bits), so the only rounding is the one
# addition of Q4_1's m or Q4_K's min, done as gguf does it (product first, then the add). Q4_0 and
# Q4_1 share one loop, w = a * (nibble - offset) + b: for Q4_0 b is -0.0, which adds nothing, not
# even to the sign of a zero.
#
# Why decode inside the multiply-add loop rather than into a buffer of 32 floats first: LLVM then
# vectorizes the whole group (8 values per AVX2 instruction from bytes to sums); through a buffer it
# emitted scalar code, 3-5x slower (it cannot tell that the buffer and the accumulators are apart).

@numba.njit(inline="always")
def _nibbles_dot(row, q, off, a, b, x, j, c, acc):
    """acc[i] += (a * (nibble_i - off) + b) * x[j, c + i] over the 32 nibbles of the 16 bytes at q
    (values 0..15 in the low nibbles, 16..31 in the high ones): Q4_0 and Q4_1. (nibble - off is
    a small integer, exact in float32 whichever way it is computed.)"""
    for i in range(16):
        lo, hi = np.float32(_bits(row, q + i, 0, 15)), np.float32(_bits(row, q + i, 4, 15))
        acc[i] += (a * (lo - off) + b) * x[j, c + i]
        acc[i + 16] += (a * (hi - off) + b) * x[j, c + 16 + i]


@numba.njit(inline="always")
def _nibbles_dot4(row, q, off, a, b, x, j, c, acc):
    """_nibbles_dot for rows j..j+3 of x into acc[0..3]."""
    for i in range(16):
        lo = a * (np.float32(_bits(row, q + i, 0, 15)) - off) + b
        hi = a * (np.float32(_bits(row, q + i, 4, 15)) - off) + b
        acc[0, i] += lo * x[j, c + i]
        acc[0, i + 16] += hi * x[j, c + 16 + i]
        acc[1, i] += lo * x[j + 1, c + i]
        acc[1, i + 16] += hi * x[j + 1, c + 16 + i]
        acc[2, i] += lo * x[j + 2, c + i]
        acc[2, i + 16] += hi * x[j + 2, c + 16 + i]
        acc[3, i] += lo * x[j + 3, c + i]
        acc[3, i + 16] += hi * x[j + 3, c + 16 + i]


@numba.njit(inline="always")
def _q8_0_dot(row, g, x, j, c, acc):
    p = g * Q8_0_BYTES
    d = _f16(row, p)
    for i in range(32):
        acc[i] += d * np.float32(np.int8(row[p + 2 + i])) * x[j, c + i]


@numba.njit(inline="always")
def _q8_0_dot4(row, g, x, j, c, acc):
    p = g * Q8_0_BYTES
    d = _f16(row, p)
    for i in range(32):
        w = d * np.float32(np.int8(row[p + 2 + i]))
        acc[0, i] += w * x[j, c + i]
        acc[1, i] += w * x[j + 1, c + i]
        acc[2, i] += w * x[j + 2, c + i]
        acc[3, i] += w * x[j + 3, c + i]


@numba.njit(inline="always")
def _q4_0_params(row, g):
    """(byte offset of the nibbles, offset, a, b): w = d * (nibble - 8) (+ -0.0)."""
    p = g * Q4_0_BYTES
    return p + 2, np.float32(8.0), _f16(row, p), np.float32(-0.0)


@numba.njit(inline="always")
def _q4_1_params(row, g):
    """(byte offset of the nibbles, offset, a, b): w = d * (nibble - 0) + m."""
    p = g * Q4_1_BYTES
    return p + 4, np.float32(0.0), _f16(row, p), _f16(row, p + 2)


@numba.njit(inline="always")
def _q4_k_params(row, p, s, d, dmin):
    """Sub-block s (0..7) of the Q4_K super-block at p, whose d and dmin are given: (byte offset of
    its 32 bytes, the shift that selects its nibbles (low for even s, high for odd), d * scale_s,
    dmin * min_s). The callers loop over s in range(8), which LLVM unrolls: s is then a constant
    and so are the shifts and the scale unpacking (measured 2x faster than a run-time s)."""
    sc, mn = _q4_k_scale_min(row, p, s)
    return p + 16 + 32 * (s // 2), 4 * (s % 2), d * np.float32(sc), dmin * np.float32(mn)


@numba.njit(inline="always")
def _q4_k_dot(row, p, s, d, dmin, x, j, c, acc):
    q, shift, ds, ms = _q4_k_params(row, p, s, d, dmin)
    for i in range(32):
        acc[i] += (ds * np.float32(_bits(row, q + i, shift, 15)) - ms) * x[j, c + i]


@numba.njit(inline="always")
def _q4_k_dot4(row, p, s, d, dmin, x, j, c, acc):
    q, shift, ds, ms = _q4_k_params(row, p, s, d, dmin)
    for i in range(32):
        w = ds * np.float32(_bits(row, q + i, shift, 15)) - ms
        acc[0, i] += w * x[j, c + i]
        acc[1, i] += w * x[j + 1, c + i]
        acc[2, i] += w * x[j + 2, c + i]
        acc[3, i] += w * x[j + 3, c + i]


@numba.njit(inline="always")
def _q6_k_params(row, p, s, d):
    """Values 32 s .. 32 s + 31 (s = 0..7, a constant after unrolling as in _q4_k_params) of the Q6_K
    super-block at p, whose d is given. Its value e = 128 h + r has its low 4 bits in ql[64 h + r % 64]
    (the low nibble for r < 64, else the high one) and its high 2 bits in qh[32 h + r % 32] at bit
    2 (r // 32), and the scale of its 16-value sub-block: gguf's Q6_K.dequantize_blocks, per group.
    -> (ql offset, ql shift, qh offset, qh shift, d * scale of the first 16, d * scale of the last 16)"""
    h, r = s // 4, 32 * (s % 4)
    da = d * np.float32(np.int8(row[p + 192 + 2 * s]))
    db = d * np.float32(np.int8(row[p + 193 + 2 * s]))
    return p + 64 * h + r % 64, 4 * (r // 64), p + 128 + 32 * h, 2 * (r // 32), da, db


@numba.njit(inline="always")
def _q6(row, ql, sl, qh, sh, i):
    """The 6-bit quant i of a Q6_K group, minus 32, as float32."""
    return np.float32(_bits(row, ql + i, sl, 15) | (_bits(row, qh + i, sh, 3) << np.uint32(4))) - np.float32(32.0)


@numba.njit(inline="always")
def _q6_k_dot(row, p, s, d, x, j, c, acc):
    ql, sl, qh, sh, da, db = _q6_k_params(row, p, s, d)
    for i in range(16):
        acc[i] += da * _q6(row, ql, sl, qh, sh, i) * x[j, c + i]
        acc[i + 16] += db * _q6(row, ql, sl, qh, sh, i + 16) * x[j, c + 16 + i]


@numba.njit(inline="always")
def _q6_k_dot4(row, p, s, d, x, j, c, acc):
    ql, sl, qh, sh, da, db = _q6_k_params(row, p, s, d)
    for i in range(16):
        lo = da * _q6(row, ql, sl, qh, sh, i)
        hi = db * _q6(row, ql, sl, qh, sh, i + 16)
        acc[0, i] += lo * x[j, c + i]
        acc[0, i + 16] += hi * x[j, c + 16 + i]
        acc[1, i] += lo * x[j + 1, c + i]
        acc[1, i + 16] += hi * x[j + 1, c + 16 + i]
        acc[2, i] += lo * x[j + 2, c + i]
        acc[2, i + 16] += hi * x[j + 2, c + 16 + i]
        acc[3, i] += lo * x[j + 3, c + i]
        acc[3, i + 16] += hi * x[j + 3, c + 16 + i]


# ggml type ids (GGMLQuantizationType's values)
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14


@numba.njit(inline="always")
def _row_dot(qt, row, groups, x, j, acc):
    """acc[i] += sum over groups g of w[32 g + i] * x[j, 32 g + i]: a weight row of type qt, one row
    of x. (The branch on the type is taken once per row: inside the loop over groups it cost a
    third of the speed.)"""
    if qt == Q4_1:
        for g in range(groups):
            q, off, a, b = _q4_1_params(row, g)
            _nibbles_dot(row, q, off, a, b, x, j, g * QK, acc)
    elif qt == Q8_0:
        for g in range(groups):
            _q8_0_dot(row, g, x, j, g * QK, acc)
    elif qt == Q4_0:
        for g in range(groups):
            q, off, a, b = _q4_0_params(row, g)
            _nibbles_dot(row, q, off, a, b, x, j, g * QK, acc)
    elif qt == Q4_K:
        for b in range(groups // 8):
            p = b * Q4_K_BYTES
            d, dmin = _f16(row, p), _f16(row, p + 2)
            for s in range(8):
                _q4_k_dot(row, p, s, d, dmin, x, j, (8 * b + s) * QK, acc)
    else:
        for b in range(groups // 8):
            p = b * Q6_K_BYTES
            d = _f16(row, p + 208)
            for s in range(8):
                _q6_k_dot(row, p, s, d, x, j, (8 * b + s) * QK, acc)


@numba.njit(inline="always")
def _row_dot4(qt, row, groups, x, j, acc):
    """_row_dot for rows j..j+3 of x into acc[0..3]."""
    if qt == Q4_1:
        for g in range(groups):
            q, off, a, b = _q4_1_params(row, g)
            _nibbles_dot4(row, q, off, a, b, x, j, g * QK, acc)
    elif qt == Q8_0:
        for g in range(groups):
            _q8_0_dot4(row, g, x, j, g * QK, acc)
    elif qt == Q4_0:
        for g in range(groups):
            q, off, a, b = _q4_0_params(row, g)
            _nibbles_dot4(row, q, off, a, b, x, j, g * QK, acc)
    elif qt == Q4_K:
        for b in range(groups // 8):
            p = b * Q4_K_BYTES
            d, dmin = _f16(row, p), _f16(row, p + 2)
            for s in range(8):
                _q4_k_dot4(row, p, s, d, dmin, x, j, (8 * b + s) * QK, acc)
    else:
        for b in range(groups // 8):
            p = b * Q6_K_BYTES
            d = _f16(row, p + 208)
            for s in range(8):
                _q6_k_dot4(row, p, s, d, x, j, (8 * b + s) * QK, acc)


@numba.njit(inline="always")
def _lanes_sum(acc):
    """The sum of 32 lanes; the lanes are zeroed for the next dot product."""
    s = np.float32(0.0)
    for i in range(LANES):
        s += acc[i]
        acc[i] = 0.0
    return s


# Parallel tasks per call: contiguous ranges of output rows. A fixed number rather than one per
# thread (asking numba for its thread count costs a microsecond per call from Python): numba's
# static schedule hands each thread a contiguous run of tasks, so each thread still reads its share
# of the matrix as one stream; a task's scratch (the lane accumulators) is allocated once.
TASKS = 64


@numba.njit(inline="always")
def _task_rows(t, tasks, rows):
    """Output rows [start, stop) of task t: contiguous ranges, as even as they can be."""
    return t * rows // tasks, (t + 1) * rows // tasks


@numba.njit(parallel=True, cache=True)
def matvec_exact(qt, raw, x, out):
    """out = x @ W.T, W of ggml type qt (Q8_0, Q4_0, Q4_1, Q4_K or Q6_K) given as its raw bytes.

    raw: (out_features, row bytes) uint8; x: (n, in_features) float32, C-contiguous; out: (n,
    out_features) float32.
    Rows of x are taken four at a time (each group of weights decoded once for the four), then the
    rest one at a time.
    """
    rows, n, groups = raw.shape[0], x.shape[0], x.shape[1] // QK
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        acc = np.zeros(LANES, np.float32)
        acc4 = np.zeros((4, LANES), np.float32)
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            row = raw[o]
            j = 0
            while j + 4 <= n:
                _row_dot4(qt, row, groups, x, j, acc4)
                for k in range(4):
                    out[j + k, o] = _lanes_sum(acc4[k])
                j += 4
            while j < n:
                _row_dot(qt, row, groups, x, j, acc)
                out[j, o] = _lanes_sum(acc)
                j += 1


# ----------------------------------------------------------------------------------------------
# fast: int8 activations, an integer dot product per group of 32
#
# numba types every integer expression as int64, so a dot product of bytes written as a numba loop
# compiles to scalar 64-bit multiplies (measured: slower than the float path). The integer dot
# products are written instead as LLVM vector code, one small intrinsic per way of unpacking the
# weights' quants: load the 16 or 32 bytes as one vector, unpack to int8 values, widen to int32,
# multiply by the activations and add up (`llvm.vector.reduce.add`). LLVM turns the widening
# multiply-add into pmaddwd (AVX2: 16 products per instruction); it is plain LLVM IR, so any CPU
# target compiles it.

_I8, _I32 = ir.IntType(8), ir.IntType(32)


def _contiguous_bytes(*array_types) -> bool:
    """Whether these numba types are all contiguous 1-D arrays of bytes (what _load_bytes reads)."""
    return all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and t.dtype in (types.uint8, types.int8)
               for t in array_types)


def _load_bytes(context, builder, array_type, array, offset, n):
    """<n x i8> from byte `offset` of a contiguous 1-D uint8/int8 array (no alignment assumed)."""
    data = context.make_array(array_type)(context, builder, value=array).data
    pointer = builder.bitcast(builder.gep(data, [offset]), ir.VectorType(_I8, n).as_pointer())
    vector = builder.load(pointer)
    vector.align = 1
    return vector


def _bytes(n, value):
    return ir.Constant(ir.VectorType(_I8, n), [value] * n)


def _splat_shift(builder, shift, n):
    """<n x i8> filled with a run-time shift count."""
    one = builder.insert_element(ir.Constant(ir.VectorType(_I8, n), ir.Undefined),
                                 builder.trunc(shift, _I8), ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _int_dot(builder, w, w_signed, x):
    """sum of w[i] * x[i] as int32, for <n x i8> vectors w (signed or unsigned) and x (signed)."""
    n = w.type.count
    wide = ir.VectorType(_I32, n)
    products = builder.mul(builder.sext(w, wide) if w_signed else builder.zext(w, wide), builder.sext(x, wide))
    reduce_add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [wide]),
                                                f"llvm.vector.reduce.add.v{n}i32")
    return builder.call(reduce_add, [products])


@intrinsic
def _isum_q8(typingctx, w, p, x, c):
    """sum over i < 32 of int8(w[p + i]) * x[c + i]   (w: a row of bytes, x: int8 activations)"""
    if not _contiguous_bytes(w, x):
        return None

    def codegen(context, builder, sig, args):
        q = _load_bytes(context, builder, sig.args[0], args[0], args[1], 32)
        return _int_dot(builder, q, True, _load_bytes(context, builder, sig.args[2], args[2], args[3], 32))
    return types.int32(w, p, x, c), codegen


@intrinsic
def _isum_nibbles(typingctx, w, p, x, c):
    """sum over i < 16 of (w[p + i] & 15) * x[c + i] + (w[p + i] >> 4) * x[c + 16 + i]  (Q4_0, Q4_1)"""
    if not _contiguous_bytes(w, x):
        return None

    def codegen(context, builder, sig, args):
        q = _load_bytes(context, builder, sig.args[0], args[0], args[1], 16)
        low, high = builder.and_(q, _bytes(16, 15)), builder.lshr(q, _bytes(16, 4))
        values = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        return _int_dot(builder, values, False, _load_bytes(context, builder, sig.args[2], args[2], args[3], 32))
    return types.int32(w, p, x, c), codegen


@intrinsic
def _isum_nibbles_at(typingctx, w, p, shift, x, c):
    """sum over i < 32 of ((w[p + i] >> shift) & 15) * x[c + i]   (a Q4_K sub-block)"""
    if not _contiguous_bytes(w, x):
        return None

    def codegen(context, builder, sig, args):
        q = _load_bytes(context, builder, sig.args[0], args[0], args[1], 32)
        values = builder.and_(builder.lshr(q, _splat_shift(builder, args[2], 32)), _bytes(32, 15))
        return _int_dot(builder, values, False, _load_bytes(context, builder, sig.args[3], args[3], args[4], 32))
    return types.int32(w, p, shift, x, c), codegen


@intrinsic
def _isum_q6(typingctx, w, ql, sl, qh, sh, x, c):
    """sum over i < 16 of q6_i * x[c + i], q6_i = ((w[ql+i] >> sl) & 15 | ((w[qh+i] >> sh) & 3) << 4) - 32
    (a Q6_K sub-block, see _q6_k_params)"""
    if not _contiguous_bytes(w, x):
        return None

    def codegen(context, builder, sig, args):
        w_type, w_value = sig.args[0], args[0]
        low = _load_bytes(context, builder, w_type, w_value, args[1], 16)
        high = _load_bytes(context, builder, w_type, w_value, args[3], 16)
        low = builder.and_(builder.lshr(low, _splat_shift(builder, args[2], 16)), _bytes(16, 15))
        high = builder.and_(builder.lshr(high, _splat_shift(builder, args[4], 16)), _bytes(16, 3))
        values = builder.sub(builder.or_(low, builder.shl(high, _bytes(16, 4))), _bytes(16, 32))
        return _int_dot(builder, values, True, _load_bytes(context, builder, sig.args[5], args[5], args[6], 16))
    return types.int32(w, ql, sl, qh, sh, x, c), codegen


@numba.njit(inline="always")
def _round_away(v):
    """C's roundf: to the nearest integer, halves away from zero."""
    q = np.int32(np.floor(abs(v) + np.float32(0.5)))
    return -q if v < 0 else q


@numba.njit(cache=True)
def quantize_activations(x, xq, xd, xsum):
    """x (n, in) float32 -> int8 blocks of 32, as llama.cpp's quantize_row_q8_0/q8_1:
    xd[j, g] = d_x = max|x| / 127, xq = round(x * (1 / d_x)) (halves away from zero; 0 where
    d_x = 0), xsum[j, g] = sum of the block's xq (s_x = d_x * xsum, Q8_1's s)."""
    n, groups = x.shape[0], x.shape[1] // QK
    for j in range(n):
        for g in range(groups):
            c = g * QK
            amax = np.float32(0.0)
            for i in range(QK):
                amax = max(amax, abs(x[j, c + i]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            total = 0
            for i in range(QK):
                q = _round_away(x[j, c + i] * inv)
                xq[j, c + i] = q
                total += q
            xd[j, g] = d
            xsum[j, g] = total


@numba.njit(inline="always")
def _row_fast(qt, row, xr, xd, xsum, j):
    """Weight row `row` (type qt) times row j of the quantized activations (xr = xq[j]): per group of
    32, the integer dot product, scaled as the type says. (The branch is taken once per row: inside
    the loop over groups it cost a third of the speed.)"""
    acc = np.float32(0.0)
    if qt == Q4_1:
        for g in range(xd.shape[1]):
            p, dx = g * Q4_1_BYTES, xd[j, g]
            isum = _isum_nibbles(row, p + 4, xr, g * QK)
            acc += _f16(row, p) * dx * np.float32(isum) + _f16(row, p + 2) * (dx * np.float32(xsum[j, g]))
    elif qt == Q8_0:
        for g in range(xd.shape[1]):
            p = g * Q8_0_BYTES
            acc += _f16(row, p) * xd[j, g] * np.float32(_isum_q8(row, p + 2, xr, g * QK))
    elif qt == Q4_0:        # sum((n - 8) q) = sum(n q) - 8 sum(q), in integers
        for g in range(xd.shape[1]):
            p = g * Q4_0_BYTES
            isum = _isum_nibbles(row, p + 2, xr, g * QK) - 8 * xsum[j, g]
            acc += _f16(row, p) * xd[j, g] * np.float32(isum)
    elif qt == Q4_K:
        for b in range(xd.shape[1] // 8):
            p = b * Q4_K_BYTES
            d, dmin = _f16(row, p), _f16(row, p + 2)
            for s in range(8):
                g = 8 * b + s
                q, shift, ds, ms = _q4_k_params(row, p, s, d, dmin)
                dx = xd[j, g]
                isum = _isum_nibbles_at(row, q, shift, xr, g * QK)
                acc += ds * dx * np.float32(isum) - ms * (dx * np.float32(xsum[j, g]))
    else:
        for b in range(xd.shape[1] // 8):
            p = b * Q6_K_BYTES
            d = _f16(row, p + 208)
            for s in range(8):
                g = 8 * b + s
                ql, sl, qh, sh, da, db = _q6_k_params(row, p, s, d)   # da, db: d * the 16-value scales
                isum_a = _isum_q6(row, ql, sl, qh, sh, xr, g * QK)
                isum_b = _isum_q6(row, ql + 16, sl, qh + 16, sh, xr, g * QK + 16)
                acc += xd[j, g] * (da * np.float32(isum_a) + db * np.float32(isum_b))
    return acc


@numba.njit(parallel=True, cache=True)
def matvec_fast(qt, raw, x, out):
    """out = x @ W.T, W of ggml type qt given as its raw bytes (out_features, row bytes) uint8, x
    (n, in) float32 quantized here (quantize_activations, in the same call: one call per product),
    out (n, out_features) float32. Rows of x one at a time (the weight row stays in L1)."""
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    xsum = np.empty((x.shape[0], x.shape[1] // QK), np.int32)
    quantize_activations(x, xq, xd, xsum)
    rows, n = raw.shape[0], x.shape[0]
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            row = raw[o]
            for j in range(n):
                out[j, o] = _row_fast(qt, row, xq[j], xd, xsum, j)


# ----------------------------------------------------------------------------------------------
# tiles of W as float32, for BLAS (prefill)

@numba.njit(inline="always")
def _nibbles_values(row, q, off, a, b, w, k):
    for i in range(16):
        w[k + i] = a * (np.float32(_bits(row, q + i, 0, 15)) - off) + b
        w[k + i + 16] = a * (np.float32(_bits(row, q + i, 4, 15)) - off) + b


@numba.njit(inline="always")
def _group_values(qt, row, g, w):
    """w[32 g + i] = value i of group g of a weight row of type qt, bit for bit as gguf's dequantize."""
    k = g * QK
    if qt == Q4_1:
        q, off, a, b = _q4_1_params(row, g)
        _nibbles_values(row, q, off, a, b, w, k)
    elif qt == Q8_0:
        p = g * Q8_0_BYTES
        d = _f16(row, p)
        for i in range(32):
            w[k + i] = d * np.float32(np.int8(row[p + 2 + i]))
    elif qt == Q4_0:
        q, off, a, b = _q4_0_params(row, g)
        _nibbles_values(row, q, off, a, b, w, k)
    elif qt == Q4_K:
        p = (g // 8) * Q4_K_BYTES
        q, shift, ds, ms = _q4_k_params(row, p, g % 8, _f16(row, p), _f16(row, p + 2))
        for i in range(32):
            w[k + i] = ds * np.float32(_bits(row, q + i, shift, 15)) - ms
    else:
        p = (g // 8) * Q6_K_BYTES
        ql, sl, qh, sh, da, db = _q6_k_params(row, p, g % 8, _f16(row, p + 208))
        for i in range(16):
            w[k + i] = da * _q6(row, ql, sl, qh, sh, i)
            w[k + i + 16] = db * _q6(row, ql, sl, qh, sh, i + 16)


@numba.njit(cache=True)
def dequantize_rows(qt, raw, out):
    """out[o] = row o of raw (type qt) as float32, for o < raw.shape[0]; out: (>= rows, in_features).

    Single-threaded: it runs between the prefill's BLAS calls, whose threads need the cores.
    """
    groups = out.shape[1] // QK
    for o in range(raw.shape[0]):
        row, w = raw[o], out[o]
        for g in range(groups):
            _group_values(qt, row, g, w)
