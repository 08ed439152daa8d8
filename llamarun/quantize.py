"""`llamarun quantize IN OUT --type TYPE`: write a quantized copy of a model, then measure what it cost.

Two kinds of output, chosen by OUT's extension:

- GGUF (`.gguf`, `--type q8_0 | q4_0 | q4_1 | q4_k_m | q5_k_m | q6_k`) from a GGUF input of any
  type we read. Every metadata key of the input is copied with its own value type (architecture,
  llama.*, tokenizer.*, chat template...), `general.file_type` is set to llama.cpp's LlamaFileType
  of the new type, and each tensor is written under its name, in the input's order: every 2-D
  matrix dequantized to float32 and requantized with `gguf.quants.quantize` or, for the K-quants,
  llamarun.kquants (the reference quantizers, bit for bit ggml's), every 1-D tensor (the norms) as
  float32. Rows are requantized as they are stored, so Q and K keep the permuted layout llama.cpp's
  converter gave them. The K-quant mixes give each matrix the type `llama-quantize` gives it (see
  `mix_type`): Q4_K_M and Q5_K_M keep attn_v and ffn_down of some layers and the classifier in
  Q6_K; rows that are not a whole number of 256-value super-blocks fall back as llama.cpp does; a
  matrix already in its new type is copied as it is. A llama2.c checkpoint cannot become a GGUF
  here: it carries no tokenizer, and llama.cpp refuses a GGUF without one.
- llama2.c version 2 (`.bin`, `--type int8 [--group-size G]`, default 64) from a float32 llama2.c
  checkpoint (legacy header or version 1), in exactly the layout llama2.c's export.py writes:
  a 256-byte header, the float32 norms, then every matrix (token embedding, wq of each layer, wk,
  wv, wo, w1, w2, w3, the classifier if not shared) as int8 values followed by its float32 group
  scales, layer by layer, quantized as export.py's quantize_q80 does.

The file is written to a temporary name in OUT's folder and renamed to OUT at the end, so OUT is
either the whole new file or untouched; every mistake (type and extension that do not pair, a
group size that does not divide the rows) is refused before anything is written.

`measure_quality(IN, OUT)` then loads both files as `llamarun.load` does and scores a short
built-in English text (or, for a model without a tokenizer, a fixed pseudo-random id sequence)
under each: perplexity, the mean absolute difference of the logits, how often the top token agrees.
"""
from __future__ import annotations

import mmap
import os
import struct
import tempfile
from dataclasses import dataclass

import gguf
import numpy as np

from .api import find_tokenizer, load
from .decoding import first_token
from .errors import LlamarunError
from .formats import gguf as gguf_format, llama2c
from .formats.gguf import _Cursor, _llamarun_name
from .inspect.perplexity import perplexity
from .kquants import QUANTIZERS as KQUANTIZERS, quantize as kquantize
from .tokenizers import load_tokenizer

