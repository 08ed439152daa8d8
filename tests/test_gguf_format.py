"""GGUF model files: our reader against the `gguf` package's GGUFReader and dequantizers.

The real SmolLM2 file (Q4_1 matrices, a Q8_0 embedding, float32 norms) is compared with GGUFReader
key by key and tensor by tensor; every other supported type is checked on small synthetic files
written with gguf's GGUFWriter; malformed and unsupported files must raise LlamarunError naming
the file and the problem.
"""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from llamarun.errors import LlamarunError
from llamarun.formats import load_checkpoint
from llamarun.formats.gguf import (GGUFCheckpoint, LAYER_NAMES,
                                   load, parse_header)
from llamarun.tensors import DEQUANTIZERS, GGMLTensor

T = gguf.GGMLQuantizationType
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bits(a: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns: equal means bit for bit (-0.0 and NaNs included)."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def llamarun_tensor(weights: dict, gguf_name: str):
    """weights[...] for a llama.cpp tensor name ('blk.3.attn_q.weight' -> weights['wq'][3])."""
    globals_ = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
    if gguf_name in globals_:
        return weights[globals_[gguf_name]]
    _, layer, kind, _ = gguf_name.split(".")
    return weights[LAYER_NAMES[kind]][int(layer)]


# ------------------------------------------------------------------------------------------------
# SmolLM2: the real file against GGUFReader


@pytest.fixture(scope="module")
def reader(smol_path):
    return gguf.GGUFReader(str(smol_path))        # seconds to open: once per module


@pytest.fixture(scope="module")
def smol(smol_path) -> GGUFCheckpoint:
    return load_checkpoint(smol_path)


def test_smol_config(smol):
    c = smol.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads) == (576, 1536, 30, 9, 3)
    assert (c.vocab_size, c.seq_len, c.shared_classifier) == (49152, 8192, True)
    assert c.rope_theta == 100000.0
    assert c.norm_eps == float(np.float32(1e-5))           # stored as float32
    assert smol.version == 3
    assert smol.description == "GGUF v3 llama, Q4_1 (210), Q8_0 (1), F32 (61)"


