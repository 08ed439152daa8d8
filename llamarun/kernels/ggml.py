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
from llvmlite import binding as llvm_binding
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
# fast: int8 activations, integer dot products
#
# numba types every integer expression as int64, so a dot product of bytes written as a numba loop
# compiles to scalar 64-bit multiplies (measured: slower than the float path). The integer products
# are written instead as LLVM vector code in small intrinsics.
#
# Q8_0, Q4_0 and Q4_1 (the types of the common GGUF files, SmolLM2's among them) have one intrinsic
# each for a whole row (`_row_dot_fast`), llama.cpp's AVX2 loop in LLVM IR: per 32-value block, the
# 32 byte products summed pairwise into 8 int32 lanes (pmaddubsw then pmaddwd: two instructions),
# converted to float and multiply-added, scaled by d_w d_x, into 8 float lanes that live in a register
# for the whole row; one horizontal sum per row. The earlier form (one intrinsic per block, summed to a
# scalar there, then scaled and added to a scalar) spent most of its time in that per-block
# horizontal sum and the scalar chain: the row intrinsics measured 1.7-2.0x faster (Q4_1, SmolLM2's
# shapes, benchmarks/bench_kernels.py). pmaddubsw and psignb are x86 AVX2 instructions, used when
# the CPU has them; elsewhere the same sums are plain LLVM vector IR (the result is the same: every
# integer sum is exact). The K-quants keep a per-block intrinsic (`_isum_nibbles_at`, `_isum_q6`):
# their 6-bit scales make each block's scale a small computation anyway.

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vector(element, n):
    return ir.VectorType(element, n)


def _host_has_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2 (the host, unless NUMBA_CPU_NAME says otherwise)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    return bool(llvm_binding.get_host_cpu_features().get("avx2", False))


AVX2 = _host_has_avx2()


def _host_has_vnni() -> bool:
    """Whether the CPU also has 256-bit VNNI (vpdpbusd: AVX512-VNNI with AVX512-VL, or AVX-VNNI)."""
    if not AVX2:
        return False
    features = llvm_binding.get_host_cpu_features()
    return bool((features.get("avx512vnni") and features.get("avx512vl")) or features.get("avxvnni"))


VNNI = _host_has_vnni()


def _contiguous_bytes(*array_types) -> bool:
    """Whether these numba types are all contiguous 1-D arrays of bytes (what _load_bytes reads)."""
    return all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and t.dtype in (types.uint8, types.int8)
               for t in array_types)


def _data(context, builder, array_type, array):
    """The data pointer of a numba array value."""
    return context.make_array(array_type)(context, builder, value=array).data


def _load(builder, base, offset, value_type):
    """A value of value_type read at byte/element `offset` of pointer `base` (no alignment assumed)."""
    pointer = builder.bitcast(builder.gep(base, [offset]), value_type.as_pointer())
    value = builder.load(pointer)
    value.align = 1
    return value


def _load_bytes(context, builder, array_type, array, offset, n):
    """<n x i8> from byte `offset` of a contiguous 1-D uint8/int8 array."""
    return _load(builder, _data(context, builder, array_type, array), offset, _vector(_I8, n))


def _bytes(n, value):
    return ir.Constant(_vector(_I8, n), [value] * n)


def _function(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


def _splat_shift(builder, shift, n):
    """<n x i8> filled with a run-time shift count."""
    one = builder.insert_element(ir.Constant(_vector(_I8, n), ir.Undefined),
                                 builder.trunc(shift, _I8), ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_vector(_I32, n), [0] * n))


def _splat_float(builder, value, n):
    one = builder.insert_element(ir.Constant(_vector(_F32, n), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_vector(_I32, n), [0] * n))


def _int_dot(builder, w, w_signed, x):
    """sum of w[i] * x[i] as int32, for <n x i8> vectors w (signed or unsigned) and x (signed)."""
    n = w.type.count
    wide = _vector(_I32, n)
    products = builder.mul(builder.sext(w, wide) if w_signed else builder.zext(w, wide), builder.sext(x, wide))
    return builder.call(_function(builder, f"llvm.vector.reduce.add.v{n}i32", _I32, [wide]), [products])


