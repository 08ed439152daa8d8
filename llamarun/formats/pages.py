"""A model file's memory map, in 2 MiB pages where Linux can give them.

Why: a decode step streams every weight once. In 4 KiB pages that stream crosses a page boundary
every 4 KiB: a TLB miss each time, and a stop for the hardware prefetcher, which does not cross
pages. In 2 MiB pages a token's products streamed about a tenth faster, and SmolLM2's decode a few
percent (docs/performance.md): the pages numpy's own large arrays get, and so the benchmarks'
bandwidth bound.

The weights stay where they are, in the page cache, shared with every process that maps the file;
what changes is the size of the page cache's pieces (folios). Linux (6.x, on ext4 and xfs) maps a
file in 2 MiB pages where the page cache holds it in 2 MiB folios and the mapping is aligned to
2 MiB (the kernel aligns large file mappings). The page cache makes 2 MiB folios when a mapping
marked MADV_HUGEPAGE reads the file in; a file already cached in small folios (just downloaded,
copied, or read by another program) keeps them. So `map_file` marks the mapping, maps in the
2 MiB pages of the file that the page cache holds (one byte read from each: no disk reads) and
unmaps them again, and when any of them was not mapped huge, drops the file's cached pages
(POSIX_FADV_DONTNEED: they are clean; the pages another process has mapped stay) so that they are
read in again as the model touches them, huge. (Looking at one page was not enough: a file partly
cached small by another program can have its first pages huge and a part of its weights not.) That
costs one more read of the file from disk, once: the page cache keeps the big folios
for later loads. Nothing is done where the kernel could not map them huge (transparent huge pages
off, another file system, an unaligned mapping, a file under 4 MiB, not Linux).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

HUGE = 2 << 20                                    # x86-64's and aarch64's (4 KiB base) PMD page
# file systems whose page cache makes large folios on Linux 6.x (statfs magic numbers)
LARGE_FOLIO_FILE_SYSTEMS = {0xEF53: "ext4", 0x58465342: "xfs"}


def map_file(f) -> mmap.mmap:
    """A read-only memory map of the whole open file f (binary), in 2 MiB pages where it can be."""
    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _huge_pages(mapping, f)
    except (OSError, ValueError, AttributeError):
        pass                                      # a hint: the map works in small pages as well
    return mapping


def _huge_pages(mapping: mmap.mmap, f) -> None:
    if not (sys.platform.startswith("linux") and len(mapping) >= 2 * HUGE and hasattr(mmap, "MADV_HUGEPAGE")
            and _transparent_huge_pages() and _file_system(f.fileno()) in LARGE_FOLIO_FILE_SYSTEMS):
        return
    address = _address(mapping)
    if address % HUGE:
        return                                    # an unaligned map never gets 2 MiB pages
    mapping.madvise(mmap.MADV_HUGEPAGE)
    cached = _cached_huge_pages(mapping, address)
    for page in cached:
        mapping[page * HUGE]                      # map it in: huge if the page cache holds it as one folio
    all_huge = _huge_mapped_kb(address) >= len(cached) * (HUGE >> 10)
    mapping.madvise(mmap.MADV_DONTNEED)           # unmapped again: the process maps what it reads, as before
    if not all_huge:                              # some cached in small folios: drop the file's clean pages
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _cached_huge_pages(mapping: mmap.mmap, address: int) -> list[int]:
    """The whole 2 MiB pages of the mapping (by index) with any part in the page cache (mincore)."""
    import numpy as np
    small = mmap.PAGESIZE
    resident = np.zeros(-(-len(mapping) // small), np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    if libc.mincore(address, len(mapping), resident.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    per_page = HUGE // small
    whole = len(mapping) // HUGE
    cached = (resident[:whole * per_page].reshape(whole, per_page) & 1).any(axis=1)
    return np.flatnonzero(cached).tolist()


def _transparent_huge_pages() -> bool:
    """Whether the kernel gives huge pages to mappings that ask (madvise) or to all (always)."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
        return "[never]" not in setting.read()


def _file_system(fd: int) -> int:
    """The magic number of the file system holding the open file fd (fstatfs's f_type)."""
    buffer = ctypes.create_string_buffer(256)      # struct statfs: f_type is its first field, a long
    if ctypes.CDLL(None, use_errno=True).fstatfs(fd, buffer) != 0:
        raise OSError(ctypes.get_errno(), "fstatfs")
    return int.from_bytes(buffer.raw[:ctypes.sizeof(ctypes.c_long)], sys.byteorder)


def _address(mapping: mmap.mmap) -> int:
    """The address of the mapping's first byte."""
    import numpy as np
    return np.frombuffer(mapping, np.uint8, count=1).ctypes.data


def _huge_mapped_kb(address: int) -> int:
    """FilePmdMapped of the mapping that starts at `address` (/proc/self/smaps): KiB mapped in 2 MiB pages."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                inside = int(head.split("-")[0], 16) == address
            elif inside and head == "FilePmdMapped:":
                return int(line.split()[1])
    return 0
