"""Quantized weight tensors that stay quantized in memory.

Every type here offers the same three things to the model, so model.py never asks which it has:
    linear(x)   x @ W.T for activations x (n, in_features) -> (n, out_features) float32
    rows(ids)   rows of W dequantized to float32 (an embedding lookup)
    dequantize  the whole matrix as float32
and `shape` = (out_features, in_features). Plain float32 weights are numpy arrays.

- `GroupQuantized`: llama2.c's version-2 format (what `export.py` writes and `runq.c` reads): int8
  values in groups of `group_size` along the last axis, one float32 scale per group,
  so `w[..., g*G:(g+1)*G] ~= q[..., g*G:(g+1)*G] * scale[..., g]`.
- `GGMLTensor`: ggml's block formats (Q8_0, Q4_0, Q4_1, ..., the K-quants, F16, BF16) from GGUF files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants


@dataclass(frozen=True)
class GroupQuantized:
    q: np.ndarray        # (..., n_in) int8, usually a view into the memory-mapped file
    scale: np.ndarray    # (..., n_in // group_size) float32
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __getitem__(self, index) -> GroupQuantized:
        """Index the leading axes (a layer, a set of rows); the grouped last axis stays whole."""
        return GroupQuantized(self.q[index], self.scale[index], self.group_size)

    def dequantize(self) -> np.ndarray:
        """float32 copy of these values: q * scale, group by group (as runq.c's dequantize)."""
        groups = self.q.reshape(*self.scale.shape, self.group_size).astype(np.float32)
        return (groups * self.scale[..., None]).reshape(self.q.shape)

    def rows(self, ids) -> np.ndarray:
        """Rows `ids` as float32 (runq.c dequantizes its embedding table the same way)."""
        return self[np.asarray(ids, np.int64)].dequantize()

    def linear(self, x: np.ndarray) -> np.ndarray:
        """runq.c's int8 matmul: activations quantized per group, integer dot per group, float32 sums.

        out[t, o] = sum_g float(int_dot(xq[t, g], wq[o, g])) * w_scale[o, g] * x_scale[t, g], summed
        over groups g in order. The integer dots are done as float32 products: every partial sum of a
        group is an integer below 127*127*group_size < 2^24, so float32 holds it exactly in any order.
        x: (n, in) -> (n, out)
        """
        gs = self.group_size
        n, n_in = x.shape
        G = n_in // gs
        xq = quantize_groups(x, gs)
        xg = xq.q.reshape(n, G, gs).transpose(1, 0, 2).astype(np.float32)          # (G, n, gs)
        wg = self.q.reshape(-1, G, gs).transpose(1, 2, 0).astype(np.float32)       # (G, gs, out)
        int_dots = xg @ wg                                                           # (G, n, out) exact
        terms = int_dots * self.scale.T[:, None, :] * xq.scale.T[:, :, None]        # (G, n, out)
        return np.cumsum(terms, axis=0, dtype=np.float32)[-1]                        # groups in order


def quantize_groups(x: np.ndarray, group_size: int) -> GroupQuantized:
    """Symmetric int8 quantization per group, as llama2.c's runq.c quantizes activations.

    scale = max|x_group| / 127 (float32); q = round(x / scale) with C's round (halves away from zero).
    """
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scale = (np.abs(groups).max(axis=-1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)   # an all-zero group quantizes to zeros
    ratio = (groups / safe[..., None]).astype(np.float64)  # float32 division, rounded in double as C does
    q = (np.sign(ratio) * np.floor(np.abs(ratio) + 0.5)).astype(np.int8)
    return GroupQuantized(q.reshape(x.shape), scale, group_size)


# ----------------------------------------------------------------------------------------------
# ggml's block formats (GGUF files)

# Block layouts of the types with a faster dequantizer here (as in ggml-common.h): numpy structured
# dtypes, so that a row of raw bytes views as a row of blocks with no copy.
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])                       # w = d * qs
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])                       # w = d * (nibble - 8)
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])         # w = d * nibble + m

