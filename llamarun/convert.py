"""`llamarun convert IN OUT [--type TYPE] [--force]`: a model in another format, its logits unchanged.

IN is anything `formats.load_checkpoint` opens (GGUF, llama2.c, Meta and Hugging Face directories);
OUT's form picks what is written:

- `OUT.gguf`: llama.cpp's layout. Hyper-parameters as `llama.*` keys (from the config, whatever the
  input said), RoPE theta, Llama 3.1's scaling as the `rope_freqs.weight` tensor and linear scaling
  as `llama.rope.scaling.*` (as convert_hf_to_gguf.py writes them), every `general.*` and
  `tokenizer.*` key of the input's metadata (tokenizer, special tokens, chat template, sampling) with
  the value type llama.cpp reads, `general.file_type` of the new type. Q and K rows in llama.cpp's
  interleaved pair order: a Hugging Face input's (rope_halves) are permuted as the converter's
  `permute` does. `--type f32 | f16 | bf16 | q8_0 | q4_0 | q4_1` for every matrix, quantized by the
  reference quantizers quantize.py uses; a matrix whose rows are not whole blocks of the type is
  written F16, as llama.cpp's converter does; norms and rope_freqs stay F32.
- `OUT.bin`: llama2.c, version 1 (`--type f32`, float32) or version 2 (`--type int8`, export.py's
  groups of 64, fewer where the widths need it). The format has run.c's fixed RoPE (theta 10000,
  interleaved pairs, no scaling), RMSNorm epsilon 1e-5, BOS 1 and EOS 2 and no tokenizer: a model
  needing anything else is refused; a Hugging Face input's Q and K are permuted.
- a directory (`OUT/`, or OUT without an extension): Hugging Face's layout, `config.json`
  (LlamaForCausalLM, MistralForCausalLM for a sliding window; RoPE scaling in transformers'
  `rope_scaling` spelling), `model.safetensors` (`--type f32 | f16 | bf16` for the matrices, norms
  float32; Q and K rows in rotate_half's order), `generation_config.json`, and the tokenizer: the
  input directory's own files copied, else `tokenizer.json` built with `tokenizers` from a GGUF
  byte-level BPE vocabulary and `tokenizer_config.json` with its special tokens and chat template.

Every tensor is read, converted and written one at a time (memory: the largest matrix, not the
model). Nothing is written before every check has passed; the output goes to a temporary name beside
OUT and is renamed at the end, so OUT is the whole result or untouched. An existing OUT is replaced
only with `--force`.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from .config import ModelConfig, llama3_rope_factors
from .errors import LlamarunError
from .formats import gguf as gguf_format, llama2c, load_checkpoint
from .quantize import (_largest_group, _write_atomically, metadata_value_types, quantize_matrix, quantize_q80,
                       write_gguf_tensors)
from .tensors import GGMLTensor

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
GGUF_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
LLAMA2C_TYPES = ("f32", "int8")                      # version 1, version 2
HF_TYPES = {"f32": ("F32", 4), "f16": ("F16", 2), "bf16": ("BF16", 2)}     # safetensors dtype, bytes
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
LAYER_NAMES = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
GGUF_NAMES = {name: gguf_name for gguf_name, name in gguf_format.LAYER_NAMES.items()}
HF_LAYER_NAMES = {"attention_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
                  "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}
# a source directory's tokenizer and generation files, copied into a Hugging Face output as they are
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "generation_config.json")


@dataclass
class Written:
    description: str          # "GGUF, F16 (14), F32 (7)"
    notes: list[str]          # what the user should know: fallbacks, what was left out


def convert(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "f32", force: bool = False) -> Written:
    """Write the model `src` as `dst` (its form, see the module docstring) with matrices of `qtype`.
    Raises LlamarunError, with nothing written, for anything the output cannot hold."""
    src, dst = os.fspath(src), os.fspath(dst)
    kind = output_kind(dst)
    qtype = qtype.lower()
    allowed = {"gguf": tuple(GGUF_TYPES), "llama2c": LLAMA2C_TYPES, "hf": tuple(HF_TYPES)}[kind]
    if qtype not in allowed:
        what = {"gguf": "a .gguf file", "llama2c": "a llama2.c .bin file", "hf": "a Hugging Face directory"}[kind]
        raise LlamarunError(f"--type {qtype} cannot be written to {what}: it takes --type {' | '.join(allowed)}")
    _check_destination(src, dst, kind, force)
    checkpoint = load_checkpoint(src)
    if kind == "gguf":
        plan, notes = gguf_plan(checkpoint, GGUF_TYPES[qtype])
        metadata = gguf_metadata(checkpoint, GGUF_TYPES[qtype])
        if not any(key.startswith("tokenizer.ggml.") for key, *_ in metadata):
            notes.append(f"no tokenizer: {src} carries none (llamarun runs the file on token ids or with "
                         "a tokenizer file beside it; llama.cpp needs one in the file)")
        description = _write_atomically(dst, lambda tmp: write_gguf(tmp, metadata, plan))
        return Written(description, notes)
    if kind == "llama2c":
        check_llama2c(checkpoint)
        notes = ["llama2.c files carry no tokenizer: use the model's tokenizer.bin / tokenizer.model beside it"] \
            if metadata_of(checkpoint).get("tokenizer.ggml.model") else []
        group = _largest_group(checkpoint.config) if qtype == "int8" else None
        return Written(_write_atomically(dst, lambda tmp: write_llama2c(tmp, checkpoint, group)), notes)
    config_json = hf_config(checkpoint, qtype)
    return _write_directory(dst, force, lambda tmp: write_hf(tmp, checkpoint, qtype, config_json))


def output_kind(dst: str) -> str:
    """'gguf', 'llama2c' or 'hf' (a directory) from OUT's form."""
    if dst.endswith(("/", os.sep)) or os.path.isdir(dst):
        return "hf"
    extension = os.path.splitext(dst)[1].lower()
    if extension == ".gguf":
        return "gguf"
    if extension == ".bin":
        return "llama2c"
    if not extension:
        return "hf"
    raise LlamarunError(f"cannot tell the output format of {dst}: name it OUT.gguf (GGUF), OUT.bin (llama2.c) "
                        "or OUT/ (a Hugging Face directory)")