T = gguf.GGMLQuantizationType
GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k")      # --type for .gguf outputs
K_MIXES = {                                # --type -> (llama.cpp's file type, the type of most matrices)
    "q4_k_m": (gguf.LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "q5_k_m": (gguf.LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "q6_k": (gguf.LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
}
LLAMA2C_TYPES = ("int8",)                  # --type for .bin outputs (llama2.c version 2)
DEFAULT_GROUP_SIZE = 64                    # export.py's default


# ----------------------------------------------------------------------------------------------
# the command

def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, group_size: int | None = None) -> str:
    """Write `src` quantized to `qtype` as `dst`; returns a one-line description of what was written.

    Raises LlamarunError, with nothing written, for a type that does not fit dst's extension or the
    input, an input of the wrong kind, or a group size that does not divide the model's rows.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    qtype = qtype.lower()
    kind = _output_kind(dst, qtype, group_size)
    _check_paths(src, dst)
    if kind == "gguf":
        source = _open_gguf_input(src, dst)
        plan = _gguf_plan(source, qtype)
        return _write_atomically(dst, lambda tmp: _write_gguf(source, plan, tmp, _file_type(qtype)))
    checkpoint = _open_llama2c_input(src, dst)
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    _check_group_size(checkpoint.config, group_size)
    return _write_atomically(dst, lambda tmp: _write_llama2c_v2(checkpoint, tmp, group_size))


def _output_kind(dst: str, qtype: str, group_size: int | None) -> str:
    """'gguf' or 'llama2c', from OUT's extension, once the type and the options fit it."""
    known = ", ".join(GGUF_TYPES) + " (GGUF) or " + ", ".join(LLAMA2C_TYPES) + " (llama2.c)"
    if qtype not in GGUF_TYPES + LLAMA2C_TYPES:
        raise LlamarunError(f"unknown --type {qtype!r}: llamarun quantizes to {known}")
    extension = os.path.splitext(dst)[1].lower()
    if extension == ".gguf":
        if qtype not in GGUF_TYPES:
            raise LlamarunError(f"--type {qtype} writes llama2.c .bin files; a .gguf output takes "
                                f"--type {' | '.join(GGUF_TYPES)}")
        if group_size is not None:
            raise LlamarunError(f"--group-size is for --type int8 (.bin outputs); {qtype} has ggml's fixed "
                                "blocks (32 values, 256 for the K-quants)")
        return "gguf"
    if extension == ".bin":
        if qtype not in LLAMA2C_TYPES:
            raise LlamarunError(f"--type {qtype} is a GGUF type: write it to a .gguf file; a llama2.c .bin "
                                "output takes --type int8 (version 2)")
        return "llama2c"
    raise LlamarunError(f"cannot tell the output format of {dst}: name it .gguf (--type "
                        f"{' | '.join(GGUF_TYPES)}) or .bin (--type int8, llama2.c version 2)")


def _check_paths(src: str, dst: str) -> None:
    if not os.path.isfile(src):
        raise LlamarunError(f"input model {src} not found" if not os.path.exists(src) else
                            f"input {src} is not a file")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise LlamarunError(f"cannot write {dst}: the folder {folder} does not exist")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise LlamarunError(f"{dst} is the input file: write the quantized model to another path")


def _write_atomically(dst: str, write) -> str:
    """write(tmp_path) into a temporary file beside dst, then rename it to dst; on any failure the
    temporary file is removed and dst is left as it was."""
    folder = os.path.dirname(os.path.abspath(dst))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    except OSError as e:
        raise LlamarunError(f"cannot write {dst}: {e.strerror}") from None
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # a new file's usual mode, not mkstemp's 0600
        description = write(tmp)
        os.replace(tmp, dst)
    except OSError as e:
        _remove(tmp)
        raise LlamarunError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise
    return description


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _input_magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


# ----------------------------------------------------------------------------------------------
# GGUF -> GGUF

@dataclass
class _GGUFSource:
    checkpoint: object        # formats.gguf.GGUFCheckpoint: the validated model and its tensors
    header: object            # formats.gguf.GGUFFile: metadata and tensor infos in file order
    value_types: dict         # key -> (GGUFValueType, item type of an array or None)


def _open_gguf_input(src: str, dst: str) -> _GGUFSource:
    if _input_magic(src) != b"GGUF":
        raise LlamarunError(f"{src} is a llama2.c checkpoint: GGUF output ({dst}) is written only from a GGUF "
                            "input, whose tokenizer and metadata it copies (a llama2.c file has no tokenizer); "
                            "quantize it to a llama2.c file instead: --type int8 OUT.bin")
    checkpoint = gguf_format.load(src)        # refuses what llamarun cannot run, with the reason
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = gguf_format.parse_header(buf)          # tensor infos in file order
        value_types = metadata_value_types(buf)
    return _GGUFSource(checkpoint, header, value_types)


def metadata_value_types(buf) -> dict:
    """key -> (value type, item type for arrays else None) of every metadata entry, in file order.

    Our header reader returns plain Python values; a copy must write each one back with the type it
    had (a uint32 stays a uint32, an int32 token-type array stays int32)."""
    ARRAY = gguf.GGUFValueType.ARRAY
    cursor = _Cursor(buf, 4 + 4 + 8)          # after the magic, the version and the tensor count
    types = {}
    for _ in range(cursor.u64()):
        key = cursor.string()
        vtype = gguf.GGUFValueType(cursor.u32())
        item = gguf.GGUFValueType(struct.unpack_from("<I", buf, cursor.offset)[0]) if vtype == ARRAY else None
        cursor.value(vtype)                   # skip past the value
        types[key] = (vtype, item)
    return types


@dataclass
class _TensorPlan:
    name: str                 # llama.cpp's name, as in the input
    tensor: object            # the input tensor: float32 numpy array or GGMLTensor
    ggml_type: object         # GGMLQuantizationType written: F32 for 1-D tensors, else the matrix's type


def _file_type(qtype: str):
    """llama.cpp's LlamaFileType of a --type: general.file_type in the output."""
    if qtype in K_MIXES:
        return K_MIXES[qtype][0]
    return gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]


def _gguf_plan(source: _GGUFSource, qtype: str) -> list[_TensorPlan]:
    """Every tensor of the input in file order with the type it is written in, each checked to fit
    that type before anything is written."""
    checkpoint = source.checkpoint
    names = list(source.header.tensors)
    n_layers = checkpoint.config.n_layers
    plan = []
    for info in source.header.tensors.values():
        if info.name == gguf_format.ROPE_FREQS:        # Llama 3.1's RoPE divisors: copied as float32
            plan.append(_TensorPlan(info.name, np.array(checkpoint.config.rope_factors, np.float32), T.F32))
            continue
        name, layer = _llamarun_name(checkpoint.path, info.name, n_layers)
        tensor = checkpoint.weights[name] if layer is None else checkpoint.weights[name][layer]
        if len(info.dims) != 2:
            plan.append(_TensorPlan(info.name, tensor, T.F32))
            continue
        n_in = tensor.shape[1]
        if qtype in K_MIXES:
            ggml_type = fallback_type(mix_type(qtype, info.name, n_in, n_layers, "output.weight" in names), n_in)
        else:
            ggml_type = T[qtype.upper()]
            block_size = gguf.GGML_QUANT_SIZES[ggml_type][0]
            if n_in % block_size:
                raise LlamarunError(f"{checkpoint.path}: tensor {info.name} has rows of {n_in} values, "
                                    f"not a whole number of {ggml_type.name} blocks of {block_size}")
        plan.append(_TensorPlan(info.name, tensor, ggml_type))
    return plan


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in the _M mixes:
    the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_type(qtype: str, name: str, n_in: int, n_layers: int, has_output: bool):
    """The type llama.cpp's llama_tensor_get_type gives the matrix `name` (rows of n_in values) in
    the mix `qtype` (no importance matrix, no overrides, a Llama model without experts).

    The classifier (output.weight, or token_embd.weight when the model has no output.weight: the
    embedding is the classifier too) gets Q6_K, or Q8_0 when its rows are not a whole number of
    super-blocks; in Q4_K_M and Q5_K_M, attn_v and ffn_down get Q6_K in use_more_bits' layers."""
    default = K_MIXES[qtype][1]
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return T.Q8_0 if n_in % gguf.GGML_QUANT_SIZES[default][0] else T.Q6_K
    if qtype in ("q4_k_m", "q5_k_m") and (".attn_v." in name or ".ffn_down" in name):
        layer = int(name.split(".")[1])          # blk.<layer>.attn_v.weight
        if use_more_bits(layer, n_layers):
            return T.Q6_K
    return default


FALLBACK_TYPES = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def fallback_type(ggml_type, n_in: int):
    """llama.cpp's tensor_type_fallback: a K-quant for rows that are not a whole number of 256-value
    super-blocks becomes the 32-value type of about as many bits, and F16 if even that does not fit."""
    if n_in % gguf.GGML_QUANT_SIZES[ggml_type][0] == 0:
        return ggml_type
    ggml_type = FALLBACK_TYPES[ggml_type]
    return ggml_type if n_in % gguf.GGML_QUANT_SIZES[ggml_type][0] == 0 else T.F16


def quantize_matrix(values: np.ndarray, ggml_type) -> np.ndarray:
    """A float32 matrix (rows, n) as rows of ggml_type: K-quants by llamarun.kquants, the rest by gguf."""
    values = np.ascontiguousarray(values, np.float32)
    if ggml_type.name in KQUANTIZERS:
        return kquantize(values, ggml_type.name)
    if ggml_type == T.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, ggml_type)


