"""Hostile and damaged model files (issue 19, points 4 and 8): memory follows the context used, not
the header; a file that is not what it claims says what was expected; a cached model changed in
place is refused.

Each test writes its own small file in tmp_path (from tests/fixtures-like synthetic GGUF models, or
the tiny llama2.c checkpoints in ../shared with a patched header).
"""
from __future__ import annotations

import hashlib
import resource
import struct
import time
import tracemalloc

import numpy as np
import pytest

import llamarun
from llamarun import hub
from llamarun.cli import main
from llamarun.config import DEFAULT_CONTEXT_LIMIT, ModelConfig
from llamarun.errors import LlamarunError
from llamarun.formats import MAX_HEADER_VALUE, load_checkpoint
from llamarun.model import KVCache

from conftest import MODELS, require
from test_gguf_format import CONTEXT, VOCAB, write_model

MB = 1 << 20


def patched(tmp_path, source: str, name: str, at: int, fmt: str, value) -> str:
    """A copy of shared/models/source with struct `fmt` at byte `at` set to value."""
    data = bytearray(require(MODELS / source).read_bytes())
    struct.pack_into(fmt, data, at, value)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return str(path)


def seq_len_at(version_header: bool) -> int:
    """Byte offset of seq_len in a llama2.c header (the 7th int, after the magic and version if any)."""
    return (8 if version_header else 0) + 6 * 4


# ----------------------------------------------------------------------------------------------
# point 4: the context a model runs with

@pytest.fixture(scope="module")
def huge_context_gguf(tmp_path_factory):
    """A small float32 GGUF llama whose header claims llama.context_length = 2^32 - 1."""
    path = tmp_path_factory.mktemp("hostile") / "huge_ctx.gguf"
    write_model(path, metadata={"llama.context_length": 2**32 - 1})
    return path


