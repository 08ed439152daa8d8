"""GGUF files (llama.cpp's format), architecture `llama`: a small lazy reader of our own.

A GGUF file is a header followed by tensor data:

    magic "GGUF" | version u32 (2 or 3) | tensor count u64 | metadata count u64
    metadata: count x (key string, value type u32, value)     strings are u64 length + UTF-8 bytes
    tensor infos: count x (name string, n_dims u32, dims u64 x n_dims, ggml type u32, offset u64)
    padding to `general.alignment` (default 32), then the data; each tensor at data start + offset

Only the header is parsed (a few MB, mostly the tokenizer's strings); every tensor is a numpy view
into one read-only memory map of the file, so opening costs no copy of the weights. (The `gguf`
package's GGUFReader builds numpy views of every metadata value too: seconds and 150 MB for a
49152-token vocabulary; see benchmarks/bench_gguf_open.py.) From `gguf` this module takes the
format's constants and its numpy dequantizers, the reference for every block format.

Dims are listed innermost first: a matrix has ne = [in_features, out_features], stored row by row
(one row per output), which is llamarun's (out_features, in_features) layout once reversed.
Quantized rows are a sequence of blocks, each `block_size` values in `type_size` bytes.

Names (L = n_layers): llama.cpp's on the left, llamarun's on the right.

    token_embd.weight -> tok_embeddings (V, dim)      output_norm.weight -> norm (dim,)
    output.weight     -> output (V, dim); absent: the classifier shares the token embedding
    blk.N.attn_norm   -> attention_norm[N] (dim,)     blk.N.ffn_norm  -> ffn_norm[N] (dim,)
    blk.N.attn_q      -> wq[N] (H*D, dim)             blk.N.attn_k    -> wk[N] (KV*D, dim)
    blk.N.attn_v      -> wv[N] (KV*D, dim)            blk.N.attn_output -> wo[N] (dim, H*D)
    blk.N.ffn_gate    -> w1[N] (hidden, dim)          blk.N.ffn_down  -> w2[N] (dim, hidden)
    blk.N.ffn_up      -> w3[N] (hidden, dim)
    rope_freqs.weight -> config.rope_factors (head_dim / 2,): Llama 3.1's scaling, not a weight

llama.cpp's converter stores Q and K rows permuted for the interleaved-pairs RoPE (its
LLAMA_ROPE_TYPE_NORM), which is the llama2.c convention llamarun uses: no unpermute is needed.
Per-layer weights are Python lists indexed by layer. float32 tensors are plain numpy views; every
other type is a `GGMLTensor`, dequantized where it is used.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .. import packing
from ..config import ModelConfig
from ..errors import LlamarunError
from ..tensors import GGML_TYPES, GGMLTensor
from . import GGUF_MAGIC as MAGIC, MAX_HEADER_VALUE
from .pages import map_file
SUPPORTED_VERSIONS = (2, 3)     # version 1 had 32-bit counts and lengths; llama.cpp dropped it too
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                    # GGML_MAX_DIMS
MAX_NESTING = 8                 # arrays of arrays: llama.cpp writes one level; deeper is a corrupt file
# the fewest bytes one item of a count takes in the file (a count whose items cannot fit is refused
# before anything is read or allocated for them)
KV_BYTES = 8 + 4 + 1            # key length, value type, a one-byte value
TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8     # name length, n_dims, one dim, type, offset
STRING_BYTES = 8                # its length
ARRAY_BYTES = 4 + 8             # item type, count


# ----------------------------------------------------------------------------------------------
# the header

class _BadFile(Exception):
    """A malformed header; the loader adds the file's name and raises LlamarunError."""


class _Truncated(_BadFile):
    pass


class _Corrupt(_BadFile):
    """A count or length no file could hold (beyond MAX_HEADER_VALUE, and past the end of this one)."""

    def __init__(self, field: str, value: int):
        super().__init__(f"corrupt header ({field} = {value})")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]     # GGUF order: innermost (contiguous) dimension first
    type_id: int              # ggml type number (GGMLQuantizationType, when gguf knows it)
    offset: int               # from the start of the data section