# ----------------------------------------------------------------------------------------------
# quantized in memory at load (llamarun.load(path, quantize=TYPE), --quantize TYPE)

LOAD_TYPES = ("q8_0", "q4_0", "q4_1")      # quantize= at load: the quick ones (gguf's quantizers)
QUANTIZE_ROWS = 4096                        # rows widened to float32 at a time: bounded memory


def quantize_weights(config, weights: dict, qtype: str) -> dict:
    """`weights` with every matrix (the embedding and the classifier included) quantized to `qtype` in
    memory, as `llamarun quantize` writes a file of that type (one type for every matrix), a block of
    rows at a time so that a bf16 embedding table is never widened whole; norms stay float32. What
    llama.cpp needs a separate step and a second file for."""
    from .model import LAYER_WEIGHTS
    from .tensors import GGMLTensor
    qtype = str(qtype).lower()
    if qtype not in LOAD_TYPES:
        raise LlamarunError(f"cannot quantize to {qtype!r} at load: choose one of {', '.join(LOAD_TYPES)} "
                            "(or write a file of another type with `llamarun quantize`)")
    ggml_type = T[qtype.upper()]
    block_size = gguf.GGML_QUANT_SIZES[ggml_type][0]
    if config.dim % block_size or config.hidden_dim % block_size:
        raise LlamarunError(f"cannot quantize this model to {qtype} at load: its rows ({config.dim} and "
                            f"{config.hidden_dim} values) are not whole {ggml_type.name} blocks of {block_size}")
    made: dict[int, object] = {}

    def one(name, tensor):
        if getattr(tensor, "ndim", 2) != 2 or getattr(tensor, "qtype", None) == ggml_type:
            return tensor
        if id(tensor) not in made:      # (the tensor is kept with its copy: its id is never reused meanwhile)
            rows = tensor.shape[0]
            raw = None
            for start in range(0, rows, QUANTIZE_ROWS):
                stop = min(start + QUANTIZE_ROWS, rows)
                values = tensor[start:stop] if isinstance(tensor, np.ndarray) else tensor.rows(np.arange(start, stop))
                block = quantize_matrix(values, ggml_type).view(np.uint8).reshape(stop - start, -1)
                if raw is None:
                    raw = np.empty((rows, block.shape[1]), np.uint8)
                raw[start:stop] = block
            made[id(tensor)] = (tensor, GGMLTensor(name, ggml_type, tuple(tensor.shape), raw))
        return made[id(tensor)][1]

    out = {}
    for name, value in weights.items():
        if name in LAYER_WEIGHTS:
            out[name] = [one(name, t) for t in value]
        else:
            out[name] = one(name, value)
    return out


