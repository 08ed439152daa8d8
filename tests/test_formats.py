"""llama2.c checkpoint reading: shapes, memory mapping, and refusal of bad files."""
import os
import struct
import sys

import numpy as np
import pytest

from llamarun.errors import LlamarunError
from llamarun.formats import llama2c, load_checkpoint
from llamarun.tensors import GroupQuantized

from conftest import MODELS, require


def model(name):
    return str(require(MODELS / name))


def test_named_tensors_have_their_true_shapes():
    ck = llama2c.load(model("tiny_gqa.bin"))   # dim 64, hidden 176, 3 layers, 4 heads, 2 kv heads
    c, w = ck.config, ck.weights
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == \
        (64, 176, 3, 4, 2, 32000, 128)
    assert w["wq"].shape == (3, 64, 64)
    assert w["wk"].shape == w["wv"].shape == (3, 32, 64)
    assert w["wo"].shape == (3, 64, 64)
    assert w["w1"].shape == w["w3"].shape == (3, 176, 64)
    assert w["w2"].shape == (3, 64, 176)
    assert w["attention_norm"].shape == w["ffn_norm"].shape == (3, 64)
    assert w["norm"].shape == (64,)
    assert w["output"] is w["tok_embeddings"]          # shared classifier


def test_separate_classifier_from_negative_vocab():
    ck = llama2c.load(model("tiny_untied.bin"))
    assert not ck.config.shared_classifier
    assert ck.weights["output"].shape == (32000, 48)
    assert not np.shares_memory(ck.weights["output"], ck.weights["tok_embeddings"])


def test_weights_are_memory_mapped_not_copied():
    for file in ("tiny_gqa.bin", "tiny_q8.v2.bin"):
        ck = llama2c.load(model(file))
        for name, w in ck.weights.items():
            for array in (w.q, w.scale) if isinstance(w, GroupQuantized) else (w,):
                root = array
                while isinstance(root, (np.ndarray, memoryview)):
                    root = root.base if isinstance(root, np.ndarray) else root.obj
                assert root is ck._mapping, f"{file}: {name} is not a view of the file mapping"
                assert not array.flags.writeable, name


def test_version1_holds_the_legacy_weights():
    legacy = llama2c.load(model("tiny_q8.bin")).weights
    v1 = llama2c.load(model("tiny_q8.v1.bin"))
    assert v1.version == 1
    for name, w in v1.weights.items():
        np.testing.assert_array_equal(w, legacy[name], err_msg=name)


def test_version2_is_int8_groups_close_to_the_float_weights():
    v2 = llama2c.load(model("tiny_q8.v2.bin"))
    legacy = llama2c.load(model("tiny_q8.bin")).weights
    assert v2.version == 2 and v2.group_size == 64
    for name in ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        w = v2.weights[name]
        assert isinstance(w, GroupQuantized) and w.q.dtype == np.int8 and not w.q.flags.owndata
        assert w.shape == legacy[name].shape
        scale = np.repeat(w.scale, 64, axis=-1)
        assert (np.abs(w.dequantize() - legacy[name]) <= scale / 2 + 1e-7).all(), name
    for name in ("attention_norm", "ffn_norm", "norm"):
        np.testing.assert_array_equal(v2.weights[name], legacy[name])


# ----------------------------------------------------------------------------------------------
# bad files

def write(tmp_path, data: bytes, name="bad.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def legacy_header(dim=64, hidden=176, layers=3, heads=4, kv_heads=2, vocab=32000, seq_len=128):
    return struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len)


def versioned_header(version, dim=64, hidden=192, layers=3, heads=4, kv=2, vocab=32000, seq=128, shared=1, gs=64):
    head = struct.pack("<Ii7iB", llama2c.MAGIC, version, dim, hidden, layers, heads, kv, vocab, seq, shared)
    if version == 2:
        head += struct.pack("<i", gs)
    return head.ljust(256, b"\0")


