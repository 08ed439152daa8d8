"""Hugging Face checkpoint directories (what `save_pretrained` writes and the Hub serves), memory-mapped.

    config.json                    the architecture (LlamaForCausalLM, MistralForCausalLM) and its sizes
    model.safetensors              the weights; or shards model-0000N-of-0000M.safetensors, each tensor
    model.safetensors.index.json   in the shard its {"weight_map": {tensor: file}} names
    tokenizer.json                 the tokenizer (through `tokenizers`), else tokenizer.model (SentencePiece)
    tokenizer_config.json          chat template, BOS/EOS texts, add_bos_token      (optional)
    generation_config.json         end-of-generation ids, recommended sampling      (optional)

A safetensors file, as documented by the `safetensors` project:

    header length N (u64 little-endian) | N bytes of JSON | data
    JSON: {tensor name: {"dtype": "BF16", "shape": [out, in], "data_offsets": [begin, end]},
           "__metadata__": {...}}            each tensor's bytes at 8 + N + begin .. 8 + N + end

The `safetensors` package checks a file first (a header that lies about its offsets, a truncated
file); the tensors are then numpy views of one read-only map of the file, made here from that
header: numpy has no bfloat16, so F16 and BF16 matrices stay the file's 2-byte values inside
GGMLTensors (tensors.py), float32 matrices are plain views, the 1-D norms small float32 copies.

Names (L = num_hidden_layers), Hugging Face's on the left, llamarun's on the right:

    model.embed_tokens.weight -> tok_embeddings (V, dim)   model.norm.weight -> norm (dim,)
    lm_head.weight            -> output (V, dim); absent or tie_word_embeddings: the embeddings
    model.layers.N.self_attn.{q,k,v,o}_proj.weight -> wq, wk, wv, wo [N]
    model.layers.N.mlp.gate_proj / up_proj / down_proj -> w1 / w3 / w2 [N]
    model.layers.N.input_layernorm -> attention_norm [N]; post_attention_layernorm -> ffn_norm [N]

Q and K are read as stored: Hugging Face's checkpoints rotate the halves of each head (rotate_half,
config.rope_halves), where Meta's and llama.cpp's rotate interleaved pairs; llama.cpp's converter
permutes the rows, a copy of wq and wk that the map saves.

`metadata` speaks GGUF's key spelling (formats/__init__.py), the vocabulary as llama.cpp's
convert_hf_to_gguf.py writes it; the vocabulary keys (100k+ strings) are built on first use only.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from ..config import ModelConfig, llama3_rope_factors
from ..errors import LlamarunError
from ..tensors import GGMLTensor
from .gguf import check_complete, expected_shapes
from .pages import map_file

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"

GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
                "lm_head.weight": "output"}
LAYER_NAMES = {"input_layernorm": "attention_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk",
               "self_attn.v_proj": "wv", "self_attn.o_proj": "wo", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "w1", "mlp.down_proj": "w2", "mlp.up_proj": "w3"}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.weight")
# buffers some older checkpoints saved beside the weights: RoPE's frequencies, recomputed from config.json
_IGNORED_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# safetensors dtypes llamarun reads: matrices as stored (float32 views, 2-byte GGMLTensors)
HALF_TYPES = {"F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16}
READ_DTYPES = ("F32", "F16", "BF16")


# ----------------------------------------------------------------------------------------------
# the checkpoint

class HuggingFaceCheckpoint:
    def __init__(self, path: str, architecture: str, config: ModelConfig, weights: dict, metadata,
                 tokenizer, dtype_counts: Counter, files: list):
        self.path = path
        self.architecture = architecture
        self.config = config
        self.weights = weights
        self.metadata = metadata
        self.tokenizer = tokenizer
        self.dtype_counts = dtype_counts     # safetensors dtype -> number of tensors llamarun uses
        self._files = files                  # the SafetensorsFiles (their maps) the tensors point into

    @property
    def description(self) -> str:
        """e.g. "Hugging Face LlamaForCausalLM, safetensors BF16 (155)": the tensors' dtypes by count."""
        counts = ", ".join(f"{dtype} ({n})" for dtype, n in self.dtype_counts.most_common())
        return f"Hugging Face {self.architecture}, safetensors {counts}"


