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

from .kernels import ggml as ggml_kernels
from .kernels import int8 as int8_kernels
from .kernels.ggml import PACKED, five_bit_values, int8_type
from .kernels.matvec import matvec, matvec_half, widen_rows
from .packing import PackedMatrices
from .plan import FAST_KERNEL_ROWS, MATVEC_ROWS, TILE_BYTES


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

    def on_kernels(self, x: np.ndarray) -> bool:
        """Whether x @ W.T runs on the numba kernels (kernels/int8.py): any number of rows of x. (A
        prompt too: BLAS has no int8 product, and its float32 statement of runq.c's arithmetic,
        `linear_blas`, is a batch of tiny products per group, several times slower than the kernels
        on a prompt: docs/performance.md.)"""
        return self.q.ndim == 2

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T as runq.c computes it, on the numba kernels (kernels/int8.py, no float32 copy of W);
        `linear_blas` is the same arithmetic in numpy, bit for bit alike (tests/test_decode_kernels.py)."""
        if not self.on_kernels(x):
            return self.linear_blas(x)
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty((x.shape[0], self.q.shape[0]), np.float32)
        int8_kernels.matvec(self.q, self.scale, self.group_size, x, out)
        return out

    def linear_blas(self, x: np.ndarray) -> np.ndarray:
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


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    """(rows, n_blocks * 22) uint8 -> (rows, n_blocks * 32) float32, bit for bit as gguf's:
    w = d * (v - 16), v of 5 bits (kernels/ggml.py's five_bit_values)."""
    blocks = raw.reshape(raw.shape[0], -1, 22)                         # f16 d, u8 qh[4], u8 qs[16]
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)          # (rows, nb, 1)
    out = np.multiply(five_bit_values(blocks, 2).view(np.int8) - np.int8(16), d, dtype=np.float32)
    return out.reshape(raw.shape[0], -1)


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    """(rows, n_blocks * 24) uint8 -> (rows, n_blocks * 32) float32, bit for bit as gguf's: w = d * v
    + m, the product rounded to float32 before m is added (as Q4_1)."""
    blocks = raw.reshape(raw.shape[0], -1, 24)                         # f16 d, f16 m, u8 qh[4], u8 qs[16]
    d, m = (np.ascontiguousarray(blocks[..., k:k + 2]).view(np.float16).astype(np.float32) for k in (0, 2))
    out = np.multiply(five_bit_values(blocks, 4), d, dtype=np.float32)
    out += m
    return out.reshape(raw.shape[0], -1)