def _check_destination(src: str, dst: str, kind: str, force: bool) -> None:
    folder = os.path.dirname(os.path.abspath(dst.rstrip("/" + os.sep) or dst))
    if not os.path.isdir(folder):
        raise LlamarunError(f"cannot write {dst}: the folder {folder} does not exist")
    if not os.path.exists(dst):
        return
    if os.path.samefile(src, dst) or os.path.abspath(src).startswith(os.path.abspath(dst) + os.sep):
        raise LlamarunError(f"{dst} is the input model: write the converted model to another path")
    if kind == "hf" and not os.path.isdir(dst):
        raise LlamarunError(f"{dst} is a file: a Hugging Face output is a directory; name another path")
    if kind != "hf" and os.path.isdir(dst):
        raise LlamarunError(f"{dst} is a directory: name the output file OUT.gguf or OUT.bin")
    if not force and not (kind == "hf" and not os.listdir(dst)):
        raise LlamarunError(f"{dst} exists: pass --force to replace it, or name another output")


def _write_directory(dst: str, force: bool, write: Callable[[str], Written]) -> Written:
    """write(tmp) fills a temporary directory beside dst, renamed to dst at the end (an old dst,
    allowed by --force, is removed only then); on any failure the temporary one is removed."""
    dst = dst.rstrip("/" + os.sep) or dst
    folder = os.path.dirname(os.path.abspath(dst))
    try:
        tmp = tempfile.mkdtemp(dir=folder, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    except OSError as e:
        raise LlamarunError(f"cannot write {dst}: {e.strerror}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        written = write(tmp)
        old = None
        if os.path.exists(dst):
            old = tempfile.mkdtemp(dir=folder, prefix=f".{os.path.basename(dst)}.", suffix=".old")
            os.replace(dst, os.path.join(old, "dir"))
        os.replace(tmp, dst)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LlamarunError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ----------------------------------------------------------------------------------------------
# tensors of the checkpoint, in the layout an output needs

def tensor(checkpoint, name: str, layer: int | None = None, halves: bool = False):
    """The checkpoint's tensor `name` (of `layer`), Q and K rows in RoPE's halves order (Hugging
    Face's) if `halves`, else in interleaved order (llama.cpp's, llama2.c's): rows reordered where the
    checkpoint stores the other one (a float32 array, GGML blocks or llama2.c groups: whole rows move)."""
    t = checkpoint.weights[name] if layer is None else checkpoint.weights[name][layer]
    c = checkpoint.config
    if name in ("wq", "wk") and c.rope_halves != halves:
        heads = c.n_heads if name == "wq" else c.n_kv_heads
        t = take_rows(t, pair_order(heads, c.head_dim, to_halves=halves))
    return t


def metadata_of(checkpoint) -> dict:
    """The checkpoint's metadata in GGUF spelling ({} for a format that has none, llama2.c)."""
    return getattr(checkpoint, "metadata", None) or {}


def pair_order(n_heads: int, head_dim: int, to_halves: bool) -> np.ndarray:
    """Row indices that move a Q or K matrix between RoPE's pair layouts (new = old[order]).
    To interleaved: convert_hf_to_gguf.py's permute, each head's rows (x_0..x_{D/2-1}, x_{D/2}..)
    as (x_0, x_{D/2}, x_1, x_{D/2+1}, ...); to halves: its inverse."""
    rows = np.arange(n_heads * head_dim)
    if to_halves:
        return rows.reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)
    return rows.reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def take_rows(t, order: np.ndarray):
    if isinstance(t, GGMLTensor):
        return GGMLTensor(t.name, t.qtype, t.shape, t.raw[order])
    return t[order]                      # numpy arrays and GroupQuantized index their rows alike


def float32(t) -> np.ndarray:
    """A tensor's values as a float32 array (dequantized where stored otherwise)."""
    return np.asarray(t, np.float32) if isinstance(t, np.ndarray) else t.dequantize()


def encode(t, ggml_type) -> np.ndarray:
    """The bytes of one tensor in ggml_type: a matrix already in that type as stored, else its
    values converted by quantize.py's quantize_matrix (gguf's reference quantizers)."""
    if getattr(t, "qtype", None) == ggml_type:
        return np.ascontiguousarray(t.raw)
    if ggml_type == T.F32:
        return np.ascontiguousarray(float32(t))
    return quantize_matrix(float32(t), ggml_type)


def context_length(c: ModelConfig) -> int:
    """The context to record: neither llama.cpp's llama files nor llama2.c hold a sliding window, so a
    model with one is recorded with a context up to its window (what llamarun runs it with)."""
    return min(c.seq_len, c.sliding_window) if c.sliding_window else c.seq_len


# ----------------------------------------------------------------------------------------------
# GGUF

@dataclass
class GGUFTensor:
    name: str                 # llama.cpp's
    shape: tuple              # (out, in) or (n,)
    ggml_type: object
    data: Callable            # () -> the bytes to write (read and converted when written)


def gguf_plan(checkpoint, ggml_type) -> tuple[list[GGUFTensor], list[str]]:
    """Every tensor of the output, in the order llama.cpp's converter writes them, with its type."""
    c = checkpoint.config
    plan, fallbacks = [], []

    shapes = gguf_format.expected_shapes(c)

    def add(gguf_name, name, layer=None):
        shape = shapes[name]
        if len(shape) == 1:
            plan.append(GGUFTensor(gguf_name, shape, T.F32,
                                   lambda: np.ascontiguousarray(float32(tensor(checkpoint, name, layer)))))
            return
        chosen = ggml_type
        if shape[1] % gguf.GGML_QUANT_SIZES[chosen][0]:
            chosen = T.F16                       # llama.cpp's converter falls back the same way
            fallbacks.append(gguf_name)
        plan.append(GGUFTensor(gguf_name, shape, chosen, lambda: encode(tensor(checkpoint, name, layer), chosen)))

    if c.rope_factors is not None:
        factors = np.array(c.rope_factors, np.float32)
        plan.append(GGUFTensor(gguf_format.ROPE_FREQS, factors.shape, T.F32, lambda: factors))
    add("token_embd.weight", "tok_embeddings")
    add("output_norm.weight", "norm")
    if not c.shared_classifier:
        add("output.weight", "output")
    for layer in range(c.n_layers):
        for name in LAYER_NAMES:
            add(f"blk.{layer}.{GGUF_NAMES[name]}.weight", name, layer)
    notes = []
    if fallbacks:
        notes.append(f"{len(fallbacks)} matrices ({', '.join(fallbacks[:3])}{', ...' if len(fallbacks) > 3 else ''}) "
                     f"have rows that are not whole {ggml_type.name} blocks: written F16, as llama.cpp's converter does")
    return plan, notes


# value types llama.cpp reads where the metadata's Python value could be written several ways
INT32_KEYS = {"general.sampling.top_k", "general.sampling.penalty_last_n", "general.sampling.mirostat"}
SKIPPED_KEYS = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.ALIGNMENT,
                gguf.Keys.General.QUANTIZATION_VERSION}