def weights_nbytes(weights: dict) -> int:
    """Bytes of the tensors (a shared classifier once)."""
    seen, total = set(), 0
    for value in weights.values():
        for t in value if isinstance(value, list) else [value]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
    return total


def _tensor_bytes(t: _TensorPlan) -> np.ndarray:
    """The data written for one tensor of the plan."""
    if t.ggml_type == T.F32:
        return np.ascontiguousarray(t.tensor, np.float32)
    if getattr(t.tensor, "qtype", None) == t.ggml_type:
        return np.ascontiguousarray(t.tensor.raw)       # already that type: copied, as llama.cpp does
    values = t.tensor if isinstance(t.tensor, np.ndarray) else t.tensor.dequantize()
    return quantize_matrix(values, t.ggml_type)


def _write_gguf(source: _GGUFSource, plan: list[_TensorPlan], path: str, file_type) -> str:
    meta = source.checkpoint.metadata
    writer = gguf.GGUFWriter(path, meta["general.architecture"])

    # metadata: the input's, in its order, with the new file type
    for key, (vtype, item) in source.value_types.items():
        value = meta[key]
        if key == gguf.Keys.General.ARCHITECTURE:
            continue                              # the writer's first key already
        if key == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(value)    # the key, and the alignment the writer pads to
        elif key == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(file_type)
        elif vtype == gguf.GGUFValueType.ARRAY and not value:
            continue                              # an empty array says nothing; GGUFWriter cannot write one
        else:
            writer.add_key_value(key, value, vtype, sub_type=item)
    if gguf.Keys.General.FILE_TYPE not in meta:
        writer.add_file_type(file_type)
    if gguf.Keys.General.QUANTIZATION_VERSION not in meta:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    write_gguf_tensors(writer, [(t.name, t.tensor.shape, t.ggml_type, lambda t=t: _tensor_bytes(t)) for t in plan])
    return describe_types(plan)