def _pairwise_add(builder, v):
    """<2n x i32> -> <n x i32>: v[2i] + v[2i+1]."""
    n = v.type.count // 2
    even = builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n), list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n), list(range(1, 2 * n, 2))))
    return builder.add(even, odd)


def _dot8_unsigned(builder, w, x):
    """<32 x i8> w (unsigned) times <32 x i8> x (signed, |x| <= 127) -> <8 x i32>, lane i the sum of
    products 4i..4i+3. AVX2: pmaddubsw (products summed in pairs to int16, saturating: exact here, as
    the callers' w are nibbles (<= 15) or magnitudes <= 128, so a pair is at most 2 * 128 * 127 < 2^15),
    then pmaddwd by ones (pairs of those to int32)."""
    if VNNI:
        # vpdpbusd: the same four products per int32 lane, summed in one instruction (exact, no
        # saturation), so the same values as the two-instruction form below
        words = _vector(_I32, 8)
        return builder.call(_function(builder, "llvm.x86.avx512.vpdpbusd.256", words, [words] * 3),
                            [ir.Constant(words, [0] * 8), builder.bitcast(w, words), builder.bitcast(x, words)])
    if AVX2:
        pairs = builder.call(_function(builder, "llvm.x86.avx2.pmadd.ub.sw", _vector(_I16, 16),
                                       [_vector(_I8, 32)] * 2), [w, x])
        ones = ir.Constant(_vector(_I16, 16), [1] * 16)
        return builder.call(_function(builder, "llvm.x86.avx2.pmadd.wd", _vector(_I32, 8),
                                      [_vector(_I16, 16)] * 2), [pairs, ones])
    products = builder.mul(builder.zext(w, _vector(_I32, 32)), builder.sext(x, _vector(_I32, 32)))
    return _pairwise_add(builder, _pairwise_add(builder, products))


def _dot8_signed(builder, w, x):
    """_dot8_unsigned for signed w: |w| times x with w's sign moved onto x (llama.cpp's trick; exact,
    as |w| <= 128 and |x| <= 127 keep each pair's sum within int16)."""
    if AVX2:
        magnitude = builder.call(_function(builder, "llvm.abs.v32i8", _vector(_I8, 32), [_vector(_I8, 32), ir.IntType(1)]),
                                 [w, ir.Constant(ir.IntType(1), 0)])
        signed_x = builder.call(_function(builder, "llvm.x86.avx2.psign.b", _vector(_I8, 32), [_vector(_I8, 32)] * 2),
                                [x, w])
        return _dot8_unsigned(builder, magnitude, signed_x)
    products = builder.mul(builder.sext(w, _vector(_I32, 32)), builder.sext(x, _vector(_I32, 32)))
    return _pairwise_add(builder, _pairwise_add(builder, products))


def _multiply_add(builder, a, b, c):
    """a * b + c, the same rounding wherever it is used (so that a row's result never depends on
    which kernel variant computed it): one fused multiply-add with AVX2 (every AVX2 CPU has FMA),
    else a multiply and an add. (llvm.fmuladd would leave the choice to the code generator.)"""
    if AVX2:
        name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
        return builder.call(_function(builder, name, a.type, [a.type] * 3), [a, b, c])
    return builder.fadd(builder.fmul(a, b), c)


