"""PyTorch `.pth` files (torch.save's zip format), read without torch and without running the file.

torch.save writes a zip archive (entries stored, uncompressed, each aligned by padding in its local
header):

    ARCHIVE/data.pkl          a pickle of the saved object (here: a dict of tensor names -> tensors)
    ARCHIVE/data/KEY          the raw bytes of storage KEY, little-endian, numel x element size
    ARCHIVE/byteorder         "little" (absent in older files, which are little-endian)
    ARCHIVE/version, ...      format bookkeeping

The pickle names a tensor as a call of torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
stride, requires_grad, backward_hooks), each storage as a persistent id ('storage', torch.<T>Storage,
KEY, location, numel). A pickle may name any function in any module, and unpickling calls it: a
.pth file from elsewhere can run any code in torch.load (without weights_only). Here the unpickler
resolves only the globals of that list (the tensor and parameter rebuilds, the storage types,
OrderedDict) to harmless stand-ins of our own, and refuses any other one by name before
anything is called: nothing in the file ever runs.

Each storage is a numpy view of ONE read-only memory map of the file (its data offset from the zip's
central directory and the entry's local header); a tensor is a strided view of its storage. An entry
that was compressed (a re-zipped file: torch never compresses) cannot be mapped: it is decompressed
into memory instead, and `PthFile.decompressed` names it. bfloat16 has no numpy dtype: its values
are uint16 arrays of the raw bits (`PthTensor.dtype` says "bfloat16").
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import LlamarunError
from .pages import map_file

# torch's storage types, as their persistent ids name them -> (torch's dtype name, numpy dtype of
# the stored values); bfloat16's values are its raw bits
STORAGE_TYPES = {
    "FloatStorage": ("float32", "<f4"),
    "DoubleStorage": ("float64", "<f8"),
    "HalfStorage": ("float16", "<f2"),
    "BFloat16Storage": ("bfloat16", "<u2"),
    "LongStorage": ("int64", "<i8"),
    "IntStorage": ("int32", "<i4"),
    "ShortStorage": ("int16", "<i2"),
    "CharStorage": ("int8", "i1"),
    "ByteStorage": ("uint8", "u1"),
    "BoolStorage": ("bool", "?"),
}

ZIP_MAGIC = b"PK\x03\x04"
LOCAL_HEADER = struct.Struct("<4s22xHH")       # signature, ..., file name length, extra field length
PICKLE_PROTO = 0x80                            # a pickle's first byte (protocol 2 and later)
_STORAGE_KEY = re.compile(r"[0-9A-Za-z_.]{1,64}")


class _NoState:
    """Our stand-ins refuse pickle's BUILD (which would set their attributes, or the shared storage
    types' for every later load): torch's state dicts never use it on a tensor or a storage."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"its pickle sets the state of a {type(self).__name__.strip('_')}, which torch.save never does")


@dataclass(frozen=True)
class PthTensor(_NoState):
    """One tensor of the file: its values as a view of the file's map (or of a decompressed entry)."""
    dtype: str               # torch's name: "float32", "float16", "bfloat16", ...
    data: np.ndarray         # shape as torch's, strides the file's; bfloat16 as uint16 bits

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


class _Storage(_NoState):
    """A storage as the persistent id describes it, before the tensors that view it are rebuilt."""
    __slots__ = ("values", "dtype")

    def __init__(self, values: np.ndarray, dtype: str):
        self.values = values     # (numel,) of its numpy dtype
        self.dtype = dtype


class _StorageType(_NoState):
    """The stand-in for torch.<T>Storage: the pickle only ever passes it inside a persistent id."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Function(_NoState):
    """The stand-in a pickle gets for a torch function it names: calls one of our methods, and no
    attribute of it (nor of the method) can be set by the pickle."""
    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)


class PthFile:
    """An opened .pth file: `tensors` (name -> PthTensor) in the order of its dictionary."""

    def __init__(self, path: str, tensors: dict, mapping, decompressed: list[str]):
        self.path = path
        self.tensors = tensors
        self.decompressed = decompressed     # entries read into memory (compressed: not mappable)
        self._mapping = mapping               # the views point into it: kept alive with them


class _Refused(Exception):
    """The pickle asked for something no tensor checkpoint holds; the message names it."""


def load(path: str) -> PthFile:
    """Open a torch.save zip file of a dictionary of tensors, every storage mapped, nothing run."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            size = os.fstat(f.fileno()).st_size
            mapping = map_file(f) if size else None
    except OSError as e:
        raise LlamarunError(f"cannot read {path}: {e.strerror}") from None
    if head != ZIP_MAGIC:
        if head[:1] == bytes([PICKLE_PROTO]):
            raise LlamarunError(f"{path} is in torch.save's legacy format (torch before 1.6), which llamarun does not "
                                "read: save it again with a current torch (the zip format)")
        raise LlamarunError(f"{path} is not a PyTorch checkpoint: a .pth file written by torch.save is a zip archive "
                            f"and starts with {ZIP_MAGIC!r}, this one with {head!r}")
    try:
        archive = zipfile.ZipFile(path)      # reads the central directory only; the data is the map's
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LlamarunError(f"{path} is truncated or damaged: it starts as a zip archive (torch.save's format) but "
                            f"its directory cannot be read ({e}); download or save it again") from None
    with archive:
        return _read(path, archive, mapping, size)