def test_huge_gguf_context_costs_nothing_until_used(huge_context_gguf):
    tracemalloc.start()
    try:
        start = time.perf_counter()
        llama = llamarun.load(huge_context_gguf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5
    assert peak < 100 * MB                                  # was 16.9 GB, then a traceback in rope_tables
    assert llama.checkpoint.config.seq_len == 2**32 - 1     # the file's claim is kept, as the trained context
    assert llama.config.seq_len == DEFAULT_CONTEXT_LIMIT    # the context used
    assert len(llama.model.rope_cos) <= DEFAULT_CONTEXT_LIMIT
    logits = llama.logits([1, 2, 3])
    assert logits.shape == (3, VOCAB) and np.isfinite(logits).all()


def test_n_ctx_sets_the_context_every_check_uses(huge_context_gguf):
    llama = llamarun.load(huge_context_gguf, n_ctx=16)
    assert llama.config.seq_len == 16
    assert llama.model.new_cache().seq_len == 16
    with pytest.raises(LlamarunError, match="context"):
        llama.generate(list(range(1, 18)), max_tokens=1)       # 17 prompt tokens, a context of 16
    with pytest.raises(LlamarunError, match="context of 16"):
        llama.logits(list(range(1, 18)))
    from llamarun.chat import ChatSession
    session = ChatSession.__new__(ChatSession)                  # only its cache is asked here
    session.cache = llama.model.new_cache()
    assert session.context == 16


def test_a_positions_rope_rows_do_not_depend_on_the_tables_length(huge_context_gguf):
    from llamarun.model import rope_tables
    llama = llamarun.load(huge_context_gguf, n_ctx=4096)
    short = len(llama.model.rope_cos)
    pos = np.array([0, 5, short + 100, 4095])
    cos, sin = llama.model.rope_rows(pos)                       # grows the tables to cover 4095
    full_cos, full_sin = rope_tables(llama.config)
    assert len(llama.model.rope_cos) == 4096
    assert np.array_equal(cos, full_cos[pos]) and np.array_equal(sin, full_sin[pos])


@pytest.mark.parametrize("n_ctx, words", [(0, "positive"), (-5, "positive"), ("12", "positive"),
                                          (CONTEXT + 1, f"exceeds the model's {CONTEXT}")])
def test_bad_n_ctx_is_one_line(tmp_path, n_ctx, words):
    path = tmp_path / "m.gguf"
    write_model(path)
    with pytest.raises(LlamarunError, match=words):
        llamarun.load(path, n_ctx=n_ctx)


def test_huge_llama2c_seq_len_is_harmless(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for seq_len in (2**31 - 1, 10**7):
        path = patched(tmp_path, "tiny_q8.v1.bin", "big.bin", seq_len_at(True), "<i", seq_len)
        llama = llamarun.load(path)
        assert llama.config.seq_len == DEFAULT_CONTEXT_LIMIT
        assert len(llama.generate([1], max_tokens=3, temperature=0).tokens) == 3
    # was 8.5 GB (2^31 - 1) and 2 GB (10^7); ru_maxrss is in KB on Linux
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_cli_ctx_caps_the_context(tmp_path, capsys):
    path = str(require(MODELS / "tiny_q8.v1.bin"))
    assert main(["generate", "-m", path, "--ids", "-n", "40", "--ctx", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "context full: 8 tokens" in captured.err
    assert len(eval(captured.out)) == 9                         # 8 in the cache, and the last one drawn
    assert main(["run", path, "--ids", "-n", "0", "--ctx", "5"]) == 0
    assert len(eval(capsys.readouterr().out.splitlines()[0])) == 6   # run.c's steps clamp at the context
    assert main(["generate", "-m", path, "--ids", "--ctx", "129"]) == 1
    assert "exceeds the model's 128" in capsys.readouterr().err


def test_kv_cache_beyond_the_address_space_is_one_line():
    config = ModelConfig(64, 128, 2, 4, 2, 100, 2**62)
    with pytest.raises(LlamarunError, match="shorter context"):
        KVCache(config)


def test_lens_top_is_capped(tmp_path, capsys):
    """lens --top 100000 took 118 s and 1.56 GB laying out a table of 49152 columns."""
    from llamarun.inspect.lens import logit_lens
    llama = llamarun.load(require(MODELS / "stories260K.bin"))
    lens = logit_lens(llama.model, [1, 2, 3], top=100_000)
    assert all(len(row.tokens) == llama.config.vocab_size == 512 for row in lens.layers)
    with pytest.raises(LlamarunError, match="top"):
        logit_lens(llama.model, [1, 2, 3], top=0)


def test_cli_lens_top_is_capped(smol_path, capsys):
    assert main(["lens", "Paris is", "-m", str(smol_path), "--top", "100000"]) == 0
    captured = capsys.readouterr()
    assert "#100" in captured.out and "#101" not in captured.out
    assert "--top 100000 shows the top 100" in captured.err


# ----------------------------------------------------------------------------------------------
# point 8: files that are not what they claim

@pytest.mark.parametrize("data", [b"", b"\x00" * 3, bytes(range(256)) * 8, b"ak42" + bytes(300)],
                         ids=["empty", "3 bytes", "random", "llama2c magic"])
def test_a_gguf_name_without_gguf_magic_says_so(tmp_path, data):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(LlamarunError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a GGUF file: ") and "llama2.c" not in message


def test_random_bin_names_both_formats(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", -1, 5, 5, 5, 5, 5, 5) + bytes(100))
    with pytest.raises(LlamarunError, match="neither a GGUF file .* nor a valid llama2.c checkpoint"):
        load_checkpoint(path)


def gguf_bytes(tmp_path) -> bytearray:
    path = tmp_path / "ok.gguf"
    write_model(path, metadata={"general.name": "abc", "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]})
    return bytearray(path.read_bytes())


def corrupt_error(tmp_path, data: bytes) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(LlamarunError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "truncated" not in message and "download" not in message and "\n" not in message
    return message


@pytest.mark.parametrize("field, value", [("tensor count", 2**64 - 1), ("metadata count", 2**63),
                                          ("tensor count", 2**32 - 1)])
def test_absurd_header_counts_are_corrupt_not_truncated(tmp_path, field, value):
    data = gguf_bytes(tmp_path)
    struct.pack_into("<Q", data, 8 if field == "tensor count" else 16, value)
    assert f"corrupt header ({field} = {value})" in corrupt_error(tmp_path, data)


def test_absurd_string_and_array_lengths_are_corrupt(tmp_path):
    data = gguf_bytes(tmp_path)
    at = data.index(b"abc") - 8                                     # general.name's length
    struct.pack_into("<Q", data, at, 2**40)
    assert f"corrupt header (the length of general.name = {2**40})" in corrupt_error(tmp_path, data)

    data = gguf_bytes(tmp_path)
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4                         # past the key, value type, item type
    assert struct.unpack_from("<Q", data, at)[0] == VOCAB
    struct.pack_into("<Q", data, at, 2**62)
    assert f"corrupt header (the array count of tokenizer.ggml.tokens = {2**62})" in corrupt_error(tmp_path, data)

    data = gguf_bytes(tmp_path)
    struct.pack_into("<Q", data, at + 8 + 4 * (8 + 2), MAX_HEADER_VALUE + 1)     # the length of token t4
    assert "tokenizer.ggml.tokens[4]" in corrupt_error(tmp_path, data)


def test_a_plausible_length_past_the_end_is_still_truncated(tmp_path):
    data = gguf_bytes(tmp_path)
    at = data.index(b"abc") - 8
    with pytest.raises(LlamarunError, match="truncated"):
        path = tmp_path / "cut.gguf"
        path.write_bytes(bytes(data[:at + 10]))                     # cut inside general.name
        load_checkpoint(path)


def test_absurd_block_count_is_corrupt(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, metadata={"llama.block_count": 2**32 - 1})
    with pytest.raises(LlamarunError, match=r"corrupt header \(llama.block_count = 4294967295\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [("tokenizer.ggml.bos_token_id", VOCAB), ("tokenizer.ggml.eos_token_id", 10**6)])
def test_special_tokens_outside_the_vocabulary(tmp_path, key, value):
    path = tmp_path / "m.gguf"
    write_model(path, metadata={key: value})
    with pytest.raises(LlamarunError, match=f"{key} = {value}, outside its vocabulary of {VOCAB}"):
        load_checkpoint(path)


def test_llama2c_vocabulary_must_hold_bos_and_eos(tmp_path):
    path = patched(tmp_path, "tiny_q8.v1.bin", "v2tok.bin", 8 + 5 * 4, "<i", 2)
    with pytest.raises(LlamarunError, match="BOS"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# point 8: a cached model changed in place

@pytest.fixture
def cached_model(tmp_path, monkeypatch):
    """A 'default model' in a tmp LLAMARUN_HOME, registered with its real checksum, verified once."""
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path / "home"))
    data = require(MODELS / "tiny_q8.v1.bin").read_bytes()
    model = hub.KnownModel(hub.DEFAULT_MODEL, "default.bin", "x==1", "x/default.bin",
                           hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(hub.REGISTRY, hub.DEFAULT_MODEL, model)
    hub.models_dir().mkdir(parents=True)
    path = hub.models_dir() / "default.bin"
    path.write_bytes(data)
    monkeypatch.setattr(hub, "pull", lambda *a, **k: pytest.fail("no download expected"))
    return path


def test_cached_model_is_hashed_once_then_when_it_changes(cached_model, monkeypatch):
    hashed = []
    real = hub.sha256_of
    monkeypatch.setattr(hub, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert hub.ensure_default_model() == cached_model and len(hashed) == 1
    assert hub.ensure_default_model() == cached_model and len(hashed) == 1        # unchanged: not hashed again
    data = bytearray(cached_model.read_bytes())
    data[-1000:] = bytes(1000)                                    # overwritten in place, same size
    cached_model.write_bytes(bytes(data))
    with pytest.raises(LlamarunError, match="changed since it was downloaded.*pull --force"):
        hub.ensure_default_model()
    with pytest.raises(LlamarunError, match="sha256"):
        llamarun.load()                                           # the default model, as the CLI loads it


def test_models_verify(cached_model, capsys):
    (hub.models_dir() / "mine.gguf").write_bytes(b"GGUF")
    assert main(["models", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "default.bin" in out and "sha256 ok" in out and "no checksum known" in out
    data = bytearray(cached_model.read_bytes())
    data[300] ^= 1
    cached_model.write_bytes(bytes(data))
    assert main(["models", "--verify"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: has sha256" in captured.out and "1 cached model failed verification" in captured.err