_LOW_NIBBLE, _SHIFT = np.uint8(0x0F), np.uint8(4)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """(rows, n_blocks * 34) uint8 -> (rows, n_blocks * 32) float32, bit for bit as gguf's."""
    blocks = raw.view(_Q8_0)                                            # (rows, nb)
    out = np.empty((*blocks.shape, 32), np.float32)                     # (rows, nb, 32)
    d = blocks["d"].astype(np.float32)[..., None]                       # (rows, nb, 1)
    np.multiply(blocks["qs"], d, out=out)                               # int8 -> float32 exactly
    return out.reshape(raw.shape[0], blocks.shape[1] * 32)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """(rows, n_blocks * 18) uint8 -> (rows, n_blocks * 32) float32, bit for bit as gguf's.

    A block's 16 bytes hold values 0..15 in their low nibbles and 16..31 in their high nibbles."""
    blocks = raw.view(_Q4_0)
    qs = blocks["qs"]                                                   # (rows, nb, 16)
    out = np.empty((*blocks.shape, 32), np.float32)
    d = blocks["d"].astype(np.float32)[..., None]
    np.multiply((qs & _LOW_NIBBLE).view(np.int8) - np.int8(8), d, out=out[..., :16])
    np.multiply((qs >> _SHIFT).view(np.int8) - np.int8(8), d, out=out[..., 16:])
    return out.reshape(raw.shape[0], blocks.shape[1] * 32)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """(rows, n_blocks * 20) uint8 -> (rows, n_blocks * 32) float32, bit for bit as gguf's:
    the product d * nibble is rounded to float32 before m is added, as there (no fused multiply-add)."""
    blocks = raw.view(_Q4_1)
    qs = blocks["qs"]                                                   # (rows, nb, 16)
    out = np.empty((*blocks.shape, 32), np.float32)
    d = blocks["d"].astype(np.float32)[..., None]
    np.multiply(qs & _LOW_NIBBLE, d, out=out[..., :16])
    np.multiply(qs >> _SHIFT, d, out=out[..., 16:])
    out += blocks["m"].astype(np.float32)[..., None]
    return out.reshape(raw.shape[0], blocks.shape[1] * 32)


def _dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


# The types a llama GGUF may store its matrices in, with this module's dequantizer where it has one
# (None: gguf's). Ours are for the common types, where gguf's numpy code is slowest (2-4x).
_T = GGMLQuantizationType
DEQUANTIZERS = {
    _T.F16: _dequantize_f16, _T.BF16: None, _T.Q8_0: dequantize_q8_0, _T.Q4_0: dequantize_q4_0,
    _T.Q4_1: dequantize_q4_1, _T.Q5_0: None, _T.Q5_1: None,
    _T.Q2_K: None, _T.Q3_K: None, _T.Q4_K: None, _T.Q5_K: None, _T.Q6_K: None,
}
GGML_TYPES = (_T.F32, *DEQUANTIZERS)   # the tensor types llamarun reads from GGUF files


class GGMLTensor:
    """A matrix in one of ggml's block formats, left as the file's bytes (a view of its memory map).

    shape is (out_features, in_features); `raw` is (out_features, bytes_per_row) uint8, one row of
    blocks per output. Dequantized only where used: a few rows for an embedding lookup (`rows`),
    the whole matrix for a product (`linear`, one tensor at a time, never the whole model).
    """

    def __init__(self, name: str, qtype, shape: tuple[int, int], raw: np.ndarray):
        self.name = name
        self.qtype = qtype                  # GGMLQuantizationType
        self.shape = shape
        self.raw = raw
        self._dequantize_rows = DEQUANTIZERS[qtype] or (lambda raw: gguf_quants.dequantize(raw, qtype))

    @property
    def ggml_type(self) -> str:
        return self.qtype.name

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def ndim(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"GGMLTensor({self.name!r}, {self.ggml_type}, shape={self.shape})"

    def rows(self, ids) -> np.ndarray:
        """The rows `ids`, dequantized.   -> (len(ids), in_features) float32"""
        ids = np.asarray(ids, np.int64).reshape(-1)
        return self._dequantize_rows(self.raw[ids]).reshape(len(ids), self.shape[1])

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32.   -> (out_features, in_features)"""
        return self._dequantize_rows(self.raw).reshape(self.shape)

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x (n, in_features) float32.   -> (n, out_features)

        For now the matrix is dequantized for each product and multiplied by BLAS."""
        return x @ self.dequantize().T