def gguf_metadata(checkpoint, ggml_type) -> list[tuple]:
    """(key, value, value type, array item type) of every key written besides the architecture."""
    c = checkpoint.config
    u32, f32 = V.UINT32, V.FLOAT32
    keys = [
        ("general.file_type", int(FILE_TYPES[ggml_type]), u32, None),
        ("general.quantization_version", gguf.GGML_QUANT_VERSION, u32, None),
        ("llama.context_length", context_length(c), u32, None),
        ("llama.embedding_length", c.dim, u32, None),
        ("llama.feed_forward_length", c.hidden_dim, u32, None),
        ("llama.block_count", c.n_layers, u32, None),
        ("llama.attention.head_count", c.n_heads, u32, None),
        ("llama.attention.head_count_kv", c.n_kv_heads, u32, None),
        ("llama.rope.dimension_count", c.head_dim, u32, None),
        ("llama.rope.freq_base", c.rope_theta, f32, None),
        ("llama.attention.layer_norm_rms_epsilon", c.norm_eps, f32, None),
        ("llama.vocab_size", c.vocab_size, u32, None),
    ]
    if c.rope_scale != 1.0:
        keys += [("llama.rope.scaling.type", "linear", V.STRING, None),
                 ("llama.rope.scaling.factor", c.rope_scale, f32, None)]
    types = _gguf_value_types(checkpoint)
    for key, value in metadata_of(checkpoint).items():
        if key in SKIPPED_KEYS or not key.startswith(("general.", "tokenizer.")):
            continue
        if isinstance(value, list) and not value:
            continue                    # an empty array says nothing; GGUFWriter cannot write one
        vtype, item = types.get(key) or _value_type(key, value)
        keys.append((key, value, vtype, item))
    return keys