def _lanes_total(builder, v):
    """The sum of 8 float lanes as a fixed tree (halves added, then quarters, then the pair): three
    dependent adds instead of the seven of a left-to-right sum, in the same order every time."""
    n = v.type.count
    while n > 1:
        n //= 2
        low = builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n), list(range(n))))
        high = builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(low, high)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _rows_dot_fast_codegen(qt, n_rows):
    """Code for n_rows rows of int8 activations times one weight row of type qt (Q8_0, Q4_0, Q4_1),
    summed over the blocks g:
        Q8_0  d_w d_x[g] sum(q_w q_x)
        Q4_0  d_w d_x[g] sum(n_w q_x) - 8 d_w s_x[g]        (s_x = d_x sum(q_x))
        Q4_1  d_w d_x[g] sum(n_w q_x) + m_w s_x[g]
    The first terms go to 8 float lanes per activation row (registers), the s_x terms to a scalar
    per row. A block of weights is loaded and unpacked once for all the rows: with several rows (a
    batch of sequences decoded together) that is the part they share. Each row's arithmetic is the
    same whatever n_rows is.

    Arguments: (raw, o, xq, xd, xs, j, out): row o of the weight matrix raw's bytes; xq (n, in) int8, xd and xs
    (n, in / 32) float32, all C-contiguous; rows j .. j + n_rows - 1 of them, whose results go to
    out[j .. j + n_rows - 1] (out (n,) float32: whole, not a view out[j:], which would count a
    reference per call)."""
    block_bytes = {Q8_0: Q8_0_BYTES, Q4_0: Q4_0_BYTES, Q4_1: Q4_1_BYTES}[qt]

    def codegen(context, builder, sig, args):
        row = _row_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        xq, xd, xs = (_data(context, builder, t, a) for t, a in zip(sig.args[2:5], args[2:5]))
        j, out = args[5], _data(context, builder, sig.args[6], args[6])
        n_in, groups = cgutils.unpack_tuple(builder, context.make_array(sig.args[2])(context, builder, value=args[2]).shape, 2)[1], \
            cgutils.unpack_tuple(builder, context.make_array(sig.args[3])(context, builder, value=args[3]).shape, 2)[1]
        index = lambda v: builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v   # noqa: E731
        j = index(j)
        zero8 = ir.Constant(_vector(_F32, 8), [0.0] * 8)
        lanes = [cgutils.alloca_once_value(builder, zero8) for _ in range(n_rows)]        # registers after mem2reg
        offsets = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(n_rows)]
        with cgutils.for_range(builder, groups) as loop:
            g = loop.index
            p = builder.mul(g, ir.Constant(g.type, block_bytes))
            at = lambda k: builder.add(p, ir.Constant(p.type, k))   # noqa: E731
            # the block's f16 scales (d, and Q4_1's m after it) as one load of four halves converted
            # together (vcvtph2ps from memory): read one at a time, LLVM inserted each into a register
            # that the previous block's arithmetic wrote, chaining the blocks (measured 1.3x slower)
            halves = builder.fpext(_load(builder, row, p, _vector(ir.HalfType(), 4)), _vector(_F32, 4))
            d = builder.extract_element(halves, ir.Constant(_I32, 0))
            if qt == Q8_0:
                w = _load(builder, row, at(2), _vector(_I8, 32))
            else:
                q = _load(builder, row, at(block_bytes - 16), _vector(_I8, 16))
                w = builder.shuffle_vector(builder.and_(q, _bytes(16, 15)), builder.lshr(q, _bytes(16, 4)),
                                           ir.Constant(_vector(_I32, 32), list(range(32))))
                m = (builder.extract_element(halves, ir.Constant(_I32, 1)) if qt == Q4_1
                     else builder.fmul(d, ir.Constant(_F32, -8.0)))
            for k in range(n_rows):
                r = builder.add(j, ir.Constant(j.type, k))
                x = _load(builder, xq, builder.add(builder.mul(r, n_in), builder.mul(g, ir.Constant(g.type, QK))),
                          _vector(_I8, 32))
                block = builder.add(builder.mul(r, groups), g)
                isum = _dot8_signed(builder, w, x) if qt == Q8_0 else _dot8_unsigned(builder, w, x)
                if qt != Q8_0:
                    s_x = builder.load(builder.gep(xs, [block]))
                    builder.store(_multiply_add(builder, m, s_x, builder.load(offsets[k])), offsets[k])
                scale = builder.fmul(d, builder.load(builder.gep(xd, [block])))
                products = builder.sitofp(isum, _vector(_F32, 8))
                builder.store(_multiply_add(builder, products, _splat_float(builder, scale, 8), builder.load(lanes[k])),
                              lanes[k])
        for k in range(n_rows):
            total = builder.fadd(_lanes_total(builder, builder.load(lanes[k])), builder.load(offsets[k]))
            builder.store(total, builder.gep(out, [builder.add(j, ir.Constant(ir.IntType(64), k))]))
        return context.get_dummy_value()
    return codegen


