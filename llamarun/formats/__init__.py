"""Model file formats: each module turns a file (or a checkpoint directory) into a checkpoint.

A checkpoint, whatever its format, offers:
    path         the file or directory it was read from
    config       its ModelConfig (seq_len: the context it was trained for)
    weights      llamarun's names -> tensors: float32 numpy arrays (views of the file where it stores
                 float32), GGMLTensor (ggml block types, F16 and BF16 included: 2 bytes a weight, as
                 stored), GroupQuantized (llama2.c int8); the per-layer ones as lists by layer
    description  one line for the CLI ("GGUF v3, Q4_K_M", "Hugging Face safetensors, bf16")
    metadata     what it says beside the weights, in GGUF's key spelling whatever the format (general.name,
                 tokenizer.ggml.*, tokenizer.chat_template, general.sampling.*), so that chat templates,
                 special tokens, end tokens and recommended sampling are read one way; {} if nothing
    tokenizer    (optional) a Tokenizer the checkpoint brings as a file of its own (a directory's
                 tokenizer.json or tokenizer.model); None or absent: the metadata's, if any

Modules: gguf.py (GGUF files), llama2c.py (llama2.c .bin), meta.py (Meta's params.json +
consolidated.NN.pth directories, through pth.py's torch-free reader), huggingface.py (config.json +
safetensors directories).
"""
from __future__ import annotations

import os

from ..errors import LlamarunError

# A count, length or size in a header beyond this is corrupt, not a model's (the largest real ones: a
# vocabulary of a few 100k strings, a hidden width of a few 10k): such a file is reported as a corrupt
# header naming the field, never as a truncated download, and nothing is allocated for it.
MAX_HEADER_VALUE = 1 << 24

GGUF_MAGIC = b"GGUF"


def load_checkpoint(path: str):
    """Open a model of any supported format (memory-mapped): a directory by the config file in it
    (Meta's params.json, Hugging Face's config.json); a file as GGUF by its magic, or a name ending
    in .gguf; any other file is read as a llama2.c checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LlamarunError(f"model file {path} not found: pass the path of a GGUF file, a llama2.c .bin "
                            "checkpoint, or a Meta or Hugging Face checkpoint directory with -m")
    if os.path.isdir(path):
        return load_directory(path)
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


def load_directory(path: str):
    """A checkpoint directory: Hugging Face's (config.json) or Meta's (params.json)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from . import huggingface
        return huggingface.load(path)
    if os.path.isfile(os.path.join(path, "params.json")):
        from . import meta
        return meta.load(path)
    raise LlamarunError(f"{path} is a directory with neither a params.json (a Meta checkpoint) nor a config.json "
                        "(a Hugging Face checkpoint): pass a checkpoint directory, or a model file, with -m")