def _gguf_value_types(checkpoint) -> dict:
    """A GGUF input's own value types (a uint32 stays a uint32); {} for other inputs."""
    if not isinstance(checkpoint, gguf_format.GGUFCheckpoint):
        return {}
    with open(checkpoint.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return metadata_value_types(buf)


def _value_type(key: str, value) -> tuple:
    """The GGUF type of a value from a non-GGUF input, as gguf's GGUFWriter.add_* methods write it:
    ids and counts uint32 (the sampling counts int32), reals float32, token types int32."""
    def scalar(v):
        if isinstance(v, bool):
            return V.BOOL
        if isinstance(v, int):
            return V.INT32 if key in INT32_KEYS or v < 0 else V.UINT32
        if isinstance(v, float):
            return V.FLOAT32
        return V.STRING
    if isinstance(value, list):
        item = scalar(value[0])
        return V.ARRAY, V.INT32 if item == V.UINT32 else item
    return scalar(value), None


def write_gguf(path: str, metadata: list[tuple], plan: list[GGUFTensor]) -> str:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value, vtype, item in metadata:
        writer.add_key_value(key, value, vtype, sub_type=item)
    write_gguf_tensors(writer, [(t.name, t.shape, t.ggml_type, t.data) for t in plan])
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
    f32 = counts.pop("F32", 0)
    return "GGUF, " + ", ".join([f"{n} ({k})" for n, k in counts.items()] + [f"F32 ({f32})"])


# ----------------------------------------------------------------------------------------------
# llama2.c

def check_llama2c(checkpoint) -> None:
    """Refuse, with the reason, a model that run.c's fixed architecture would run differently."""
    c, meta, path = checkpoint.config, metadata_of(checkpoint), checkpoint.path
    cannot = f"{path} cannot be written as a llama2.c checkpoint"
    if c.rope_theta != 10000.0:
        raise LlamarunError(f"{cannot}: its RoPE theta is {c.rope_theta:g} and llama2.c's is fixed at 10000; "
                            "write a .gguf or a Hugging Face directory")
    if c.rope_factors is not None or c.rope_scale != 1.0:
        raise LlamarunError(f"{cannot}: it scales RoPE ({'llama3 rope_freqs' if c.rope_factors else 'linear'}), "
                            "which llama2.c cannot; write a .gguf or a Hugging Face directory")
    if abs(c.norm_eps - 1e-5) > 1e-12:          # 1e-5 as a float32 in a GGUF (9.99999975e-06) is 1e-5
        raise LlamarunError(f"{cannot}: its RMSNorm epsilon is {c.norm_eps:g} and llama2.c's is fixed at 1e-5; "
                            "write a .gguf or a Hugging Face directory")
    for name, fixed in (("bos", llama2c.BOS), ("eos", llama2c.EOS)):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None and value != fixed:
            raise LlamarunError(f"{cannot}: its {name.upper()} token is {value} and llama2.c's is fixed at {fixed}; "
                                "write a .gguf or a Hugging Face directory")
    if max(c.dim, c.hidden_dim, c.vocab_size, context_length(c)) >= 1 << 31:
        raise LlamarunError(f"{cannot}: a size in its config does not fit the header's 32-bit fields")


def write_llama2c(path: str, checkpoint, group_size: int | None) -> str:
    """Version 1 (group_size None: float32) or 2 (int8 groups), in the order export.py writes them."""
    c = checkpoint.config
    version = 1 if group_size is None else 2
    header = struct.pack("<Ii7iB", llama2c.MAGIC, version, c.dim, c.hidden_dim, c.n_layers, c.n_heads,
                         c.n_kv_heads, c.vocab_size, context_length(c), int(c.shared_classifier))
    if group_size is not None:
        header += struct.pack("<i", group_size)
    matrices = [("tok_embeddings", None)] + [(name, layer) for name in MATRICES for layer in range(c.n_layers)]
    if not c.shared_classifier:
        matrices.append(("output", None))
    with open(path, "wb") as f:
        f.write(header.ljust(llama2c.VERSIONED_HEADER_BYTES, b"\0"))
        for name in ("attention_norm", "ffn_norm"):
            for layer in range(c.n_layers):
                f.write(float32(tensor(checkpoint, name, layer)).tobytes())
        f.write(float32(tensor(checkpoint, "norm")).tobytes())
        for name, layer in matrices:
            values = float32(tensor(checkpoint, name, layer))
            if group_size is None:
                f.write(values.tobytes())
            else:
                q, scale = quantize_q80(values, group_size)
                f.write(q.tobytes())
                f.write(scale.astype(np.float32).tobytes())
    return "llama2.c v1 float32" if group_size is None else f"llama2.c v2 int8 (group {group_size})"


# ----------------------------------------------------------------------------------------------
# Hugging Face directory

def hf_config(checkpoint, qtype: str) -> dict:
    """config.json: transformers' LlamaForCausalLM (MistralForCausalLM with a sliding window)."""
    c, meta = checkpoint.config, metadata_of(checkpoint)
    mistral = c.sliding_window is not None
    config = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.seq_len,
        "rms_norm_eps": float(np.float32(c.norm_eps)) if c.norm_eps != 1e-5 else 1e-5,
        "rope_theta": c.rope_theta, "rope_scaling": rope_scaling(checkpoint),
        "tie_word_embeddings": c.shared_classifier, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[qtype],
    }
    if mistral:
        config["sliding_window"] = c.sliding_window
    for name in ("bos", "eos"):
        if meta.get(f"tokenizer.ggml.{name}_token_id") is not None:
            config[f"{name}_token_id"] = meta[f"tokenizer.ggml.{name}_token_id"]
    return config