def _dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> float32: they are its top half (gguf's, without its rounding of NaNs)."""
    return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# The types a llama GGUF may store its matrices in, with this module's dequantizer where it has one
# (None: gguf's). Ours are for the common types, where gguf's numpy code is slowest (docs/performance.md).
_T = GGMLQuantizationType
DEQUANTIZERS = {
    _T.F16: _dequantize_f16, _T.BF16: _dequantize_bf16, _T.Q8_0: dequantize_q8_0, _T.Q4_0: dequantize_q4_0,
    _T.Q4_1: dequantize_q4_1, _T.Q5_0: dequantize_q5_0, _T.Q5_1: dequantize_q5_1,
    _T.Q2_K: None, _T.Q3_K: None, _T.Q4_K: None, _T.Q5_K: None, _T.Q6_K: None,
}
GGML_TYPES = (_T.F32, *DEQUANTIZERS)   # the tensor types llamarun reads from GGUF files


# The types with native kernels of both arithmetics (kernels/ggml.py): matrix-vector products that read
# the blocks as stored, exact and fast (int8), and a decoder for the tiles of the prefill's BLAS products.
# (Q5_0's and Q5_1's int8 kernels read their blocks rewritten as they are packed: kernels/ggml.py, TRANSCODED.)
KERNEL_TYPES = frozenset({_T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q4_K, _T.Q5_K, _T.Q6_K})
# Those whose fast kernels take 8 weight rows at once, each block shared by every row of x.
GROUP_KERNEL_TYPES = KERNEL_TYPES
# The types with the exact kernels and the tile decoder: those, and Q2_K and Q3_K, which have no fast
# (int8) kernel, so no place in the one-call forward (which computes with the fast kernels only).
EXACT_KERNEL_TYPES = KERNEL_TYPES | {_T.Q2_K, _T.Q3_K}
# Half-precision matrices: 2 bytes a weight as stored, with matrix-vector kernels of their own
# (kernels/matvec.py, matvec_half) for a decode step; a prompt's products widen a tile at a time for BLAS.
HALF_TYPES = frozenset({_T.F16, _T.BF16})

_tile_buffers: dict[tuple[int, int], np.ndarray] = {}   # shared: one product at a time (one forward)


def _tile_buffer(rows: int, cols: int) -> np.ndarray:
    """The reusable float32 (rows, cols) tile buffer of this shape (a few shapes per model)."""
    buffer = _tile_buffers.get((rows, cols))
    if buffer is None:
        buffer = _tile_buffers[(rows, cols)] = np.empty((rows, cols), np.float32)
    return buffer


class GGMLTensor:
    """A matrix in one of ggml's block formats, left as the file's bytes (a view of its memory map).

    shape is (out_features, in_features); `raw` is (out_features, bytes_per_row) uint8, one row of
    blocks per output. Never dequantized whole by a product: `linear` reads the blocks directly
    (EXACT_KERNEL_TYPES and F16/BF16, for a few rows of x) or a tile of rows at a time; `rows` for an embedding
    lookup; `dequantize` when asked for the whole matrix. The int8 kernels (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
    and the K-quants Q4_K, Q5_K, Q6_K) read the same blocks packed in groups of rows instead (`kernel_bytes`, llamarun/packing.py).

    `exact` chooses the arithmetic of the matrix-vector kernels (kernels/ggml.py): True, float32
    activations times the weights as gguf dequantizes them (what the parity tests run); False,
    activations quantized to int8 blocks and integer dot products, as llama.cpp does, where the type
    has such kernels (KERNEL_TYPES; Q2_K and Q3_K take the exact kernels on either arithmetic). It is
    fixed when the tensor is made (the model's plan gives it, llamarun/plan.py): `with_exact` makes another.
    """

    def __init__(self, name: str, qtype, shape: tuple[int, int], raw: np.ndarray, exact: bool = True,
                 packing: tuple[PackedMatrices, int] | None = None):
        self.name = name
        self.qtype = qtype                  # GGMLQuantizationType
        self.shape = shape
        self.raw = raw.view()
        self.raw.flags.writeable = False     # as the file's map: one compiled signature for every kernel
        self._exact = exact
        self._dequantize_rows = DEQUANTIZERS[qtype] or (lambda raw: gguf_quants.dequantize(raw, qtype))
        self._kernel_type = int(qtype) if qtype in EXACT_KERNEL_TYPES else None
        # the fast (int8) kernels where asked for and the type has them. Q2_K and Q3_K have none: on the
        # fast path too their products take the exact kernels (decode) and the tile decoder (prompts)
        self._int8 = not exact and qtype in KERNEL_TYPES
        self._tile_rows = max(16, min(shape[0], TILE_BYTES // (4 * shape[1]) // 16 * 16))
        self._halves = self.raw.view(np.uint16) if qtype in HALF_TYPES else None     # (out, in) bits
        # where the int8 kernels' packed copy of a PACKED type comes from (llamarun/packing.py): its model
        # file's, given by the loader, else packed in memory when first asked for
        self.packing = packing

    @property
    def exact(self) -> bool:
        return self._exact

    @property
    def int8_kernels(self) -> bool:
        """Whether the products take the fast (int8) kernels: the fast arithmetic, and a type with them."""
        return self._int8

    @property
    def kernel_type(self) -> int | None:
        """The ggml type the kernels are given for this matrix, on its arithmetic: its own, or on the int8
        kernels the type of its packed blocks (Q5_0's are Q8_0 blocks); None: no kernel."""
        return int8_type(self._kernel_type) if self._int8 else self._kernel_type

    def with_exact(self, exact: bool) -> GGMLTensor:
        """This tensor (the same bytes, no copy) with the given arithmetic."""
        return self if exact == self._exact else GGMLTensor(self.name, self.qtype, self.shape, self.raw, exact,
                                                            self.packing)

    @property
    def kernel_bytes(self) -> np.ndarray:
        """The bytes the int8 kernels read: `raw`, or for the types with int8 kernels the same blocks
        packed in groups of rows (kernels/ggml.py, PACKED), packed at the first call."""
        if int8_type(int(self.qtype)) not in PACKED:
            return self.raw
        if self.packing is None:
            self.packing = (PackedMatrices(None, [(int(self.qtype), self.raw)]), 0)
        matrices, i = self.packing
        return matrices.packed(i)

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
        # one row (a decode step) as a view, not a copy: fewer cache misses right after a step
        one = len(ids) == 1 and 0 <= ids[0] < len(self.raw)
        raw = self.raw[ids[0]:ids[0] + 1] if one else self.raw[ids]
        raw.flags.writeable = False          # as the map's rows: the decoders' one compiled signature
        out = np.empty((len(ids), self.shape[1]), np.float32)
        self._decode(raw, out)
        return out

    def _decode(self, raw: np.ndarray, out: np.ndarray) -> None:
        """out = the rows raw (some of self.raw's) as float32, bit for bit as gguf's dequantize: by the
        numba decoders where the type has one (a call, where numpy's decoders are a few calls per
        block field: a decode step's embedding row, a prompt's tiles), else by numpy or gguf."""
        if self._halves is not None:
            widen_rows(raw.view(np.uint16), self.qtype == _T.BF16, out)
        elif self._kernel_type is not None:
            ggml_kernels.dequantize_rows(self._kernel_type, raw, out)
        else:
            out[...] = self._dequantize_rows(raw).reshape(out.shape)

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32.   -> (out_features, in_features)"""
        return self._dequantize_rows(self.raw).reshape(self.shape)

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x (n, in_features) float32.   -> (n, out_features) float32

        A type with a kernel goes to the matrix-vector kernels, exact or fast (`int8_kernels`), for up
        to MATVEC_ROWS rows (a decode step; fast: FAST_KERNEL_ROWS, short prompts too); on numba's
        thread pool only, no BLAS (why: kernels/matvec.py). More rows (a prompt): BLAS, a tile of W at
        a time (`_linear_tiled`)."""
        x = np.ascontiguousarray(x, np.float32)
        if not self.on_kernels(x):
            return self._linear_tiled(x)
        out = np.empty((x.shape[0], self.shape[0]), np.float32)
        if self._halves is not None:
            matvec_half(x, self._halves, self.qtype == _T.BF16, out)
            return out
        if self._int8:
            ggml_kernels.matvec_fast(self.kernel_type, self.kernel_bytes, x, out)
        else:
            ggml_kernels.matvec_exact(self._kernel_type, self.raw, x, out)
        return out

    def on_kernels(self, x: np.ndarray) -> bool:
        """Whether x @ W.T runs on the matrix-vector kernels: a type with a kernel, and a decode-sized x
        (exact kernels) or up to FAST_KERNEL_ROWS rows (int8 kernels)."""
        if self._halves is not None:
            return x.shape[0] <= MATVEC_ROWS
        return self._kernel_type is not None and x.shape[0] <= (FAST_KERNEL_ROWS if self._int8 else MATVEC_ROWS)

    def _linear_tiled(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T, W dequantized TILE_BYTES at a time into a reused buffer, each tile multiplied by
        BLAS (or, for a decode-sized x of a type without a kernel, by the numba matvec kernel)."""
        n, (rows, cols) = x.shape[0], self.shape
        out = np.empty((n, rows), np.float32)
        tile = _tile_buffer(self._tile_rows, cols)
        part = np.empty((n, self._tile_rows), np.float32)   # BLAS's out: np.dot wants it contiguous
        for start in range(0, rows, self._tile_rows):
            stop = min(start + self._tile_rows, rows)
            w = tile[:stop - start]
            self._decode(self.raw[start:stop], w)
            if n <= MATVEC_ROWS:
                matvec(x, w, out[:, start:stop])
            else:
                dest = part if stop - start == len(part[0]) else np.empty((n, stop - start), np.float32)
                np.dot(x, w.T, out=dest)
                out[:, start:stop] = dest
        return out


# ----------------------------------------------------------------------------------------------
# fused products of a decode step (quantized weights): one kernel call for the matrices that read
# the same x, each value computed as `linear` computes it (why: kernels/ggml.py, "fused products")

def fusable(x: np.ndarray, *weights) -> bool:
    """Whether linear3 / swiglu take these weights for this x: all on their kernels, all one kind
    (GGML tensors all on the int8 kernels or all on the exact ones, or llama2.c int8 of one group size).
    (A fast Q3_K matrix is on the exact kernels: it fuses with other Q2_K / Q3_K matrices, not with
    int8 ones, whose one call quantizes x.)"""
    if all(isinstance(w, GGMLTensor) and w._kernel_type is not None and w.on_kernels(x) for w in weights):
        return len({w.int8_kernels for w in weights}) == 1
    if all(isinstance(w, GroupQuantized) and w.on_kernels(x) for w in weights):
        return len({w.group_size for w in weights}) == 1
    return False


def linear3(x: np.ndarray, a, b, c) -> tuple[np.ndarray, ...]:
    """(x @ A.T, x @ B.T, x @ C.T) in one kernel call (x quantized once), for `fusable` weights."""
    x = np.ascontiguousarray(x, np.float32)
    outs = tuple(np.empty((x.shape[0], w.shape[0]), np.float32) for w in (a, b, c))
    if isinstance(a, GroupQuantized):
        int8_kernels.matvec3((a.q, b.q, c.q), (a.scale, b.scale, c.scale), a.group_size, x, *outs)
    else:
        kernel = ggml_kernels.matvec3_fast if a.int8_kernels else ggml_kernels.matvec3_exact
        kernel((a.kernel_type, b.kernel_type, c.kernel_type), _kernel_bytes(a, b, c), x, outs)
    return outs


def swiglu(x: np.ndarray, w1, w3) -> np.ndarray:
    """silu(x @ W1.T) * (x @ W3.T) in one kernel call, for `fusable` weights.   -> (n, hidden)"""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], w1.shape[0]), np.float32)
    if isinstance(w1, GroupQuantized):
        int8_kernels.swiglu(w1.q, w1.scale, w3.q, w3.scale, w1.group_size, x, out)
    else:
        kernel = ggml_kernels.swiglu_fast if w1.int8_kernels else ggml_kernels.swiglu_exact
        kernel((w1.kernel_type, w3.kernel_type), _kernel_bytes(w1, w3), x, out)
    return out


def _kernel_bytes(*weights: GGMLTensor) -> tuple[np.ndarray, ...]:
    """The bytes of fusable GGML tensors their kernels read: packed on the int8 kernels, else raw."""
    return tuple(w.kernel_bytes if w.int8_kernels else w.raw for w in weights)


def with_arithmetic(weights: dict, exact: bool) -> dict:
    """`weights` with every GGML tensor (per-layer lists included) in the given arithmetic: exact (float32
    activations, what the parity tests run) or fast (int8 activations, as llama.cpp). New tensor objects
    over the same bytes where the arithmetic differs, so that two models over one file never change each
    other's; a tensor shared under two names (a shared classifier) stays one. llama2.c's int8 tensors
    always follow runq.c, the reference they are tested against."""
    made: dict[int, object] = {}

    def one(tensor):
        if not isinstance(tensor, GGMLTensor):
            return tensor
        if id(tensor) not in made:
            made[id(tensor)] = tensor.with_exact(exact)
        return made[id(tensor)]

    return {name: [one(t) for t in value] if isinstance(value, list) else one(value) for name, value in weights.items()}
