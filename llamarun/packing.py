"""Quantized matrices in the int8 kernels' layout, made once per model file and kept in a cache
file beside the models, memory-mapped as the model is.

The fast kernels of Q8_0, Q4_0, Q4_1 and the K-quants (Q4_K, Q5_K, Q6_K) read a group of weight rows
with one int32 lane per row (kernels/ggml.py, PACKED): the blocks of the group's rows side by side,
their quants by the dword (or 8 bytes) of every row in turn. (Q5_0's and Q5_1's blocks are rewritten
as they are packed, their values a byte each: kernels/ggml.py's TRANSCODED.) Transposing the file's
rows into that layout at every step was most of the kernels' instructions; packed once, a decode step's products stream faster
and a batch's multiply faster (docs/performance.md). llama.cpp's CPU backend repacks Q4_0, Q4_K and
others the same way at load, into memory it allocates.

Here the packed matrices go into a file of their own, which is memory-mapped as the model file is
(formats/pages.py: 2 MiB pages where Linux gives them): the weights stay quantized and memory-mapped,
their pages in the page cache and shared by every process that runs the model, and a later load maps
them without packing again. The model's own map still serves everything else (embedding rows, the
exact kernels, a prompt's BLAS tiles); the pages of its packed matrices are then not read by the fast
path. The file is `$LLAMARUN_HOME/packed/<hash>.bin` (~/.cache/llamarun), the hash of the model file's
real path, size and modification time and of the layout (ROW_GROUP, LAYOUT): a changed model, or
another CPU's group size, gets a new file. Each load compares a few groups of every matrix with the
model's own rows, packed again, and writes a file that does not agree (damaged, cut short) again.
Beside each file, `<hash>.json` records the model file it was made from (its real path, size and
modification time) and its LAYOUT; whenever a new file is written, the files whose model is gone or
changed since, or of an older layout, are removed, so a re-downloaded or rewritten model, or an upgrade,
does not leave an old packing behind. (A file without a
record, made before records were kept, stays until removed by hand.) Removing the folder frees the
space; the next load makes the file again.

Models with under CACHED_BYTES of such matrices (the tests' tiny models) are packed in memory at
load, in milliseconds, and so are a model whose cache file cannot be written (a read-only or full
disk) and matrices that come from no file. A model quantized in memory at load (--quantize) therefore
holds its matrices twice in memory, as quantized and as packed: its rows are still read in the file's
order (embedding rows, the exact kernels, a prompt's BLAS tiles).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import threading

import numpy as np

from .hub import home
from .kernels.ggml import PACKED, ROW_GROUP, int8_type, pack_groups, packed_row_bytes, packed_rows

LAYOUT = 3                  # the version of pack_groups's layout (and of its types): a change makes new cache files
CACHED_BYTES = 16 << 20     # packed matrices of a model under this many bytes are packed in memory
ALIGN = 4096                # each matrix's offset in the cache file (a page: its rows' lines are aligned)
CHUNK_BYTES = 16 << 20      # a matrix is packed and written this much at a time (bounded scratch memory)
NOTICE_BYTES = 256 << 20    # a cache file this big takes seconds to write: said on stderr first


class PackedMatrices:
    """The int8 kernels' matrices (PACKED types, and TRANSCODED ones) of one model file (path; None: no
    file), packed the first time one of them is asked for: `packed(i)` is matrix i's, (rows, packed row
    bytes) uint8, read-only."""

    def __init__(self, path: str | None, matrices: list[tuple[int, np.ndarray]]):
        self.path = path
        self.matrices = matrices                  # (ggml type, raw bytes (rows, row bytes)) each
        self._views: list[np.ndarray] | None = None
        self._lock = threading.Lock()

    def packed(self, i: int) -> np.ndarray:
        with self._lock:
            if self._views is None:
                self._views = self._make()
        return self._views[i]

    def _layout(self) -> tuple[list[int], int]:
        """Each matrix's offset in the packed bytes, and their total."""
        offsets, total = [], 0
        for qt, raw in self.matrices:
            total = -(-total // ALIGN) * ALIGN
            offsets.append(total)
            total += packed_rows(raw.shape[0]) * packed_row_bytes(qt, raw.shape[1])
        return offsets, total

    def _make(self) -> list[np.ndarray]:
        offsets, total = self._layout()
        buffer = None
        if self.path is not None and total >= CACHED_BYTES:
            try:
                buffer = self._cached(offsets, total)
            except OSError:
                buffer = None                     # no cache file: packed in memory below
        if buffer is None:
            buffer = np.empty(total, np.uint8)
            for (qt, raw), offset in zip(self.matrices, offsets):
                pack_groups(qt, raw, self._matrix(buffer, offset, qt, raw))
        views = []
        for (qt, raw), offset in zip(self.matrices, offsets):
            view = self._matrix(buffer, offset, qt, raw)[:raw.shape[0]]
            view.flags.writeable = False          # as the model's map: one compiled signature for every kernel
            views.append(view)
            _unmap(raw)
        return views

    @staticmethod
    def _matrix(buffer, offset: int, qt: int, raw: np.ndarray) -> np.ndarray:
        return np.ndarray((packed_rows(raw.shape[0]), packed_row_bytes(qt, raw.shape[1])), np.uint8, buffer, offset)

    def _cached(self, offsets: list[int], total: int):
        """The cache file's read-only map, written first where it is missing, not whole, or does not agree
        with the model (`_agrees`)."""
        from .formats.pages import map_file
        source = _source(self.path)
        key = f"{source['model']}\0{source['size']}\0{source['mtime_ns']}\0{ROW_GROUP}\0{LAYOUT}"
        path = home() / "packed" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"
        for attempt in range(2):
            if attempt or not (path.is_file() and path.stat().st_size == total):
                self._write_file(path, offsets, total)
                _record(path, source)
            with open(path, "rb") as f:
                mapping = map_file(f)
            if self._agrees(mapping, offsets):
                return mapping
        raise OSError(f"{path} does not agree with {self.path} as written")     # packed in memory instead

    def _agrees(self, buffer, offsets: list[int]) -> bool:
        """Whether the first, middle and last groups of every matrix in buffer are the model's rows packed:
        a check of a few KB a matrix against a cache file of another layout, damaged, or cut short."""
        for (qt, raw), offset in zip(self.matrices, offsets):
            packed, groups = self._matrix(buffer, offset, qt, raw), packed_rows(raw.shape[0]) // ROW_GROUP
            for group in sorted({0, groups // 2, groups - 1}):
                rows = slice(group * ROW_GROUP, (group + 1) * ROW_GROUP)
                expected = np.empty((ROW_GROUP, packed.shape[1]), np.uint8)
                pack_groups(qt, raw, expected, group * ROW_GROUP)
                if not np.array_equal(packed[rows], expected):
                    return False
        return True

    def _write_file(self, path, offsets: list[int], total: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if total >= NOTICE_BYTES:
            print(f"llamarun: packing {total >> 20} MiB of {os.path.basename(self.path)} for the int8 kernels "
                  f"into {path.parent}, once per model file", file=sys.stderr, flush=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            with open(part, "wb") as f:
                for (qt, raw), offset in zip(self.matrices, offsets):
                    self._write(f, offset, qt, raw)
                f.truncate(total)
            os.replace(part, path)                # whole or not there: a reader never maps a part
        finally:
            if part.exists():
                part.unlink()

    @staticmethod
    def _write(f, offset: int, qt: int, raw: np.ndarray) -> None:
        groups, row_bytes = packed_rows(raw.shape[0]) // ROW_GROUP, packed_row_bytes(qt, raw.shape[1])
        step = max(1, CHUNK_BYTES // (ROW_GROUP * row_bytes))
        f.seek(offset)
        for start in range(0, groups, step):
            chunk = np.empty((min(step, groups - start) * ROW_GROUP, row_bytes), np.uint8)
            pack_groups(qt, raw, chunk, start * ROW_GROUP)
            f.write(chunk.data)


def _source(path: str) -> dict:
    """What a packed file is made from: the model file's real path, size and modification time."""
    stat = os.stat(path)
    return {"model": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _record(path, source: dict) -> None:
    """Write packed file path's record of its model (`_source`) and layout, then remove the stale files
    beside it. (A record that cannot be written leaves the file without one: kept, as a file made before
    records.)"""
    try:
        path.with_suffix(".json").write_text(json.dumps(dict(source, layout=LAYOUT)))
    except OSError:
        return
    _remove_stale(path.parent)


def _remove_stale(folder) -> None:
    """Remove the packed files (and their records) in folder whose model file is gone, or is not the one
    they were made from (another size or modification time), or that an older LAYOUT made (records
    without one: LAYOUT 2's), which this version never reads. A record that cannot be read, or a model
    that cannot be looked at (permissions), leaves its file alone."""
    for record in folder.glob("*.json"):
        try:
            made_from = json.loads(record.read_text())
            if not isinstance(made_from["model"], str):
                continue
            stat = os.stat(made_from["model"])
            if (stat.st_size == made_from["size"] and stat.st_mtime_ns == made_from["mtime_ns"]
                    and made_from.get("layout", 2) >= LAYOUT):
                continue
        except FileNotFoundError:
            pass                                  # the model is gone
        except (OSError, ValueError, KeyError, TypeError):
            continue
        record.with_suffix(".bin").unlink(missing_ok=True)
        record.unlink(missing_ok=True)


def _unmap(raw: np.ndarray) -> None:
    """Unmap the whole pages of raw's bytes in the model file's map, if it is one: they stay in the page
    cache, and come back if read (the exact kernels, an embedding row), but a process that runs the
    packed copy does not count them in its memory twice. (In 2 MiB pages, reading a norm between two
    matrices maps the whole 2 MiB around it.)"""
    mapping = raw
    while isinstance(mapping, np.ndarray):
        mapping = mapping.base
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    offset = raw.ctypes.data - np.frombuffer(mapping, np.uint8, count=1).ctypes.data
    start, stop = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE, (offset + raw.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


def attach(path: str, tensors) -> None:
    """Give the GGML tensors of one model file (each once) that the fast kernels read packed their
    place in one PackedMatrices of that file."""
    packable = [t for t in tensors if int8_type(int(t.qtype)) in PACKED]
    matrices = PackedMatrices(path, [(int(t.qtype), t.raw) for t in packable])
    for i, tensor in enumerate(packable):
        tensor.packing = (matrices, i)