def rope_scaling(checkpoint) -> dict | None:
    """config.json's rope_scaling: linear as it is; rope_factors as the "llama3" parameters that give
    them (Meta's low and high frequency factors 1 and 4, the original context solved from the pairs
    between, checked by recomputing every factor), refused where none do."""
    c = checkpoint.config
    if c.rope_factors is None:
        return {"rope_type": "linear", "factor": c.rope_scale} if c.rope_scale != 1.0 else None
    if c.rope_scale != 1.0:
        raise LlamarunError(f"{checkpoint.path} has both rope_freqs and linear RoPE scaling, which "
                            "transformers' config cannot hold together; write a .gguf")
    factors = np.array(c.rope_factors, np.float64)
    if np.all(factors == 1.0):
        return None
    factor = float(np.float32(factors.max()))
    wavelengths = 2 * math.pi * c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    fast, slow = factors <= 1 + 1e-6, factors >= factor * (1 - 1e-6)
    between = ~fast & ~slow
    if between.any():       # 1/f = (1 - s)/factor + s, s = (original/wavelength - 1) / 3
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        original = float(np.mean(wavelengths[between] * (3 * s + 1)))
    else:                   # any original context between the two groups: a power of two if one fits
        low = 4 * wavelengths[fast].max() if fast.any() else 0.0
        high = wavelengths[slow].min() if slow.any() else math.inf
        powers = [2 ** k for k in range(1, 40) if low < 2 ** k < high]
        original = powers[0] if powers else (low + high) / 2
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": int(round(original))}
    again = llama3_rope_factors(c.head_dim, c.rope_theta, factor, 1.0, 4.0, params["original_max_position_embeddings"])
    if not np.allclose(again, factors, rtol=1e-5, atol=0):
        raise LlamarunError(f"{checkpoint.path}'s rope_freqs are not Llama 3's \"llama3\" scaling, the one "
                            "transformers' config can state: write a .gguf instead")
    return params


