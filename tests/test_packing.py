"""The int8 kernels' packed layout of Q8_0, Q4_0 and Q4_1 (kernels/ggml.py, PACKED) and its cache file
(llamarun/packing.py): the layout byte by byte as specified, and a model file's packed matrices written
once, mapped, reused, rewritten when damaged, and in memory where no cache can be written, with the
same results bit for bit every way. (That the kernels compute llama.cpp's products from the packed
bytes: tests/test_kernels.py, tests/test_decode_kernels.py, tests/test_step.py.)"""
import json
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llamarun import packing
from llamarun.formats import load_checkpoint
from llamarun.kernels.ggml import BLOCK_BYTES, PACKED, ROW_GROUP, pack_groups, packed_rows
from llamarun.model import Batch, Transformer
from llamarun.tensors import GGMLTensor

from test_gguf_format import write_model


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [ROW_GROUP, 2 * ROW_GROUP + 5, 3])
def test_the_packed_layout_puts_each_regions_units_of_a_groups_rows_side_by_side(qtype, rows):
    block, (group, regions) = BLOCK_BYTES[qtype], PACKED[qtype]
    assert regions[0][0] == 0 and regions[-1][1] == block
    assert all(a[1] == b[0] for a, b in zip(regions, regions[1:]))        # the regions cover the block
    raw = np.random.default_rng(rows).integers(0, 256, (rows, 2 * block), np.uint8)
    out = np.empty((packed_rows(rows), raw.shape[1]), np.uint8)
    pack_groups(int(qtype), raw, out)
    assert out.shape[0] % ROW_GROUP == 0 and out.shape[0] - rows < ROW_GROUP
    for g in range(out.shape[0] // group):
        packed = out[g * group:(g + 1) * group].reshape(-1)                 # the group's bytes, in order
        for b in range(2):
            for start, stop, unit in regions:
                for k in range((stop - start) // unit):
                    for i in range(group):
                        row = raw[min(g * group + i, rows - 1)]               # past the end: the last row
                        at = b * group * block + group * start + (k * group + i) * unit
                        first = b * block + start + k * unit
                        assert bytes(packed[at:at + unit]) == bytes(row[first:first + unit])


def test_a_tensor_without_a_file_is_packed_in_memory_and_keeps_its_raw_bytes():
    rng = np.random.default_rng(0)
    raw = gguf.quants.quantize(rng.standard_normal((21, 64)).astype(np.float32), T.Q4_1)
    tensor = GGMLTensor("w", T.Q4_1, (21, 64), raw, exact=False)
    packed = tensor.kernel_bytes
    assert packed.shape == raw.shape and not packed.flags.writeable and packed is tensor.kernel_bytes
    assert np.array_equal(tensor.raw, raw)                    # the rows, the embedding and exact paths read
    assert tensor.with_exact(True).kernel_bytes is packed     # one packing for the same bytes
    half = GGMLTensor("w", T.F16, (4, 32), rng.integers(0, 256, (4, 64), np.uint8), exact=False)
    assert half.kernel_bytes is half.raw                      # a type without int8 kernels reads the file's rows


def _write(path, seed=0):
    """SmolLM2's types (Q4_1, a Q8_0 classifier): the one-call forward the compile step compiles for it."""
    write_model(path, T.Q4_1, quantize=True, types={"output.weight": T.Q8_0}, untied=True, seed=seed)


def _logits(path):
    """A fast-path model of the file at path, its logits for a few tokens, and the model."""
    checkpoint = load_checkpoint(str(path))
    model = Transformer(checkpoint.config, checkpoint.weights)
    cache = model.new_cache(seq_len=8)
    return model.forward(Batch.sequence([1, 5, 9, 2], 0, all_logits=True), cache), checkpoint


def _cached_files(home, suffix=".bin"):
    folder = home / "packed"
    return sorted(f for f in folder.iterdir() if f.suffix == suffix) if folder.exists() else []


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_model_files_packed_matrices_are_written_once_and_mapped(tmp_path, cache_home, monkeypatch):
    path = tmp_path / "m.gguf"
    _write(path)
    in_memory, _ = _logits(path)                              # a tiny model: under CACHED_BYTES
    assert _cached_files(cache_home) == []

    monkeypatch.setattr(packing, "CACHED_BYTES", 0)
    monkeypatch.setattr(packing, "CHUNK_BYTES", 1)            # written a group at a time, as a big model's
    first, checkpoint = _logits(path)
    files = _cached_files(cache_home)
    assert len(files) == 1 and len(list((cache_home / "packed").iterdir())) == 2   # and its record; no part left
    record = json.loads(files[0].with_suffix(".json").read_text())
    assert record == {"model": os.path.realpath(path), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                      "layout": packing.LAYOUT}
    assert np.array_equal(first, in_memory)                   # bit for bit the same products
    wq = checkpoint.weights["wq"][0]
    base = wq.kernel_bytes
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert type(base).__name__ == "mmap"                      # memory-mapped, not a copy in memory
    assert checkpoint.weights["tok_embeddings"].packing is None   # the embedding rows: the model's own map

    written = files[0].stat().st_mtime_ns
    again, _ = _logits(path)
    assert np.array_equal(again, in_memory) and files[0].stat().st_mtime_ns == written   # reused

    with open(files[0], "r+b") as f:                          # cut short (a crash, a full disk): made again
        f.truncate(100)
    repaired, _ = _logits(path)
    assert np.array_equal(repaired, in_memory) and files[0].stat().st_size > 100

    size = files[0].stat().st_size
    with open(files[0], "r+b") as f:                          # whole but wrong: another layout, damage
        f.seek(size - 64)
        f.write(bytes(64))
    repaired, _ = _logits(path)
    assert np.array_equal(repaired, in_memory) and files[0].stat().st_size == size


def test_a_changed_model_file_gets_a_new_cache_file_and_the_old_one_goes(tmp_path, cache_home, monkeypatch):
    monkeypatch.setattr(packing, "CACHED_BYTES", 0)
    path = tmp_path / "m.gguf"
    _write(path, seed=1)
    first, _ = _logits(path)
    old = _cached_files(cache_home)
    _write(path, seed=2)
    os.utime(path, ns=(1, 1))                                 # even with a clock that did not move on
    second, _ = _logits(path)
    new = _cached_files(cache_home)
    assert len(old) == len(new) == 1 and old != new and not np.array_equal(first, second)
    assert _cached_files(cache_home, ".json") == [new[0].with_suffix(".json")]


def test_packed_files_of_models_gone_go_when_another_is_written(tmp_path, cache_home, monkeypatch):
    """Not at every load: when a new file is written. Files of models still there stay (not those of an
    older layout), and so do a file without a record (made before records were kept) and one whose
    record cannot be read."""
    monkeypatch.setattr(packing, "CACHED_BYTES", 0)
    kept, gone = tmp_path / "kept.gguf", tmp_path / "gone.gguf"
    _write(kept, seed=1)
    _write(gone, seed=2)
    _logits(kept)
    _logits(gone)
    assert len(_cached_files(cache_home)) == 2
    folder = cache_home / "packed"
    (folder / ("0" * 32 + ".bin")).write_bytes(b"an older file")
    (folder / ("1" * 32 + ".bin")).write_bytes(b"a file whose record is damaged")
    (folder / ("1" * 32 + ".json")).write_text("{not json")
    older = folder / ("2" * 32 + ".json")               # kept's packing in an older layout (its record has none)
    older.write_text(json.dumps({"model": os.path.realpath(kept), "size": kept.stat().st_size,
                                 "mtime_ns": kept.stat().st_mtime_ns}))
    older.with_suffix(".bin").write_bytes(b"an older layout")
    gone.unlink()
    _logits(kept)                                             # nothing written: nothing removed
    assert len(_cached_files(cache_home)) == 5
    third = tmp_path / "third.gguf"
    _write(third, seed=3)
    _logits(third)
    models = {json.loads(r.read_text())["model"] for r in _cached_files(cache_home, ".json") if r.stem != "1" * 32}
    assert models == {os.path.realpath(kept), os.path.realpath(third)}
    assert len(_cached_files(cache_home)) == 4                # kept's, third's, and the two left alone
    assert (folder / ("0" * 32 + ".bin")).exists() and (folder / ("1" * 32 + ".bin")).exists()
    assert not older.exists() and not older.with_suffix(".bin").exists()


def test_no_writable_cache_packs_in_memory(tmp_path, cache_home, monkeypatch):
    monkeypatch.setattr(packing, "CACHED_BYTES", 0)
    path = tmp_path / "m.gguf"
    _write(path)
    expected, _ = _logits(path)
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LLAMARUN_HOME", str(blocked))         # mkdir fails
    logits, _ = _logits(path)
    assert np.array_equal(logits, expected)