def _read(path: str, archive: zipfile.ZipFile, mapping, size: int) -> PthFile:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        found = "none" if not pickles else ", ".join(pickles)
        raise LlamarunError(f"{path} is a zip archive but not a torch.save checkpoint: it needs one ARCHIVE/data.pkl "
                            f"entry, and has {found}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = _entry_text(archive, prefix + "byteorder", default="little")
    if byteorder != "little":
        raise LlamarunError(f"{path} stores its tensors {byteorder}-endian; llamarun reads little-endian .pth files "
                            "(what torch.save writes on every common machine)")
    entries = _Entries(path, archive, mapping, size, prefix)
    pickled = entries.read(pickles[0])
    unpickler = _TensorUnpickler(io.BytesIO(pickled), entries)
    try:
        state = unpickler.load()
    except _Refused as e:
        raise LlamarunError(f"{path} refuses to load: {e}; llamarun never runs code from a model file") from None
    except LlamarunError:
        raise
    except Exception as e:       # a malformed pickle: any of pickle's own errors, or a bad argument
        raise LlamarunError(f"{path} is damaged: its pickle cannot be read ({type(e).__name__}: {e})") from None
    tensors = _state_dict(path, state, unpickler.rebuilt, pickled)
    return PthFile(path, tensors, mapping, entries.decompressed)


def _entry_text(archive: zipfile.ZipFile, name: str, default: str) -> str:
    try:
        return archive.read(name).decode("ascii", "replace").strip()
    except KeyError:
        return default


def _state_dict(path: str, state, rebuilt: int, pickled: bytes) -> dict:
    """The loaded object as {name: PthTensor}, or a one-line refusal of anything else."""
    if not isinstance(state, dict):
        raise LlamarunError(f"{path} holds a {type(state).__name__}, not a dictionary of tensors (a state dict)")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, PthTensor):
            raise LlamarunError(f"{path} is not a flat dictionary of tensors: its entry {name!r} is a "
                                f"{type(value).__name__}")
    # a name given twice keeps only its last tensor (a dict): the file then rebuilds more tensors than
    # its dictionary holds (one tensor under two names is one rebuild, and fine)
    if rebuilt > len({id(t) for t in state.values()}):
        repeated = _repeated_names(pickled, state)
        which = f" ({', '.join(repeated)})" if repeated else ""
        raise LlamarunError(f"{path} gives a tensor name twice{which}: {rebuilt} tensors under {len(state)} names; "
                            "the file is damaged or was not written by torch.save from one state dict")
    return dict(state)


def _repeated_names(pickled: bytes, state: dict) -> list[str]:
    """The dictionary keys the pickle writes more than once (for the error message only)."""
    strings = collections.Counter(arg for op, arg, _ in pickletools.genops(pickled)
                                  if isinstance(arg, str) and arg in state and "UNICODE" in op.name)
    return sorted(name for name, count in strings.items() if count > 1)


