"""Fuzzing the model file readers (issue 19, point 10): whatever the bytes, opening a file gives a
checkpoint or a LlamarunError: never another exception, a hang, or more than 100 MB.

Tiny valid files (a GGUF llama of dim 8 with a small tokenizer in its metadata; llama2.c checkpoints
of each version) are mutated byte by byte, have their counts and lengths replaced by boundary
values, are truncated anywhere, or are replaced by random bytes. Bounded: a few hundred examples in
all, a few seconds (each example's deadline catches a hang; tracemalloc its memory).
"""
from __future__ import annotations

import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llamarun.api import Llama
from llamarun.errors import LlamarunError
from llamarun.formats import load_checkpoint, llama2c

from test_gguf_format import write_gguf

MB = 1 << 20
MEMORY_LIMIT = 100 * MB      # beyond the file itself (memory-mapped, so not traced)

FUZZ = settings(max_examples=100, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# dim 8, hidden 16, 1 layer, 2 heads of 4, 1 kv head, vocab 16
DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB, CONTEXT = 8, 16, 1, 2, 1, 16, 32
T, V = gguf.GGMLQuantizationType, gguf.GGUFValueType


def tiny_gguf_bytes(tmp_path) -> bytes:
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,),
              "blk.0.attn_norm.weight": (DIM,), "blk.0.ffn_norm.weight": (DIM,),
              "blk.0.attn_q.weight": (DIM, DIM), "blk.0.attn_k.weight": (KV * DIM // HEADS, DIM),
              "blk.0.attn_v.weight": (KV * DIM // HEADS, DIM), "blk.0.attn_output.weight": (DIM, DIM),
              "blk.0.ffn_gate.weight": (HIDDEN, DIM), "blk.0.ffn_down.weight": (DIM, HIDDEN),
              "blk.0.ffn_up.weight": (HIDDEN, DIM)}
    tensors = {name: (rng.standard_normal(shape).astype(np.float32), T.F32) for name, shape in shapes.items()}
    metadata = {
        "llama.block_count": LAYERS, "llama.context_length": CONTEXT, "llama.embedding_length": DIM,
        "llama.feed_forward_length": HIDDEN, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "general.name": "tiny",
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)],
        "tokenizer.ggml.scores": ([0.5] * VOCAB, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "test.nested": ([[1, 2], [3]], V.ARRAY),
    }
    path = write_gguf(tmp_path / "tiny.gguf", tensors, metadata)
    return path.read_bytes()