def load(path: str) -> HuggingFaceCheckpoint:
    path = os.fspath(path)
    hf = read_json(path, "config.json")
    architecture = check_architecture(path, hf)
    files = open_weight_files(path)
    names = {name for file in files for name in file.entries}
    config = config_from_hf(path, hf, architecture, has_classifier="lm_head.weight" in names)
    weights, dtype_counts = map_weights(path, files, config)
    tokenizer, metadata = read_tokenizer(path, hf, config)
    return HuggingFaceCheckpoint(path, architecture, config, weights, metadata, tokenizer, dtype_counts, files)


def read_json(folder: str, name: str, required: bool = True):
    """The parsed JSON file `name` in `folder`; None if it is absent and not required."""
    file = os.path.join(folder, name)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if not required:
            return None
        raise LlamarunError(f"{folder} has no {name}: a Hugging Face checkpoint directory needs it") from None
    except OSError as e:
        raise LlamarunError(f"cannot read {file}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamarunError(f"{file} is not valid JSON ({e}): download it again") from None


# ----------------------------------------------------------------------------------------------
# config.json

def check_architecture(path: str, hf: dict) -> str:
    if not isinstance(hf, dict):
        raise LlamarunError(f"{path}/config.json is not a JSON object: download it again")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    if not architectures and hf.get("model_type") in ("llama", "mistral"):
        return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[hf["model_type"]]
    named = ", ".join(map(str, architectures)) or f"model_type {hf.get('model_type')!r}"
    raise LlamarunError(f"{path} holds a {named} model (config.json); llamarun runs Hugging Face checkpoints "
                        f"of {' and '.join(SUPPORTED_ARCHITECTURES)}")


def config_from_hf(path: str, hf: dict, architecture: str, has_classifier: bool) -> ModelConfig:
    """The hyper-parameters in config.json, with transformers' defaults where a key is optional."""
    where = f"{path}/config.json"

    def integer(key, default=None):
        value = hf.get(key, default)
        if value is None:
            raise LlamarunError(f"{where} lacks {key}, which a {architecture} model needs")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LlamarunError(f"{where} has {key} = {value!r}; expected a positive integer")
        return value

    def real(key, default):
        value = hf.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LlamarunError(f"{where} has {key} = {value!r}; expected a positive number")
        return float(value)

    dim, n_heads = integer("hidden_size"), integer("num_attention_heads")
    if dim % n_heads or (dim // n_heads) % 2:
        raise LlamarunError(f"{where}: hidden_size {dim} does not split into {n_heads} heads of even size")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise LlamarunError(f"{where} has head_dim {head_dim}, but llamarun needs it equal to hidden_size / "
                            f"num_attention_heads = {dim // n_heads}")
    n_kv_heads = integer("num_key_value_heads", n_heads)
    if n_heads % n_kv_heads:
        raise LlamarunError(f"{where}: num_key_value_heads {n_kv_heads} does not divide num_attention_heads {n_heads}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise LlamarunError(f"{where} has {key} true: llamarun runs Llama layers without biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise LlamarunError(f"{where} has hidden_act {hf['hidden_act']!r}; llamarun's feed-forward layer is SwiGLU (silu)")
    window = hf.get("sliding_window") if architecture == "MistralForCausalLM" else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise LlamarunError(f"{where} has sliding_window = {window!r}; expected a positive integer or null")
    tied = bool(hf.get("tie_word_embeddings", False)) or not has_classifier
    return ModelConfig(
        dim=dim,
        hidden_dim=integer("intermediate_size"),
        n_layers=integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=integer("vocab_size"),
        seq_len=integer("max_position_embeddings"),
        shared_classifier=tied,
        norm_eps=real("rms_norm_eps", 1e-6),
        rope_halves=True,
        sliding_window=window,
        **rope_settings(where, hf, dim // n_heads),
    )


def rope_settings(where: str, hf: dict, head_dim: int) -> dict:
    """rope_theta, rope_factors and rope_scale from either spelling: transformers 5's rope_parameters
    {"rope_type", "rope_theta", ...}, or transformers 4's top-level rope_theta with rope_scaling
    {"type" or "rope_type", "factor", ...}."""
    parameters = hf.get("rope_parameters")
    scaling = parameters if parameters is not None else hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise LlamarunError(f"{where} has RoPE settings {scaling!r}; expected a JSON object")
    scaling = scaling or {}
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise LlamarunError(f"{where} has rope_theta = {theta!r}; expected a positive number")
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LlamarunError(f"{where} rotates only part of each head (partial_rotary_factor); llamarun rotates all of it")
    kind = scaling.get("rope_type", scaling.get("type"))

    def number(key, default=None):
        value = scaling.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LlamarunError(f"{where}: {kind} RoPE scaling needs {key} as a positive number, not {value!r}")
        return value

    settings: dict = {"rope_theta": float(theta)}
    if kind in (None, "default"):
        return settings
    if kind == "linear":
        settings["rope_scale"] = float(number("factor"))
    elif kind == "llama3":
        settings["rope_factors"] = llama3_rope_factors(
            head_dim, float(theta), float(number("factor")), float(number("low_freq_factor", 1.0)),
            float(number("high_freq_factor", 4.0)), int(number("original_max_position_embeddings")))
    else:
        raise LlamarunError(f"{where} uses {kind!r} RoPE scaling; llamarun implements 'llama3' and 'linear' "
                            "(and none)")
    return settings


# ----------------------------------------------------------------------------------------------
# safetensors files

@dataclass
class SafetensorsFile:
    path: str
    mapping: mmap.mmap
    data_start: int           # 8 + the header's length: where data_offsets count from
    entries: dict             # tensor name -> {"dtype", "shape", "data_offsets"}


def open_weight_files(path: str) -> list[SafetensorsFile]:
    """model.safetensors, or every shard model.safetensors.index.json lists, checked to fit together:
    each listed file present and holding the tensors listed for it, no tensor in two files."""
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index_path):
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(single):
            return [open_safetensors(single)]
        others = sorted(name for name in os.listdir(path) if name.endswith((".bin", ".pt", ".pth", ".safetensors")))
        found = f" (it has {', '.join(others[:3])})" if others else ""
        raise LlamarunError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}{found}: llamarun reads Hugging Face "
                            "weights stored as safetensors")
    index = read_json(path, INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LlamarunError(f"{index_path} has no weight_map of tensor names to files: download it again")
    files = []
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise LlamarunError(f"{index_path} lists the shard {shard!r}, which is not a file name in the directory")
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise LlamarunError(f"{path} lacks {shard}, a shard listed in {INDEX_FILE}: download it again")
        files.append(open_safetensors(shard_path))
    check_shards(path, weight_map, files)
    return files


def check_shards(path: str, weight_map: dict, files: list[SafetensorsFile]) -> None:
    held: dict[str, str] = {}
    for file in files:
        for name in file.entries:
            if name in held:
                raise LlamarunError(f"{path}: the tensor {name} is in both {os.path.basename(held[name])} and "
                                    f"{os.path.basename(file.path)}: the shards do not fit together; download them again")
            held[name] = file.path
    for name, shard in weight_map.items():
        if os.path.basename(held.get(name, "")) != shard:
            raise LlamarunError(f"{path}: {INDEX_FILE} puts the tensor {name} in {shard}, which does not hold it: "
                                "the shards do not fit together; download them again")


def open_safetensors(path: str) -> SafetensorsFile:
    """Check the file with the safetensors package, then map it and read its header ourselves."""
    check_with_safetensors(path)
    try:
        with open(path, "rb") as f:
            mapping = map_file(f)
    except (OSError, ValueError) as e:
        raise LlamarunError(f"cannot map {path}: {getattr(e, 'strerror', None) or e}") from None
    (header_length,) = struct.unpack_from("<Q", mapping, 0)
    header = json.loads(mapping[8:8 + header_length])
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    return SafetensorsFile(path, mapping, 8 + header_length, entries)


def check_with_safetensors(path: str) -> None:
    """The safetensors package refuses a header that is cut short, lies about its offsets (a tensor's
    bytes not its shape's, past the end, overlapping), or names an unknown dtype."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise LlamarunError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(path, "numpy"):
            pass
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ").split(", expected one of")[0]
        raise LlamarunError(f"{path} is not a valid safetensors file ({reason.strip()}): download it again") from None
    except OSError as e:
        raise LlamarunError(f"cannot read {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------
# tensors

def map_weights(path: str, files: list[SafetensorsFile], config: ModelConfig) -> tuple[dict, Counter]:
    """llamarun's weight dict: views of the files' tensors under llamarun's names, checked for shape."""
    shapes = expected_shapes(config)
    L = config.n_layers
    weights: dict = {name: [None] * L for name in LAYER_NAMES.values()}
    dtypes: Counter = Counter()
    for file in files:
        for hf_name, entry in file.entries.items():
            if _IGNORED_TENSOR.fullmatch(hf_name):
                continue
            name, layer = llamarun_name(path, hf_name, L)
            if name == "output" and config.shared_classifier:
                continue                 # tie_word_embeddings: transformers ignores a stored lm_head too
            tensor = map_tensor(file, hf_name, entry, shapes[name])
            dtypes[entry["dtype"]] += 1
            if layer is None:
                weights[name] = tensor
            else:
                weights[name][layer] = tensor
    check_complete(path, weights, L, GLOBAL_NAMES, LAYER_NAMES, lambda layer, key: f"model.layers.{layer}.{key}.weight",
                   ": download the checkpoint again")
    if config.shared_classifier:
        weights["output"] = weights["tok_embeddings"]
    return weights, dtypes


def llamarun_name(path: str, hf_name: str, n_layers: int) -> tuple[str, int | None]:
    """('wq', 3) for model.layers.3.self_attn.q_proj.weight, ('norm', None) for model.norm.weight."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name], None
    match = _LAYER_TENSOR.fullmatch(hf_name)
    if match and match[2] in LAYER_NAMES and int(match[1]) < n_layers:
        return LAYER_NAMES[match[2]], int(match[1])
    raise LlamarunError(f"{path} has a tensor {hf_name}, which is not part of the llama model llamarun runs "
                        "(a variant it does not implement?)")


def map_tensor(file: SafetensorsFile, name: str, entry: dict, shape: tuple):
    """A float32 view or a 2-byte GGMLTensor over the file's bytes; a 1-D norm as a float32 copy."""
    dtype = entry["dtype"]
    if dtype not in READ_DTYPES:
        raise LlamarunError(f"{file.path}: tensor {name} is stored as {dtype}, which llamarun does not read "
                            f"(it reads {', '.join(READ_DTYPES)})")
    if tuple(entry["shape"]) != shape:
        raise LlamarunError(f"{file.path}: tensor {name} has shape {tuple(entry['shape'])} but config.json "
                            f"implies {shape}")
    start = file.data_start + entry["data_offsets"][0]
    if dtype in HALF_TYPES:
        raw = np.ndarray((shape[0], 2 * shape[-1]) if len(shape) == 2 else (2 * shape[0],), np.uint8, file.mapping, start)
        if len(shape) == 1:
            return half_to_float32(raw, dtype)
        return GGMLTensor(name, HALF_TYPES[dtype], shape, raw)
    if start % 4:                # a float32 tensor after an odd number of 2-byte values: aligned copy
        return np.frombuffer(file.mapping, np.uint8, 4 * int(np.prod(shape)), start).view(np.float32).reshape(shape).copy()
    tensor = np.ndarray(shape, np.float32, file.mapping, start)
    return tensor.copy() if len(shape) == 1 else tensor


def half_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """2-byte values (raw bytes, little-endian) -> float32: bfloat16 is float32's upper half."""
    if dtype == "F16":
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------------------
# tokenizer and metadata

def read_tokenizer(path: str, hf: dict, config: ModelConfig):
    """(tokenizer or None, metadata): tokenizer.json (else tokenizer.model) with tokenizer_config.json and
    generation_config.json's special tokens, chat template and sampling, in GGUF's key spelling."""
    from ..tokenizers.huggingface import BYTE_LEVEL, HuggingFaceTokenizer, load_hf_tokenizer
    from ..tokenizers.sentencepiece import SentencePieceTokenizer

    tokenizer_config = read_json(path, "tokenizer_config.json", required=False) or {}
    generation = read_json(path, "generation_config.json", required=False) or {}
    metadata: dict = {"general.architecture": "llama",
                      "general.name": os.path.basename(os.path.normpath(os.path.abspath(path)))}
    template = chat_template(path, tokenizer_config)
    if template:
        metadata["tokenizer.chat_template"] = template
    metadata.update(recommended_sampling(generation))
    end_ids = token_ids(generation.get("eos_token_id")) | token_ids(hf.get("eos_token_id"))

    json_path, model_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.isfile(json_path):
        hf_tokenizer = load_hf_tokenizer(json_path)

        def special_id(key):
            text = special_text(tokenizer_config.get(key))
            token = hf_tokenizer.token_to_id(text) if text else None
            if token is None:
                ids = sorted(token_ids(generation.get(f"{key}_id"), hf.get(f"{key}_id")))
                token = ids[0] if ids else None
            return token

        bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
        add_bos = tokenizer_config.get("add_bos_token")
        if not isinstance(add_bos, bool):                  # the post-processor decides, as in transformers
            add_bos = bos_id is not None and hf_tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        tokenizer = HuggingFaceTokenizer(hf_tokenizer, bos_id, eos_id, add_bos, end_ids=frozenset(end_ids))
        model_kind = "gpt2" if tokenizer.kind == BYTE_LEVEL else "llama"
        if model_kind == "gpt2" and pre_tokenizer_name(hf_tokenizer):
            metadata["tokenizer.ggml.pre"] = pre_tokenizer_name(hf_tokenizer)
        # two groups, each built when one of its keys is first read: the token list and types come from
        # the tokenizer in memory (what chat templates' special tokens need); the merges, or the
        # scores made from them, need the file parsed again (only `convert` reads them)
        tokens = lambda: tokens_from_hf(tokenizer, config.vocab_size)         # noqa: E731
        lazy = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": tokens}
        ranked = "tokenizer.ggml.merges" if model_kind == "gpt2" else "tokenizer.ggml.scores"
        lazy[ranked] = lambda: merges_from_json(json_path, tokenizer.kind, lazy_metadata)   # noqa: E731
    elif os.path.isfile(model_path):
        tokenizer = SentencePieceTokenizer.from_file(model_path)
        tokenizer.eog_ids = tokenizer.eog_ids | end_ids
        bos_id, eos_id, add_bos, model_kind = tokenizer.bos_id, tokenizer.eos_id, True, "llama"
        vocabulary = lambda: vocabulary_from_sentencepiece(tokenizer, config.vocab_size)   # noqa: E731
        lazy = dict.fromkeys(("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"),
                             vocabulary)
    else:
        return None, metadata
    if tokenizer.vocab_size > config.vocab_size:
        raise LlamarunError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                            f"{config.vocab_size}: the directory is inconsistent; download it again")
    metadata["tokenizer.ggml.model"] = model_kind
    metadata["tokenizer.ggml.add_bos_token"] = add_bos
    for key, token in (("bos", bos_id), ("eos", eos_id)):
        if token is not None:
            metadata[f"tokenizer.ggml.{key}_token_id"] = token
    lazy_metadata = LazyMetadata(metadata, lazy)
    return tokenizer, lazy_metadata


def special_text(value) -> str | None:
    """tokenizer_config.json spells a special token as its text or as an AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def token_ids(*values) -> set[int]:
    """The ids in values that are each an int, a list of ints, or null."""
    ids = set()
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                ids.add(item)
    return ids


def chat_template(path: str, tokenizer_config: dict) -> str | None:
    """chat_template.jinja (what newer transformers save), else tokenizer_config.json's chat_template: a
    string, or a list of named templates of which the one named "default" is the chat template."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                 "top_k": "general.sampling.top_k"}


def recommended_sampling(generation: dict) -> dict:
    """generation_config.json's temperature, top_p, top_k, which apply where it samples (do_sample true or unsaid)."""
    if not isinstance(generation, dict) or generation.get("do_sample", True) is False:
        return {}
    return {key: generation[name] for name, key in SAMPLING_KEYS.items()
            if isinstance(generation.get(name), (int, float)) and not isinstance(generation.get(name), bool)}


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for the pre-tokenizers of tokenizer.json it knows
# by their structure: the ones tokenizers/gguf.py reads back
def pre_tokenizer_name(hf_tokenizer) -> str | None:
    from ..tokenizers.gguf import LLAMA3_REGEX
    if hf_tokenizer.pre_tokenizer is None:
        return None
    spec = json.loads(hf_tokenizer.pre_tokenizer.__getstate__())
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
        return "llama-bpe"
    return None


# GGUF token types (tokenizers/gguf.py)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special, for the texts a Llama vocabulary has."""
    return text.startswith("<|") and text.endswith("|>")


def tokens_from_hf(tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.tokens and token_type for ids 0..vocab_size-1 as convert_hf_to_gguf.py writes them
    (a hole in the ids is "[PADn]", unused; added tokens control or user-defined)."""
    from ..tokenizers.huggingface import BYTE_LEVEL
    hf, byte_level = tokenizer.hf, tokenizer.kind == BYTE_LEVEL
    unknown = getattr(hf.model, "unk_token", None)
    tokens, types = [], []
    for token in range(vocab_size):
        text = hf.id_to_token(token)
        added = tokenizer.added.get(token)
        if text is None:
            text, kind = f"[PAD{token}]", UNUSED
        elif added is not None:
            kind = CONTROL if added.special or looks_special(text) else USER_DEFINED
        elif not byte_level and _BYTE_TOKEN.fullmatch(text):
            kind = BYTE
        elif not byte_level and text == unknown:
            kind = UNKNOWN
        else:
            kind = NORMAL
        tokens.append(text)
        types.append(kind)
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def merges_from_json(json_path: str, kind: str, metadata) -> dict:
    """tokenizer.ggml.merges ("a b", by rank) of a byte-level tokenizer.json; for a SentencePiece-style one,
    the tokenizer.ggml.scores that make SentencePiece's merge-by-score loop merge in the same order."""
    from ..tokenizers.huggingface import BYTE_LEVEL
    with open(json_path, encoding="utf-8") as f:
        merges = json.load(f).get("model", {}).get("merges", [])
    # tokenizers writes a merge as "a b" (older files) or ["a", "b"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    if kind == BYTE_LEVEL:
        return {"tokenizer.ggml.merges": [" ".join(pair) for pair in pairs]}
    return {"tokenizer.ggml.scores": merge_rank_scores(pairs, metadata["tokenizer.ggml.tokens"],
                                                       metadata["tokenizer.ggml.token_type"])}


def merge_rank_scores(pairs: list, tokens: list[str], types: list[int]) -> list[float]:
    """Scores under which SentencePiece's merge-by-score loop (GGUF "llama" tokenizers) merges as the BPE
    does by rank: a piece's score is minus the rank of the first merge that makes it; pieces no merge
    makes score 0 (single characters, bytes, specials), except other normal pieces, which get the lowest."""
    rank_of: dict[str, int] = {}
    for rank, (left, right) in enumerate(pairs):
        rank_of.setdefault(left + right, rank)
    lowest = -float(len(pairs) + 1)
    scores = []
    for text, kind in zip(tokens, types):
        rank = rank_of.get(text)
        scores.append(-float(rank) if rank is not None else
                      lowest if kind == NORMAL and len(text) > 1 else 0.0)
    return scores


def vocabulary_from_sentencepiece(tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.tokens, scores and token_type of a tokenizer.model, as convert_hf_to_gguf.py writes them."""
    sp = tokenizer.sp
    tokens, scores, types = [], [], []
    for token in range(vocab_size):
        if token >= sp.GetPieceSize():
            tokens.append(f"[PAD{token}]"), scores.append(-1000.0), types.append(UNUSED)
            continue
        kind = UNKNOWN if sp.IsUnknown(token) else CONTROL if sp.IsControl(token) else \
            UNUSED if sp.IsUnused(token) else BYTE if sp.IsByte(token) else NORMAL
        tokens.append(sp.IdToPiece(token)), scores.append(sp.GetScore(token)), types.append(kind)
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}


class LazyMetadata(MutableMapping):
    """A checkpoint's metadata whose vocabulary keys are built on first use: 100k+ strings (a 128k
    vocabulary, 280k merges) cost more than the rest of opening, and a model that runs from its
    tokenizer.json never reads them (chat templates' special tokens and `convert` do).

    lazy: key -> a function building a dict that holds that key (and perhaps others still pending).
    Deleting (or popping) a key before it is built drops it without building it, as api.load drops
    the merges it does not need; `pop` then returns its default (None if none is given)."""

    _MISSING = object()

    def __init__(self, values: dict, lazy: dict[str, Callable[[], dict]]):
        self._values = dict(values)
        self._pending = {key: build for key, build in lazy.items() if key not in values}

    def _build(self, key) -> None:
        built = self._pending[key]()
        for name, value in built.items():
            if name in self._pending:
                del self._pending[name]
                self._values[name] = value

    def __getitem__(self, key):
        if key in self._pending:
            self._build(key)
        return self._values[key]

    def __setitem__(self, key, value) -> None:
        self._pending.pop(key, None)
        self._values[key] = value

    def __delitem__(self, key) -> None:
        if self._pending.pop(key, None) is None:
            del self._values[key]

    def __contains__(self, key) -> bool:
        return key in self._values or key in self._pending

    def __iter__(self):
        return iter([*self._values, *self._pending])

    def __len__(self) -> int:
        return len(self._values) + len(self._pending)

    def pop(self, key, default=_MISSING):
        if key in self._pending:
            del self._pending[key]
            return None if default is self._MISSING else default
        return super().pop(key) if default is self._MISSING else super().pop(key, default)

    def __repr__(self) -> str:
        return f"LazyMetadata({self._values!r}, not yet built: {list(self._pending)})"