def hf_tensors(checkpoint) -> list[tuple[str, str, Callable]]:
    """(transformers' name, llamarun's name, () -> the tensor, Q/K rows in halves order)."""
    c = checkpoint.config
    out = [("model.embed_tokens.weight", "tok_embeddings", lambda: tensor(checkpoint, "tok_embeddings"))]
    for layer in range(c.n_layers):
        for name in LAYER_NAMES:
            out.append((f"model.layers.{layer}.{HF_LAYER_NAMES[name]}.weight", name,
                        lambda name=name, layer=layer: tensor(checkpoint, name, layer, halves=True)))
    out.append(("model.norm.weight", "norm", lambda: tensor(checkpoint, "norm")))
    if not c.shared_classifier:
        out.append(("lm_head.weight", "output", lambda: tensor(checkpoint, "output")))
    return out


def write_hf(folder: str, checkpoint, qtype: str, config: dict) -> Written:
    c = checkpoint.config
    dtype, size = HF_TYPES[qtype]
    shapes = gguf_format.expected_shapes(c)
    entries = []
    for hf_name, name, get in hf_tensors(checkpoint):
        shape = shapes[name]
        if len(shape) == 1:             # norms stay float32 (transformers casts them as it loads)
            entries.append((hf_name, "F32", shape, lambda get=get: np.ascontiguousarray(float32(get()))))
        else:
            ggml_type = GGUF_TYPES[qtype]
            entries.append((hf_name, dtype, shape, lambda get=get: encode(get(), ggml_type)))
    write_safetensors(os.path.join(folder, "model.safetensors"), entries)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    notes = write_hf_tokenizer(folder, checkpoint)
    return Written(f"Hugging Face directory, safetensors {dtype} ({len(entries)} tensors)", notes)