def test_smol_metadata_equals_gguf_reader(smol, reader):
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert list(smol.metadata) == list(expected)            # same keys, same order
    for key, value in expected.items():
        assert smol.metadata[key] == value, key
        assert type(smol.metadata[key]) is type(value), key
    assert len(smol.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in smol.metadata["tokenizer.chat_template"]


def test_smol_tensors_equal_gguf_reader(smol, reader):
    assert len(reader.tensors) == 272
    for t in reader.tensors:
        ours = llamarun_tensor(smol.weights, t.name)
        assert tuple(ours.shape) == tuple(reversed(t.shape.tolist())), t.name
        if t.tensor_type == T.F32:
            assert isinstance(ours, np.ndarray) and ours.dtype == np.float32, t.name
            assert np.array_equal(bits(ours), bits(t.data)), t.name
        else:
            assert isinstance(ours, GGMLTensor), t.name
            assert ours.ggml_type == t.tensor_type.name, t.name
            assert ours.nbytes == t.n_bytes, t.name
            assert np.array_equal(ours.raw, t.data), t.name
    assert smol.weights["output"] is smol.weights["tok_embeddings"]      # no output.weight: shared


@pytest.mark.parametrize("layer", [0, 17, 29])
def test_smol_dequantize_bit_exact(smol, reader, layer):
    data = {t.name: t for t in reader.tensors}
    for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"):
        t = data[f"blk.{layer}.{kind}.weight"]
        ours = llamarun_tensor(smol.weights, t.name).dequantize()
        assert ours.dtype == np.float32 and ours.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(bits(ours), bits(gguf.quants.dequantize(t.data, t.tensor_type))), t.name


def test_smol_embedding_q8_0(smol, reader):
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert t.tensor_type == T.Q8_0
    table = smol.weights["tok_embeddings"]
    full = table.dequantize()                                            # (49152, 576)
    assert np.array_equal(bits(full), bits(gguf.quants.dequantize(t.data, T.Q8_0)))
    ids = np.array([0, 1, 2, 49151, 1000, 1000, 12345])                 # repeats allowed, any order
    assert np.array_equal(bits(table.rows(ids)), bits(full[ids]))
    assert np.array_equal(bits(table.rows([7])), bits(full[7:8]))
    assert table.rows([]).shape == (0, 576)


def test_smol_rows_and_linear_of_a_q4_1_matrix(smol):
    w = smol.weights["w2"][5]                                            # (576, 1536) Q4_1
    full = w.dequantize()
    ids = np.array([575, 0, 300])
    assert np.array_equal(bits(w.rows(ids)), bits(full[ids]))
    x = np.random.default_rng(0).standard_normal((3, 1536)).astype(np.float32)
    # the kernel's weights are gguf's to the bit; only its float32 sum runs in another order than
    # BLAS's: within the bound of any order, 1536 * 2^-24 * sum |x w| (tests/test_kernels.py)
    assert np.all(np.abs(w.linear(x) - x @ full.T) <= 1536 * 2.0 ** -24 * (np.abs(x) @ np.abs(full).T))


def test_smol_tensors_are_views_of_the_memory_map(smol):
    whole = np.frombuffer(smol._mapping, np.uint8)
    tensors = [smol.weights["tok_embeddings"], smol.weights["norm"]]
    tensors += [smol.weights[name][layer] for name in LAYER_NAMES.values() for layer in (0, 29)]
    for t in tensors:
        array = t.raw if isinstance(t, GGMLTensor) else t
        assert np.shares_memory(array, whole)
        assert not array.flags.writeable and not array.flags.owndata


def test_open_reads_only_the_header(smol_path):
    """Opening maps the file and reads its header (1.8 MB here); the weights stay on disk until used."""
    before = _file_rss_kb()
    if before is None:
        pytest.skip("no /proc/self/status here")
    ckpt = load(smol_path)
    assert _file_rss_kb() - before < 10_000 < len(ckpt._mapping) // 1024


def _file_rss_kb() -> int | None:
    """Kilobytes of memory-mapped files resident in this process (Linux's RssFile)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssFile:")), None)


# ------------------------------------------------------------------------------------------------
# synthetic files: every supported type


DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, CONTEXT = 256, 512, 2, 4, 2, 64, 128
HEAD_DIM = DIM // HEADS

# Where each block format keeps its float16 scales (ggml-common.h): random blocks set these to small
# finite values and fill every other byte (the packed quants, the 6-bit sub-scales) at random.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16)   # gguf.quants.quantize implements these


def random_blocks(rng, shape: tuple[int, int], qtype) -> np.ndarray:
    """Valid random (rows, bytes_per_row) uint8 data of a (rows, cols) tensor in a block format."""
    rows, cols = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.1, 0.1, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def tensor_bytes(rng, shape: tuple[int, int], qtype, quantize: bool) -> np.ndarray:
    """The stored form of a random (rows, cols) float tensor: float32/float16 values or block bytes."""
    if qtype == T.F32:
        return rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F16:
        return rng.standard_normal(shape).astype(np.float16)
    if qtype in QUANTIZABLE and (quantize or qtype == T.BF16):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    return random_blocks(rng, shape, qtype)


def model_shapes(untied: bool = False, kv_heads: int = KV_HEADS) -> dict:
    """llama.cpp tensor name -> (out_features, in_features) or (n,) of the synthetic model."""
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,)}
    if untied:
        shapes["output.weight"] = (VOCAB, DIM)
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
            f"blk.{i}.attn_q.weight": (DIM, DIM), f"blk.{i}.attn_k.weight": (kv_heads * HEAD_DIM, DIM),
            f"blk.{i}.attn_v.weight": (kv_heads * HEAD_DIM, DIM), f"blk.{i}.attn_output.weight": (DIM, DIM),
            f"blk.{i}.ffn_gate.weight": (HIDDEN, DIM), f"blk.{i}.ffn_down.weight": (DIM, HIDDEN),
            f"blk.{i}.ffn_up.weight": (HIDDEN, DIM),
        })
    return shapes


def llama_metadata() -> dict:
    return {
        "llama.block_count": LAYERS, "llama.context_length": CONTEXT, "llama.embedding_length": DIM,
        "llama.feed_forward_length": HIDDEN, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS, "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-6, "llama.vocab_size": VOCAB,
    }


def write_gguf(path: Path, tensors: dict, metadata: dict | None = None, arch: str = "llama",
               alignment: int | None = None) -> Path:
    """A GGUF file of `tensors` (name -> (stored array, ggml type)) and `metadata` (key -> value;
    ints as uint32, floats as float32, or (value, GGUFValueType[, sub type]))."""
    writer = gguf.GGUFWriter(str(path), arch)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value in (metadata or {}).items():
        if isinstance(value, tuple):
            writer.add_key_value(key, *value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (data, qtype) in tensors.items():
        raw_dtype = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model(path: Path, qtype=T.F32, quantize: bool = False, untied: bool = False, seed: int = 0,
                metadata: dict | None = None, drop: tuple = (), types: dict | None = None,
                kv_heads: int = KV_HEADS, **kw) -> dict:
    """A small llama model with its matrices in `qtype` and float32 norms; returns what was stored."""
    rng = np.random.default_rng(seed)
    stored = {}
    for name, shape in model_shapes(untied, kv_heads).items():
        if name in drop:
            continue
        t = (types or {}).get(name, qtype if len(shape) == 2 else T.F32)
        stored[name] = (tensor_bytes(rng, shape, t, quantize) if len(shape) == 2
                        else rng.standard_normal(shape).astype(np.float32), t)
    meta = {**llama_metadata(), **(metadata or {})}
    write_gguf(path, stored, {k: v for k, v in meta.items() if v is not None}, **kw)
    return stored


def check_model(path: Path, stored: dict) -> GGUFCheckpoint:
    """Load `path` and compare every tensor with what was stored, through gguf's dequantizer."""
    ckpt = load_checkpoint(path)
    for name, (data, qtype) in stored.items():
        ours = llamarun_tensor(ckpt.weights, name)
        expected = gguf.quants.dequantize(data.view(np.uint8) if qtype != T.F32 else data, qtype)
        if qtype == T.F32:
            assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
            assert np.array_equal(bits(ours), bits(expected)), name
            continue
        assert isinstance(ours, GGMLTensor) and ours.ggml_type == qtype.name, name
        assert ours.shape == data.shape[:1] + (expected.shape[-1],), name
        assert np.array_equal(ours.raw, data.view(np.uint8)), name
        assert np.array_equal(bits(ours.dequantize()), bits(expected.reshape(ours.shape))), name
    return ckpt


MATRIX_TYPES = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", MATRIX_TYPES, ids=lambda t: t.name)
def test_every_type_dequantizes_as_gguf(tmp_path, qtype):
    stored = write_model(tmp_path / "m.gguf", qtype, quantize=qtype in QUANTIZABLE)
    ckpt = check_model(tmp_path / "m.gguf", stored)
    table = ckpt.weights["tok_embeddings"]
    ids = np.array([3, 0, 63, 3])
    assert np.array_equal(bits(table.rows(ids)), bits(table.dequantize()[ids]))
    assert ckpt.description == f"GGUF v3 llama, {qtype.name} ({1 + 7 * LAYERS}), F32 ({1 + 2 * LAYERS})"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_our_dequantizers_on_random_blocks(qtype):
    """Every bit pattern of the quants (not only those a quantizer writes), against gguf's."""
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(rng, (96, 1536), qtype)
    ours = DEQUANTIZERS[qtype](raw)
    assert ours.shape == (96, 1536)
    assert np.array_equal(bits(ours), bits(gguf.quants.dequantize(raw, qtype)))


def test_mixed_types_and_untied_classifier(tmp_path):
    types = {"token_embd.weight": T.Q8_0, "output.weight": T.Q6_K, "blk.1.ffn_down.weight": T.Q4_K}
    stored = write_model(tmp_path / "m.gguf", T.Q4_1, quantize=True, untied=True, types=types)
    ckpt = check_model(tmp_path / "m.gguf", stored)
    assert not ckpt.config.shared_classifier
    assert ckpt.weights["output"].ggml_type == "Q6_K"
    assert ckpt.description == "GGUF v3 llama, Q4_1 (13), Q4_K (1), Q6_K (1), Q8_0 (1), F32 (5)"


def test_float32_model_is_plain_numpy(tmp_path):
    stored = write_model(tmp_path / "m.gguf", T.F32)
    ckpt = check_model(tmp_path / "m.gguf", stored)
    assert all(isinstance(w, np.ndarray) for w in ckpt.weights["wq"])
    assert ckpt.weights["wk"][1].shape == (KV_HEADS * HEAD_DIM, DIM)


def test_synthetic_config_and_defaults(tmp_path):
    write_model(tmp_path / "a.gguf")
    c = load(tmp_path / "a.gguf").config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads) == (DIM, HIDDEN, LAYERS, HEADS, KV_HEADS)
    assert (c.vocab_size, c.seq_len, c.rope_theta) == (VOCAB, CONTEXT, 500000.0)
    assert c.norm_eps == float(np.float32(1e-6))
    # optional keys: kv heads default to heads, theta to 10000, the vocabulary to the token list
    tokens = [f"t{i}" for i in range(VOCAB)]
    write_model(tmp_path / "b.gguf", kv_heads=HEADS, metadata={"llama.attention.head_count_kv": None, "llama.rope.freq_base": None,
                                               "llama.vocab_size": None, "tokenizer.ggml.tokens": tokens})
    c = load(tmp_path / "b.gguf").config
    assert (c.n_kv_heads, c.rope_theta, c.vocab_size) == (HEADS, 10000.0, VOCAB)