class _Entries:
    """The archive's entries as numpy arrays: views of the file's map where stored uncompressed."""

    def __init__(self, path: str, archive: zipfile.ZipFile, mapping, size: int, prefix: str):
        self.path, self.archive, self.mapping, self.size, self.prefix = path, archive, mapping, size, prefix
        self.decompressed: list[str] = []

    def read(self, name: str) -> bytes:
        try:
            return self.archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise LlamarunError(f"{self.path} is truncated or damaged: its entry {name} cannot be read ({e})") from None

    def storage(self, key: str, numpy_dtype: np.dtype, numel: int) -> np.ndarray:
        """Storage KEY's values, (numel,) of numpy_dtype."""
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise LlamarunError(f"{self.path} is damaged: its pickle names storage {key}, but the archive has no "
                                f"entry {name}") from None
        nbytes = numel * numpy_dtype.itemsize
        if info.file_size < nbytes:
            raise LlamarunError(f"{self.path} is damaged: storage {key} should hold {numel} values ({nbytes} bytes) "
                                f"but its entry has {info.file_size} bytes")
        if info.compress_type != zipfile.ZIP_STORED:
            # torch never compresses; a re-zipped file's entry cannot be a view of the map
            self.decompressed.append(name)
            return np.frombuffer(self.read(name), numpy_dtype, numel)
        return np.ndarray((numel,), numpy_dtype, self.mapping, self._data_offset(info, nbytes))

    def _data_offset(self, info: zipfile.ZipInfo, nbytes: int) -> int:
        """Where an entry's bytes start: after its local header, whose name and extra field (torch's
        alignment padding) may differ in length from the central directory's."""
        start = info.header_offset
        if start + LOCAL_HEADER.size > self.size:
            raise LlamarunError(f"{self.path} is truncated: the entry {info.filename} starts past its end")
        signature, name_length, extra_length = LOCAL_HEADER.unpack_from(self.mapping, start)
        if signature != ZIP_MAGIC:
            raise LlamarunError(f"{self.path} is damaged: the zip directory points at no entry for {info.filename}")
        offset = start + LOCAL_HEADER.size + name_length + extra_length
        if offset + nbytes > self.size:
            raise LlamarunError(f"{self.path} is truncated: storage {info.filename} runs {offset + nbytes - self.size} "
                                "bytes past the end of the file; download or save it again")
        return offset


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles what torch.save writes for a state dict, and nothing else.

    find_class is the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, and the
    EXT codes all go through it): every other name is refused there, so the REDUCE and
    BUILD opcodes can only ever call our own stand-ins, which build numpy views and run nothing."""

    def __init__(self, file, entries: _Entries):
        super().__init__(file)
        self.entries = entries
        self.storages: dict[str, _Storage] = {}
        self.rebuilt = 0              # tensors built (a name given twice is one more than the dict holds)
        self.functions = {("torch._utils", "_rebuild_tensor_v2"): _Function(self.rebuild_tensor),
                          ("torch._utils", "_rebuild_parameter"): _Function(self.rebuild_parameter)}

    def find_class(self, module: str, name: str):
        allowed = self.functions.get((module, name)) or _ALLOWED.get((module, name))
        if allowed is None and module == "torch" and name.endswith("Storage"):
            known = ", ".join(dtype for dtype, _ in STORAGE_TYPES.values())
            raise LlamarunError(f"{self.entries.path} holds tensors of torch.{name}, a type llamarun does not read "
                                f"(it reads {known})")
        if allowed is None:
            raise _Refused(f"its pickle asks for {module}.{name}, which a tensor checkpoint never needs")
        return allowed

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"its pickle names a persistent object {pid!r:.80}, which is not a storage record")
        _, storage_type, key, _location, numel = pid
        if not _STORAGE_KEY.fullmatch(key) or numel < 0:
            raise _Refused(f"its pickle names a storage {key!r:.40} of {numel} values, not one torch.save writes")
        storage = self.storages.get(key)
        if storage is None:
            dtype, numpy_dtype = STORAGE_TYPES[storage_type.name]
            values = self.entries.storage(key, np.dtype(numpy_dtype), numel)
            storage = self.storages[key] = _Storage(values, dtype)
        return storage

    def rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> PthTensor:
        """torch._utils._rebuild_tensor_v2's stand-in: a strided view of the storage, bounds checked."""
        if not isinstance(storage, _Storage):
            raise _Refused("its pickle rebuilds a tensor from something that is not a storage")
        size, stride = tuple(size), tuple(stride)
        if not (all(type(v) is int for v in (storage_offset, *size, *stride)) and len(size) == len(stride)):
            raise _Refused(f"its pickle rebuilds a tensor of size {size!r:.60} and stride {stride!r:.60}")
        path, values = self.entries.path, storage.values
        if min((storage_offset, *size, *stride)) < 0:
            raise LlamarunError(f"{path} has a tensor with a negative size, stride or offset (size {size}, stride "
                                f"{stride}, offset {storage_offset}), which llamarun cannot map")
        # the last value the view reads (an empty tensor reads none)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if 0 not in size else -1
        if last >= len(values):
            raise LlamarunError(f"{path} is damaged: a tensor of size {size} and stride {stride} at offset "
                                f"{storage_offset} reaches past its storage of {len(values)} values")
        item = values.itemsize
        data = np.ndarray(size, values.dtype, values, storage_offset * item, tuple(s * item for s in stride))
        self.rebuilt += 1
        return PthTensor(storage.dtype, data)

    def rebuild_parameter(self, data, requires_grad=False, backward_hooks=None) -> PthTensor:
        """torch._utils._rebuild_parameter's stand-in: a Parameter is its tensor."""
        if not isinstance(data, PthTensor):
            raise _Refused("its pickle makes a parameter of something that is not a tensor")
        return data


# the other globals a state dict's pickle may name: OrderedDict (a builtin type: no attribute of it can
# be set) and the storage types
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,        # state dicts and empty hook dicts
    **{("torch", name): _StorageType(name) for name in STORAGE_TYPES},
}