@pytest.mark.parametrize("header, words", [
    (legacy_header(dim=0), "non-positive dim"),
    (legacy_header(layers=-3), "non-positive n_layers"),
    (legacy_header(dim=66), "does not split into 4 heads"),
    (legacy_header(kv_heads=3), "3 kv heads do not divide 4 heads"),
    (versioned_header(3), "version 3"),
    (versioned_header(2, gs=48), "group size 48"),
])
def test_nonsense_headers_are_refused(tmp_path, header, words):
    with pytest.raises(LlamarunError, match=words):
        llama2c.load(write(tmp_path, header + bytes(1024)))


def test_truncated_file_is_refused(tmp_path):
    data = open(model("tiny_gqa.bin"), "rb").read()
    with pytest.raises(LlamarunError, match="truncated"):
        llama2c.load(write(tmp_path, data[:-100]))


def test_truncated_versioned_header_is_refused(tmp_path):
    with pytest.raises(LlamarunError, match="truncated"):
        llama2c.load(write(tmp_path, versioned_header(1)[:100]))


def test_file_longer_than_its_header_says_is_refused(tmp_path):
    data = open(model("tiny_q8.v1.bin"), "rb").read()
    with pytest.raises(LlamarunError, match="header describes"):
        llama2c.load(write(tmp_path, data + bytes(4)))


def test_foreign_files_are_refused(tmp_path):
    with pytest.raises(LlamarunError, match="GGUF"):
        load_checkpoint(write(tmp_path, b"GGUF" + bytes(100)))
    with pytest.raises(LlamarunError):
        load_checkpoint(write(tmp_path, "just some text, not a model at all\n".encode() * 10))
    with pytest.raises(LlamarunError, match="too small"):
        load_checkpoint(write(tmp_path, b""))
    with pytest.raises(LlamarunError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.bin"))
    with pytest.raises(LlamarunError, match="directory"):
        load_checkpoint(str(tmp_path))


def test_a_freshly_written_model_is_mapped_in_2_mib_pages_once_read(tmp_path):
    """formats/pages.py: a file just copied sits in the page cache in small pieces; its first load has
    them read again as 2 MiB pages, and a second load finds them so. Then a part of the file read with
    read() (small pieces again) behind a first 2 MiB page that is huge: the next load finds it too. Every
    whole 2 MiB page of the file is mapped huge after each load. Skipped where this kernel or file system
    cannot map a file in huge pages (then map_file leaves the map as it is)."""
    import mmap
    import shutil
    from llamarun.formats import llama2c, pages
    path = tmp_path / "copy.bin"
    shutil.copyfile(require(MODELS / "tiny_gqa.bin"), path)         # 8.8 MB, written now: small folios
    with open(path, "rb") as f:
        os.fsync(f.fileno())            # written back: clean pages, which the page cache can drop
        if not (sys.platform.startswith("linux") and pages._transparent_huge_pages()
                and pages._file_system(f.fileno()) in pages.LARGE_FOLIO_FILE_SYSTEMS):
            pytest.skip("no huge pages for files here (kernel setting, file system or OS)")

    def huge_kb_once_read(mapping) -> int:
        address = pages._address(mapping)
        if address % pages.HUGE:
            pytest.skip("the kernel did not align the file's map to 2 MiB")
        int(np.frombuffer(mapping, np.uint8)[::4096].sum())         # read every page, as a forward does
        return pages._huge_mapped_kb(address)

    whole_kb = os.path.getsize(path) // pages.HUGE * pages.HUGE // 1024
    for load in ("first", "second"):
        checkpoint = llama2c.load(str(path))
        assert huge_kb_once_read(checkpoint._mapping) == whole_kb, load
        del checkpoint

    last = os.path.getsize(path) // pages.HUGE - 1                   # the last whole 2 MiB page
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), last * pages.HUGE, pages.HUGE, os.POSIX_FADV_DONTNEED)
        os.pread(f.fileno(), pages.HUGE, last * pages.HUGE)          # cached again, by read()
        plain = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)    # a map without the hint
        if huge_kb_once_read(plain) == whole_kb:
            pytest.skip("read() cached the page as one 2 MiB folio here")
        del plain
    checkpoint = llama2c.load(str(path))
    assert huge_kb_once_read(checkpoint._mapping) == whole_kb, "after read()"
