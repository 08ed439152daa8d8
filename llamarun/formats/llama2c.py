"""llama2.c checkpoints: the legacy header, version 1 (float32) and version 2 (int8 groups).

Every tensor is a view into one read-only memory map of the file; nothing is copied.
Names and shapes (L = n_layers, V = vocab, H*D = n_heads*head_dim, KV*D = kv_dim):

    tok_embeddings (V, dim)        attention_norm (L, dim)      ffn_norm (L, dim)    norm (dim,)
    wq (L, H*D, dim)   wk (L, KV*D, dim)   wv (L, KV*D, dim)   wo (L, dim, H*D)
    w1 (L, hidden, dim)   w2 (L, dim, hidden)   w3 (L, hidden, dim)   output (V, dim)

Matrices are stored (out_features, in_features), as run.c's matmul reads them.
"""
from __future__ import annotations

import math
import mmap
import os
import struct

import numpy as np

from ..config import ModelConfig
from ..errors import LlamarunError
from ..tensors import GroupQuantized
from . import MAX_HEADER_VALUE
from .pages import map_file

MAGIC = 0x616B3432            # "ak42" read as a little-endian uint32
BOS, EOS = 1, 2               # run.c's fixed ids: every llama2.c vocabulary holds them
VERSIONED_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 7 * 4


class Llama2cCheckpoint:
    """A loaded llama2.c file: its config, its named tensors, and the mapping that backs them."""

    def __init__(self, path: str, config: ModelConfig, weights: dict, version: int, group_size: int | None,
                 mapping: mmap.mmap):
        self.path = path
        self.config = config
        self.weights = weights
        self.version = version          # 0 = legacy header, 1 = float32 ak42, 2 = int8 ak42
        self.group_size = group_size
        self._mapping = mapping         # the arrays point into it: keep it alive as long as they are

    @property
    def description(self) -> str:
        kind = {0: "llama2.c legacy float32", 1: "llama2.c v1 float32",
                2: f"llama2.c v2 int8 (group {self.group_size})"}[self.version]
        return kind


def load(path: str) -> Llama2cCheckpoint:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(VERSIONED_HEADER_BYTES)
            mapping = map_file(f) if size else None
    except OSError as e:
        raise LlamarunError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if len(head) < LEGACY_HEADER_BYTES:
        raise LlamarunError(f"{path} is too small to be a llama2.c checkpoint ({size} bytes), and it is not a "
                            "GGUF file (no GGUF magic)")

    (magic,) = struct.unpack_from("<I", head)
    if magic == MAGIC:
        return _load_versioned(path, head, size, mapping)
    if head[:4] == b"GGUF":
        raise LlamarunError(f"{path} is a GGUF file, not a llama2.c checkpoint")
    return _load_legacy(path, head, size, mapping)


# ----------------------------------------------------------------------------------------------
# headers

