"""Meta's checkpoint directories (the reference LLaMA code's): params.json, consolidated.NN.pth, tokenizer.model.

    params.json            dim, n_layers, n_heads, n_kv_heads, vocab_size (-1: the tensors'), multiple_of,
                           ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope
    consolidated.00.pth    the weights, one file per model-parallel rank (00, 01, ...), read by pth.py:
    consolidated.01.pth    torch-free, memory-mapped, and no code from the file ever runs
    tokenizer.model        SentencePiece (Llama 1 and 2); Llama 3's tiktoken file is refused

Names (Meta's on the left, llamarun's on the right; L = n_layers, H*D = n_heads * head_dim):

    tok_embeddings.weight                 -> tok_embeddings (V, dim)       norm.weight -> norm (dim,)
    output.weight                         -> output (V, dim)
    layers.N.attention.wq/wk/wv.weight    -> wq[N] (H*D, dim), wk[N], wv[N] (KV*D, dim)
    layers.N.attention.wo.weight          -> wo[N] (dim, H*D)
    layers.N.feed_forward.w1/w3.weight    -> w1[N], w3[N] (hidden, dim)    w2 -> w2[N] (dim, hidden)
    layers.N.attention_norm.weight        -> attention_norm[N] (dim,)      ffn_norm -> ffn_norm[N]

Model-parallel shards hold slices of each matrix, as Meta's fairscale layers cut them: the column-
parallel ones (wq, wk, wv, w1, w3, output) by output rows, the row-parallel ones (wo, w2) and the
parallel embedding by columns; the norms are replicated. One shard: every matrix is a view of the
file's map (bfloat16 and float16 as GGMLTensor, 2 bytes a weight, never converted; float32 as numpy
views). Several shards: each matrix is joined once into memory at load (the model's weights then cost
their size in RAM, not in page cache): a slice of a matrix in each file cannot be one view.
Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]) as run.c does: Q and K are used as stored.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from gguf import GGMLQuantizationType

from ..config import ModelConfig, llama3_rope_factors
from ..errors import LlamarunError
from ..tensors import GGMLTensor
from . import MAX_HEADER_VALUE, pth

SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")

# how shards split each kind of tensor: the axis they cut (None: replicated, every shard holds it whole)
SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
              "wo": 1, "w2": 1, "tok_embeddings": 1,
              "attention_norm": None, "ffn_norm": None, "norm": None}
LAYER_NAME = re.compile(r"layers\.(\d+)\.(attention\.(wq|wk|wv|wo)|feed_forward\.(w1|w2|w3)|(attention_norm|ffn_norm))"
                        r"\.weight")
# Llama 1's shards also hold the RoPE frequencies Meta's code precomputed: recomputed here, unused
IGNORED = {"rope.freqs"}

HALF_TYPES = {"bfloat16": GGMLQuantizationType.BF16, "float16": GGMLQuantizationType.F16}

# The context Meta's models were trained for; params.json does not say it. As llama.cpp's converter
# of Meta directories tells the generations apart: Llama 1 (norm_eps 1e-6) 2048, Llama 2 (1e-5) 4096,
# Code Llama (rope_theta 1e6) 16384; Llama 3 (rope_theta 500000) 8192; Llama 3.1 and later
# (use_scaled_rope) 131072, the context its RoPE scaling stretches 8192 positions to.
LLAMA1_CONTEXT, LLAMA2_CONTEXT, CODE_LLAMA_CONTEXT, LLAMA3_CONTEXT, LLAMA31_CONTEXT = 2048, 4096, 16384, 8192, 131072


class MetaCheckpoint:
    """A loaded Meta directory: config, weights (llamarun's names), its tokenizer and metadata."""

    def __init__(self, path: str, config: ModelConfig, weights: dict, description: str, metadata: dict,
                 tokenizer, files: list):
        self.path = path
        self.config = config
        self.weights = weights
        self.description = description
        self.metadata = metadata
        self.tokenizer = tokenizer
        self._files = files           # the PthFiles whose maps the weights view: kept alive with them


def load(path: str) -> MetaCheckpoint:
    path = os.fspath(path)
    params = read_params(path)
    files = [pth.load(shard) for shard in shard_paths(path)]
    tensors, dtype = merge_shards(path, files)
    config = config_from_params(path, params, tensors)
    weights = llamarun_weights(path, tensors, config)
    tokenizer = read_tokenizer(path, config.vocab_size)
    metadata = {"general.name": os.path.basename(os.path.abspath(path))}
    if tokenizer is not None:
        from ..tokenizers.sentencepiece import gguf_metadata
        metadata.update(gguf_metadata(tokenizer))
    n = len(files)
    description = f"Meta checkpoint, {n} shard{'s' if n > 1 else ''}, {dtype}"
    compressed = sum(len(file.decompressed) for file in files)
    if compressed:
        description += f", {compressed} compressed zip entries read into memory (a mapped file's are stored)"
    return MetaCheckpoint(path, config, weights, description, metadata, tokenizer, files)


# ----------------------------------------------------------------------------------------------
# params.json

def read_params(path: str) -> dict:
    file = os.path.join(path, "params.json")
    try:
        with open(file, encoding="utf-8") as f:
            params = json.load(f)
    except OSError as e:
        raise LlamarunError(f"cannot read {file}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LlamarunError(f"{file} is not valid JSON ({e}): restore the params.json of the checkpoint") from None
    if not isinstance(params, dict):
        raise LlamarunError(f"{file} holds a {type(params).__name__}, not the object of Meta's model parameters")
    return params


def _param(path: str, params: dict, key: str, kind, default=None, required=False):
    """params[key] checked to be a positive number of `kind` (int or float), or the default."""
    value = params.get(key)
    if value is None:
        if required:
            raise LlamarunError(f"{os.path.join(path, 'params.json')} has no {key!r}: a Meta checkpoint's params.json "
                                "gives dim, n_layers and n_heads")
        return default
    ok = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or not value > 0 or (kind is int and value > MAX_HEADER_VALUE) or (kind is float and not math.isfinite(value)):
        what = "a positive integer" if kind is int else "a positive number"
        raise LlamarunError(f"{os.path.join(path, 'params.json')}: {key} is {value!r}, not {what}")
    return value


def hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: two thirds of 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def trained_context(params: dict, rope_theta: float, norm_eps: float, scaled: bool) -> int:
    """The context the model was trained for (see LLAMA1_CONTEXT ...): params.json's max_seq_len if it
    has one, else by the generation its other parameters tell."""
    if type(params.get("max_seq_len")) is int and params["max_seq_len"] > 0:
        return params["max_seq_len"]
    if scaled:
        return LLAMA31_CONTEXT
    if rope_theta == 500000:
        return LLAMA3_CONTEXT
    if rope_theta == 1000000:
        return CODE_LLAMA_CONTEXT
    return LLAMA1_CONTEXT if norm_eps == 1e-6 else LLAMA2_CONTEXT


def config_from_params(path: str, params: dict, tensors: dict) -> ModelConfig:
    dim = _param(path, params, "dim", int, required=True)
    n_layers = _param(path, params, "n_layers", int, required=True)
    n_heads = _param(path, params, "n_heads", int, required=True)
    n_kv_heads = _param(path, params, "n_kv_heads", int, default=n_heads)
    multiple_of = _param(path, params, "multiple_of", int, default=256)        # Meta's ModelArgs defaults
    ffn_dim_multiplier = _param(path, params, "ffn_dim_multiplier", float)
    norm_eps = float(_param(path, params, "norm_eps", float, default=1e-5))
    rope_theta = float(_param(path, params, "rope_theta", float, default=10000.0))
    file = os.path.join(path, "params.json")
    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise LlamarunError(f"{file}: use_scaled_rope is {scaled!r}, not true or false")
    if dim % n_heads or (dim // n_heads) % 2:
        raise LlamarunError(f"{file}: dim {dim} does not split into {n_heads} heads of even size")
    if n_heads % n_kv_heads:
        raise LlamarunError(f"{file}: n_kv_heads {n_kv_heads} does not divide n_heads {n_heads}")

    vocab_size = params.get("vocab_size", -1)
    embedding = tensors.get("tok_embeddings.weight")
    if vocab_size == -1 or vocab_size is None:       # Llama 1 and 2 write -1: the tokenizer's, the tensors'
        if embedding is None or embedding.ndim != 2:
            raise LlamarunError(f"{path} has no tok_embeddings.weight matrix to take the vocabulary size from")
        vocab_size = embedding.shape[0]
    else:
        vocab_size = _param(path, params, "vocab_size", int)
    head_dim = dim // n_heads
    factors = None
    if scaled:
        # Meta's apply_scaling: factor 8, low 1, high 4 over the original 8192 positions (llama-models'
        # params may name the factors: rope_scaling_factor, rope_high_freq_factor)
        factor = _param(path, params, "rope_scaling_factor", float, default=8.0)
        high = _param(path, params, "rope_high_freq_factor", float, default=4.0)
        factors = llama3_rope_factors(head_dim, rope_theta, factor, 1.0, high, 8192)
    return ModelConfig(dim=dim, hidden_dim=hidden_size(dim, multiple_of, ffn_dim_multiplier), n_layers=n_layers,
                       n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                       seq_len=trained_context(params, rope_theta, norm_eps, scaled), shared_classifier=False,
                       rope_theta=rope_theta, norm_eps=norm_eps, rope_halves=False, rope_factors=factors)


# ----------------------------------------------------------------------------------------------
# shards

def shard_paths(path: str) -> list[str]:
    """consolidated.00.pth, 01, ... in rank order; a gap in the numbers is a missing shard."""
    numbers = {}
    for name in os.listdir(path):
        match = SHARD_NAME.fullmatch(name)
        if match:
            numbers[int(match.group(1))] = os.path.join(path, name)
    if not numbers:
        raise LlamarunError(f"{path} has a params.json but no consolidated.00.pth: a Meta checkpoint directory holds "
                            "its weights as consolidated.NN.pth files; download them too")
    missing = [n for n in range(max(numbers) + 1) if n not in numbers]
    if missing:
        raise LlamarunError(f"{path} has {len(numbers)} of its {max(numbers) + 1} shards: consolidated."
                            f"{missing[0]:02d}.pth is missing; download every consolidated.NN.pth file")
    return [numbers[n] for n in range(len(numbers))]


def _kind(name: str) -> str | None:
    """llamarun's name of a Meta tensor name (without the layer), or None if it is no Llama tensor."""
    if name in ("tok_embeddings.weight", "output.weight", "norm.weight"):
        return name[:-len(".weight")]
    match = LAYER_NAME.fullmatch(name)
    return None if match is None else (match.group(3) or match.group(4) or match.group(5))


def merge_shards(path: str, files: list) -> tuple[dict, str]:
    """Meta's tensors as whole numpy arrays (bfloat16 as uint16 bits) and the matrices' dtype:
    views of the map for one shard, joined copies for several."""
    first = files[0]
    names = [name for name in first.tensors if name not in IGNORED]
    for file in files[1:]:
        extra = [n for n in file.tensors if n not in first.tensors and n not in IGNORED]
        lacking = [n for n in names if n not in file.tensors]
        if extra or lacking:
            name, has, lacks = (extra[0], file, first) if extra else (lacking[0], first, file)
            raise LlamarunError(f"the shards of {path} do not fit together: {os.path.basename(has.path)} has "
                                f"{name} and {os.path.basename(lacks.path)} does not")
    tensors, dtypes = {}, set()
    for name in names:
        kind = _kind(name)
        if kind is None:
            raise LlamarunError(f"{first.path} has a tensor {name}, which is not part of the Llama model llamarun runs")
        parts = [file.tensors[name] for file in files]
        if {p.dtype for p in parts} - set(HALF_TYPES) - {"float32"}:
            odd = next(p.dtype for p in parts if p.dtype not in HALF_TYPES and p.dtype != "float32")
            raise LlamarunError(f"{first.path}: {name} is {odd}; llamarun reads Meta checkpoints of float32, float16 "
                                "and bfloat16 weights")
        if len({p.dtype for p in parts}) > 1:
            raise LlamarunError(f"the shards of {path} do not fit together: {name} is "
                                f"{' and '.join(sorted({p.dtype for p in parts}))} in different shards")
        if parts[0].data.ndim >= 2:
            dtypes.add(parts[0].dtype)
        tensors[name] = _join(path, name, files, parts, SPLIT_AXIS[kind])
    return tensors, "mixed" if len(dtypes) > 1 else next(iter(dtypes), "float32")


def _join(path: str, name: str, files: list, parts: list, axis: int | None) -> np.ndarray:
    """One tensor from its shards' parts: cut along `axis`, or replicated (None: equal in every shard)."""
    arrays = [p.data for p in parts]
    if len(arrays) == 1:
        return arrays[0]
    shapes = [a.shape for a in arrays]
    if axis is None:
        for file, a in zip(files[1:], arrays[1:]):
            if a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]):
                raise LlamarunError(f"the shards of {path} do not fit together: {name}, the same in every shard of a "
                                    f"Meta checkpoint, differs in {os.path.basename(file.path)}")
        return arrays[0]
    ok = len({len(s) for s in shapes}) == 1 and len(shapes[0]) > axis and \
        len({s[:axis] + s[axis + 1:] for s in shapes}) == 1
    if not ok:
        listed = ", ".join(f"{s} in {os.path.basename(f.path)}" for s, f in zip(shapes, files))
        raise LlamarunError(f"the shards of {path} do not fit together: {name} is {listed}, "
                            f"which do not join along axis {axis}")
    return np.concatenate(arrays, axis=axis)


# ----------------------------------------------------------------------------------------------
# llamarun's weights

def expected_shapes(c: ModelConfig) -> dict:
    D = c.head_dim
    return {"tok_embeddings": (c.vocab_size, c.dim), "output": (c.vocab_size, c.dim), "norm": (c.dim,),
            "wq": (c.n_heads * D, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim),
            "wo": (c.dim, c.n_heads * D), "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim),
            "w3": (c.hidden_dim, c.dim), "attention_norm": (c.dim,), "ffn_norm": (c.dim,)}


def llamarun_weights(path: str, tensors: dict, c: ModelConfig) -> dict:
    shapes = expected_shapes(c)
    weights = {name: [None] * c.n_layers for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3",
                                                      "attention_norm", "ffn_norm")}
    for meta_name, array in tensors.items():
        kind = _kind(meta_name)
        if array.shape != shapes[kind]:
            raise LlamarunError(f"{path}: {meta_name} is {array.shape}, but params.json (dim {c.dim}, n_heads "
                                f"{c.n_heads}, n_kv_heads {c.n_kv_heads}, hidden size {c.hidden_dim} by Meta's "
                                f"FeedForward rule, vocab {c.vocab_size}) needs {shapes[kind]}")
        tensor = _weight(meta_name, array)
        if meta_name.startswith("layers."):
            layer = int(meta_name.split(".")[1])
            if layer >= c.n_layers:
                raise LlamarunError(f"{path} has {meta_name}, but params.json gives {c.n_layers} layers")
            weights[kind][layer] = tensor
        else:
            weights[kind] = tensor
    missing = [name for name in ("tok_embeddings", "output", "norm") if name not in weights]
    missing += [f"layers.{layer} {name}" for name, per_layer in weights.items() if isinstance(per_layer, list)
                for layer, t in enumerate(per_layer) if t is None]
    if missing:
        more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
        raise LlamarunError(f"{path} lacks {missing[0]}{more}, which params.json's model of {c.n_layers} layers "
                            "needs: the checkpoint is incomplete")
    return weights