def write_gguf_tensors(writer: gguf.GGUFWriter, tensors: list[tuple]) -> None:
    """Finish a GGUF file whose metadata `writer` holds: the tensor infos (sizes follow from the shapes),
    then the header, metadata and infos, then each tensor's data, one tensor at a time (a model's worth
    of converted tensors is never in memory at once), and close it. tensors: (name, shape (out, in) or
    (n,), ggml type, a function returning its data) in file order."""
    for name, shape, ggml_type, _ in tensors:
        if ggml_type in (T.F32, T.F16):
            dtype = np.dtype(np.float32 if ggml_type == T.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, dtype.itemsize * int(np.prod(shape)))
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n_out, n_in = shape
            row_bytes = n_in // block_size * type_size
            writer.add_tensor_info(name, (n_out, row_bytes), np.dtype(np.uint8), n_out * row_bytes, raw_dtype=ggml_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for *_, data in tensors:
            writer.write_tensor_data(data())
    finally:
        writer.close()


def describe_types(plan: list[_TensorPlan]) -> str:
    """'GGUF, Q4_K (96), Q6_K (17), F32 (33)': how many tensors of each type, the most frequent
    matrix type first, F32 last."""
    counts = {}
    for t in plan:
        counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
    f32 = counts.pop("F32", 0)
    parts = [f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "GGUF, " + ", ".join(parts + [f"F32 ({f32})"])


# ----------------------------------------------------------------------------------------------
# llama2.c float32 -> llama2.c version 2 (int8 groups)

def _open_llama2c_input(src: str, dst: str):
    if _input_magic(src) == b"GGUF":
        raise LlamarunError(f"{src} is a GGUF file: llama2.c output ({dst}) is written only from a float32 "
                            "llama2.c checkpoint; quantize a GGUF to a .gguf file (--type "
                            f"{' | '.join(GGUF_TYPES)})")
    checkpoint = llama2c.load(src)
    if checkpoint.version == 2:
        raise LlamarunError(f"{src} is already quantized ({checkpoint.description}): version 2 output is "
                            "written from a float32 checkpoint (legacy or version 1)")
    return checkpoint


def _check_group_size(config, group_size: int) -> None:
    if group_size <= 0 or config.dim % group_size or config.hidden_dim % group_size:
        raise LlamarunError(f"--group-size {group_size} does not divide the model's rows (dim {config.dim}, "
                            f"hidden_dim {config.hidden_dim}); pick a common divisor, e.g. "
                            f"{_largest_group(config)}")


def _largest_group(config) -> int:
    """The largest power of two up to 64 dividing both widths (export.py backs off the same way)."""
    g = DEFAULT_GROUP_SIZE
    while config.dim % g or config.hidden_dim % g:
        g //= 2
    return g


def quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """export.py's quantize_q80: per group of `group_size` consecutive values, scale = max|w| / 127
    and q = round(w / scale), in float32, ties to even (torch.round). -> (int8 q, float32 scales)

    An all-zero group gets scale 0 and zeros (export.py divides 0 by 0 there: NaN, cast to int8)."""
    groups = np.asarray(w, np.float32).reshape(-1, group_size)
    scale = np.abs(groups).max(axis=1) / np.float32(127.0)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.round(groups / safe[:, None]).astype(np.int8)
    return q.reshape(-1), scale


def _write_llama2c_v2(checkpoint, path: str, group_size: int) -> str:
    c, w = checkpoint.config, checkpoint.weights
    header = struct.pack("<Ii7iBi", llama2c.MAGIC, 2, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                         c.vocab_size, c.seq_len, int(c.shared_classifier), group_size)
    matrices = [w["tok_embeddings"]]
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        matrices += list(w[name])                 # one matrix per layer, as export.py lists them
    if not c.shared_classifier:
        matrices.append(w["output"])
    with open(path, "wb") as f:
        f.write(header.ljust(llama2c.VERSIONED_HEADER_BYTES, b"\0"))       # zero padding to 256 bytes
        for norm in (w["attention_norm"], w["ffn_norm"], w["norm"]):
            f.write(np.ascontiguousarray(norm, np.float32).tobytes())
        for matrix in matrices:
            q, scale = quantize_q80(matrix, group_size)
            f.write(q.tobytes())
            f.write(scale.astype(np.float32).tobytes())
    return f"llama2.c v2 int8 (group {group_size}), {len(matrices)} matrices"


# ----------------------------------------------------------------------------------------------
# what the quantization cost

# About 300 tokens of plain English prose (written for this purpose), scored under both models.
QUALITY_TEXT = (
    "The lighthouse stood at the end of a long stone pier, and for more than a century it had "
    "warned ships away from the rocks that lay hidden beneath the grey water of the bay. Its keeper "
    "lived in a small white cottage at the foot of the tower. Every evening, just before the sun "
    "went down, he climbed the one hundred and twelve steps to the lamp room, trimmed the wick, "
    "polished the great glass lens, and lit the flame that would turn slowly through the night. "
    "In the winter the storms came in from the west, and the waves broke so high against the pier "
    "that the spray reached the windows of the cottage. On those nights the keeper did not sleep. "
    "He sat by the stove with a pot of strong tea and listened to the wind, and every hour he went "
    "up the stairs again to make sure the light was still burning. The fishermen of the village "
    "said that they had never once seen it go dark. When the government finally decided to replace "
    "the old lamp with an electric one that needed no keeper, the people of the village wrote "
    "letters and held meetings, but nothing could change the decision. The keeper packed his books "
    "and his tea into two wooden boxes and moved to a house in town. Still, on stormy nights, his "
    "neighbours would sometimes see him standing at his window, looking out toward the sea, as if "
    "he were counting the slow turns of a light that was no longer his to tend."
)
RANDOM_IDS = 300            # the length of the pseudo-random sequence scored without a tokenizer
RANDOM_SEED = 1234
MAX_CONTEXT = 512           # perplexity chunk length (the model's context if that is shorter)


@dataclass
class Quality:
    """The quantized model against its input, on the same token ids."""
    scored_on: str              # "the built-in English text", or "pseudo-random ids (no tokenizer)"
    tokens: int                 # ids fed to both models
    ppl_before: float           # perplexity under the input model
    ppl_after: float            # ... and under the quantized one
    mean_abs_logit_error: float  # mean over every position and vocabulary entry of |after - before|
    top1_agreement: float       # fraction of positions whose most likely next token is the same
    bytes_before: int
    bytes_after: int

    def lines(self) -> list[str]:
        change = (self.ppl_after / self.ppl_before - 1) * 100
        return [
            f"size: {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
            f"({self.bytes_after / self.bytes_before:.2f}x)",
            f"quality on {self.tokens} tokens of {self.scored_on}, against the input model:",
            f"  perplexity {self.ppl_before:.3f} -> {self.ppl_after:.3f} ({change:+.2f}%)",
            f"  logits: mean |error| {self.mean_abs_logit_error:.4g}, "
            f"top-1 agreement {self.top1_agreement * 100:.1f}%",
        ]


class _RecordingModel:
    """A model that keeps the logits of every forward pass, so that perplexity() scores a text and
    the logits can be compared afterwards without running the model twice."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.logits: list[np.ndarray] = []

    def forward(self, batch, cache):
        out = self.model.forward(batch, cache)
        self.logits.append(out)
        return out

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)


def quality_ids(llama, text: str = QUALITY_TEXT) -> tuple[list[int], str]:
    """The ids to score: `text` through the model's tokenizer (the one it embeds, else one beside
    it), or a fixed pseudo-random sequence (BOS first) when it has none."""
    tokenizer = llama.tokenizer
    if tokenizer is None:
        found = find_tokenizer(llama.checkpoint.path, llama.config.vocab_size)
        tokenizer = load_tokenizer(found, vocab_size=llama.config.vocab_size) if found else None
    if tokenizer is not None:
        return tokenizer.encode(text), "the built-in English text" if text == QUALITY_TEXT else "the given text"
    rng = np.random.default_rng(RANDOM_SEED)
    ids = [first_token(None)] + rng.integers(0, llama.config.vocab_size, RANDOM_IDS - 1).tolist()
    return ids, "pseudo-random ids (no tokenizer)"


def measure_quality(src: str | os.PathLike, dst: str | os.PathLike, text: str = QUALITY_TEXT) -> Quality:
    """Score the same ids under the input model and its quantized copy (both loaded as
    `llamarun.load` loads them): perplexity, mean |logit error|, top-1 agreement, file sizes."""
    return compare_quality(load(src, exact=True), load(dst, exact=True), text, os.path.getsize(src),
                           os.path.getsize(dst))


def compare_quality(before, after, text: str = QUALITY_TEXT, bytes_before: int | None = None,
                    bytes_after: int | None = None, max_tokens: int | None = None) -> Quality:
    """measure_quality for two loaded models (Llama): the same ids (at most max_tokens of them) under
    each. Sizes default to their weights' bytes."""
    ids, scored_on = quality_ids(before, text)
    ids = ids[:max_tokens] if max_tokens else ids
    ctx = min(before.config.seq_len, MAX_CONTEXT)
    runs = []
    for llama in (before, after):
        recorder = _RecordingModel(llama.model)
        result = perplexity(recorder, ids, ctx)
        runs.append((result.ppl, np.concatenate(recorder.logits)))
    (ppl_before, logits_before), (ppl_after, logits_after) = runs
    error = np.abs(logits_after.astype(np.float64) - logits_before).mean()
    agreement = np.mean(logits_after.argmax(-1) == logits_before.argmax(-1))
    return Quality(scored_on, len(ids), ppl_before, ppl_after, float(error), float(agreement),
                   bytes_before if bytes_before is not None else weights_nbytes(before.checkpoint.weights),
                   bytes_after if bytes_after is not None else weights_nbytes(after.model.w))
