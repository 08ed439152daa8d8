"""Model file formats: each module turns a file into a ModelConfig and named weight tensors."""
from __future__ import annotations

import os

from ..errors import LlamarunError

# A count, length or size in a header beyond this is corrupt, not a model's (the largest real ones: a
# vocabulary of a few 100k strings, a hidden width of a few 10k): such a file is reported as a corrupt
# header naming the field, never as a truncated download, and nothing is allocated for it.
MAX_HEADER_VALUE = 1 << 24

GGUF_MAGIC = b"GGUF"


def load_checkpoint(path: str):
    """Open a model file of any supported format (memory-mapped): GGUF by its magic, or a name ending
    in .gguf; anything else is read as a llama2.c checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LlamarunError(f"model file {path} not found: pass the path of a llama2.c .bin checkpoint or a "
                            "GGUF file with -m")
    if os.path.isdir(path):
        raise LlamarunError(f"{path} is a directory: pass the model file itself with -m")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LlamarunError(f"cannot read model file {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC and path.lower().endswith(".gguf"):
        found = "it is empty" if not magic else f"it starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}"
        raise LlamarunError(f"{path} is not a GGUF file: {found}")
    if magic == GGUF_MAGIC:
        try:
            from . import gguf
        except ImportError as e:
            raise LlamarunError(f"reading the GGUF file {path} needs the gguf package ({e}): "
                                "pip install gguf") from None
        return gguf.load(path)
    from . import llama2c
    return llama2c.load(path)