def _weight(meta_name: str, array: np.ndarray):
    """A tensor as the model takes it: matrices as stored (bfloat16 and float16: GGMLTensor over the
    bytes; float32: the array), norms as small float32 copies."""
    dtype = "bfloat16" if array.dtype == np.uint16 else str(array.dtype)     # pth.py's bfloat16 bits
    if array.ndim == 1:
        return as_float32(array, dtype)
    array = np.ascontiguousarray(array)       # Meta's are: a view stays the view (a transposed one: a copy)
    if dtype in HALF_TYPES:
        return GGMLTensor(meta_name, HALF_TYPES[dtype], array.shape, array.view(np.uint8))
    return array


def as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 copy (bfloat16 bits are a float32's upper half)."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# tokenizer.model

def read_tokenizer(path: str, vocab_size: int):
    """tokenizer.model beside the weights as a SentencePieceTokenizer, None if there is none."""
    file = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(file):
        return None
    with open(file, "rb") as f:
        first_line = f.readline(200)
    # Llama 3's tokenizer.model is tiktoken's: lines of a base64 token and its rank
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first_line):
        raise LlamarunError(f"{file} is a tiktoken vocabulary (Llama 3's), which llamarun does not read: use the "
                            "model's Hugging Face directory (tokenizer.json) or a GGUF file of it")
    from ..tokenizers.sentencepiece import SentencePieceTokenizer
    tokenizer = SentencePieceTokenizer.from_file(file)
    if tokenizer.vocab_size != vocab_size:
        raise LlamarunError(f"{file} has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab_size}: "
                            "it is not this checkpoint's tokenizer")
    return tokenizer