def _row_pointer(context, builder, matrix_type, matrix, o_type, o):
    """A pointer to the first byte of row o of a C-contiguous 2-D array of bytes. (The kernels take
    (matrix, o) rather than the row `matrix[o]`: a view made in compiled code counts a reference to
    the matrix, an atomic add on memory that every thread of a parallel loop shares, twice per row.)"""
    array = context.make_array(matrix_type)(context, builder, value=matrix)
    stride = cgutils.unpack_tuple(builder, array.strides, 2)[0]
    return builder.gep(array.data, [builder.mul(context.cast(builder, o, o_type, types.intp), stride)])


def _bytes_matrix(t) -> bool:
    return isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and t.dtype in (types.uint8, types.int8)


def _rows_dot_fast_intrinsic(qt, n_rows):
    def typer(typingctx, raw, o, xq, xd, xs, j, out):
        matrices = (xq, xd, xs)
        if not (_bytes_matrix(raw) and isinstance(o, types.Integer) and all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C"
                                               for t in matrices)
                and xq.dtype == types.int8 and xd.dtype == xs.dtype == types.float32
                and isinstance(j, types.Integer) and isinstance(out, types.Array) and out.dtype == types.float32):
            return None
        return types.void(raw, o, xq, xd, xs, j, out), _rows_dot_fast_codegen(qt, n_rows)
    return intrinsic(typer)


