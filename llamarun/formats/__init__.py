"""Model file formats: each module turns a file into a ModelConfig and named weight tensors."""
from __future__ import annotations

import os

from ..errors import LlamarunError


def load_checkpoint(path: str):
    """Open a model file of any supported format (memory-mapped)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LlamarunError(f"model file {path} not found: pass the path of a llama2.c .bin checkpoint or a "
                            "GGUF file with -m")
    if os.path.isdir(path):
        raise LlamarunError(f"{path} is a directory: pass the model file itself with -m")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        try:
            from . import gguf
        except ImportError as e:
            raise LlamarunError(f"reading the GGUF file {path} needs the gguf package ({e}): "
                                "pip install gguf") from None
        return gguf.load(path)
    from . import llama2c
    return llama2c.load(path)