def test_every_metadata_value_type(tmp_path):
    V = gguf.GGUFValueType
    metadata = {
        "general.name": "x\u00e9\u4e2d",
        "test.u8": (200, V.UINT8), "test.i8": (-100, V.INT8), "test.u16": (60000, V.UINT16),
        "test.i16": (-30000, V.INT16), "test.u32": (4_000_000_000, V.UINT32), "test.i32": (-2_000_000_000, V.INT32),
        "test.u64": (2**63 + 5, V.UINT64), "test.i64": (-(2**62), V.INT64), "test.f32": (0.1, V.FLOAT32),
        "test.f64": (0.1, V.FLOAT64), "test.bool": (True, V.BOOL), "test.false": (False, V.BOOL),
        "test.empty_string": ("", V.STRING),
        "test.u8s": ([1, 2, 255], V.ARRAY, V.UINT8), "test.i64s": ([-1, 2**40], V.ARRAY, V.INT64),
        "test.f32s": ([0.5, -1e-3], V.ARRAY, V.FLOAT32), "test.bools": ([True, False], V.ARRAY, V.BOOL),
        "test.strings": (["a", "", "\u00fc\U0001F600"], V.ARRAY, V.STRING),
    }
    write_model(tmp_path / "m.gguf", metadata=metadata)
    ours = load(tmp_path / "m.gguf").metadata
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key in metadata:
        expected = reader.fields[key].contents()
        assert ours[key] == expected and type(ours[key]) is type(expected), key
    assert ours["test.f32"] == float(np.float32(0.1)) and ours["test.f64"] == 0.1
    assert ours["test.u64"] == 2**63 + 5