SAFETENSORS_SIZES = {"F32": 4, "F16": 2, "BF16": 2}


def write_safetensors(path: str, entries: list[tuple]) -> None:
    """A .safetensors file written one tensor at a time: 8-byte header length, the JSON header
    (dtype, shape, byte range of each tensor), then the data (the format's documented layout; the
    safetensors package's numpy writer needs every array in memory and has no bfloat16)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * SAFETENSORS_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, data in entries:
            raw = data()
            assert raw.nbytes == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
            f.write(raw.tobytes())


def write_hf_tokenizer(folder: str, checkpoint) -> list[str]:
    """The tokenizer files: a source directory's copied; else built from GGUF metadata where it can be."""
    source = checkpoint.path
    if os.path.isdir(source):
        copied = [name for name in HF_SIDE_FILES if os.path.isfile(os.path.join(source, name))]
        for name in copied:
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        return [] if {"tokenizer.json", "tokenizer.model"} & set(copied) else \
            [f"no tokenizer written: {source} has no tokenizer.json or tokenizer.model"]
    meta = metadata_of(checkpoint)
    write_generation_config(folder, meta)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return [f"no tokenizer written: {source} carries none"]
    tokens = meta["tokenizer.ggml.tokens"]
    special = {}
    for name in ("bos", "eos", "unknown"):
        token = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token is not None:
            special[{"unknown": "unk"}.get(name, name) + "_token"] = tokens[token]
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                        "model_max_length": context_length(checkpoint.config)}
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    if model != "gpt2":
        return [f"no tokenizer.json written: llamarun builds one from a byte-level BPE (gpt2) vocabulary, and "
                f"{source} has a {model!r} one; tokenizer_config.json holds its special tokens and chat template"]
    write_bpe_tokenizer(os.path.join(folder, "tokenizer.json"), meta)
    return []


def write_bpe_tokenizer(path: str, meta: dict) -> None:
    """tokenizer.json of a GGUF byte-level BPE vocabulary: the `tokenizers` object llamarun's own GGUF
    tokenizer runs on (vocabulary, merges, pre-tokenizer, special tokens), with BOS prepended by a
    post-processor where the file says to add it."""
    from .tokenizers.gguf import GGUFBpeTokenizer, import_tokenizers
    tokenizer = GGUFBpeTokenizer(meta)
    hf = tokenizer.hf
    if tokenizer.vocab.add_bos and tokenizer.bos_id is not None:
        bos = tokenizer.vocab.tokens[tokenizer.bos_id]
        hf.post_processor = import_tokenizers().processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    hf.save(path)


def write_generation_config(folder: str, meta: dict) -> None:
    """generation_config.json: BOS, EOS and the recommended sampling of general.sampling.*."""
    config = {}
    for name in ("bos", "eos"):
        if meta.get(f"tokenizer.ggml.{name}_token_id") is not None:
            config[f"{name}_token_id"] = meta[f"tokenizer.ggml.{name}_token_id"]
    for key, hf_key in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p")):
        if meta.get(f"general.sampling.{key}") is not None:
            config[hf_key] = meta[f"general.sampling.{key}"]
            config["do_sample"] = True
    if config:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(config, f, indent=2)