# one and four rows of activations, for each type with a row kernel
_ROWS = {(qt, n): _rows_dot_fast_intrinsic(qt, n) for qt in (Q8_0, Q4_0, Q4_1) for n in (1, 4)}
_rows1_q8_0, _rows4_q8_0 = _ROWS[Q8_0, 1], _ROWS[Q8_0, 4]
_rows1_q4_0, _rows4_q4_0 = _ROWS[Q4_0, 1], _ROWS[Q4_0, 4]
_rows1_q4_1, _rows4_q4_1 = _ROWS[Q4_1, 1], _ROWS[Q4_1, 4]


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
def _quantized(x):
    """x (n, in) float32 -> (xq int8, xd, xs): the activation blocks and their d_x and s_x = d_x sum(q_x)."""
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    xsum = np.empty((x.shape[0], x.shape[1] // QK), np.int32)
    xs = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    quantize_into(x, xq, xd, xsum, xs)
    return xq, xd, xs


@numba.njit(inline="always")
def quantize_into(x, xq, xd, xsum, xs):
    """_quantized into given buffers (xsum: the int32 sums of the blocks, scratch)."""
    quantize_activations(x, xq, xd, xsum)
    for j in range(xd.shape[0]):
        for g in range(xd.shape[1]):
            xs[j, g] = xd[j, g] * np.float32(xsum[j, g])


@numba.njit(inline="always")
def _k_quant_row(qt, row, xq, xd, xs):
    """A Q4_K or Q6_K weight row times one row of quantized activations (xq (in,), xd and xs (in / 32,)):
    per 32-value sub-block, an integer dot product scaled as the type says."""
    acc = np.float32(0.0)
    if qt == Q4_K:
        for b in range(xd.shape[0] // 8):
            p = b * Q4_K_BYTES
            d, dmin = _f16(row, p), _f16(row, p + 2)
            for s in range(8):
                g = 8 * b + s
                q, shift, ds, ms = _q4_k_params(row, p, s, d, dmin)
                isum = _isum_nibbles_at(row, q, shift, xq, g * QK)
                acc += ds * xd[g] * np.float32(isum) - ms * xs[g]
    else:
        for b in range(xd.shape[0] // 8):
            p = b * Q6_K_BYTES
            d = _f16(row, p + 208)
            for s in range(8):
                g = 8 * b + s
                ql, sl, qh, sh, da, db = _q6_k_params(row, p, s, d)   # da, db: d * the 16-value scales
                isum_a = _isum_q6(row, ql, sl, qh, sh, xq, g * QK)
                isum_b = _isum_q6(row, ql + 16, sl, qh + 16, sh, xq, g * QK + 16)
                acc += xd[g] * (da * np.float32(isum_a) + db * np.float32(isum_b))
    return acc


# How far ahead of the row being read the kernels ask for the weights (software prefetch, below).
PREFETCH_BYTES = 2048


def _prefetch_lines(builder, first, count):
    """Prefetch (for reading, into every cache level) each 64-byte line of the bytes [first, first +
    count): first an int64 address, count an int64."""
    prefetch = _function(builder, "llvm.prefetch.p0i8", ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
    line = ir.Constant(ir.IntType(64), 64)
    with cgutils.for_range(builder, builder.udiv(builder.add(count, ir.Constant(ir.IntType(64), 63)), line)) as loop:
        address = builder.add(first, builder.mul(loop.index, line))
        builder.call(prefetch, [builder.inttoptr(address, ir.IntType(8).as_pointer()), ir.Constant(_I32, 0),
                                ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


@intrinsic
def prefetch_bytes(typingctx, data, start, count):
    """Prefetch the lines of bytes [start, start + count) from the first element of a C-contiguous
    array of any type (they may lie past its end: a prefetch is dropped there, never a fault). Why:
    _prefetch_ahead."""
    if not (isinstance(data, types.Array) and data.layout == "C" and isinstance(start, types.Integer)
            and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, value=args[0])
        first = builder.add(builder.ptrtoint(array.data, ir.IntType(64)), context.cast(builder, args[1], sig.args[1], types.int64))
        _prefetch_lines(builder, first, context.cast(builder, args[2], sig.args[2], types.int64))
        return context.get_dummy_value()
    return types.void(data, start, count), codegen


@numba.njit(inline="always")
def _prefetch_ahead(raw, o, distance):
    """Ask the CPU to bring into cache the bytes [distance, distance + row bytes) past the start of
    row o of the matrix raw (C-contiguous bytes): one prefetch per 64-byte line.

    Why: the weights are read once per token, from memory. The hardware prefetcher stops at every
    4 KiB page (the file's memory map has no huge pages), and a row of a small model (360 bytes of
    Q4_1 at SmolLM2's 576 inputs) is too short a stream for it to get going: the kernels streamed the
    model at 4-6 GB/s of the machine's 13-18. Prefetches are hints: past the end of the matrix
    they are dropped, never a fault."""
    prefetch_bytes(raw, o * raw.shape[1] + distance, raw.shape[1])


@numba.njit(inline="always")
def _rows_fast(qt, raw, o, xq, xd, xs, out):
    """out[j] = row o of the weight matrix raw (type qt) times row j of the quantized activations,
    for every j: four rows at a time where the type has a four-row kernel (the weights unpacked once
    for the four), then one at a time. out: (n,) float32 scratch."""
    _prefetch_ahead(raw, o, PREFETCH_BYTES)
    n = xq.shape[0]
    j = 0
    if qt == Q4_1:
        while j + 4 <= n:
            _rows4_q4_1(raw, o, xq, xd, xs, j, out)
            j += 4
        while j < n:
            _rows1_q4_1(raw, o, xq, xd, xs, j, out)
            j += 1
    elif qt == Q8_0:
        while j + 4 <= n:
            _rows4_q8_0(raw, o, xq, xd, xs, j, out)
            j += 4
        while j < n:
            _rows1_q8_0(raw, o, xq, xd, xs, j, out)
            j += 1
    elif qt == Q4_0:
        while j + 4 <= n:
            _rows4_q4_0(raw, o, xq, xd, xs, j, out)
            j += 4
        while j < n:
            _rows1_q4_0(raw, o, xq, xd, xs, j, out)
            j += 1
    else:
        row = raw[o]
        for j in range(n):
            out[j] = _k_quant_row(qt, row, xq[j], xd[j], xs[j])


@numba.njit(parallel=True, cache=True)
def matvec_fast(qt, raw, x, out):
    """out = x @ W.T, W of ggml type qt given as its raw bytes (out_features, row bytes) uint8, x
    (n, in) float32 quantized here (in the same call: one call per product), out (n, out_features)
    float32. A row's result does not depend on the other rows in the batch."""
    xq, xd, xs = _quantized(x)
    rows, n = raw.shape[0], x.shape[0]
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        column = np.empty(n, np.float32)
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            _rows_fast(qt, raw, o, xq, xd, xs, column)
            for j in range(n):
                out[j, o] = column[j]


# ----------------------------------------------------------------------------------------------
# fused products of a decode step: several matrices that read the same activations, in one call
#
# A decode step of a small model is many short products (SmolLM2: 30 layers x 7 matrices, 40-60 us
# each); each call from Python costs its dispatch and a start of the thread pool (~4 us), and the
# fast path quantized x once per matrix. q, k and v read the same normalized x, and so do the FFN's
# gate and up projections: one call each quantizes x once and runs all their rows in one parallel
# loop. Each output value is computed exactly as the single-matrix kernels compute it.

@numba.njit(inline="always")
def _row_exact(qt, row, x, j, acc):
    """Weight row `row` (type qt) times row j of float32 x, as matvec_exact computes it."""
    _row_dot(qt, row, x.shape[1] // QK, x, j, acc)
    return _lanes_sum(acc)


@numba.njit(inline="always")
def _part(r, ra, rb):
    """Row r of the stacked rows of three matrices (ra, rb, then the rest): (which matrix, its row)."""
    if r < ra:
        return 0, r
    if r < ra + rb:
        return 1, r - ra
    return 2, r - ra - rb


# Exact and fast are separate functions (not one with a flag): each compiles only its own arithmetic,
# which keeps the first-ever compilation of a decode step short.

@numba.njit(parallel=True, cache=True)
def matvec3_exact(qts, raws, x, outs):
    """outs[i] = x @ raws[i].T for the three matrices raws (types qts), float32 x, all their rows in
    one parallel loop (tasks over the stacked rows, so each matrix gets threads in proportion)."""
    ra, rb = raws[0].shape[0], raws[1].shape[0]
    total = ra + rb + raws[2].shape[0]
    tasks = min(TASKS, total)
    for t in numba.prange(tasks):
        acc = np.zeros(LANES, np.float32)
        start, stop = _task_rows(t, tasks, total)
        for r in range(start, stop):
            i, o = _part(r, ra, rb)
            for j in range(x.shape[0]):
                outs[i][j, o] = _row_exact(qts[i], raws[i][o], x, j, acc)


@numba.njit(parallel=True, cache=True)
def matvec3_fast(qts, raws, x, outs):
    """matvec3_exact with int8 activations: x quantized once for the three matrices."""
    xq, xd, xs = _quantized(x)
    ra, rb = raws[0].shape[0], raws[1].shape[0]
    total = ra + rb + raws[2].shape[0]
    tasks = min(TASKS, total)
    for t in numba.prange(tasks):
        column = np.empty(x.shape[0], np.float32)
        start, stop = _task_rows(t, tasks, total)
        for r in range(start, stop):
            i, o = _part(r, ra, rb)
            _rows_fast(qts[i], raws[i], o, xq, xd, xs, column)
            for j in range(x.shape[0]):
                outs[i][j, o] = column[j]


@numba.njit(inline="always")
def _silu_times(a, b):
    """silu(a) * b, silu(a) = a * (1 / (1 + exp(-a))), rounded as run.c and model.silu round it."""
    return a * (np.float32(1.0) / (np.float32(1.0) + np.exp(-a))) * b


@numba.njit(parallel=True, cache=True)
def swiglu_exact(qts, raws, x, out):
    """out = silu(x @ W1.T) * (x @ W3.T) for raws = (W1, W3) of types qts: the FFN's gated hidden
    units, one pass over both matrices, float32 x."""
    rows = raws[0].shape[0]
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        acc = np.zeros(LANES, np.float32)
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            for j in range(x.shape[0]):
                out[j, o] = _silu_times(_row_exact(qts[0], raws[0][o], x, j, acc),
                                        _row_exact(qts[1], raws[1][o], x, j, acc))


@numba.njit(parallel=True, cache=True)
def swiglu_fast(qts, raws, x, out):
    """swiglu_exact with int8 activations, x quantized once for both matrices."""
    xq, xd, xs = _quantized(x)
    rows = raws[0].shape[0]
    tasks = min(TASKS, rows)
    for t in numba.prange(tasks):
        gate, up = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
        start, stop = _task_rows(t, tasks, rows)
        for o in range(start, stop):
            _rows_fast(qts[0], raws[0], o, xq, xd, xs, gate)
            _rows_fast(qts[1], raws[1], o, xq, xd, xs, up)
            for j in range(x.shape[0]):
                out[j, o] = _silu_times(gate[j], up[j])


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
