"""Quantized weight tensors that stay quantized in memory.

`GroupQuantized` is llama2.c's version-2 format (what `export.py` writes and `runq.c` reads): int8
values in groups of `group_size` along the last axis, one float32 scale per group,
so `w[..., g*G:(g+1)*G] ~= q[..., g*G:(g+1)*G] * scale[..., g]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