@dataclass
class GGUFFile:
    version: int
    metadata: dict            # key -> str, int, float, bool or list (of those, or of lists)
    tensors: dict             # name -> TensorInfo, in file order
    alignment: int
    data_start: int           # absolute offset of the data section
    size: int                 # bytes in the file


class _Cursor:
    """Reads little-endian GGUF values from a buffer, front to back, checking each read fits."""

    U32, U64 = struct.Struct("<I"), struct.Struct("<Q")

    def __init__(self, buf, offset: int = 0):
        self.buf = buf
        self.offset = offset
        self.size = len(buf)

    def skip(self, n: int) -> int:
        """Advance past n bytes; returns where they start."""
        start = self.offset
        if n < 0 or start + n > self.size:
            raise _Truncated()
        self.offset = start + n
        return start

    def unpack(self, fmt: struct.Struct):
        return fmt.unpack_from(self.buf, self.skip(fmt.size))[0]

    def u32(self) -> int:
        return self.unpack(self.U32)

    def u64(self) -> int:
        return self.unpack(self.U64)

    def count(self, field: str, item_bytes: int = 1) -> int:
        """A u64 count (or length) of items taking at least item_bytes each. If they cannot fit in the
        rest of the file: a corrupt header when the count is absurd (beyond MAX_HEADER_VALUE), else a
        truncated file (a download cut short in its header)."""
        n = self.u64()
        if n * item_bytes > self.size - self.offset:
            _past_the_end(field, n)
        return n

    def string(self, what: str = "a metadata key") -> str:
        """A string; `what` names it in errors ("general.name", "a tensor name")."""
        n = self.count(f"the length of {what}")
        start = self.skip(n)
        return _utf8(self.buf[start:start + n], what)

    def value(self, vtype: int, key: str = "value"):
        """The value of metadata `key` (named in errors), of type vtype."""
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            return self.unpack(fmt)
        if vtype == GGUFValueType.STRING:
            return self.string(key)
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        raise _BadFile(f"its metadata {key} has unknown type {vtype}")

    def array(self, key: str, depth: int = 0) -> list:
        if depth >= MAX_NESTING:
            raise _BadFile(f"its metadata {key} nests arrays more than {MAX_NESTING} deep")
        item_type = self.u32()
        field = f"the array count of {key}"
        dtype = _ARRAY_DTYPES.get(item_type)
        if dtype is not None:       # numbers: one numpy read, then Python values
            count = self.count(field, dtype.itemsize)
            start = self.skip(count * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        if item_type == GGUFValueType.STRING:
            return self.strings(self.count(field, STRING_BYTES), key)
        if item_type == GGUFValueType.ARRAY:
            return [self.array(key, depth + 1) for _ in range(self.count(field, ARRAY_BYTES))]
        raise _BadFile(f"its metadata {key} is an array of unknown item type {item_type}")

    def strings(self, count: int, key: str) -> list[str]:
        """`count` consecutive strings (the caller checked that their length fields fit). The hot loop
        of opening a file (a vocabulary and its merges, ~100k strings): locals only, one comparison
        per string (a slice past the end would be short, not an error)."""
        buf, offset, size, unpack = self.buf, self.offset, self.size, self.U64.unpack_from
        out = []
        append = out.append
        try:
            for i in range(count):
                (n,) = unpack(buf, offset)
                offset += 8
                if offset + n > size:
                    _past_the_end(f"the length of {key}[{i}]", n)
                append(str(buf[offset:offset + n], "utf-8"))
                offset += n
        except struct.error:
            raise _Truncated() from None
        except UnicodeDecodeError:
            raise _BadFile(f"its metadata {key} holds a string that is not valid UTF-8") from None
        self.offset = offset
        return out


def _past_the_end(field: str, value: int):
    """A count or length reaching past the end of the file: corrupt if absurd, else truncated."""
    if value > MAX_HEADER_VALUE:
        raise _Corrupt(field, value)
    raise _Truncated()


def _utf8(data: bytes, what: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError:
        raise _BadFile(f"{what} is not valid UTF-8") from None


# Numeric value types: struct format of one value (scalars), numpy dtype (arrays: one read for all).
_NUMBER_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}
_SCALAR_FORMATS = {t: struct.Struct("<" + f) for t, f in _NUMBER_FORMATS.items()}
_ARRAY_DTYPES = {t: np.dtype("<" + f) for t, f in _NUMBER_FORMATS.items()}


def parse_header(buf) -> GGUFFile:
    """Header, metadata and tensor infos of a GGUF file held in `buf` (raises _BadFile)."""
    cursor = _Cursor(buf)
    if bytes(buf[:4]) != MAGIC:
        raise _BadFile(f"it does not start with the GGUF magic (found {bytes(buf[:4])!r})")
    cursor.skip(4)
    version = cursor.u32()
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version:       # a small number read in the wrong byte order
            raise _BadFile("it is a big-endian GGUF file; llamarun reads little-endian ones")
        raise _BadFile(f"it is GGUF version {version}; llamarun reads versions 2 and 3")
    n_tensors = cursor.count("tensor count", TENSOR_INFO_BYTES)
    n_kv = cursor.count("metadata count", KV_BYTES)

    metadata = {}
    for i in range(n_kv):
        key = cursor.string(f"metadata key #{i}")
        metadata[key] = cursor.value(cursor.u32(), key)

    tensors = {}
    for _ in range(n_tensors):
        info = _tensor_info(cursor)
        if info.name in tensors:
            raise _BadFile(f"tensor {info.name} appears twice")
        tensors[info.name] = info

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _BadFile(f"general.alignment is {alignment!r}, not a power of two")
    if alignment > MAX_HEADER_VALUE:
        raise _Corrupt("general.alignment", alignment)
    data_start = -(-cursor.offset // alignment) * alignment
    return GGUFFile(version, metadata, tensors, alignment, data_start, len(buf))


def _tensor_info(cursor: _Cursor) -> TensorInfo:
    name = cursor.string("a tensor name")
    n_dims = cursor.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise _BadFile(f"tensor {name} has {n_dims} dimensions")
    dims = tuple(cursor.u64() for _ in range(n_dims))
    type_id = cursor.u32()
    return TensorInfo(name, dims, type_id, cursor.u64())


# ----------------------------------------------------------------------------------------------
# the checkpoint

class GGUFCheckpoint:
    """A loaded GGUF llama model: config, named tensors, the metadata, and the mapping behind them."""

    def __init__(self, path: str, config: ModelConfig, weights: dict, metadata: dict, version: int,
                 type_counts: Counter, mapping: mmap.mmap):
        self.path = path
        self.config = config
        self.weights = weights
        self.metadata = metadata
        self.version = version
        self.type_counts = type_counts      # ggml type name -> number of tensors in the file
        self._mapping = mapping             # the tensors point into it: keep it alive with them

    @property
    def description(self) -> str:
        """e.g. "GGUF v3 llama, Q4_1 (210), Q8_0 (1), F32 (61)": matrix types by count, float32 last."""
        order = sorted(self.type_counts.items(), key=lambda kv: (kv[0] == "F32", -kv[1], kv[0]))
        return f"GGUF v{self.version} llama, " + ", ".join(f"{name} ({n})" for name, n in order)


def load(path: str) -> GGUFCheckpoint:
    path = os.fspath(path)
    mapping = _map_file(path)
    try:
        file = parse_header(mapping)
    except _Truncated:
        raise LlamarunError(f"{path} is truncated: its GGUF header ends past the end of the file "
                            f"({len(mapping)} bytes); download it again") from None
    except _BadFile as e:
        raise LlamarunError(f"{path} is not a valid GGUF file: {e}") from None
    _check_architecture(path, file.metadata)
    config = config_from_metadata(path, file)
    config = replace(config, rope_factors=rope_factors(path, file, mapping, config.head_dim))
    _check_special_tokens(path, file.metadata, config.vocab_size)
    weights = map_weights(path, file, mapping, config)
    type_counts = Counter(_type_name(info.type_id) for info in file.tensors.values())
    return GGUFCheckpoint(path, config, weights, file.metadata, file.version, type_counts, mapping)


def _map_file(path: str) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:      # magic, version and the two counts
                raise LlamarunError(f"{path} is truncated: {os.fstat(f.fileno()).st_size} bytes is "
                                    "too small for a GGUF header")
            return map_file(f)
    except OSError as e:
        raise LlamarunError(f"cannot read model file {path}: {e.strerror}") from None


def _check_architecture(path: str, metadata: dict) -> None:
    arch = metadata.get("general.architecture")
    if arch is None:
        raise LlamarunError(f"{path} has no general.architecture in its metadata; llamarun reads "
                            "GGUF files of architecture llama")
    if arch != "llama":
        raise LlamarunError(f"{path} is a model of architecture {arch!r}; llamarun runs only the "
                            "'llama' architecture")


# ----------------------------------------------------------------------------------------------
# config

def config_from_metadata(path: str, file: GGUFFile) -> ModelConfig:
    """The hyper-parameters in `llama.*` metadata (llama.cpp's defaults where a key is optional)."""
    meta = file.metadata

    def integer(key, default=None):
        value = _per_layer_constant(path, key, meta.get(key, default))
        if value is None:
            raise LlamarunError(f"{path} lacks the metadata key {key}, which a llama model needs")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LlamarunError(f"{path} has {key} = {value!r}; expected a positive integer")
        return value

    def real(key, default=None):
        value = meta.get(key, default)
        if value is None:
            raise LlamarunError(f"{path} lacks the metadata key {key}, which a llama model needs")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LlamarunError(f"{path} has {key} = {value!r}; expected a positive number")
        return float(value)

    n_heads = integer("llama.attention.head_count")
    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        embd = file.tensors.get("token_embd.weight")
        vocab = len(tokens) if isinstance(tokens, list) else embd.dims[-1] if embd else None
    config = ModelConfig(
        dim=integer("llama.embedding_length"),
        hidden_dim=integer("llama.feed_forward_length"),
        n_layers=integer("llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=integer("llama.attention.head_count_kv", n_heads),
        vocab_size=integer("llama.vocab_size", vocab),
        seq_len=integer("llama.context_length"),
        shared_classifier="output.weight" not in file.tensors,
        rope_theta=real("llama.rope.freq_base", 10000.0),
        norm_eps=real("llama.attention.layer_norm_rms_epsilon"),
        rope_scale=rope_scale(path, meta),
    )
    _check_config(path, meta, config)
    return config


def rope_scale(path: str, meta: dict) -> float:
    """Linear RoPE scaling: positions divided by llama.rope.scaling.factor (the older key
    llama.rope.scale_linear where it is absent; 0 or absent: none). llama.cpp applies the factor
    this way when the scaling type is "linear", its default, or "none"; any other type (yarn,
    longrope) rotates differently, which llamarun does not implement."""
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 0.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0 or factor != factor:
        raise LlamarunError(f"{path} has llama.rope.scaling.factor = {factor!r}; expected a positive number")
    factor = float(factor) or 1.0
    scaling = meta.get("llama.rope.scaling.type", "linear")
    if scaling not in ("none", "linear") and factor != 1.0:
        raise LlamarunError(f"{path} uses RoPE scaling {scaling!r} (factor {factor:g}), which llamarun does not "
                            "implement: it runs linear scaling and Llama 3's rope_freqs")
    return factor


def rope_factors(path: str, file: GGUFFile, mapping, head_dim: int) -> tuple[float, ...] | None:
    """The per-pair frequency divisors of the rope_freqs tensor, which llama.cpp's converter writes for
    Llama 3.1's "llama3" scaling (head_dim / 2 float32 values); None where the file has none."""
    info = file.tensors.get(ROPE_FREQS)
    if info is None:
        return None
    if info.dims != (head_dim // 2,) or info.type_id != GGMLQuantizationType.F32:
        raise LlamarunError(f"{path}: tensor {ROPE_FREQS} is {_type_name(info.type_id)} of shape "
                            f"{tuple(reversed(info.dims))}; llama.cpp's converter writes F32 of shape "
                            f"({head_dim // 2},), one divisor per RoPE pair")
    factors = _map_tensor(path, file, mapping, info)
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise LlamarunError(f"{path}: tensor {ROPE_FREQS} holds a value that is not a positive number, "
                            "so it divides no RoPE frequency: the file is corrupt")
    return tuple(float(f) for f in factors)


# The special tokens whose ids the tokenizer and the decoder use (tokenizers/gguf.py's read_vocab).
SPECIAL_TOKENS = ("bos", "eos", "eot", "eom", "unknown")


def _check_special_tokens(path: str, meta: dict, vocab_size: int) -> None:
    """BOS, EOS and the other special ids the file names must be tokens of its vocabulary: an id beyond
    it would index past the embedding table when BOS is prepended, or never end a generation."""
    for name in SPECIAL_TOKENS:
        key = f"tokenizer.ggml.{name}_token_id"
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < vocab_size):
            raise LlamarunError(f"{path} has {key} = {value!r}, outside its vocabulary of {vocab_size} tokens: "
                                "the file is inconsistent; convert it again")


def _per_layer_constant(path, key, value):
    """llama.cpp allows some counts as one value per layer; llamarun needs them all equal."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise LlamarunError(f"{path} has {key} varying across layers ({value[:4]}...); llamarun "
                                "needs the same value in every layer")
        return value[0]
    return value


def _check_config(path: str, meta: dict, c: ModelConfig) -> None:
    """Refuse what this model would run wrongly rather than fail on: shapes that do not split into
    heads, and llama variants llamarun does not implement (experts, partial RoPE; RoPE scaling other
    than linear and Llama 3's: rope_scale)."""
    if c.dim % c.n_heads or c.head_dim % 2:
        raise LlamarunError(f"{path}: embedding length {c.dim} does not split into {c.n_heads} heads of "
                            "even size")
    if c.n_heads % c.n_kv_heads:
        raise LlamarunError(f"{path}: {c.n_kv_heads} kv heads do not divide {c.n_heads} heads")
    for key, expected in (("llama.attention.key_length", c.head_dim),
                          ("llama.attention.value_length", c.head_dim),
                          ("llama.rope.dimension_count", c.head_dim)):
        if meta.get(key, expected) != expected:
            raise LlamarunError(f"{path} has {key} = {meta[key]}, but llamarun needs it equal to the head "
                                f"size {expected} (embedding length / heads)")
    if meta.get("llama.expert_count", 0):
        raise LlamarunError(f"{path} is a mixture-of-experts model ({meta['llama.expert_count']} experts), "
                            "which llamarun does not run")


# ----------------------------------------------------------------------------------------------
# tensors

GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
               "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
# Llama 3.1's RoPE scaling, one frequency divisor per pair: read into config.rope_factors, not a weight
ROPE_FREQS = "rope_freqs.weight"
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def check_complete(path, weights: dict, n_layers: int, global_names: dict, layer_names: dict,
                   layer_tensor: Callable[[int, str], str], advice: str = "") -> None:
    """Raise one line naming (the first three of) the tensors a llama model needs that a file lacks.
    weights: name -> tensor, and for per-layer names a list with None where a layer's is missing;
    global_names, layer_names: the format's tensor names -> ours; layer_tensor(layer, key): the format's
    name of layer's tensor `key`. The classifier may be absent (a tied one). advice: appended to the line."""
    missing = [key for key, name in global_names.items() if name not in weights and name != "output"]
    missing += [layer_tensor(layer, key) for key, name in layer_names.items()
                for layer in range(n_layers) if weights[name][layer] is None]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LlamarunError(f"{path} lacks the tensor{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing[:3])}{more}, which a llama model needs{advice}")


def expected_shapes(c: ModelConfig) -> dict:
    """llamarun name -> (out_features, in_features) or (n,), per tensor (per layer for the lists)."""
    q_dim = c.n_heads * c.head_dim
    return {
        "tok_embeddings": (c.vocab_size, c.dim), "norm": (c.dim,), "output": (c.vocab_size, c.dim),
        "attention_norm": (c.dim,), "ffn_norm": (c.dim,),
        "wq": (q_dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim), "wo": (c.dim, q_dim),
        "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim),
    }


def map_weights(path: str, file: GGUFFile, mapping, config: ModelConfig) -> dict:
    """llamarun's weight dict: views of the file's tensors under llamarun's names, checked for shape."""
    shapes = expected_shapes(config)
    L = config.n_layers
    if L * len(LAYER_NAMES) > len(file.tensors):       # before a list per layer is made for them
        raise LlamarunError(f"{path} is not a valid GGUF file: corrupt header (llama.block_count = {L}): "
                            f"its {len(file.tensors)} tensors cannot hold {L} layers")
    weights: dict = {name: [None] * L for name in LAYER_NAMES.values()}
    for info in file.tensors.values():
        if info.name == ROPE_FREQS:
            continue                                    # in the config: rope_factors
        name, layer = _llamarun_name(path, info.name, L)
        shape = tuple(reversed(info.dims))              # llamarun's (out, in) order; checked before it is mapped
        if shape != shapes[name]:
            raise LlamarunError(f"{path}: tensor {info.name} has shape {shape} but the model's "
                                f"metadata implies {shapes[name]}")
        tensor = _map_tensor(path, file, mapping, info)
        if layer is None:
            weights[name] = tensor
        else:
            weights[name][layer] = tensor

    check_complete(path, weights, L, GLOBAL_NAMES, LAYER_NAMES, lambda layer, key: f"blk.{layer}.{key}.weight")
    if config.shared_classifier:
        weights["output"] = weights["tok_embeddings"]
    # the matrices of products (the embedding table's only if it is the classifier too), for the fast kernels
    products = [t for name, value in weights.items() if name != "tok_embeddings"
                for t in (value if isinstance(value, list) else [value]) if isinstance(t, GGMLTensor)]
    packing.attach(path, products)
    return weights


def _llamarun_name(path: str, gguf_name: str, n_layers: int) -> tuple[str, int | None]:
    """('wq', 3) for blk.3.attn_q.weight, ('norm', None) for output_norm.weight."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name], None
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in LAYER_NAMES and int(match[1]) < n_layers:
        return LAYER_NAMES[match[2]], int(match[1])
    raise LlamarunError(f"{path} has a tensor {gguf_name}, which is not part of the llama model llamarun "
                        "runs (a variant it does not implement?)")


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _map_tensor(path: str, file: GGUFFile, mapping, info: TensorInfo):
    """A float32 numpy view, or a GGMLTensor over the raw blocks; 1-D tensors (norms) as float32."""
    if info.type_id not in GGML_TYPES:
        supported = ", ".join(t.name for t in GGML_TYPES)
        raise LlamarunError(f"{path}: tensor {info.name} is stored as {_type_name(info.type_id)}, which "
                            f"llamarun does not read (it reads {supported})")
    qtype = GGMLQuantizationType(info.type_id)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_in, *outer = info.dims
    if len(outer) > 1:
        raise LlamarunError(f"{path}: tensor {info.name} has {len(info.dims)} dimensions; llama weights have "
                            "one or two")
    n_out = outer[0] if outer else 1
    if n_in % block_size:
        raise LlamarunError(f"{path}: tensor {info.name} has rows of {n_in} values, not a whole number of "
                            f"{qtype.name} blocks of {block_size}")
    row_bytes = n_in // block_size * type_size
    start = file.data_start + info.offset
    if start + n_out * row_bytes > file.size:
        raise LlamarunError(f"{path} is truncated: the data of tensor {info.name} ends at byte "
                            f"{start + n_out * row_bytes}, past the end of the file ({file.size} bytes); "
                            "download it again")
    shape = (n_out, n_in) if outer else (n_in,)            # reversed GGUF dims
    if qtype == GGMLQuantizationType.F32:
        return np.ndarray(shape, np.float32, mapping, start)
    raw = np.ndarray((n_out, row_bytes), np.uint8, mapping, start)
    tensor = GGMLTensor(info.name, qtype, (n_out, n_in), raw)
    return tensor if outer else tensor.dequantize()[0]     # a 1-D vector is small: float32 once