def _check_config(path: str, legacy: bool, dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len):
    """Refuse a header no llama2.c model has. legacy: the header has no magic, so the file may be
    anything at all: the error then says that it is no GGUF file either."""
    invalid = (f"{path} is neither a GGUF file (no GGUF magic) nor a valid llama2.c checkpoint" if legacy
               else f"{path} is not a valid llama2.c checkpoint")
    values = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab, seq_len=seq_len)
    bad = [f"{k}={v}" for k, v in values.items() if v <= 0]
    if bad:
        raise LlamarunError(f"{invalid}: header has non-positive {', '.join(bad)}")
    # the context is not a size in the file (but for the legacy RoPE tables, checked with the size):
    # the model runs a context it chooses (config.with_context), so a huge one costs nothing
    absurd = [(k, v) for k, v in values.items() if v > MAX_HEADER_VALUE and k != "seq_len"]
    if absurd:
        raise LlamarunError(f"{invalid}: corrupt header ({absurd[0][0]} = {absurd[0][1]})")
    if dim % n_heads or (dim // n_heads) % 2:
        raise LlamarunError(f"{invalid}: dim {dim} does not split into {n_heads} heads of even size")
    if n_heads % n_kv_heads:
        raise LlamarunError(f"{invalid}: {n_kv_heads} kv heads do not divide {n_heads} heads")
    if vocab <= EOS:
        raise LlamarunError(f"{invalid}: its vocabulary of {vocab} tokens leaves out llama2.c's BOS ({BOS}) "
                            f"and EOS ({EOS}) ids")


def _load_legacy(path, head, size, mapping) -> Llama2cCheckpoint:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", head)
    shared = vocab > 0       # run.c: a negative vocab size means a separate classifier at the end
    vocab = abs(vocab)
    _check_config(path, True, dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)
    config = ModelConfig(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, shared_classifier=shared)
    D = config.head_dim
    layout = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, n_heads * D, dim)),
        ("wk", (n_layers, config.kv_dim, dim)),
        ("wv", (n_layers, config.kv_dim, dim)),
        ("wo", (n_layers, dim, n_heads * D)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, D // 2)),   # RoPE tables of old exports: unused, recomputed
        ("freq_cis_imag", (seq_len, D // 2)),
    ]
    if not shared:
        layout.append(("output", (vocab, dim)))
    _check_size(path, size, LEGACY_HEADER_BYTES + _float32_bytes(layout), config)
    weights = _map_float32(mapping, LEGACY_HEADER_BYTES, layout)
    del weights["freq_cis_real"], weights["freq_cis_imag"]
    if shared:
        weights["output"] = weights["tok_embeddings"]
    return Llama2cCheckpoint(path, config, weights, 0, None, mapping)


def _load_versioned(path, head, size, mapping) -> Llama2cCheckpoint:
    if len(head) < VERSIONED_HEADER_BYTES:
        raise LlamarunError(f"{path} is truncated: its 256-byte llama2.c header is incomplete")
    (version,) = struct.unpack_from("<i", head, 4)
    if version not in (1, 2):
        raise LlamarunError(f"{path} is llama2.c checkpoint version {version}; llamarun reads the legacy "
                            "format and versions 1 and 2")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", head, 8)
    shared = bool(head[36])
    _check_config(path, False, dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)
    config = ModelConfig(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, shared_classifier=shared)
    if version == 1:
        weights = _map_version1(path, mapping, size, config)
        return Llama2cCheckpoint(path, config, weights, 1, None, mapping)
    (group_size,) = struct.unpack_from("<i", head, 37)
    weights = _map_version2(path, mapping, size, config, group_size)
    return Llama2cCheckpoint(path, config, weights, 2, group_size, mapping)


# ----------------------------------------------------------------------------------------------
# tensor layouts

def _float32_bytes(layout) -> int:
    return 4 * sum(math.prod(shape) for _, shape in layout)      # Python ints: no overflow at any header


def _map_float32(mapping, offset, layout) -> dict:
    """Views of consecutive float32 tensors starting at `offset`."""
    weights = {}
    for name, shape in layout:
        count = math.prod(shape)
        weights[name] = np.frombuffer(mapping, np.float32, count, offset).reshape(shape)
        offset += 4 * count
    return weights


def _map_version1(path, mapping, size, config: ModelConfig) -> dict:
    c, L = config, config.n_layers
    layout = [
        ("attention_norm", (L, c.dim)),
        ("ffn_norm", (L, c.dim)),
        ("norm", (c.dim,)),
        ("tok_embeddings", (c.vocab_size, c.dim)),
        ("wq", (L, c.n_heads * c.head_dim, c.dim)),
        ("wk", (L, c.kv_dim, c.dim)),
        ("wv", (L, c.kv_dim, c.dim)),
        ("wo", (L, c.dim, c.n_heads * c.head_dim)),
        ("w1", (L, c.hidden_dim, c.dim)),
        ("w2", (L, c.dim, c.hidden_dim)),
        ("w3", (L, c.hidden_dim, c.dim)),
    ]
    if not c.shared_classifier:
        layout.append(("output", (c.vocab_size, c.dim)))
    _check_size(path, size, VERSIONED_HEADER_BYTES + _float32_bytes(layout), config)
    weights = _map_float32(mapping, VERSIONED_HEADER_BYTES, layout)
    if c.shared_classifier:
        weights["output"] = weights["tok_embeddings"]
    return weights


def _map_version2(path, mapping, size, config: ModelConfig, group_size: int) -> dict:
    """Version 2: float32 norms first, then each matrix as int8 values followed by its group scales.

    export.py writes the quantized matrices one layer at a time (values, then scales, then the next
    layer), so a stacked (n_layers, out, in) tensor is a strided view with a layer stride that
    skips over each layer's scales.
    """
    c, L = config, config.n_layers
    matrices = [
        ("tok_embeddings", 1, (c.vocab_size, c.dim)),
        ("wq", L, (c.n_heads * c.head_dim, c.dim)),
        ("wk", L, (c.kv_dim, c.dim)),
        ("wv", L, (c.kv_dim, c.dim)),
        ("wo", L, (c.dim, c.n_heads * c.head_dim)),
        ("w1", L, (c.hidden_dim, c.dim)),
        ("w2", L, (c.dim, c.hidden_dim)),
        ("w3", L, (c.hidden_dim, c.dim)),
    ]
    if not c.shared_classifier:
        matrices.append(("output", 1, (c.vocab_size, c.dim)))
    for name, _, (n_out, n_in) in matrices:
        if group_size <= 0 or n_in % group_size:
            raise LlamarunError(f"{path} is not a valid llama2.c v2 checkpoint: group size {group_size} does "
                                f"not divide the {n_in} inputs of {name}")

    norms = [("attention_norm", (L, c.dim)), ("ffn_norm", (L, c.dim)), ("norm", (c.dim,))]
    offset = VERSIONED_HEADER_BYTES + _float32_bytes(norms)
    expected = offset + sum(n * (rows * cols + 4 * rows * cols // group_size) for _, n, (rows, cols) in matrices)
    _check_size(path, size, expected, config)
    weights = _map_float32(mapping, VERSIONED_HEADER_BYTES, norms)

    for name, n, (n_out, n_in) in matrices:
        count = n_out * n_in
        layer_bytes = count + 4 * count // group_size
        q = np.ndarray((n, n_out, n_in), np.int8, mapping, offset, (layer_bytes, n_in, 1))
        scale = np.ndarray((n, n_out, n_in // group_size), np.float32, mapping, offset + count,
                           (layer_bytes, 4 * n_in // group_size, 4))
        tensor = GroupQuantized(q, scale, group_size)
        weights[name] = tensor if n > 1 else tensor[0]
        offset += n * layer_bytes
    if c.shared_classifier:
        weights["output"] = weights["tok_embeddings"]
    return weights


def _check_size(path, size, expected, c: ModelConfig):
    if size < expected:
        raise LlamarunError(f"{path} is truncated, or not a llama2.c checkpoint: its header (dim {c.dim}, "
                            f"hidden_dim {c.hidden_dim}, n_layers {c.n_layers}, vocab_size {c.vocab_size}) "
                            f"describes {expected} bytes but the file has {size}; download or export it again")
    if size > expected:
        raise LlamarunError(f"{path} has {size} bytes but its header describes {expected}: it is not a "
                            "llama2.c checkpoint of the kind its header claims")
