"""ggml's K-quant block quantizers (Q4_K, Q5_K, Q6_K), bit for bit llama.cpp's reference ones.

These are ggml-quants.c's quantize_row_q4_K_ref / q5_K_ref / q6_K_ref (what `llama-quantize`
runs when it has no importance matrix), written over every super-block of a tensor at once:
numpy arrays hold one lane per sub-block and the C loops over the 16 or 32 values of a sub-block
become steps over the rows of an (n, lanes) array.

Bit-exactness rests on three things, each kept on purpose:
- every quantity is float32, as the C code's `float`: numpy keeps float32 op float32 in float32,
  and each constant is a np.float32 before it meets an array;
- the C loops sum in index order (0 + v0 + v1 + ...); numpy's pairwise summation would round
  differently, so the sums reduce over axis 0 of a C-contiguous (n, lanes) array, which numpy does
  as a plain running sum (pairwise summation is only for the contiguous axis), from an initial 0;
- nearest_int is ggml's rounding trick (add 1.5 * 2**23, read the low mantissa bits): round half
  to even, and the same garbage as C for the lanes where the input is inf or NaN (those lanes are
  masked afterwards, as the C code returns early on them).

A super-block is 256 values (QK_K); the blocks are laid out as ggml-common.h declares them:
  Q4_K: d f16, dmin f16, scales[12] (6-bit scales and mins), qs[128]            -> 144 bytes
  Q5_K: d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128] (low 4 bits)     -> 176 bytes
  Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16      -> 210 bytes
"""
from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
MAGIC = F32(12582912.0)           # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits
CHUNK_SUPERBLOCKS = 512           # super-blocks quantized together: 128K values, temporaries stay in cache


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even through the float32 mantissa, as int32."""
    with np.errstate(invalid="ignore", over="ignore"):
        bits = (np.asarray(v, F32) + MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def running_sum(terms: np.ndarray) -> np.ndarray:
    """sum over axis 0 of (n, lanes) float32 terms, in index order from 0, per lane (C's `s += t`)."""
    return np.add.reduce(np.ascontiguousarray(terms, F32), axis=0, initial=F32(0.0))


# ----------------------------------------------------------------------------------------------
# the searches for a sub-block's scale (and min)

def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants (use_mad false) for every lane: x, w (n, lanes) float32.

    Fits x ~ scale * L + min with L in 0..nmax and min <= 0, trying nstep + 1 scales around
    nmax / (max - min) and keeping the least weighted squared error. -> (scale, -min, L (n, lanes))."""
    nmax_f = F32(nmax)
    sum_w = running_sum(w)
    sum_x = running_sum(w * x)
    mn = np.minimum(x.min(axis=0), F32(0.0))
    mx = x.max(axis=0)
    flat = mx == mn                                     # C returns scale 0, L = 0, this min for these lanes
    flat_min = mn

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / (mx - mn)
        scale = F32(1.0) / iscale
        L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
        best_error = running_sum(w * np.square(scale * L.astype(F32) + mn - x))
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (mx - mn)
            laux = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
            lf = laux.astype(F32)
            wl = w * lf
            sum_l = running_sum(wl)
            sum_l2 = running_sum(wl * lf)
            sum_xl = running_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0                      # a min above 0 is refit as scale alone
            this_min = np.where(positive, F32(0.0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur_error = running_sum(w * np.square(this_scale * lf + this_min - x))
            better = (D > 0) & (cur_error < best_error)
            L = np.where(better, laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0.0), scale)
    mn = np.where(flat, flat_min, mn)
    L = np.where(flat, 0, L)
    return scale.astype(F32), (-mn).astype(F32), L


def make_qx_quants_rmse1(x: np.ndarray, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 and no importance weights, for every lane: x (n, lanes).

    Symmetric: x ~ scale * (L - nmax), L in 0..2*nmax-1, the scale searched over 19 candidates
    around -nmax / max (max: the value of largest magnitude, first one on ties), weights x**2.
    -> (scale, L (n, lanes))."""
    ax = np.abs(x)
    first_largest = ax.argmax(axis=0)
    lanes = np.arange(x.shape[1])
    amax = ax[first_largest, lanes]
    mx = x[first_largest, lanes]
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def quants(iscale):
        return np.clip(nearest_int(iscale * x), -nmax, nmax - 1)

    def sums(l):
        lf = l.astype(F32)
        return running_sum(wx * lf), running_sum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l = quants(F32(-nmax) / mx)
        sumlx, suml2 = sums(l)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            lt = quants(iscale)
            slx, sl2 = sums(lt)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            l = np.where(better, lt, l)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    L = np.where(zero, 0, l + nmax)
    scale = np.where(zero, F32(0.0), scale)
    return scale.astype(F32), L


# ----------------------------------------------------------------------------------------------
# Q4_K and Q5_K: 8 sub-blocks of 32 with a 6-bit scale and a 6-bit min each

def _subblock_weights(xs: np.ndarray) -> np.ndarray:
    """av_x + |x| per value, av_x the root mean square of its sub-block: xs (32, lanes)."""
    av_x = np.sqrt(running_sum(xs * xs) / F32(32.0))
    return av_x + np.abs(xs)


def _largest_positive(v: np.ndarray) -> np.ndarray:
    """max(0, v[:, 0], v[:, 1], ...) per row, as C's running `if (v > m) m = v` from m = +0 (never -0)."""
    m = v.max(axis=1)
    return np.where(m > 0, m, F32(0.0)).astype(F32)


def pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and mins: ls, lm (blocks, 8) uint8 -> (blocks, 12)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _quantize_scaled_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The part Q4_K and Q5_K share: x (blocks, 256) -> (d f16, dmin f16, scales (blocks, 12), L (blocks, 256))."""
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * 8, 32).T)            # (32, sub-blocks)
    scales, mins, L = make_qkx2_quants(xs, _subblock_weights(xs), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    L = L.T.reshape(nb, 8, 32)

    max_scale = _largest_positive(scales)
    max_min = _largest_positive(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0)).astype(F32)
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)   # C: uint8_t, then MIN
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / F32(63.0)).astype(np.float16)
    dmin = (max_min / F32(63.0)).astype(np.float16)

    # requantize every value with the scale and min as stored; a sub-block whose scale reads back
    # as 0 keeps the search's L (C skips it)
    dl = d.astype(F32)[:, None] * ls.astype(F32)                  # (blocks, 8)
    ml = dmin.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int((x.reshape(nb, 8, 32) + ml[:, :, None]) / dl[:, :, None]), 0, nmax)
    L = np.where((dl != 0)[:, :, None], again, L).reshape(nb, QK_K).astype(np.uint8)
    return d, dmin, pack_scales_mins(ls, lm), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks of x (blocks, 256) float32 -> (blocks, 144) uint8, as quantize_row_q4_K_ref."""
    d, dmin, scales, L = _quantize_scaled_min(x, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)                                   # 4 chunks of 64: low nibbles, high nibbles
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """Q5_K blocks of x (blocks, 256) float32 -> (blocks, 176) uint8, as quantize_row_q5_K_ref."""
    d, dmin, scales, L = _quantize_scaled_min(x, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32)
    low = L & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (L >> 4).astype(np.uint8)                              # (blocks, 4, 2, 32): bit 2*chunk + half
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce((high << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qh, qs], axis=1)


# ----------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16 with an 8-bit signed scale each

def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks of x (blocks, 256) float32 -> (blocks, 210) uint8, as quantize_row_q6_K_ref."""
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * 16, 16).T)           # (16, sub-blocks)
    scales, L = make_qx_quants_rmse1(xs, 32)
    scales = scales.reshape(nb, 16)
    L = L.T.reshape(nb, 16, 16)

    abs_scales = np.abs(scales)
    first_largest = abs_scales.argmax(axis=1)
    max_scale = scales[np.arange(nb), first_largest]
    zero = abs_scales[np.arange(nb), first_largest] < GROUP_MAX_EPS    # C writes an all-zero block
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (F32(-128.0) / max_scale).astype(F32)
        d = (F32(1.0) / iscale).astype(np.float16)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
        dl = d.astype(F32)[:, None] * sc.astype(F32)                 # (blocks, 16)
        again = np.clip(nearest_int(x.reshape(nb, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where((dl != 0)[:, :, None], again, L).reshape(nb, 2, 4, 32).astype(np.uint8)   # 2 halves of 128

    ql = np.concatenate([L[:, :, 0] & 0xF | (L[:, :, 2] & 0xF) << 4,
                         L[:, :, 1] & 0xF | (L[:, :, 3] & 0xF) << 4], axis=2).reshape(nb, 128)
    qh = (L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6).reshape(nb, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
    blocks[zero] = 0
    return blocks


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype("<f2")).view(np.uint8).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------

QUANTIZERS = {"Q4_K": (quantize_q4_k, 144), "Q5_K": (quantize_q5_k, 176), "Q6_K": (quantize_q6_k, 210)}


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """A matrix (rows, n) float32, n a multiple of 256, as rows of type_name's blocks: (rows, n / 256 * bytes)."""
    quantize_blocks, type_size = QUANTIZERS[type_name]
    values = np.ascontiguousarray(values, F32)
    rows, n = values.shape
    if n % QK_K:
        raise ValueError(f"{type_name} needs rows of a multiple of {QK_K} values, not {n}")
    blocks = values.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), np.uint8)
    for start in range(0, blocks.shape[0], CHUNK_SUPERBLOCKS):
        out[start:start + CHUNK_SUPERBLOCKS] = quantize_blocks(blocks[start:start + CHUNK_SUPERBLOCKS])
    return out.reshape(rows, n // QK_K * type_size)