def test_nested_array_metadata(tmp_path):
    V = gguf.GGUFValueType
    write_model(tmp_path / "m.gguf", metadata={"test.nested": ([[1, 2], [3]], V.ARRAY)})
    assert load(tmp_path / "m.gguf").metadata["test.nested"] == [[1, 2], [3]]


def test_custom_alignment(tmp_path):
    path = tmp_path / "m.gguf"
    stored = write_model(path, T.Q4_0, quantize=True, alignment=256)
    header = parse_header(path.read_bytes())
    assert header.alignment == 256 and header.data_start % 256 == 0
    assert all(info.offset % 256 == 0 for info in header.tensors.values())
    check_model(path, stored)


# ------------------------------------------------------------------------------------------------
# errors: one LlamarunError naming the file and the problem


def error_of(path: Path) -> str:
    with pytest.raises(LlamarunError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_magic(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUX"
    path.write_bytes(bytes(data))
    assert "magic" in error_of(path)


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tmp_path, version):
    path = tmp_path / "m.gguf"
    write_model(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    message = error_of(path)
    assert f"version {version}" in message and "2 and 3" in message


def test_big_endian_file(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack(">I", 3)
    path.write_bytes(bytes(data))
    assert "big-endian" in error_of(path)


@pytest.mark.parametrize("keep", [10, 30, 200, 2000])
def test_truncated_header(tmp_path, keep):
    path = tmp_path / "m.gguf"
    write_model(path)
    path.write_bytes(path.read_bytes()[:keep])
    assert "truncated" in error_of(path)


@pytest.mark.parametrize("patch", ["value type", "utf-8"])
def test_malformed_metadata(tmp_path, patch):
    path = tmp_path / "m.gguf"
    write_model(path, metadata={"general.name": "abc"})
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    if patch == "value type":
        at = data.index(key) + len(key)
        data[at:at + 4] = struct.pack("<I", 99)
    else:
        data[data.index(b"abc")] = 0xFF
    path.write_bytes(bytes(data))
    message = error_of(path)
    assert ("llama.block_count" in message and "type 99" in message) if patch == "value type" else "UTF-8" in message


def test_truncated_tensor_data(tmp_path):
    path = tmp_path / "m.gguf"
    stored = write_model(path, T.Q4_1, quantize=True)
    path.write_bytes(path.read_bytes()[:-100])
    message = error_of(path)
    last = list(stored)[-1]
    assert "truncated" in message and last in message


def test_truncated_through_load_checkpoint(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LlamarunError, match="truncated"):
        load_checkpoint(path)


def test_other_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, arch="gpt2")
    message = error_of(path)
    assert "'gpt2'" in message and "llama" in message


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_unsupported_tensor_type(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    rng = np.random.default_rng(0)
    stored = write_model(path)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    stored["blk.1.ffn_up.weight"] = (rng.integers(0, 256, (HIDDEN, DIM // block_size * type_size), np.uint8), qtype)
    write_gguf(path, stored, llama_metadata())
    message = error_of(path)
    assert "blk.1.ffn_up.weight" in message and qtype.name in message


def test_unknown_tensor_type_id(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_k.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8         # past the name, n_dims and two dims
    assert struct.unpack_from("<I", data, at)[0] == T.F32
    data[at:at + 4] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    message = error_of(path)
    assert "blk.0.attn_k.weight" in message and "type 99" in message


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                                 "llama.attention.head_count", "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon"])
def test_missing_metadata(tmp_path, key):
    path = tmp_path / "m.gguf"
    write_model(path, metadata={key: None})
    assert key in error_of(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, drop=("blk.1.attn_v.weight",))
    assert "blk.1.attn_v.weight" in error_of(path)


def test_missing_embedding(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, drop=("token_embd.weight",), metadata={"tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]})
    assert "token_embd.weight" in error_of(path)


def test_wrong_shape(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, metadata={"llama.feed_forward_length": HIDDEN // 2})
    message = error_of(path)
    assert "ffn_" in message and str((HIDDEN // 2, DIM)) in message


def test_unknown_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    stored = write_model(path)
    stored["blk.0.attn_q.bias"] = (np.ones(DIM, np.float32), T.F32)       # a variant with biases
    write_gguf(path, stored, llama_metadata())
    assert "blk.0.attn_q.bias" in error_of(path)


def test_rope_freqs_of_the_wrong_shape(tmp_path):
    """Llama 3.1's rope_freqs is read (tests/test_gguf_rope_freqs.py); one that is not head_dim / 2
    positive float32 values is refused."""
    path = tmp_path / "m.gguf"
    stored = write_model(path)
    stored["rope_freqs.weight"] = (np.ones(HEAD_DIM, np.float32), T.F32)
    write_gguf(path, stored, llama_metadata())
    assert "rope_freqs.weight" in error_of(path)
    stored["rope_freqs.weight"] = (np.zeros(HEAD_DIM // 2, np.float32), T.F32)
    write_gguf(path, stored, llama_metadata())
    assert "not a positive number" in error_of(path)


def test_unsupported_llama_variants(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, metadata={"llama.expert_count": 8})
    assert "experts" in error_of(path)
    write_model(path, metadata={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    assert "RoPE scaling 'yarn'" in error_of(path)
    write_model(path, metadata={"llama.rope.dimension_count": HEAD_DIM // 2})
    assert "llama.rope.dimension_count" in error_of(path)