def tiny_llama2c_bytes(version: int) -> bytes:
    """A llama2.c checkpoint of the tiny shapes: legacy (0), float32 (1) or int8 groups of 8 (2)."""
    rng = np.random.default_rng(version)
    kv_dim = KV * DIM // HEADS
    if version == 0:
        head = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB, CONTEXT)
        floats = (VOCAB * DIM + 2 * LAYERS * DIM + LAYERS * (2 * DIM * DIM + 2 * kv_dim * DIM + 3 * HIDDEN * DIM)
                  + DIM + CONTEXT * DIM // HEADS)                    # + the two RoPE tables
        return head + rng.standard_normal(floats).astype(np.float32).tobytes()
    head = struct.pack("<Ii7iB", llama2c.MAGIC, version, DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB, CONTEXT, 1)
    norms = (2 * LAYERS + 1) * DIM
    matrices = [(1, VOCAB, DIM), (LAYERS, DIM, DIM), (LAYERS, kv_dim, DIM), (LAYERS, kv_dim, DIM),
                (LAYERS, DIM, DIM), (LAYERS, HIDDEN, DIM), (LAYERS, DIM, HIDDEN), (LAYERS, HIDDEN, DIM)]
    values = sum(n * rows * cols for n, rows, cols in matrices)
    if version == 1:
        body = rng.standard_normal(norms + values).astype(np.float32).tobytes()
        return head.ljust(llama2c.VERSIONED_HEADER_BYTES, b"\0") + body
    group = 8
    head += struct.pack("<i", group)
    body = rng.standard_normal(norms).astype(np.float32).tobytes() + bytes(values + 4 * values // group)
    return head.ljust(llama2c.VERSIONED_HEADER_BYTES, b"\0") + body


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_gguf(folder) -> bytes:
    data = tiny_gguf_bytes(folder)
    assert load_checkpoint(write(folder, "check.gguf", data)).config.dim == DIM     # the seed is valid
    return data


@pytest.fixture(scope="module")
def valid_llama2c(folder) -> list[bytes]:
    files = [tiny_llama2c_bytes(version) for version in (0, 1, 2)]
    for version, data in enumerate(files):                                          # the seeds are valid
        assert load_checkpoint(write(folder, f"check{version}.bin", data)).config.dim == DIM
    return files


def write(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


def opens_or_refuses(path) -> None:
    """The property: a model (without its tokenizer: tokenizers are not fuzzed here) or a LlamarunError,
    within the memory limit. Any other exception fails the example; hypothesis's deadline catches a hang."""
    tracemalloc.start()
    try:
        Llama(load_checkpoint(path))        # the model as a load makes it: its context, RoPE tables, plan
    except LlamarunError as e:
        assert "\n" not in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak / MB:.0f} MB to open {path.stat().st_size} bytes"


# counts, lengths and sizes where readers go wrong: zero, one, the edges of 32 and 64 bits, the bound
BOUNDARY = st.sampled_from([0, 1, 2, 7, 255, 2**16, 2**24, 2**24 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                            2**62, 2**63 - 1, 2**63, 2**64 - 1])


def header_end(data: bytes) -> int:
    """Where the tiny GGUF's header ends (its first tensor's data): mutations aim there."""
    return data.index(b"blk.0.ffn_up.weight") + 64


def integer_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every integer of a valid GGUF header: version, counts, string
    lengths, value types, scalar values, array item types and counts, dims, tensor types and offsets.
    (A walk of our own, so that the fuzzing aims at fields rather than at random bytes.)"""
    fields, at = [(4, "<I"), (8, "<Q"), (16, "<Q")], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string():
        nonlocal at
        fields.append((at, "<Q"))
        at += 8 + struct.unpack_from("<Q", data, at)[0]

    def value(vtype):
        nonlocal at
        if vtype == V.STRING:
            return string()
        if vtype == V.ARRAY:
            fields.extend([(at, "<I"), (at + 4, "<Q")])
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            for _ in range(count):
                value(item)
            return
        size = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
                V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}[vtype]
        if vtype not in (V.FLOAT32, V.FLOAT64, V.BOOL):
            fields.append((at, {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]))
        at += size

    for _ in range(n_kv):
        string()
        fields.append((at, "<I"))
        (vtype,) = struct.unpack_from("<I", data, at)
        at += 4
        value(vtype)
    for _ in range(n_tensors):
        string()
        fields.append((at, "<I"))
        (n_dims,) = struct.unpack_from("<I", data, at)
        fields.extend((at + 4 + 8 * i, "<Q") for i in range(n_dims))
        at += 4 + 8 * n_dims
        fields.extend([(at, "<I"), (at + 4, "<Q")])
        at += 12
    return fields


@FUZZ
@given(st.data())
def test_gguf_with_flipped_bytes(folder, valid_gguf, data):
    buf = bytearray(valid_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, header_end(valid_gguf)))
        buf[at] = data.draw(st.integers(0, 255))
    opens_or_refuses(write(folder, "flipped.gguf", bytes(buf)))


@FUZZ
@given(st.data())
def test_gguf_with_boundary_values(folder, valid_gguf, data):
    """Integers of the header (counts, lengths, types, values such as llama.context_length or
    llama.block_count, dims, offsets) set to edge values or random ones."""
    buf = bytearray(valid_gguf)
    fields = integer_fields(valid_gguf)
    for _ in range(data.draw(st.integers(1, 3))):
        at, fmt = data.draw(st.sampled_from(fields))
        bits = 8 * struct.calcsize(fmt)
        value = data.draw(st.one_of(BOUNDARY, st.integers(0, 2**bits - 1))) & (2**bits - 1)
        struct.pack_into(fmt, buf, at, value)
    opens_or_refuses(write(folder, "boundary.gguf", bytes(buf)))


def set_value(data: bytes, key: str, value: int, fmt: str = "<I") -> bytes:
    """The tiny GGUF with the scalar value of metadata `key` replaced (its type field left as it is)."""
    buf = bytearray(data)
    at = data.index(key.encode()) + len(key) + 4                 # past the key and its value type
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


def set_dims(data: bytes, tensor: str, dims: tuple[int, int]) -> bytes:
    buf = bytearray(data)
    at = data.index(tensor.encode()) + len(tensor) + 4            # past the name and n_dims
    struct.pack_into("<QQ", buf, at, *dims)
    return bytes(buf)


def nested_arrays(depth: int) -> bytes:
    """A GGUF header whose one metadata value is an array of an array of ... `depth` deep."""
    key = b"test.deep"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", V.ARRAY)
    return head + struct.pack("<IQ", V.ARRAY, 1) * depth + struct.pack("<IQ", V.UINT32, 0)


# Cases the fuzzing above may or may not draw in a given run, each of which broke the readers once:
# the header's context or layer count sized memory before anything checked them (16.9 GB, then a
# numpy traceback), a deep nest of arrays recursed past Python's limit, a zero dim beside a huge
# one made numpy refuse the shape with a ValueError.
KNOWN_HOSTILE = {
    "context_length 2^32-1": lambda d: set_value(d, "llama.context_length", 2**32 - 1),
    "context_length 10^7": lambda d: set_value(d, "llama.context_length", 10**7),
    "block_count 2^32-1": lambda d: set_value(d, "llama.block_count", 2**32 - 1),
    "arrays nested 5000 deep": lambda d: nested_arrays(5000),
    "dims (2^64-1, 0)": lambda d: set_dims(d, "blk.0.ffn_up.weight", (2**64 - 1, 0)),
    "dims (0, 2^64-1)": lambda d: set_dims(d, "blk.0.ffn_up.weight", (0, 2**64 - 1)),
}


@pytest.mark.parametrize("case", KNOWN_HOSTILE)
def test_known_hostile_headers(folder, valid_gguf, case):
    opens_or_refuses(write(folder, "hostile.gguf", KNOWN_HOSTILE[case](valid_gguf)))


def test_the_field_walk_finds_every_field(valid_gguf):
    """The walk above ends where the reader's header ends (so it saw every field)."""
    from llamarun.formats.gguf import parse_header
    fields = integer_fields(valid_gguf)
    header = parse_header(valid_gguf)
    last_offset = max(at for at, _ in fields)
    assert last_offset + 8 <= header.data_start <= last_offset + 8 + header.alignment
    assert len(fields) > 60


@FUZZ
@given(st.data())
def test_gguf_truncated_anywhere(folder, valid_gguf, data):
    keep = data.draw(st.integers(0, len(valid_gguf) - 1))
    opens_or_refuses(write(folder, "cut.gguf", valid_gguf[:keep]))


@FUZZ
@given(body=st.binary(max_size=2048), version=st.sampled_from([2, 3]), name=st.sampled_from(["r.gguf", "r.bin", "r"]))
def test_random_bytes(folder, body, version, name):
    """Random bytes after the GGUF magic and a version, and random bytes alone (named .gguf or not)."""
    opens_or_refuses(write(folder, name, b"GGUF" + struct.pack("<I", version) + body))
    opens_or_refuses(write(folder, name, body))


@FUZZ
@given(st.data())
def test_llama2c_with_mutated_headers(folder, valid_llama2c, data):
    """Any field of a legacy, v1 or v2 header set to an edge value or a random int, or cut short."""
    version = data.draw(st.sampled_from([0, 1, 2]))
    buf = bytearray(valid_llama2c[version])
    fields = 7 if version == 0 else 11                # v1/v2: magic, version, 7 ints, shared flag, group
    for _ in range(data.draw(st.integers(1, 3))):
        at = 4 * data.draw(st.integers(0, fields - 1)) if version == 0 else data.draw(st.integers(0, 40))
        value = data.draw(st.one_of(BOUNDARY, st.integers(-2**31, 2**32 - 1))) & 0xFFFFFFFF
        struct.pack_into("<I", buf, at, value)
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    opens_or_refuses(write(folder, f"mutated{version}.bin", bytes(buf)))
