"""Matrix-vector products with ggml's quantized block formats, reading the weights' blocks as they are stored.

out = x @ W.T for a decode-sized x (up to 8 rows) and W in Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K
(and, on the exact arithmetic only, Q2_K or Q3_K): each kernel reads the raw bytes of the matrix (a view of the
memory-mapped GGUF file; for the fast kernels, the same blocks packed in groups of rows, see
PACKED) once, in parallel over output rows, and keeps no float32 copy of it. Two ways to do
the arithmetic:

- exact (`matvec_exact`): every weight is decoded to the float32 value gguf's `dequantize` gives it
  (bit for bit: tests/test_kernels.py, tests/test_q2k_q3k.py), and dotted with the float32
  activations. Only the order of the float32 sum differs from dequantize-then-BLAS (BLAS reorders it
  too): the parity tests run this.
- fast (`matvec_fast`): activations quantized as llama.cpp quantizes them for these types (Q8_0 /
  Q8_1 blocks of 32: d_x = max|x| / 127, q_x = round(x * (1 / d_x)) halves away from zero, and
  s_x = d_x * sum(q_x)); per block, a sum of integer products, exact in int32, scaled once:
      Q8_0  d_w d_x sum(q_w q_x)                 Q4_0  d_w d_x sum((n_w - 8) q_x)
      Q4_1  d_w d_x sum(n_w q_x) + m_w s_x       Q4_K  (d sc) d_x sum(n_w q_x) - (dmin m) s_x
      Q5_K  as Q4_K, n_w of 5 bits               Q6_K  d_x (d sc_a sum_a(q_w q_x) + d sc_b sum_b(q_w q_x))
      Q5_0  as Q8_0, q_w = v - 16                      (its two 16-value sub-blocks)
      Q5_1  as Q4_1, n_w of 5 bits               (Q5_0 and Q5_1 repacked for it: TRANSCODED)
  The K-quants take the same 32-value activation blocks as the others (llama.cpp gives them 256-value
  Q8_K super-blocks, a float scale and integer sums per 16): one quantization of x serves every
  type, and a Q4_K / Q5_K sub-block (32 values, one scale and min) lines up with one activation block.

Speed (why the code looks as it does; the figures, from benchmarks/bench_kernels.py on SmolLM2's
shapes, are in docs/performance.md):
- Lane-wise accumulators (exact). A dot product summed into one float32 scalar is a chain of
  dependent adds, which LLVM may not reorder (that would change the rounding). Summing into 32 lanes
  instead (acc[i] += w[i] * x[c + i], lane i of every group of 32), added up once per output row,
  gives 32 independent sums, four AVX2 vectors: several times faster.
- The weights are decoded inside that multiply-add loop, not into a buffer of floats first: through
  a buffer LLVM emitted scalar code, several times slower. With 4+ rows of x, four rows share each decode.
- Integer dot products (fast) are LLVM vector intrinsics on groups of 8 or 16 weight rows (see the fast
  section), several times the exact kernels' rate (see also `_nibbles_block_dot`).
- Parallel over output rows, in TASKS contiguous ranges, so each thread reads its share of the
  matrix as one sequential stream; a task's scratch is allocated once per call, not per row.
- f16 scales are read as two bytes and converted by the CPU's vcvtph2ps where it has F16C (`_f16`,
  kernels/half.py).
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

from . import cpu
from .half import half_to_float

LANES = 32          # float32 partial sums per row of x: one per value of a 32-value block
QK = 32             # values per block (Q8_0, Q4_0, Q4_1, and the activations' blocks)
QK_K = 256          # values per super-block (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)

# bytes per block, as ggml-common.h lays them out
Q8_0_BYTES = 34     # f16 d, int8 qs[32]                           w = d * q
Q4_0_BYTES = 18     # f16 d, u8 qs[16]                             w = d * (nibble - 8)
Q4_1_BYTES = 20     # f16 d, f16 m, u8 qs[16]                      w = d * nibble + m
Q5_0_BYTES = 22     # f16 d, u8 qh[4], u8 qs[16]                   w = d * (v - 16), v = nibble + 16 * (bit of qh)
Q5_1_BYTES = 24     # f16 d, f16 m, u8 qh[4], u8 qs[16]            w = d * v + m
Q4_K_BYTES = 144    # f16 d, f16 dmin, u8 scales[12], u8 qs[128]   w = (d sc_s) nibble - (dmin m_s)
Q5_K_BYTES = 176    # as Q4_K, u8 qh[32] before qs: bit s of qh[i] is bit 4 of value i of sub-block s
Q6_K_BYTES = 210    # u8 ql[128], u8 qh[64], i8 scales[16], f16 d  w = (d sc_s) (q6 - 32)
Q2_K_BYTES = 84     # u8 scales[16], u8 qs[64], f16 d, f16 dmin    w = (d sc_s) q2 - (dmin m_s), 16-value s
Q3_K_BYTES = 110    # u8 hmask[32], u8 qs[64], u8 scales[12], f16 d w = (d (sc_s - 32)) (q2 + 4 h - 4)


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
        return half_to_float(builder, v)                                          # exact, any value

    return types.float32(bits), codegen


@numba.njit(inline="always")
def _f16(row, p):
    """The little-endian f16 at byte p of a row, as float32."""
    return _half_to_float(np.uint16(row[p]) | (np.uint16(row[p + 1]) << np.uint16(8)))


@numba.njit(inline="always")
def _bits(row, k, shift, mask):
    """(row[k] >> shift) & mask, in unsigned 32-bit arithmetic. (numba computes integers in int64,
    and LLVM then vectorizes the unpacking with 64-bit lanes: measured slower.)"""
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
# Every type is read in groups of 32 values (a Q8_0/Q4_0/Q4_1 block; an eighth of a K-quant
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
# emitted scalar code, several times slower (it cannot tell that the buffer and the accumulators are apart).

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
def _add4(acc, i, w, x, j, k):
    """acc[r, i] += w * x[j + r, k] for the four rows r of the _dot4 kernels (written out: unrolled)."""
    acc[0, i] += w * x[j, k]
    acc[1, i] += w * x[j + 1, k]
    acc[2, i] += w * x[j + 2, k]
    acc[3, i] += w * x[j + 3, k]


@numba.njit(inline="always")
def _nibbles_dot4(row, q, off, a, b, x, j, c, acc):
    """_nibbles_dot for rows j..j+3 of x into acc[0..3]."""
    for i in range(16):
        lo = a * (np.float32(_bits(row, q + i, 0, 15)) - off) + b
        hi = a * (np.float32(_bits(row, q + i, 4, 15)) - off) + b
        _add4(acc, i, lo, x, j, c + i)
        _add4(acc, i + 16, hi, x, j, c + 16 + i)


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
        _add4(acc, i, w, x, j, c + i)


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


# Q5_0 and Q5_1: Q4_0 and Q4_1 with a fifth bit per value, bit i of the block's 32-bit qh for value i.
# They are where llama.cpp's K-quant mixes put the matrices whose rows are not whole super-blocks (Q4_K
# falls back to Q5_0, Q5_K to Q5_1): most of a Q4_K_M SmolLM2, whose rows are 576 wide. Their exact
# kernels: w = a * (v - off) + b as the Q4 loop, v of 5 bits (the int8 kernels read them repacked:
# TRANSCODED).

@numba.njit(inline="always")
def _fives(row, q, h, i):
    """Values i and 16 + i (i < 16) of a Q5_0 / Q5_1 block, 0..31: the low and the high nibble of byte
    q + i, each with its fifth bit from h, the block's qh as one 32-bit number (bits i and 16 + i).
    (A byte of qh picked per value instead: a third slower, docs/performance.md.)"""
    lo = _bits(row, q + i, 0, 15) | (((h >> np.uint32(i)) & np.uint32(1)) << np.uint32(4))
    hi = _bits(row, q + i, 4, 15) | (((h >> np.uint32(i + 16)) & np.uint32(1)) << np.uint32(4))
    return np.float32(lo), np.float32(hi)


@numba.njit(inline="always")
def _u32(row, p):
    """The little-endian 32-bit number at byte p of a row."""
    return (np.uint32(row[p]) | (np.uint32(row[p + 1]) << np.uint32(8)) | (np.uint32(row[p + 2]) << np.uint32(16))
            | (np.uint32(row[p + 3]) << np.uint32(24)))


@numba.njit(inline="always")
def _q5_0_params(row, g):
    """(byte offset of qs, qh, offset, a, b): w = d * (v - 16) (+ -0.0)."""
    p = g * Q5_0_BYTES
    return p + 6, _u32(row, p + 2), np.float32(16.0), _f16(row, p), np.float32(-0.0)


@numba.njit(inline="always")
def _q5_1_params(row, g):
    """(byte offset of qs, qh, offset, a, b): w = d * (v - 0) + m."""
    p = g * Q5_1_BYTES
    return p + 8, _u32(row, p + 4), np.float32(0.0), _f16(row, p), _f16(row, p + 2)


@numba.njit(inline="always")
def _fives_dot(row, q, h, off, a, b, x, j, c, acc):
    """_nibbles_dot for a Q5_0 / Q5_1 block."""
    for i in range(16):
        lo, hi = _fives(row, q, h, i)
        acc[i] += (a * (lo - off) + b) * x[j, c + i]
        acc[i + 16] += (a * (hi - off) + b) * x[j, c + 16 + i]


@numba.njit(inline="always")
def _fives_dot4(row, q, h, off, a, b, x, j, c, acc):
    """_fives_dot for rows j..j+3 of x into acc[0..3]."""
    for i in range(16):
        lo, hi = _fives(row, q, h, i)
        _add4(acc, i, a * (lo - off) + b, x, j, c + i)
        _add4(acc, i + 16, a * (hi - off) + b, x, j, c + 16 + i)


@numba.njit(inline="always")
def _q4_k_params(row, p, s, d, dmin):
    """Sub-block s (0..7) of the Q4_K super-block at p, whose d and dmin are given: (byte offset of
    its 32 bytes, the shift that selects its nibbles (low for even s, high for odd), d * scale_s,
    dmin * min_s). The callers loop over s in range(8), which LLVM unrolls: s is then a constant
    and so are the shifts and the scale unpacking (measured faster than a run-time s)."""
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
        _add4(acc, i, w, x, j, c + i)


@numba.njit(inline="always")
def _q5(row, q, shift, s, p, i):
    """Value i (0..31) of Q5_K sub-block s, whose nibbles are at q, shift (_q4_k_params) in the
    super-block at p: its nibble with bit s of qh[i] on top, as float32."""
    return np.float32(_bits(row, q + i, shift, 15) | (_bits(row, p + 16 + i, s, 1) << np.uint32(4)))


@numba.njit(inline="always")
def _q5_k_dot(row, p, s, d, dmin, x, j, c, acc):
    q, shift, ds, ms = _q4_k_params(row, p, s, d, dmin)
    q += 32                                          # Q5_K's nibbles follow its 32 bytes of qh
    for i in range(32):
        acc[i] += (ds * _q5(row, q, shift, s, p, i) - ms) * x[j, c + i]


@numba.njit(inline="always")
def _q5_k_dot4(row, p, s, d, dmin, x, j, c, acc):
    q, shift, ds, ms = _q4_k_params(row, p, s, d, dmin)
    q += 32
    for i in range(32):
        w = ds * _q5(row, q, shift, s, p, i) - ms
        _add4(acc, i, w, x, j, c + i)


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
        _add4(acc, i, lo, x, j, c + i)
        _add4(acc, i + 16, hi, x, j, c + 16 + i)


# Q2_K and Q3_K (exact only: they have no fast kernel). Both pack 2-bit quants as Q6_K packs its low
# bits: value 128 h + 32 k + i (i < 32) at bits 2 k of qs[32 h + i]; and both have sixteen 16-value
# sub-blocks, so a group s of 32 values spans sub-blocks 2 s and 2 s + 1 (as in Q6_K).
#   Q2_K  w = (d sc_t) q - (dmin m_t)       sc_t, m_t: the low and high nibbles of scales[t]
#   Q3_K  w = (d (sc_t - 32)) (q + 4 h - 4) h: bit s of hmask[i]; sc_t 6 bits packed in 12 bytes
# Bit for bit as gguf computes them: d sc_t and d (sc_t - 32) are exact (an f16 times at most 6 bits),
# and so is their product with the quant; Q2_K's only rounding is the subtraction of its min, done
# after the product as there. One loop body serves both types, w = a * (q + 4 h - off) - m: Q3_K's m is
# +0.0 (w - 0.0 is w exactly, signed zeros too), Q2_K's off and hmask bit are 0. Every type is compiled
# into each specialization of the exact kernels: one body for the two, its group s a run-time value
# (not unrolled as the other K-quants' are), mostly called rather than inlined, keeps their compile
# time down.

@numba.njit(inline="always")
def _q3_k_scale(row, p, t):
    """d's factor sc_t - 32 of sub-block t (0..15) of the Q3_K super-block at p, as float32: the low 4
    bits of sc_t are nibble t // 8 of scales[t % 8], its high 2 bits bits 2 (t // 4) of scales[8 + t % 4]."""
    k = p + 96
    sc = _bits(row, k + t % 8, 4 * (t // 8), 15) | (_bits(row, k + 8 + t % 4, 2 * (t // 4), 3) << np.uint32(4))
    return np.float32(np.int32(sc) - 32)


@numba.njit(inline="always")
def _q23_params(qt, row, g):
    """Group g (values 32 g .. 32 g + 31 of the row) of a Q2_K or Q3_K row: (qs offset, shift of its
    quants, hmask offset, hmask bit (s, masked by hm: 0 for Q2_K), off, a and m of its first 16
    values, a and m of its last 16), for w = a * (q + 4 h - off) - m."""
    s = g % 8
    shift = 2 * (s % 4)
    if qt == Q2_K:
        p = (g // 8) * Q2_K_BYTES
        d, dmin = _f16(row, p + 80), _f16(row, p + 82)
        k = p + 2 * s                               # the bytes of sub-blocks 2 s and 2 s + 1
        return (p + 16 + 32 * (s // 4), shift, p, s, 0, np.float32(0.0),
                d * np.float32(_bits(row, k, 0, 15)), dmin * np.float32(_bits(row, k, 4, 15)),
                d * np.float32(_bits(row, k + 1, 0, 15)), dmin * np.float32(_bits(row, k + 1, 4, 15)))
    p = (g // 8) * Q3_K_BYTES
    d = _f16(row, p + 108)
    return (p + 32 + 32 * (s // 4), shift, p, s, 1, np.float32(4.0),
            d * _q3_k_scale(row, p, 2 * s), np.float32(0.0), d * _q3_k_scale(row, p, 2 * s + 1), np.float32(0.0))


@numba.njit(inline="always")
def _q23(row, q, shift, h, s, hm, off, i):
    """Quant i of a Q2_K / Q3_K group (_q23_params) as float32: its 2 bits, and bit s of hmask[i]
    (masked by hm) as bit 2, minus off: small integers, exact."""
    return np.float32(_bits(row, q + i, shift, 3) | (_bits(row, h + i, s, hm) << np.uint32(2))) - off


# _q23_row_dot and _q23_values are called, not inlined as the other types' code is: numba types an
# inlined function anew at every call site. Measured: all inlined, Q2_K and Q3_K made the exact kernels'
# compilation 80% longer; this way, 20%. A call per weight row costs nothing measurable beside its work.
# (_row_dot, which calls _q23_row_dot, is now called too: see there.) _q23_row_dot4 has one call site
# (matvec_exact) and stays inlined: called, LLVM left its loop scalar (it cannot tell the four
# accumulator rows from x), twice as slow.

@numba.njit
def _q23_row_dot(qt, row, groups, x, j, acc):
    """_row_dot of a Q2_K or Q3_K row."""
    for g in range(groups):
        q, shift, h, s, hm, off, a0, m0, a1, m1 = _q23_params(qt, row, g)
        c = g * QK
        for i in range(16):
            acc[i] += (a0 * _q23(row, q, shift, h, s, hm, off, i) - m0) * x[j, c + i]
            acc[i + 16] += (a1 * _q23(row, q, shift, h, s, hm, off, i + 16) - m1) * x[j, c + 16 + i]


@numba.njit(inline="always")
def _q23_row_dot4(qt, row, groups, x, j, acc):
    """_row_dot4 of a Q2_K or Q3_K row: each value decoded once for rows j..j+3 of x."""
    for g in range(groups):
        q, shift, h, s, hm, off, a0, m0, a1, m1 = _q23_params(qt, row, g)
        c = g * QK
        for i in range(16):
            lo = a0 * _q23(row, q, shift, h, s, hm, off, i) - m0
            hi = a1 * _q23(row, q, shift, h, s, hm, off, i + 16) - m1
            _add4(acc, i, lo, x, j, c + i)
            _add4(acc, i + 16, hi, x, j, c + 16 + i)


@numba.njit
def _q23_values(qt, row, groups, w):
    """w[32 g + i] = value i of group g of a Q2_K or Q3_K row, for g < groups (as _group_values)."""
    for g in range(groups):
        q, shift, h, s, hm, off, a0, m0, a1, m1 = _q23_params(qt, row, g)
        k = g * QK
        for i in range(16):
            w[k + i] = a0 * _q23(row, q, shift, h, s, hm, off, i) - m0
            w[k + i + 16] = a1 * _q23(row, q, shift, h, s, hm, off, i + 16) - m1


# ggml type ids (GGMLQuantizationType's values)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14
# Q5_1's blocks as the int8 kernels read them (TRANSCODED): no ggml type of its own, an id past ggml's
Q5_1_BYTES_T = 107

# The types a compiled product takes, one bit each (`kinds`): a one-call forward is compiled for its
# model's types only (step.forward_fast_for). Why: each type's group kernels are long vector code, and
# the branches of the types a model lacks were most of its first compile (docs/performance.md). numba
# prunes a branch on `kinds & BIT` before typing when kinds is a constant of the caller.
Q4_1_BIT, Q8_0_BIT, Q4_0_BIT, Q4_K_BIT, Q5_K_BIT, Q6_K_BIT, Q5_1_BIT = 1, 2, 4, 8, 16, 32, 64
ALL_KINDS = 127
KIND_BITS = {Q4_1: Q4_1_BIT, Q8_0: Q8_0_BIT, Q4_0: Q4_0_BIT, Q4_K: Q4_K_BIT, Q5_K: Q5_K_BIT, Q6_K: Q6_K_BIT,
             Q5_1_BYTES_T: Q5_1_BIT}


def kinds_of(qtypes) -> int:
    """The `kinds` bits of these ggml types (each must have a group kernel)."""
    kinds = 0
    for qt in qtypes:
        kinds |= KIND_BITS[int(qt)]
    return kinds


@numba.njit
def _row_dot(qt, row, groups, x, j, acc):
    """acc[i] += sum over groups g of w[32 g + i] * x[j, 32 g + i]: a weight row of type qt, one row
    of x. (The branch on the type is taken once per row: inside the loop over groups it cost a
    third of the speed.)

    Called, not inlined: it has four call sites in the exact kernels (matvec_exact's last rows,
    matvec3_exact, swiglu_exact's two matrices), and numba typed and lowered the code of all ten types
    anew at each; called, it is compiled once a process. The three kernels compiled in less than half
    the time, and their products were as fast (docs/performance.md, 2026-12-07)."""
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
    elif qt == Q5_K:
        for b in range(groups // 8):
            p = b * Q5_K_BYTES
            d, dmin = _f16(row, p), _f16(row, p + 2)
            for s in range(8):
                _q5_k_dot(row, p, s, d, dmin, x, j, (8 * b + s) * QK, acc)
    elif qt == Q2_K or qt == Q3_K:
        _q23_row_dot(qt, row, groups, x, j, acc)
    elif qt == Q5_0 or qt == Q5_1:
        for g in range(groups):
            q, h, off, a, b = _q5_0_params(row, g) if qt == Q5_0 else _q5_1_params(row, g)
            _fives_dot(row, q, h, off, a, b, x, j, g * QK, acc)
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
    elif qt == Q5_K:
        for b in range(groups // 8):
            p = b * Q5_K_BYTES
            d, dmin = _f16(row, p), _f16(row, p + 2)
            for s in range(8):
                _q5_k_dot4(row, p, s, d, dmin, x, j, (8 * b + s) * QK, acc)
    elif qt == Q2_K or qt == Q3_K:
        _q23_row_dot4(qt, row, groups, x, j, acc)
    elif qt == Q5_0 or qt == Q5_1:
        for g in range(groups):
            q, h, off, a, b = _q5_0_params(row, g) if qt == Q5_0 else _q5_1_params(row, g)
            _fives_dot4(row, q, h, off, a, b, x, j, g * QK, acc)
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
    """out = x @ W.T, W of ggml type qt (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K) given as
    its raw bytes.

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
# each for a group of ROW_GROUP weight rows (`_row_group_codegen`), written in LLVM IR. A group is 16
# rows where the CPU has AVX512-VNNI (one int32 lane each in a 512-bit vector), else 8 (256-bit):
# - int32 lane i of a vector holds four consecutive quant bytes of row i, so one broadcast of four
#   activation bytes multiplies every row of the group at once: vpdpbusd where the CPU has VNNI (64
#   products, the activation bytes broadcast from memory within the instruction, {1to16}), else
#   pmaddubsw and pmaddwd (AVX2), else plain vector IR; four bytes summed into each int32 lane, exact;
# - after a block's 8 broadcasts each lane holds its row's integer sum, so the scaling (d_w d_x, a
#   vector of the rows' d_w) and the accumulation stay in the lanes: one float lane per weight row,
#   no horizontal sum anywhere.
# With several activation rows (sequences decoded together) the loading and the unpacking of the
# nibbles are shared by them all. The kernels read the rows in that lane layout, made once from the
# file's (`pack_groups`, PACKED; llama.cpp's CPU "repack" does the same at load): a group's block is a
# vector of its rows' scales, then its quants as vectors of dwords. Transposed in registers from the
# file's rows at every step instead (16 loads and a dozen shuffles per 16 bytes of the 16 rows, and a
# gather of the scales), the transposes were most of a kernel's instructions: on AMD EPYC Zen 4 one
# core's Q4_1 products ran 1.2-2x faster packed, and Q8_0's 1.3-2x (docs/performance.md).
# llamarun/packing.py keeps the packed matrices of a model file in a cache file of their own, mapped as
# the model is: the weights stay memory-mapped (and quantized), the file's own map still serves
# everything else (embedding rows, the exact kernels, a prompt's BLAS tiles).
# The K-quants (Q4_K, Q5_K, Q6_K) have group kernels of the same shape, per 256-value super-block
# (`_k_group_codegen`), packed too (8 rows a group, lanes 2i and 2i + 1 holding eight bytes of row i with
# 512-bit vectors: `_block_isum`; a 16-row group is two calls of theirs). Every layout gives the same
# integer sums and the same float32 arithmetic per lane, so the same results bit for bit
# (tests/test_kquant_kernels.py).

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element, n):
    return ir.VectorType(element, n)


# which instructions the code below may use: the target CPU's features, decided in cpu.py
AVX2, VNNI, VNNI512, NATIVE_HALF = cpu.AVX2, cpu.VNNI, cpu.VNNI512, cpu.NATIVE_HALF


def _contiguous_bytes(*array_types) -> bool:
    """Whether these numba types are all contiguous 1-D arrays of bytes."""
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


def _function(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


def _splat(builder, value, n):
    """<n x T> with every lane the scalar `value` of type T."""
    one = builder.insert_element(ir.Constant(_vector(value.type, n), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_vector(_I32, n), [0] * n))


def _pairwise_add(builder, v):
    """<2n x i32> -> <n x i32>: v[2i] + v[2i+1]."""
    n = v.type.count // 2
    even = builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n), list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(_vector(_I32, n), list(range(1, 2 * n, 2))))
    return builder.add(even, odd)


def _dot8_unsigned(builder, w, x):
    """<32 x i8> w (unsigned) times <32 x i8> x (signed, |x| <= 127) -> <8 x i32>, lane i the sum of
    products 4i..4i+3. AVX2: pmaddubsw (products summed in pairs to int16, saturating: exact here, as
    the callers' w are nibbles (<= 15), Q5_1's values (<= 31) or magnitudes <= 128, so a pair is at most
    2 * 128 * 127 < 2^15),
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


def _magnitude(builder, v):
    """|v| of the 32 bytes of a 256-bit vector v (vpabsb), as v's type. AVX2."""
    bytes32 = _vector(_I8, 32)
    magnitude = builder.call(_function(builder, "llvm.abs.v32i8", bytes32, [bytes32, ir.IntType(1)]),
                             [builder.bitcast(v, bytes32), ir.Constant(ir.IntType(1), 0)])
    return builder.bitcast(magnitude, v.type)


def _with_sign(builder, x, sign):
    """The 32 bytes of x negated where sign's are negative, zeroed where they are zero (psignb), as
    x's type. AVX2."""
    bytes32 = _vector(_I8, 32)
    return builder.bitcast(builder.call(_function(builder, "llvm.x86.avx2.psign.b", bytes32, [bytes32] * 2),
                                        [builder.bitcast(x, bytes32), builder.bitcast(sign, bytes32)]), x.type)


def _dot8_signed(builder, w, x):
    """_dot8_unsigned for signed w: |w| times x with w's sign moved onto x (llama.cpp's trick; exact,
    as |w| <= 128 and |x| <= 127 keep each pair's sum within int16)."""
    if AVX2:
        return _dot8_unsigned(builder, _magnitude(builder, w), _with_sign(builder, x, w))
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


# Weight rows per group: one float32 lane each, in a 512-bit vector where the CPU has AVX512-VNNI (16),
# else a 256-bit one (8). The K-quants' kernels take 8 rows on every CPU (K_ROWS): with 16-row groups
# each group is two calls of theirs.
ROW_GROUP = 16 if VNNI512 else 8
K_ROWS = 8


# How the group kernels read each type, packed (pack_groups): the rows of a group (ROW_GROUP; the K-quants'
# kernels take K_ROWS), and the regions (start, stop, unit) of a block's bytes: the region's units of the
# group's rows side by side, unit k of every row, then unit k + 1, ... (lane i: row i). So with R rows a
# group, the bytes at offset `off` of a block start at R * off of the group's block, which takes R times a
# block's bytes, as in the file. Q8_0, Q4_0 and Q4_1: their scales (f16 d, and Q4_1's m) for the rows side by side, then the
# quants by the dword (one int32 lane a row). The K-quants: the quants by the dword, or with 512-bit vectors
# by the 8 bytes (a lane pair a row: _block_isum), and their scales by the dword too (Q4_K and Q5_K: d and
# dmin, then the 12 bytes of 6-bit scales, first; Q6_K: the 16 int8 scales, then d, last): each a load.
K_UNIT = 8 if VNNI512 else 4
PACKED = {Q8_0: (ROW_GROUP, ((0, 2, 2), (2, 34, 4))), Q4_0: (ROW_GROUP, ((0, 2, 2), (2, 18, 4))),
          Q4_1: (ROW_GROUP, ((0, 4, 4), (4, 20, 4))), Q5_1_BYTES_T: (ROW_GROUP, ((0, 4, 4), (4, 36, 4))),
          Q4_K: (K_ROWS, ((0, 16, 4), (16, 144, K_UNIT))), Q5_K: (K_ROWS, ((0, 16, 4), (16, 176, K_UNIT))),
          Q6_K: (K_ROWS, ((0, 192, K_UNIT), (192, 208, 4), (208, 210, 2)))}
BLOCK_BYTES = {Q8_0: Q8_0_BYTES, Q4_0: Q4_0_BYTES, Q4_1: Q4_1_BYTES, Q4_K: Q4_K_BYTES, Q5_K: Q5_K_BYTES,
               Q6_K: Q6_K_BYTES, Q5_0: Q5_0_BYTES, Q5_1: Q5_1_BYTES, Q5_1_BYTES_T: 36}


def five_bit_values(blocks: np.ndarray, qh: int) -> np.ndarray:
    """The 32 values (0..31) of each Q5_0 / Q5_1 block (..., block bytes) uint8, whose 4 bytes of qh start
    at byte qh and its 16 of nibbles follow: (..., 32) uint8. Value i: nibble i of the 16 bytes (the low
    nibbles first, then the high ones, as Q4's), and bit i of qh (little-endian) as its fifth bit."""
    fifth = np.unpackbits(np.ascontiguousarray(blocks[..., qh:qh + 4]), axis=-1, bitorder="little")  # bit i of qh
    values = fifth << np.uint8(4)
    values[..., :16] |= blocks[..., qh + 4:] & np.uint8(15)
    values[..., 16:] |= blocks[..., qh + 4:] >> np.uint8(4)
    return values


def _q5_0_as_q8_0(rows: np.ndarray) -> np.ndarray:
    """Q5_0 rows (n, blocks * 22) uint8 -> the same weights in Q8_0 blocks (n, blocks * 34) uint8."""
    blocks = rows.reshape(rows.shape[0], -1, Q5_0_BYTES)
    out = np.empty((*blocks.shape[:2], Q8_0_BYTES), np.uint8)
    out[..., :2] = blocks[..., :2]                                              # d
    out[..., 2:] = (five_bit_values(blocks, 2).view(np.int8) - np.int8(16)).view(np.uint8)
    return out.reshape(rows.shape[0], -1)


def _q5_1_as_bytes(rows: np.ndarray) -> np.ndarray:
    """Q5_1 rows (n, blocks * 24) uint8 -> Q5_1_BYTES_T blocks (n, blocks * 36): d, m, the 32 values."""
    blocks = rows.reshape(rows.shape[0], -1, Q5_1_BYTES)
    out = np.empty((*blocks.shape[:2], 36), np.uint8)
    out[..., :4] = blocks[..., :4]                                              # d, m
    out[..., 4:] = five_bit_values(blocks, 4)
    return out.reshape(rows.shape[0], -1)


# Types whose int8 kernels read their blocks rewritten, as they are packed, into another form. A Q5_0
# weight d * (v - 16) is the Q8_0 weight of the same d and q = v - 16: the Q8_0 kernels compute its
# products as a Q5_0 kernel would (d_w d_x sum((v - 16) q_x), llama.cpp's), reading 34 bytes a block
# for 22. A Q5_1 weight d * v + m keeps d and m and its values a byte each (Q5_1_BYTES_T, 36 bytes a
# block for 24), computed as Q4_1's with 5-bit values (d_w d_x sum(v q_x) + m_w s_x, llama.cpp's Q5_1).
# Q5_0 and Q5_1 are where llama.cpp's K-quant mixes put the matrices whose rows are not whole
# super-blocks (Q4_K's fallback and Q5_K's: most of a Q4_K_M or Q5_K_M SmolLM2, whose rows are 576 wide);
# on the exact kernels only, their decode steps were a tenth of the int8 kernels' speed.
# Each: the type its int8 kernels read, and the function that rewrites its rows (n, bytes) into it.
TRANSCODED = {Q5_0: (Q8_0, _q5_0_as_q8_0), Q5_1: (Q5_1_BYTES_T, _q5_1_as_bytes)}


def int8_type(qt: int) -> int:
    """The type whose int8 kernels compute a matrix of type qt (PACKED), as packed: its own, or TRANSCODED's."""
    return TRANSCODED[qt][0] if qt in TRANSCODED else qt


def packed_row_bytes(qt: int, row_bytes: int) -> int:
    """The bytes of a packed row of a type-qt matrix whose rows take row_bytes as stored."""
    return row_bytes // BLOCK_BYTES[qt] * BLOCK_BYTES[int8_type(qt)]


def packed_rows(rows: int) -> int:
    """The rows a packed matrix of `rows` rows takes: whole groups of ROW_GROUP (the last one's missing
    rows are copies of the last row, which the kernels compute and no one keeps)."""
    return -(-rows // ROW_GROUP) * ROW_GROUP


def pack_groups(qt: int, raw: np.ndarray, out: np.ndarray, first: int = 0) -> None:
    """out = rows first, first + 1, ... of the matrix raw (type qt in PACKED or TRANSCODED, (rows, row bytes)
    uint8; rows past its end: its last row) in the group kernels' layout (PACKED) of int8_type(qt), as many
    as out holds: out (n * ROW_GROUP, packed_row_bytes) uint8, first a multiple of ROW_GROUP."""
    group, regions = PACKED[int8_type(qt)]
    n = out.shape[0] // group
    w = raw[np.minimum(np.arange(first, first + n * group), raw.shape[0] - 1)]
    if qt in TRANSCODED:
        w = TRANSCODED[qt][1](w)
    block = BLOCK_BYTES[int8_type(qt)]
    blocks = w.shape[1] // block
    w = w.reshape(n, group, blocks, block)
    dest = out.reshape(n, blocks, group * block)                                 # (group, block, bytes)
    for start, stop, unit in regions:
        part = w[..., start:stop].reshape(n, group, blocks, (stop - start) // unit, unit)
        dest[:, :, group * start:group * stop] = part.transpose(0, 2, 3, 1, 4).reshape(n, blocks, -1)


def _halves_of_words(builder, words, count):
    """<n x i32> words -> `count` <n x float>: the f16 value in the low half of each word, and with
    count 2 the one in its high half too."""
    n, out = words.type.count, []
    for c in range(count):
        part = builder.lshr(words, ir.Constant(_vector(_I32, n), [16] * n)) if c else words
        out.append(half_to_float(builder, builder.trunc(part, _vector(_I16, n))))
    return out


def _dwords_dot(builder, acc, w, x, w_signed=False):
    """acc + lane-wise dot products of four bytes: <8 x i32> (or, with VNNI512, <16 x i32>) w and x
    (signed bytes, |x| <= 127),
    lane i += sum over b < 4 of w[4i + b] x[4i + b], exact in int32. w holds unsigned bytes (as
    vpdpbusd and pmaddubsw take them, see _dot8_unsigned), or signed ones with w_signed, which only
    the plain-IR path (no AVX2) takes: see _unsigned_q8_0."""
    words = w.type
    if VNNI:
        name = f"llvm.x86.avx512.vpdpbusd.{32 * words.count}"
        return builder.call(_function(builder, name, words, [words] * 3), [acc, w, x])
    dot = _dot8_signed if w_signed else _dot8_unsigned
    return builder.add(acc, dot(builder, builder.bitcast(w, _vector(_I8, 32)), builder.bitcast(x, _vector(_I8, 32))))


def _nibbles_block_dot(builder, w, x):
    """A block's integer sums for nibble weights on AVX2 without VNNI: w, x 8 vectors <8 x i32> as
    _dwords_dot takes them (w bytes <= 15) -> <8 x i32>, lane i the sum over the 8 vectors of
    w[k] x[k] in lane i. The 8 pmaddubsw results are added as int16 before one pmaddwd by ones,
    rather than each widened to int32 on its own: exact, as a lane of each is at most 2 * 15 * 127,
    so the 8 together stay under 2^15 (8 * 3810 = 30480). 9 multiplies and 7 adds a block instead of
    16 and 8: with several activation rows the kernels are bound by instructions, not by reading the
    weights (Q4_1 with 8 activation rows on an AVX2 CPU without VNNI: docs/performance.md)."""
    bytes32, halves = _vector(_I8, 32), _vector(_I16, 16)
    madd = _function(builder, "llvm.x86.avx2.pmadd.ub.sw", halves, [bytes32] * 2)
    pairs = [builder.call(madd, [builder.bitcast(w[k], bytes32), builder.bitcast(x[k], bytes32)]) for k in range(8)]
    while len(pairs) > 1:      # a tree of adds: short dependency chains
        pairs = [builder.add(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    ones = ir.Constant(halves, [1] * 16)
    return builder.call(_function(builder, "llvm.x86.avx2.pmadd.wd", _vector(_I32, 8), [halves] * 2), [pairs[0], ones])


def _unsigned_q8_0(builder, w):
    """Q8_0's signed weight bytes (vectors <8 x i32>) made ready for _dwords_dot -> (w', signs):
    with VNNI, w' = q + 128 as unsigned bytes (the kernel then takes 128 sum(q_x) off each block's
    sum); with AVX2, w' = |q| and signs = q, whose signs go onto x (psignb: llama.cpp's trick);
    without either, w unchanged (plain signed products)."""
    if VNNI:
        return [builder.xor(v, ir.Constant(v.type, [0x80808080 - 2**32] * v.type.count)) for v in w], None
    if AVX2:
        return [_magnitude(builder, v) for v in w], w
    return w, None


def _prefetch(builder, pointer):
    """Ask for the 64-byte line at pointer (i8*), for reading, into L2 (prefetcht1 on x86).

    Why L2: every prefetch here is of weights, which a decode step reads once, and the group kernels ask
    a group ahead: tens of KB for a 1B model's rows. Into L1 as well (prefetcht0), they pushed out what
    the next steps reuse (the KV cache, the activations, the interpreter's own data between two steps:
    measured on AMD EPYC Zen 5). As non-temporal data (prefetchnta), which skips L2, the lines of a long
    group seem to leave L1 before the kernel comes to them: on Zen 4 a 1B model's K-quant and Q8_0 decode
    ran markedly faster with prefetcht1, and SmolLM2's decode, its served batches and llama2.c's int8 rows
    as fast as before (docs/performance.md, 2026-12-06 23:00)."""
    prefetch = _function(builder, "llvm.prefetch.p0i8", ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
    # llvm.prefetch(address, read, locality 2 = the second cache level (t1), data)
    builder.call(prefetch, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


def _group_rows(context, builder, raw_type, raw, o, o_type):
    """Where a group kernel reads the group of a packed matrix from row o -> (first, stride): its bytes
    from first (i8*), rows of stride bytes (int64). Every group is whole: the packed matrix's last one has
    copies of its last row (packed_rows), so the kernels need no check of the matrix's end. (Rows clamped
    one by one to the last were as many unrelated pointers, more than the registers hold: the loops
    reloaded them from the stack at every block, and one core's one-row Q4_1 and Q8_0 products of
    matrices in L2 took 20-50% longer: docs/performance.md, 2026-12-06.)"""
    matrix = context.make_array(raw_type)(context, builder, value=raw)
    stride = cgutils.unpack_tuple(builder, matrix.strides, 2)[0]
    o = context.cast(builder, o, o_type, types.intp)
    return _row_pointer(context, builder, raw_type, raw, types.intp, o), stride


def _group_arguments(context, builder, sig, args, weights):
    """The group kernels' arguments (raw, o, xq, xd, xsum, xs, j, out) as IR values, for a kernel whose
    group lies at weights = (first, stride) (_group_rows) -> (const: int64
    constants, first: the group's first byte, the data pointers of xq, xd, xsum, xs,
    n_in, groups (activation blocks per row), j, out's data pointer, col: o's lane in its group of
    ROW_GROUP, where the kernel's rows go in out)."""
    i64 = ir.IntType(64)
    const = lambda v: ir.Constant(i64, v)   # noqa: E731
    o = context.cast(builder, args[1], sig.args[1], types.intp)
    first = weights[0]
    xq, xd, xsum, xs = (_data(context, builder, t, a) for t, a in zip(sig.args[2:6], args[2:6]))
    n_in = cgutils.unpack_tuple(builder, context.make_array(sig.args[2])(context, builder, value=args[2]).shape, 2)[1]
    groups = cgutils.unpack_tuple(builder, context.make_array(sig.args[3])(context, builder, value=args[3]).shape, 2)[1]
    j = context.cast(builder, args[6], sig.args[6], types.intp)
    out = _data(context, builder, sig.args[7], args[7])
    col = builder.urem(o, const(ROW_GROUP))
    return const, first, xq, xd, xsum, xs, n_in, groups, j, out, col


def _activation_rows(builder, const, args, j, n_rows):
    """The activation rows a kernel of n_rows takes from row j: j .. j + n_rows - 1, those past the last
    (args[8], when given: a kernel run on the last few rows of a batch) read and written as the last
    (the same value twice: each row's arithmetic is its own)."""
    rows = [builder.add(j, const(r)) for r in range(n_rows)]
    if len(args) > 8:
        rows = [builder.select(builder.icmp_signed("<=", r, args[8]), r, args[8]) for r in rows]
    return rows


def _store_rows(builder, const, out, row, col, total):
    """out[row, col:col + n] = total (<n x float>): one activation row's products with n weight rows."""
    at_row = builder.gep(out, [builder.add(builder.mul(row, const(ROW_GROUP)), col)])
    store = builder.store(total, builder.bitcast(at_row, total.type.as_pointer()))
    store.align = 4


def _row_group_codegen(qt, n_rows):
    """Code for weight rows o .. o + ROW_GROUP - 1 of a packed matrix of type qt (Q8_0, Q4_0, Q4_1,
    Q5_1_BYTES_T: see PACKED), times rows j .. j + n_rows - 1 of the quantized activations; per block g:
        Q8_0  d_w d_x[g] sum(q_w q_x)
        Q4_0  d_w d_x[g] (sum(n_w q_x) - 8 sum(q_x))
        Q4_1  d_w d_x[g] sum(n_w q_x) + m_w s_x[g]
        Q5_1  d_w d_x[g] sum(v_w q_x) + m_w s_x[g]     (its 5-bit values a byte each: TRANSCODED)
    the integer sums exact in int32 (Q8_0 with VNNI: sum((q_w + 128) q_x) - 128 sum(q_x), as
    vpdpbusd takes unsigned weights; without it, |q_w| times q_x with q_w's sign, llama.cpp's trick);
    each block's terms added in turn (Q4_1: the d term, then the m term) to one float32 vector of the
    group's rows. (Q4_1's m terms once had a vector of their own, added at the end: with eight
    activation rows the sixteen vectors left too few registers, and the kernel ran ~30% slower.) Each
    (weight row, activation row) gets the same arithmetic whatever n_rows is, whichever group its
    weight row falls in, and whether the vectors hold 8 rows or 16.

    Arguments (raw, o, xq, xd, xsum, xs, j, out): raw (rows, row bytes) uint8, packed (pack_groups;
    whole groups, though its shape may give fewer rows: they are read as well); xq (n, in) int8; xd,
    xs (n, in / 32) float32 and xsum int32 (see quantize_activations); out (n, ROW_GROUP) float32 with
    out[j + r, i] = weight row o + i times activation row j + r (all C-contiguous)."""
    block_bytes, scale_bytes = BLOCK_BYTES[qt], PACKED[qt][1][0][1]       # the first region: the scales

    def codegen(context, builder, sig, args, weights):
        const, first, xq, xd, xsum, xs, n_in, groups, j, out, col = _group_arguments(context, builder, sig, args,
                                                                                  weights)
        lanes = ROW_GROUP
        floats, words = _vector(_F32, lanes), _vector(_I32, lanes)
        zero, izero = ir.Constant(floats, [0.0] * lanes), ir.Constant(words, [0] * lanes)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(n_rows)]   # registers after mem2reg
        nibbles, four = (ir.Constant(words, [v] * lanes) for v in (0x0F0F0F0F, 4))
        x_rows = _activation_rows(builder, const, args, j, n_rows)

        def nibble_values(v):   # 4 vectors of a block's 16 quant bytes -> 8 of its 32 nibbles
            return [builder.and_(u, nibbles) for u in v] + [builder.and_(builder.lshr(u, four), nibbles) for u in v]

        def add_block(g, d_w, m_w, w, signs):
            """acc[r] += block g's terms, for each activation row r."""
            for r, row in enumerate(x_rows):
                block = builder.add(builder.mul(row, groups), g)
                base = builder.add(builder.mul(row, n_in), builder.mul(g, const(QK)))
                xs_k = [_splat(builder, _load(builder, xq, builder.add(base, const(4 * k)), _I32), lanes)
                        for k in range(8)]
                if (qt == Q4_0 or qt == Q4_1) and AVX2 and not VNNI:
                    isum = _nibbles_block_dot(builder, w, xs_k)
                else:
                    sums = [izero, izero]                      # two chains of vpdpbusd, added at the end
                    for k in range(8):
                        x = xs_k[k] if signs is None else _with_sign(builder, xs_k[k], signs[k])
                        sums[k % 2] = _dwords_dot(builder, sums[k % 2], w[k], x, w_signed=qt == Q8_0 and not AVX2)
                    isum = builder.add(sums[0], sums[1])
                if qt == Q4_0 or (qt == Q8_0 and VNNI):
                    total = builder.load(builder.gep(xsum, [block]))
                    shift = 3 if qt == Q4_0 else 7                  # 8 or 128 times the block's sum of q_x
                    isum = builder.sub(isum, _splat(builder, builder.shl(total, ir.Constant(_I32, shift)), lanes))
                scale = builder.fmul(d_w, _splat(builder, builder.load(builder.gep(xd, [block])), lanes))
                total = _multiply_add(builder, builder.sitofp(isum, floats), scale, builder.load(acc[r]))
                if qt == Q4_1 or qt == Q5_1_BYTES_T:
                    s_x = _splat(builder, builder.load(builder.gep(xs, [block])), lanes)
                    total = _multiply_add(builder, m_w, s_x, total)
                builder.store(total, acc[r])

        # block g of the group as pack_groups lays it out: the rows' scales, then the quants' dwords, one
        # vector load each; and slice g of the next group's bytes prefetched (_prefetch_next_group), which
        # packed is its block g: the bytes the kernel reads next, whatever n_rows
        group_bytes = block_bytes * lanes
        with cgutils.for_range(builder, groups) as loop:
            g = loop.index
            p = builder.mul(g, const(group_bytes))
            _prefetch_next_group(builder, weights, ROW_GROUP, g, groups)
            quants = [_load(builder, first, builder.add(p, const(scale_bytes * lanes + 4 * lanes * k)), words)
                      for k in range(4 if qt == Q4_0 or qt == Q4_1 else 8)]
            if qt == Q4_1 or qt == Q5_1_BYTES_T:
                d_w, m_w = _halves_of_words(builder, _load(builder, first, p, words), 2)
            else:
                d_w, m_w = half_to_float(builder, _load(builder, first, p, _vector(_I16, lanes))), None
            if qt == Q8_0:
                add_block(g, d_w, None, *_unsigned_q8_0(builder, quants))
            elif qt == Q5_1_BYTES_T:
                add_block(g, d_w, m_w, quants, None)                # unsigned bytes <= 31, as they are
            else:
                add_block(g, d_w, m_w, nibble_values(quants), None)
        for r, row in enumerate(x_rows):
            _store_rows(builder, const, out, row, col, builder.load(acc[r]))
        return context.get_dummy_value()
    return codegen


# The fewest activation rows each kernel size is run on: the last rows of a batch take a bigger kernel
# than they fill (its rows past the last computed as the last again, and not kept) where that is faster
# than smaller kernels one after another. A decode step of SmolLM2 Q4_1 (benchmarks/bench_decode_rows.py,
# AMD EPYC Zen 5, 16-row groups) took, as a multiple of a one-row step: 3 rows 1.60 (1 + 1 + 1), where
# the 4-row kernel's 4 rows took 1.31; 5, 6 and 7 rows 1.67, 2.05 and 2.53 (4 + 1 + ...), where the
# 8-row kernel's 8 took 1.97.
FEWEST = {8: 6, 4: 3, 1: 1}


def _row_groups_intrinsic(qt):
    """An intrinsic (raw, o, xq, xd, xsum, xs, j0, n, out): weight rows o .. o + ROW_GROUP - 1 (K-quants:
    o .. o + 7) of the matrix raw (type qt) times activation rows j0 .. n - 1, into out as
    _row_group_codegen's: eight activation rows at a time, then four, then one (the last few rows by a
    bigger kernel where FEWEST says). The K-quants take eight only with 512-bit vectors: on 256-bit ones
    their eight-row code made the first compile of the fast path over a minute longer; with 512-bit ones
    it costs ~15 s and runs a prompt's products ~15% faster than four rows at a time (docs/performance.md)."""
    make = _k_group_codegen if qt in (Q4_K, Q5_K, Q6_K) else _row_group_codegen
    sizes = (8, 4, 1) if VNNI512 or qt not in (Q4_K, Q5_K, Q6_K) else (4, 1)

    def typer(typingctx, raw, o, xq, xd, xsum, xs, j0, n, out):
        floats = (xd, xs, out)
        if not (_bytes_matrix(raw) and all(isinstance(t, types.Integer) for t in (o, j0, n))
                and all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in (xq, xd, xsum, xs, out))
                and xq.dtype == types.int8 and xsum.dtype == types.int32 and all(t.dtype == types.float32 for t in floats)):
            return None
        group_sig = types.void(raw, o, xq, xd, xsum, xs, types.intp, out, types.intp)

        def codegen(context, builder, sig, args):
            raw_v, o_v, xq_v, xd_v, xsum_v, xs_v, j0_v, n_v, out_v = args
            j = cgutils.alloca_once_value(builder, context.cast(builder, j0_v, sig.args[6], types.intp))
            n_v = context.cast(builder, n_v, sig.args[7], types.intp)
            last = builder.sub(n_v, ir.Constant(n_v.type, 1))
            first, stride = _group_rows(context, builder, sig.args[0], raw_v, o_v, sig.args[1])
            for size in sizes:              # while n - j >= FEWEST[size]: rows j .. j + size - 1 (at most the last)
                check, body, done = (builder.append_basic_block(f"rows{size}.{part}") for part in ("check", "body", "done"))
                builder.branch(check)
                builder.position_at_end(check)
                left = builder.sub(n_v, builder.load(j))
                builder.cbranch(builder.icmp_signed(">=", left, ir.Constant(n_v.type, FEWEST[size])), body, done)
                builder.position_at_end(body)
                at = builder.load(j)
                make(qt, size)(context, builder, group_sig, [raw_v, o_v, xq_v, xd_v, xsum_v, xs_v, at, out_v, last],
                               (first, stride))
                after = builder.add(at, ir.Constant(n_v.type, size))
                builder.store(builder.select(builder.icmp_signed("<", after, n_v), after, n_v), j)
                builder.branch(check)
                builder.position_at_end(done)
            return context.get_dummy_value()
        return types.void(raw, o, xq, xd, xsum, xs, j0, n, out), codegen
    return intrinsic(typer)


# The K-quants' group kernels: the same lanes (one per weight row), per 256-value super-block. Their
# 32-value sub-blocks line up with the activations' blocks, so each sub-block is one integer sum per
# (weight row, activation row), scaled in float32 by the row's sub-block scale (a vector of 8: the
# rows' 6-bit or 8-bit scales unpacked in the lanes, times their d) and the block's d_x:
#     Q4_K  (d sc_s) d_x sum(n_w q_x) - (dmin m_s) s_x          (as Q4_1, with the min subtracted; Q5_K alike)
#     Q6_K  (d sc_a) d_x (sum_a(q6 q_x) - 32 sum_a(q_x)) + (d sc_b) d_x (...)_b    (halves a, b of 16)
# Q6_K's quants are taken unsigned (q6 = q + 32, 0..63, as vpdpbusd and pmaddubsw take them) and
# 32 times each half's sum of q_x taken off after: exact, and the same integers on every path.

def _q4_k_scales(builder, v0, v1, v2):
    """The 8 rows' 6-bit scales and mins of a Q4_K super-block, from the dwords of its bytes 4-7, 8-11 and
    12-15 (v0, v1, v2: <8 x i32>, lane i row i's) -> (sc, m): 8 <8 x i32> each, sub-block s in sc[s]
    (gguf's get_scale_min, in the lanes: bytes 0-3 of the 12 hold scales 0-3, bytes 4-7 mins 0-3, low 6
    bits; scales and mins 4-7 have their low 4 bits in bytes 8-11 and their high 2 bits in the top bits of
    bytes 0-3 and 4-7)."""
    words = _vector(_I32, 8)
    c = lambda v: ir.Constant(words, [v] * 8)   # noqa: E731
    byte = lambda v, b, shift, mask: builder.and_(builder.lshr(v, c(8 * b + shift)), c(mask))   # noqa: E731
    sc = [byte(v0, s, 0, 63) for s in range(4)]
    m = [byte(v1, s, 0, 63) for s in range(4)]
    for s in range(4):
        sc.append(builder.or_(byte(v2, s, 0, 15), builder.shl(byte(v0, s, 6, 3), c(4))))
        m.append(builder.or_(byte(v2, s, 4, 15), builder.shl(byte(v1, s, 6, 3), c(4))))
    return sc, m


def _q6_k_scales(builder, v):
    """The 8 rows' 16 int8 scales of a Q6_K super-block, from the dwords of its bytes 192..207 (v: 4
    <8 x i32>, lane i row i's) -> 16 <8 x i32>."""
    words = _vector(_I32, 8)
    c = lambda v: ir.Constant(words, [v] * 8)   # noqa: E731
    return [builder.ashr(builder.shl(v[k // 4], c(24 - 8 * (k % 4))), c(24)) for k in range(16)]


def _k_group_codegen(qt, n_rows):
    """Code for weight rows o .. o + 7 of a packed Q4_K, Q5_K or Q6_K matrix (PACKED) times rows j .. j +
    n_rows - 1 of the quantized activations, as _row_group_codegen (same arguments, same out), per
    super-block."""
    block_bytes = BLOCK_BYTES[qt]
    minus_min = qt in (Q4_K, Q5_K)

    def codegen(context, builder, sig, args, weights):
        const, first, xq, xd, xsum, xs, n_in, groups, j, out, col = _group_arguments(context, builder, sig, args,
                                                                                  weights)
        floats = _vector(_F32, 8)
        zero = ir.Constant(floats, [0.0] * 8)
        lanes = 16 if VNNI512 else 8                    # of the weight bytes' vectors (see _block_isum)
        cw = lambda v: ir.Constant(_vector(_I32, lanes), [v] * lanes)   # noqa: E731
        # per activation row, float32 sums of the 8 rows (registers after mem2reg): Q4_K and Q5_K the d and
        # the min terms; Q6_K its halves' terms, each half's sub-blocks in a sum of its own (with 512-bit
        # vectors both in one, lanes 8-15 the second half's), the two added at the end
        wide_q6 = VNNI512 and not minus_min
        d_sums = [cgutils.alloca_once_value(builder, ir.Constant(_vector(_F32, 16), [0.0] * 16) if wide_q6 else zero)
                  for _ in range(n_rows)]
        m_sums = [cgutils.alloca_once_value(builder, zero) for _ in range(n_rows)] if not wide_q6 else []
        x_rows = _activation_rows(builder, const, args, j, n_rows)
        with cgutils.for_range(builder, builder.udiv(groups, const(8))) as loop:
            b = loop.index
            # super-block b of the group as pack_groups lays it out, and slice b of the next group's bytes
            # prefetched, which packed is its super-block b (_prefetch_next_group; see _row_group_codegen)
            block = builder.gep(first, [builder.mul(b, const(K_ROWS * block_bytes))])
            _prefetch_next_group(builder, weights, K_ROWS, b, builder.udiv(groups, const(8)))

            def quants(off):            # the 16 bytes at off of the 8 rows, in `lanes` int32 lanes (PACKED)
                return [_load(builder, block, const(K_ROWS * (off + K_UNIT * h)), _vector(_I32, lanes))
                        for h in range(16 // K_UNIT)]

            def words(off):             # <8 x i32>: the dword at byte off of each of the 8 rows (PACKED)
                return _load(builder, block, const(K_ROWS * off), _vector(_I32, 8))

            if minus_min:
                d, dmin = _halves_of_words(builder, words(0), 2)
                sc, m = _q4_k_scales(builder, words(4), words(8), words(12))
                ds = [builder.fmul(d, builder.sitofp(v, floats)) for v in sc]
                ms = [builder.fmul(dmin, builder.sitofp(v, floats)) for v in m]
                qs = 16 if qt == Q4_K else 48                         # Q5_K: 32 bytes of qh first
                qh = quants(16) + quants(32) if qt == Q5_K else None
                subs = []       # (sub-block s, its vectors of weight bytes)
                for k in range(4):
                    q = quants(qs + 32 * k) + quants(qs + 16 + 32 * k)
                    for s, shift in ((2 * k, 0), (2 * k + 1, 4)):
                        w = [builder.and_(builder.lshr(v, cw(shift)), cw(0x0F0F0F0F)) for v in q]
                        if qh is not None:          # bit s of qh, as bit 4
                            w = [builder.or_(v, builder.shl(builder.and_(builder.lshr(h, cw(s)), cw(0x01010101)), cw(4)))
                                 for v, h in zip(w, qh)]
                        subs.append((s, w))
            else:
                d = half_to_float(builder, _load(builder, block, const(K_ROWS * 208), _vector(_I16, 8)))
                scales = [builder.fmul(d, builder.sitofp(v, floats))
                          for v in _q6_k_scales(builder, [words(192 + 4 * k) for k in range(4)])]
                if wide_q6:                 # sub-block s's two scales in one vector, as its two halves' sums
                    scales = [builder.shuffle_vector(scales[2 * k], scales[2 * k + 1], ir.Constant(_vector(_I32, 16), list(range(16))))
                              for k in range(8)]
                subs = []
                for h in range(2):
                    ql = [v for k in range(4) for v in quants(64 * h + 16 * k)]
                    qh = quants(128 + 32 * h) + quants(144 + 32 * h)
                    n = len(qh)           # vectors per 32 values
                    for quarter in range(4):      # values 32 quarter .. + 31 of this half: sub-block 4 h + quarter
                        low = [builder.and_(builder.lshr(v, cw(4 * (quarter // 2))), cw(0x0F0F0F0F))
                               for v in ql[n * (quarter % 2):n * (quarter % 2) + n]]
                        high = [builder.and_(builder.lshr(v, cw(2 * quarter)), cw(0x03030303)) for v in qh]
                        subs.append((4 * h + quarter, [builder.or_(lo, builder.shl(hi, cw(4))) for lo, hi in zip(low, high)]))
            g0 = builder.mul(b, const(8))
            for s, w in subs:
                g = builder.add(g0, const(s))
                for r, row in enumerate(x_rows):
                    block = builder.add(builder.mul(row, groups), g)
                    base = builder.add(builder.mul(row, n_in), builder.mul(g, const(QK)))
                    d_x = _splat(builder, builder.load(builder.gep(xd, [block])), 8)
                    if minus_min:
                        if qt == Q4_K and AVX2 and not VNNI:       # (Q5_K's values would overflow its int16 sums)
                            xs_k = [_splat(builder, _load(builder, xq, builder.add(base, const(4 * k)), _I32), 8) for k in range(8)]
                            isum = _nibbles_block_dot(builder, w, xs_k)
                        else:
                            isum = _block_isum(builder, w, xq, base)
                        scale = builder.fmul(ds[s], d_x)
                        builder.store(_multiply_add(builder, builder.sitofp(isum, floats), scale, builder.load(d_sums[r])), d_sums[r])
                        s_x = _splat(builder, builder.load(builder.gep(xs, [block])), 8)
                        builder.store(_multiply_add(builder, ms[s], s_x, builder.load(m_sums[r])), m_sums[r])
                    elif wide_q6:                   # both halves at once: lanes 0-7 the first's rows, 8-15 the second's
                        n = len(w) // 2
                        both = [_wide_sums(builder, w[n * half:n * half + n], xq, builder.add(base, const(16 * half)),
                                           minus_32_sum_x=True) for half in range(2)]
                        isum = _pairwise_add(builder, builder.shuffle_vector(both[0], both[1], ir.Constant(_vector(_I32, 32), list(range(32)))))
                        scale = builder.fmul(scales[s], _splat(builder, builder.load(builder.gep(xd, [block])), 16))
                        builder.store(_multiply_add(builder, builder.sitofp(isum, _vector(_F32, 16)), scale, builder.load(d_sums[r])), d_sums[r])
                    else:
                        n = len(w) // 2
                        for half, sums in ((0, d_sums), (1, m_sums)):       # two 16-value halves, each its own scale
                            isum = _block_isum(builder, w[n * half:n * half + n], xq, builder.add(base, const(16 * half)),
                                               minus_32_sum_x=True)
                            scale = builder.fmul(scales[2 * s + half], d_x)
                            builder.store(_multiply_add(builder, builder.sitofp(isum, floats), scale, builder.load(sums[r])), sums[r])
        for r, row in enumerate(x_rows):
            total = builder.load(d_sums[r])
            if minus_min:
                total = builder.fsub(total, builder.load(m_sums[r]))
            elif wide_q6:
                halves = [builder.shuffle_vector(total, total, ir.Constant(_vector(_I32, 8), list(range(h, h + 8)))) for h in (0, 8)]
                total = builder.fadd(halves[0], halves[1])
            else:
                total = builder.fadd(total, builder.load(m_sums[r]))
            _store_rows(builder, const, out, row, col, total)
        return context.get_dummy_value()
    return codegen


def _block_isum(builder, w, xq, base, minus_32_sum_x=False):
    """<8 x i32>, lane i: the exact integer sum over w's bytes of row i's unsigned weight bytes times
    the activation bytes from xq[base] on (4 per int32 of a row), less 32 times the sum of those
    activation bytes with minus_32_sum_x (Q6_K's offset). w: vectors of a dword of each row (lane i: row
    i), or (VNNI512) of 8 bytes of each row (lanes 2i and 2i + 1), whose two lanes per row are added at
    the end: the same integers."""
    if w[0].type.count == 16:
        return _pairwise_add(builder, _wide_sums(builder, w, xq, base, minus_32_sum_x))
    sums = [ir.Constant(_vector(_I32, 8), [0] * 8)] * 2
    for k, v in enumerate(w):
        x = _splat(builder, _load(builder, xq, builder.add(base, ir.Constant(_I64, 4 * k)), _I32), 8)
        sums[k % 2] = _dwords_dot(builder, sums[k % 2], v, x)
    total = builder.add(sums[0], sums[1])
    if minus_32_sum_x:
        x16 = _load(builder, xq, base, _vector(_I8, 4 * len(w)))
        x_sum = builder.call(_function(builder, "llvm.vector.reduce.add.v16i32", _I32, [_vector(_I32, 16)]),
                             [builder.sext(x16, _vector(_I32, 16))])
        total = builder.sub(total, _splat(builder, builder.shl(x_sum, ir.Constant(_I32, 5)), 8))
    return total


def _wide_sums(builder, w, xq, base, minus_32_sum_x=False):
    """_block_isum on vectors of 8 bytes of each row, before the two lanes of each row are added:
    <16 x i32>, lanes 2i and 2i + 1 summing to row i's integer sum."""
    words = _vector(_I32, 16)
    vpdpbusd = _function(builder, "llvm.x86.avx512.vpdpbusd.512", words, [words] * 3)
    zero, ones = ir.Constant(words, [0] * 16), ir.Constant(words, [0x01010101] * 16)
    sums, sum_x = [zero, zero], zero                # two chains, added at the end
    for k, v in enumerate(w):
        x = builder.bitcast(_splat(builder, _load(builder, xq, builder.add(base, ir.Constant(_I64, 8 * k)), _I64), 8), words)
        sums[k % 2] = builder.call(vpdpbusd, [sums[k % 2], v, x])
        if minus_32_sum_x:          # the activations' sum, by the same instruction (no horizontal sum)
            sum_x = builder.call(vpdpbusd, [sum_x, ones, x])
    total = builder.add(sums[0], sums[1])
    if minus_32_sum_x:
        total = builder.sub(total, builder.shl(sum_x, ir.Constant(words, [5] * 16)))
    return total


def _row_pointer(context, builder, matrix_type, matrix, o_type, o):
    """A pointer to the first byte of row o of a C-contiguous 2-D array of bytes. (The kernels take
    (matrix, o) rather than the row `matrix[o]`: a view made in compiled code counts a reference to
    the matrix, an atomic add on memory that every thread of a parallel loop shares, twice per row.)"""
    array = context.make_array(matrix_type)(context, builder, value=matrix)
    stride = cgutils.unpack_tuple(builder, array.strides, 2)[0]
    return builder.gep(array.data, [builder.mul(context.cast(builder, o, o_type, types.intp), stride)])


def _bytes_matrix(t) -> bool:
    return isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and t.dtype in (types.uint8, types.int8)


# each type's group kernels, over a range of activation rows
_row_groups_q8_0, _row_groups_q4_0, _row_groups_q4_1, _row_groups_q5_1 = (_row_groups_intrinsic(qt)
                                                                          for qt in (Q8_0, Q4_0, Q4_1, Q5_1_BYTES_T))
_row_groups_q4_k, _row_groups_q5_k, _row_groups_q6_k = (_row_groups_intrinsic(qt) for qt in (Q4_K, Q5_K, Q6_K))


@intrinsic
def _quantize_block(typingctx, x, j, g, xq, xd, xsum):
    """Block g (values 32g .. 32g + 31) of row j of x quantized as quantize_activations says, as one
    vector of 32 lanes: |x|, their maximum, x * (1 / d) rounded (C's roundf: floor(|v| + 0.5), the
    sign put back), the int8s stored and the int32s summed. The same operations on the same values as
    a loop over the 32, so the results are those of llama.cpp's reference quantizer, bit for bit
    (tests/test_kernels.py); numba's loop of them stayed scalar (a maximum and a rounding per value)."""
    if not (all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in (x, xq, xd, xsum))
            and x.dtype == types.float32 and xq.dtype == types.int8 and xd.dtype == types.float32
            and xsum.dtype == types.int32 and isinstance(j, types.Integer) and isinstance(g, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        x_, j_, g_, xq_, xd_, xsum_ = args
        floats, words = _vector(_F32, QK), _vector(_I32, QK)
        xp, qp, dp, sp = (_data(context, builder, sig.args[k], args[k]) for k in (0, 3, 4, 5))
        n_in = cgutils.unpack_tuple(builder, context.make_array(sig.args[0])(context, builder, value=x_).shape, 2)[1]
        groups = cgutils.unpack_tuple(builder, context.make_array(sig.args[4])(context, builder, value=xd_).shape, 2)[1]
        j, g = (context.cast(builder, v, t, types.intp) for v, t in ((j_, sig.args[1]), (g_, sig.args[2])))
        start = builder.add(builder.mul(j, n_in), builder.mul(g, ir.Constant(_I64, QK)))     # flat index of the block
        v = _load(builder, xp, start, floats)
        fabs = _function(builder, "llvm.fabs.v32f32", floats, [floats])
        # the largest |x| as the largest of their bits as unsigned ints (the same order for floats >= 0):
        # a tree of integer maxima, where a float maximum reduction is a chain (it must order NaNs)
        bits = builder.bitcast(builder.call(fabs, [v]), words)
        amax = builder.bitcast(builder.call(_function(builder, "llvm.vector.reduce.umax.v32i32", _I32, [words]), [bits]), _F32)
        d = builder.fdiv(amax, ir.Constant(_F32, 127.0))
        inv = builder.select(builder.fcmp_ordered(">", d, ir.Constant(_F32, 0.0)),
                             builder.fdiv(ir.Constant(_F32, 1.0), d), ir.Constant(_F32, 0.0))
        scaled = builder.fmul(v, _splat(builder, inv, QK))
        rounded = builder.call(_function(builder, "llvm.floor.v32f32", floats, [floats]),
                               [builder.fadd(builder.call(fabs, [scaled]), ir.Constant(floats, [0.5] * QK))])
        magnitude = builder.fptosi(rounded, words)
        q = builder.select(builder.fcmp_ordered("<", scaled, ir.Constant(floats, [0.0] * QK)),
                           builder.sub(ir.Constant(words, [0] * QK), magnitude), magnitude)
        store = builder.store(builder.trunc(q, _vector(_I8, QK)),
                              builder.bitcast(builder.gep(qp, [start]), _vector(_I8, QK).as_pointer()))
        store.align = 1
        at = builder.add(builder.mul(j, groups), g)
        builder.store(d, builder.gep(dp, [at]))
        builder.store(builder.call(_function(builder, "llvm.vector.reduce.add.v32i32", _I32, [words]), [q]),
                      builder.gep(sp, [at]))
        return context.get_dummy_value()
    return types.void(x, j, g, xq, xd, xsum), codegen


@numba.njit(cache=True)
def quantize_activations(x, xq, xd, xsum):
    """x (n, in) float32 -> int8 blocks of 32, as llama.cpp's quantize_row_q8_0/q8_1:
    xd[j, g] = d_x = max|x| / 127, xq = round(x * (1 / d_x)) (halves away from zero, C's roundf; 0
    where d_x = 0), xsum[j, g] = sum of the block's xq (s_x = d_x * xsum, Q8_1's s)."""
    for j in range(x.shape[0]):
        for g in range(x.shape[1] // QK):
            _quantize_block(x, j, g, xq, xd, xsum)


@numba.njit(inline="always")
def _quantized(x):
    """x (n, in) float32 -> (xq int8, xd, xsum int32, xs): the activation blocks, their d_x, the sums
    of their q_x and s_x = d_x sum(q_x)."""
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    xsum = np.empty((x.shape[0], x.shape[1] // QK), np.int32)
    xs = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    quantize_into(x, xq, xd, xsum, xs)
    return xq, xd, xsum, xs


@numba.njit(inline="always")
def quantize_into(x, xq, xd, xsum, xs):
    """_quantized into given buffers (xsum: the int32 sums of the blocks, scratch)."""
    quantize_activations(x, xq, xd, xsum)
    for j in range(xd.shape[0]):
        for g in range(xd.shape[1]):
            xs[j, g] = xd[j, g] * np.float32(xsum[j, g])


# Why the kernels prefetch the weights (software prefetch): a decode step reads each weight once, from
# memory. The hardware prefetcher stops at every 4 KiB boundary, and the rows of a small model (360 bytes
# of Q4_1 at SmolLM2's 576 inputs) are too short a stream for it to get going: without prefetches the
# kernels streamed the model at a third of the machine's bandwidth (docs/performance.md). Prefetches are
# hints: past the end of an array they are dropped, never a fault. (The float32 rows, one long stream a
# thread, do without: kernels/matvec.py.)
#
# The group kernels ask for the next group's bytes as they go, in address order, a slice a block: a
# group's rows lie next to each other, so that is one stream a thread, and packed (PACKED) the slice is
# the block the kernel reads next. Asked for row by row (each row's next bytes, the order the kernel read
# the file's rows in), it was sixteen interleaved streams, which AMD EPYC Zen 4 read at two thirds of the
# rate of one: SmolLM2's decode was 1.3-1.5x faster in address order (docs/performance.md, 2026-12-06).
# (On Zen 5, earlier that day, an address-order prefetch had measured 1.03x in a slow stretch and 0.89x in
# a fast one. Further ahead, 1.5 groups, was slower on Zen 4; so were half a group and two groups for
# Q8_0's rows, as non-temporal prefetches. Into L2, as they are now, half a group and two groups ahead
# were no different from one: 2026-12-06 23:00.)
#
# llama2.c's int8 rows (kernels/step.py) ask for this many bytes ahead of the row being read:
PREFETCH_BYTES = 4096


def _prefetch_next_group(builder, weights, group_rows, step, steps):
    """A kernel's prefetches at step `step` of `steps` (int64 values) of its loop over a group's blocks:
    slice `step` of the next group's bytes (the group_rows rows after its own; why: see above), in address
    order, in whole 64-byte lines (the last slice may run past them: dropped there). weights = (first,
    stride) as _group_rows gives them. Packed, slice `step` is the next group's block `step`: the bytes
    the kernel reads next, for one activation row or several."""
    i64 = ir.IntType(64)
    const = lambda v: ir.Constant(i64, v)   # noqa: E731
    first, stride = weights
    size = builder.mul(stride, const(group_rows))
    lines = builder.udiv(builder.add(size, const(63)), const(64))
    per_step = builder.udiv(builder.add(lines, builder.sub(steps, const(1))), steps)
    start = builder.add(size, builder.mul(builder.mul(step, per_step), const(64)))
    _prefetch_lines(builder, builder.add(builder.ptrtoint(first, i64), start), builder.mul(per_step, const(64)))


def _prefetch_lines(builder, first, count):
    """Prefetch (for reading, into L2: _prefetch) each 64-byte line of the bytes [first, first +
    count): first an int64 address, count an int64."""
    line = ir.Constant(ir.IntType(64), 64)
    with cgutils.for_range(builder, builder.udiv(builder.add(count, ir.Constant(ir.IntType(64), 63)), line)) as loop:
        _prefetch(builder, builder.inttoptr(builder.add(first, builder.mul(loop.index, line)), ir.IntType(8).as_pointer()))


@intrinsic
def prefetch_bytes(typingctx, data, start, count):
    """Prefetch the lines of bytes [start, start + count) from the first element of a C-contiguous
    array of any type (they may lie past its end: a prefetch is dropped there, never a fault). Why:
    see PREFETCH_BYTES."""
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
def _groups(rows):
    """How many groups of ROW_GROUP weight rows (the last one may be short) `rows` rows make."""
    return (rows + ROW_GROUP - 1) // ROW_GROUP


@numba.njit(inline="always")
def group_range(t, tasks, rows):
    """Weight rows [start, stop) of task t when rows are dealt out in whole groups of ROW_GROUP."""
    start, stop = _task_rows(t, tasks, _groups(rows))
    return start * ROW_GROUP, min(stop * ROW_GROUP, rows)


@numba.njit(inline="always")
def _row_group_fast(kinds, qt, raw, o, xq, xd, xsum, xs, out, j0, n):
    """out[j, i] = weight row o + i of the matrix raw (type qt, one of `kinds`) times row j of the
    quantized activations, for i < ROW_GROUP (rows past the matrix's end: its last row again) and
    j0 <= j < n: eight activation rows at a time (K-quants without 512-bit vectors: four), then four,
    then one. out: (n, ROW_GROUP) float32 scratch."""
    if kinds & Q4_1_BIT and qt == Q4_1:
        _row_groups_q4_1(raw, o, xq, xd, xsum, xs, j0, n, out)
    elif kinds & Q8_0_BIT and qt == Q8_0:
        _row_groups_q8_0(raw, o, xq, xd, xsum, xs, j0, n, out)
    elif kinds & Q4_0_BIT and qt == Q4_0:
        _row_groups_q4_0(raw, o, xq, xd, xsum, xs, j0, n, out)
    elif kinds & Q5_1_BIT and qt == Q5_1_BYTES_T:
        _row_groups_q5_1(raw, o, xq, xd, xsum, xs, j0, n, out)
    else:
        for k in range(o, o + ROW_GROUP, K_ROWS):     # the K-quants' kernels: K_ROWS weight rows at a time
            if kinds & Q4_K_BIT and qt == Q4_K:
                _row_groups_q4_k(raw, k, xq, xd, xsum, xs, j0, n, out)
            elif kinds & Q5_K_BIT and qt == Q5_K:
                _row_groups_q5_k(raw, k, xq, xd, xsum, xs, j0, n, out)
            elif kinds & Q6_K_BIT and qt == Q6_K:
                _row_groups_q6_k(raw, k, xq, xd, xsum, xs, j0, n, out)


# _row_group_fast as a function of its own, called rather than inlined, for the fused products of the
# layer-by-layer path below (matvec3_fast, swiglu_fast: inspection and the per-kernel tests, never the
# one-call forward). They take every type, and each inlined copy compiled the group kernels of all seven
# again; one called copy serves both. (The one-call forward inlines _row_group_fast for its own types
# only, kernels/step.py; called there it made a decode step slower.)
_row_group_called = numba.njit(_row_group_fast.py_func)


@numba.njit(inline="always")
def _put_row(block, out, o, add, j):
    """put_group for a whole group and one activation row j: loops of the constant ROW_GROUP, which
    the compiler unrolls into a few vector moves where the general loops, of run-time lengths, stay
    scalar (measured: docs/performance.md)."""
    if add:
        for i in range(ROW_GROUP):
            out[j, o + i] = out[j, o + i] + block[j, i]
    else:
        for i in range(ROW_GROUP):
            out[j, o + i] = block[j, i]


@numba.njit(inline="always")
def put_group(block, out, o, add, j0, n):
    """For the rows i of the group starting at weight row o that the matrix has, and j0 <= j < n:
    out[j, o + i] = block[j, i], or with `add` out[j, o + i] + block[j, i] (the residual stream).
    out: (n, rows); block: (n, ROW_GROUP), from _row_group_fast. (In the one-call forward `add` is
    not a constant: kernels/step.py's LAYER_ADDS.)"""
    rows = min(ROW_GROUP, out.shape[1] - o)
    if rows == ROW_GROUP:
        for j in range(j0, n):
            _put_row(block, out, o, add, j)
    elif add:
        for i in range(rows):
            for j in range(j0, n):
                out[j, o + i] = out[j, o + i] + block[j, i]
    else:
        for i in range(rows):
            for j in range(j0, n):
                out[j, o + i] = block[j, i]


# A batch of many activation rows (a prompt's part) goes through the weights in tiles: a block of weight
# rows (their bytes stay in L2) times TILE_X_BYTES of activation rows (they stay in L1) at a time. Without
# tiles, each group of 8 weight rows read every activation row, from L2 once they outgrew L1: a product
# of 128 rows took twice the time per multiply of one of 16 (docs/performance.md).
TILE_X_BYTES = 32 * 1024        # activation rows per tile: this many of their int8 bytes (L1: 32-48 KiB)
TILE_W_BYTES = 256 * 1024       # weight rows per block: this many of their bytes (L2: 1-2 MiB)


@numba.njit(inline="always")
def products(kinds, qt, raw, start, stop, xq, xd, xsum, xs, out, block, add):
    """Weight rows [start, stop) (whole groups of ROW_GROUP) of (quantized activations) @ W.T, W of type
    qt (one of `kinds`), put into out, or added to it (put_group), in tiles of activation rows and blocks
    of weight rows. block:
    (n, ROW_GROUP) float32 scratch. Each (weight row, activation row) is computed as untiled."""
    n, n_in, row_bytes = xq.shape[0], xq.shape[1], raw.shape[1]
    tile = max(ROW_GROUP, TILE_X_BYTES // n_in // ROW_GROUP * ROW_GROUP)
    rows_per_block = max(ROW_GROUP, TILE_W_BYTES // row_bytes // ROW_GROUP * ROW_GROUP)
    for o0 in range(start, stop, rows_per_block):
        o1 = min(o0 + rows_per_block, stop)
        for j0 in range(0, n, tile):
            j1 = min(j0 + tile, n)
            for o in range(o0, o1, ROW_GROUP):
                _row_group_fast(kinds, qt, raw, o, xq, xd, xsum, xs, block, j0, j1)
                put_group(block, out, o, add, j0, j1)


@numba.njit(parallel=True, cache=True)
def matvec_fast(qt, raw, x, out):
    """out = x @ W.T, W of ggml type qt given as its raw bytes (out_features, row bytes) uint8, x
    (n, in) float32 quantized here (in the same call: one call per product), out (n, out_features)
    float32. A row's result does not depend on the other rows in the batch."""
    xq, xd, xsum, xs = _quantized(x)
    rows, n = raw.shape[0], x.shape[0]
    tasks = min(TASKS, _groups(rows))
    for t in numba.prange(tasks):
        start, stop = group_range(t, tasks, rows)
        products(ALL_KINDS, qt, raw, start, stop, xq, xd, xsum, xs, out, np.empty((n, ROW_GROUP), np.float32),
                 False)


# ----------------------------------------------------------------------------------------------
# fused products of a decode step: several matrices that read the same activations, in one call
#
# A decode step of a small model is many short products (SmolLM2: 30 layers x 7 matrices, tens of
# microseconds each); each call from Python costs its dispatch and a start of the thread pool, and the
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
    """matvec3_exact with int8 activations: x quantized once for the three matrices, tasks over the
    stacked groups of ROW_GROUP rows."""
    xq, xd, xsum, xs = _quantized(x)
    n = x.shape[0]
    ga, gb = _groups(raws[0].shape[0]), _groups(raws[1].shape[0])
    total = ga + gb + _groups(raws[2].shape[0])
    tasks = min(TASKS, total)
    for t in numba.prange(tasks):
        block = np.empty((n, ROW_GROUP), np.float32)
        start, stop = _task_rows(t, tasks, total)
        for r in range(start, stop):
            i, group = _part(r, ga, gb)
            o = group * ROW_GROUP
            _row_group_called(ALL_KINDS, qts[i], raws[i], o, xq, xd, xsum, xs, block, 0, n)
            put_group(block, outs[i], o, False, 0, n)


# SwiGLU's gate, two ways: run.c's (libm's expf, for the exact kernels and float32 weights) and llama.cpp's
# (a vectorized exp, as ggml's swiglu: the fast path). libm's expf is a call per value, which keeps a loop
# of them scalar: with eight activation rows (the server's decode steps) SmolLM2's gate took ~7% of a
# step that way (docs/performance.md).

@numba.njit(inline="always")
def _silu_times(a, b):
    """silu(a) * b, silu(a) = a * (1 / (1 + exp(-a))), rounded as run.c and model.silu round it."""
    return a * (np.float32(1.0) / (np.float32(1.0) + np.exp(-a))) * b


@numba.njit(inline="always")
def gate(out, up, start, stop, fast):
    """out[:, o] = silu(out[:, o]) * up[:, o] for the units o in [start, stop): SwiGLU's gate, on the
    units whose two products (w1 in out, w3 in up) one thread has computed; llama.cpp's silu where
    `fast`, else run.c's. Each row's units are one loop over unsigned indices (see _unsigned), which
    the fast one lets vectorize."""
    if fast:
        for j in range(out.shape[0]):
            for o in range(_unsigned(start), _unsigned(stop)):
                out[j, o] = _silu_times_fast(out[j, o], up[j, o])
    else:
        for j in range(out.shape[0]):
            for o in range(_unsigned(start), _unsigned(stop)):
                out[j, o] = _silu_times(out[j, o], up[j, o])


@numba.njit(inline="always")
def _unsigned(i):
    """i (>= 0) as an unsigned index. numba reads a signed index below zero from the end of the axis, a
    compare and select per element: in a loop whose start is known only at run time that kept LLVM
    from vectorizing (it read the elements one by one, or by gathers). An unsigned index it takes as
    it is: the one-call forward's gate ran ~15x faster (docs/performance.md, 2026-12-06). (Unsigned
    throughout a loop's index arithmetic: numpy's rules make int64 + uint64 a float64.)"""
    return np.uint64(i)


@numba.njit(inline="always")
def _silu_times_fast(a, b):
    """silu(a) * b as llama.cpp's vectorized swiglu computes it: a / (1 + e^-a) * b, e^-a by exp_fast."""
    return _quotient(a, np.float32(1.0) + exp_fast(-a)) * b


@intrinsic
def _quotient(typingctx, a, b):
    """a / b for float32, IEEE's (b = 0 gives inf or nan): without the zero check of numba's division,
    which raises ZeroDivisionError and so keeps a loop of them from vectorizing (error_model="numpy"
    drops it too, but only for a whole function: one inlined into another takes the caller's)."""
    if not (a == types.float32 and b == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])
    return types.float32(a, b), codegen


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose bits are the low 32 of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        word = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(word, ir.FloatType())
    return types.float32(bits), codegen


@numba.njit(inline="always", error_model="numpy")
def exp_fast(x):
    """e^x for float32 x, within ~2 ulp, with no libm call so that a loop of them vectorizes (ggml's
    SIMD expf does the same): x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n
    put into the exponent bits. x is taken as at least -87 and at most 88: below, e^-87 (~1.6e-38) comes
    out rather than less (nothing next to a softmax's largest term, e^0 = 1); above, e^88 (~1.7e38)
    rather than inf (silu(a) for a < -88 is then a / 1.7e38, not -0.0)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))          # float32, as every step here
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * _float_of_bits((np.int32(n) + 127) << 23)


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
    xq, xd, xsum, xs = _quantized(x)
    rows, n = raws[0].shape[0], x.shape[0]
    tasks = min(TASKS, _groups(rows))
    up = np.empty_like(out)
    for t in numba.prange(tasks):
        block = np.empty((n, ROW_GROUP), np.float32)
        start, stop = group_range(t, tasks, rows)
        for o in range(start, stop, ROW_GROUP):      # the gate's products into out, the up's into up
            _row_group_called(ALL_KINDS, qts[0], raws[0], o, xq, xd, xsum, xs, block, 0, n)
            put_group(block, out, o, False, 0, n)
            _row_group_called(ALL_KINDS, qts[1], raws[1], o, xq, xd, xsum, xs, block, 0, n)
            put_group(block, up, o, False, 0, n)
        gate(out, up, start, stop, True)


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
    elif qt == Q5_0 or qt == Q5_1:
        q, h, off, a, b = _q5_0_params(row, g) if qt == Q5_0 else _q5_1_params(row, g)
        for i in range(16):
            lo, hi = _fives(row, q, h, i)
            w[k + i] = a * (lo - off) + b
            w[k + i + 16] = a * (hi - off) + b
    elif qt == Q4_K:
        p = (g // 8) * Q4_K_BYTES
        q, shift, ds, ms = _q4_k_params(row, p, g % 8, _f16(row, p), _f16(row, p + 2))
        for i in range(32):
            w[k + i] = ds * np.float32(_bits(row, q + i, shift, 15)) - ms
    elif qt == Q5_K:
        p = (g // 8) * Q5_K_BYTES
        q, shift, ds, ms = _q4_k_params(row, p, g % 8, _f16(row, p), _f16(row, p + 2))
        for i in range(32):
            w[k + i] = ds * _q5(row, q + 32, shift, g % 8, p, i) - ms
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
        if qt == Q2_K or qt == Q3_K:
            _q23_values(qt, row, groups, w)
            continue
        for g in range(groups):
            _group_values(qt, row, g, w)
