"""Hugging Face checkpoint directories (llamarun/formats/huggingface.py) against transformers itself.

Tiny random LlamaForCausalLM / MistralForCausalLM models are written with save_pretrained here; the
reference logits are transformers' own forward in float32 (eager attention) on the checkpoint as
saved, read back with from_pretrained(dtype=float32): for a bf16 or f16 checkpoint that is the
stored values upcast, what llamarun computes with. Tokenizers are compared with `tokenizers` and
transformers' PreTrainedTokenizerFast on the same tokenizer.json.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llamarun  # noqa: E402
from llamarun.errors import LlamarunError  # noqa: E402
from llamarun.formats.huggingface import load  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=256,
             max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
IDS = [int(i) for i in np.random.default_rng(7).integers(0, 256, 40)]   # 40 positions: past 16


# ----------------------------------------------------------------------------------------------
# checkpoints written by transformers

CASES = {
    # name: (architecture, stored dtype, config, save_pretrained options)
    "f32_gqa_untied": ("llama", "float32", dict(num_attention_heads=4, num_key_value_heads=2), {}),
    "f16_mha_tied": ("llama", "float16", dict(num_attention_heads=4, tie_word_embeddings=True), {}),
    "bf16_gqa_llama3": ("llama", "bfloat16", dict(num_attention_heads=8, num_key_value_heads=2,
                                                   rope_parameters={"rope_theta": 500000.0, **LLAMA3}), {}),
    "f32_linear": ("llama", "float32", dict(num_attention_heads=4, num_key_value_heads=1,
                                            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                             "factor": 2.0}), {}),
    "bf16_sharded": ("llama", "bfloat16", dict(num_attention_heads=4, num_key_value_heads=2),
                     dict(max_shard_size="40KB")),
    "mistral_window": ("mistral", "float32", dict(num_attention_heads=4, num_key_value_heads=2,
                                                  sliding_window=16), {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory, each written on first use."""
    made = {}

    def make(name):
        if name not in made:
            arch, dtype, config, options = CASES[name]
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            cls_config, cls_model = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if arch == "llama"
                                     else (transformers.MistralConfig, transformers.MistralForCausalLM))
            model = cls_model(cls_config(**SIZES, **config))
            model.to(getattr(torch, dtype)).save_pretrained(folder, **options)
            made[name] = str(folder)
        return made[name]
    return make


def reference_logits(folder: str, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits of every position, for the checkpoint as stored."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def assert_parity(folder: str, ids=IDS, exact=True, **load_options):
    # exact: float32 activations and KV cache, the reference arithmetic (the fast path's f16 cache
    # moves logits by ~1e-4 relative, as it does for GGUF files)
    llama = llamarun.load(folder, exact=exact, **load_options)
    got = llama.logits(ids)
    ref = reference_logits(folder, ids)
    assert got.shape == ref.shape
    tolerance = 1e-4 * (1 + np.abs(ref).max(axis=1))
    worst = np.abs(got - ref).max(axis=1)
    assert (worst <= tolerance).all(), f"worst row error {worst.max()} vs tolerance {tolerance.min()}"
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()
    return llama


@pytest.mark.parametrize("name", [n for n in CASES if n != "mistral_window"])
def test_logits_equal_transformers(checkpoints, name):
    assert_parity(checkpoints(name))


def test_stored_types_are_kept(checkpoints):
    """bf16/f16 matrices stay 2-byte views of the file; llama3 scaling and tying reach the config."""
    bf16 = load(checkpoints("bf16_gqa_llama3"))
    assert bf16.weights["wq"][0].ggml_type == "BF16" and bf16.weights["wq"][0].raw.base is not None
    assert bf16.config.rope_halves and bf16.config.rope_factors is not None and bf16.config.rope_theta == 500000.0
    assert not bf16.config.shared_classifier
    f16 = load(checkpoints("f16_mha_tied"))
    assert f16.weights["w2"][1].ggml_type == "F16" and f16.config.shared_classifier
    assert f16.weights["output"] is f16.weights["tok_embeddings"]
    f32 = load(checkpoints("f32_gqa_untied"))
    assert f32.weights["wk"][0].dtype == np.float32 and not f32.weights["wk"][0].flags.owndata
    assert "BF16" in bf16.description and "LlamaForCausalLM" in bf16.description


def test_sharded_directory_is_read_through_its_index(checkpoints):
    folder = checkpoints("bf16_sharded")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))


def test_transformers4_config_spelling(checkpoints, tmp_path):
    """The same llama3 checkpoint with transformers 4's top-level rope_theta and rope_scaling {"type": ...}."""
    folder = tmp_path / "v4"
    shutil.copytree(checkpoints("bf16_gqa_llama3"), folder)
    config = json.loads((folder / "config.json").read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    parameters["type"] = parameters.pop("rope_type")
    config["rope_scaling"] = parameters
    (folder / "config.json").write_text(json.dumps(config))
    v4 = load(str(folder))
    assert v4.config == load(checkpoints("bf16_gqa_llama3")).config
    assert_parity(str(folder))


def test_mistral_sliding_window_caps_the_context(checkpoints):
    folder = checkpoints("mistral_window")
    llama = assert_parity(folder, IDS[:16])
    assert llama.config.sliding_window == 16 and llama.config.seq_len == 16
    with pytest.raises(LlamarunError, match="sliding attention window"):
        llamarun.load(folder, n_ctx=32)


def test_generation_is_greedy_argmax(checkpoints):
    folder = checkpoints("f32_gqa_untied")
    out = llamarun.load(folder).generate(IDS[:5], max_tokens=4, temperature=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    ref = model.generate(torch.tensor([IDS[:5]]), max_new_tokens=4, do_sample=False)[0, 5:].tolist()
    assert out.tokens == ref


# ----------------------------------------------------------------------------------------------
# tokenizer files

TEXTS = ["Hello world!", "  two  spaces and\nnew lines\n\n", "numbers 12345 and émojis 🦙",
         "<|start|>system<|end|>hi", "it's <|eot_id|> done"]


def train_byte_level(path):
    """A small byte-level BPE tokenizer.json (Llama 3's kind), trained here with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|start|>",
                                                  "<|end|>", "<|eot_id|>"])
    tok.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 20 + TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(path))
    return tok


def train_sentencepiece_style(path):
    """A SentencePiece-style tokenizer.json (Llama 2's kind: '▁' spaces, byte fallback <0xXX>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 20,
                             trainers.BpeTrainer(vocab_size=120))
    state = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {text: i for i, text in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for text in sorted(state["vocab"], key=state["vocab"].get):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return tok


def write_random_checkpoint(folder, vocab_size=512, dim=32, hidden=64, layers=1, heads=2, dtype="BF16",
                            tensors=None, config=None, rng=np.random.default_rng(0)):
    """A LlamaForCausalLM directory of random weights (no torch; bf16 as float32's upper halves).
    tensors / config: entries that replace (or, as None, remove) the generated ones."""
    os.makedirs(folder, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (vocab_size, dim), "model.norm.weight": (dim,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
                       p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden)})
    specs = {}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        data = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes() if dtype == "BF16" else values.tobytes()
        specs[name] = {"dtype": dtype, "shape": list(shape), "data": data}
    for name, spec in (tensors or {}).items():
        if spec is None:
            specs.pop(name)
        else:
            specs[name] = spec
    write_safetensors(os.path.join(folder, "model.safetensors"), specs)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": dim, "intermediate_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "vocab_size": vocab_size,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(folder)


def write_safetensors(path, specs):
    """The documented layout: u64 header length, JSON header (padded to 8 bytes), the data in order."""
    header, offset = {}, 0
    for name, spec in specs.items():
        header[name] = {"dtype": spec["dtype"], "shape": spec["shape"],
                        "data_offsets": [offset, offset + len(spec["data"])]}
        offset += len(spec["data"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for spec in specs.values():
            f.write(spec["data"])


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("bytelevel"), vocab_size=512)
    train_byte_level(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"},
                   "chat_template": [{"name": "default", "template": "{{ bos_token }}T"},
                                     {"name": "tool_use", "template": "X"}]}, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 4], "temperature": 0.6, "top_p": 0.9, "do_sample": True}, f)
    return folder


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("spm"), vocab_size=512)
    train_sentencepiece_style(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)
    return folder


@pytest.mark.parametrize("kind", ["byte_level_dir", "sentencepiece_dir"])
def test_tokenizer_matches_tokenizers_and_transformers(kind, request):
    from tokenizers import Tokenizer
    folder = request.getfixturevalue(kind)
    tok = llamarun.load(folder).tokenizer
    path = os.path.join(folder, "tokenizer.json")
    reference = Tokenizer.from_file(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    for text in TEXTS:
        expected = reference.encode(text).ids                  # with the post-processor's BOS
        assert tok.encode(text) == expected, text
        assert fast(text)["input_ids"] == expected
        assert tok.encode(text, bos=False) == reference.encode(text, add_special_tokens=False).ids
        # decode: byte-level prints special tokens as written (as GGUF byte-level tokenizers and Hugging
        # Face's skip_special_tokens=False do), SentencePiece-style ones print nothing for <s> </s>
        byte_level = kind == "byte_level_dir"
        assert tok.decode(expected) == reference.decode(expected, skip_special_tokens=not byte_level), text
        assert tok.decode(tok.encode(text, bos=False) if byte_level else tok.encode(text)) == text


def test_byte_level_special_tokens_and_metadata(byte_level_dir):
    from tokenizers import Tokenizer
    checkpoint = load(byte_level_dir)        # (llamarun.load drops the merges, which its tokenizer has)
    tok, meta = checkpoint.tokenizer, checkpoint.metadata
    reference = Tokenizer.from_file(os.path.join(byte_level_dir, "tokenizer.json"))
    eot = reference.token_to_id("<|eot_id|>")
    assert tok.encode("a<|eot_id|>", bos=False)[-1] == eot
    assert eot not in tok.encode("a<|eot_id|>", bos=False, special=False)
    assert tok.bos_id == 0 and tok.eos_id == 1 and {1, 4} <= tok.eog_ids
    assert meta["tokenizer.chat_template"] == "{{ bos_token }}T"
    assert meta["general.sampling.temp"] == 0.6 and meta["general.sampling.top_p"] == 0.9
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.add_bos_token"] is True
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 512 and tokens[eot] == "<|eot_id|>" and tokens[-1] == "[PAD511]"
    assert meta["tokenizer.ggml.token_type"][eot] == 3
    merges = json.loads(reference.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    # what a GGUF file with this metadata reads back as: the same tokenizer
    from llamarun.tokenizers import tokenizer_from_gguf
    gguf_tok = tokenizer_from_gguf(dict(meta.items()))
    for text in TEXTS:
        assert gguf_tok.encode(text, bos=True) == tok.encode(text)


def test_sentencepiece_style_metadata_reads_back(sentencepiece_dir):
    """The "llama" vocabulary written for a SentencePiece-style tokenizer.json (scores from merge ranks)
    encodes as the tokenizer.json does, through llamarun's GGUF SentencePiece tokenizer."""
    from llamarun.tokenizers import tokenizer_from_gguf
    checkpoint = load(sentencepiece_dir)
    meta = checkpoint.metadata
    assert meta["tokenizer.ggml.model"] == "llama"
    gguf_tok = tokenizer_from_gguf(dict(meta.items()))
    for text in ["Hello world, the quick fox", "lazy dogs jump", "ünïcode bytes"]:
        assert gguf_tok.encode(text) == checkpoint.tokenizer.encode(text), text


def test_tokenizer_model_is_the_fallback(tmp_path):
    from llamarun.tokenizers import SentencePieceTokenizer
    from conftest import MODELS, require
    folder = write_random_checkpoint(tmp_path / "spmodel", vocab_size=32000, dim=16, hidden=32, heads=2)
    shutil.copy(require(MODELS / "tokenizer.model"), os.path.join(folder, "tokenizer.model"))
    llama = llamarun.load(folder)
    assert isinstance(llama.tokenizer, SentencePieceTokenizer)
    assert llama.encode("Hello") == [1, 15043]
    assert llama.checkpoint.metadata["tokenizer.ggml.model"] == "llama"


def test_vocabulary_metadata_is_built_lazily(byte_level_dir):
    meta = load(byte_level_dir).metadata
    assert meta._pending                                  # nothing built by opening
    assert meta.pop("tokenizer.ggml.merges", None) is None and meta._pending   # dropped, not built
    assert "tokenizer.ggml.merges" not in meta and "tokenizer.ggml.tokens" in meta
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and not meta._pending


# ----------------------------------------------------------------------------------------------
# bad input: one line each

def one_line_error(folder, match):
    with pytest.raises(LlamarunError, match=match) as info:
        llamarun.load(str(folder))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_config(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m")
    os.remove(os.path.join(folder, "config.json"))
    one_line_error(folder, "config.json")


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"])
def test_missing_config_key(tmp_path, key):
    one_line_error(write_random_checkpoint(tmp_path / "m", config={key: None}), f"lacks {key}")


@pytest.mark.parametrize("config, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*LlamaForCausalLM and MistralForCausalLM"),
    ({"head_dim": 8}, "head_dim 8"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' RoPE scaling"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
    ({"num_key_value_heads": 3}, "does not divide"),
])
def test_unsupported_config(tmp_path, config, match):
    one_line_error(write_random_checkpoint(tmp_path / "m", config=config), match)


def test_wrong_shape(tmp_path):
    spec = {"dtype": "F32", "shape": [32, 16], "data": bytes(32 * 16 * 4)}
    one_line_error(write_random_checkpoint(tmp_path / "m", tensors={"model.layers.0.self_attn.k_proj.weight": spec}),
                   r"k_proj.weight has shape \(32, 16\) but config.json implies \(32, 32\)")


def test_missing_tensor(tmp_path):
    one_line_error(write_random_checkpoint(tmp_path / "m", tensors={"model.layers.0.mlp.up_proj.weight": None}),
                   "lacks the tensor model.layers.0.mlp.up_proj.weight")


def test_unread_dtype(tmp_path):
    spec = {"dtype": "F64", "shape": [32], "data": bytes(32 * 8)}
    one_line_error(write_random_checkpoint(tmp_path / "m", tensors={"model.norm.weight": spec}), "stored as F64")


def rewrite_header(path, change):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_unknown_dtype(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m")
    rewrite_header(os.path.join(folder, "model.safetensors"),
                   lambda h: h["model.norm.weight"].update(dtype="Q7"))
    one_line_error(folder, "not a valid safetensors file.*Q7")


def test_truncated_file(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 10)
    one_line_error(folder, "not a valid safetensors file")


def test_header_offsets_lie(tmp_path):
    def lie(header):
        header["model.norm.weight"]["data_offsets"][1] += 2     # 2 bytes more than its 32 float32s
    folder = write_random_checkpoint(tmp_path / "m")
    rewrite_header(os.path.join(folder, "model.safetensors"), lie)
    one_line_error(folder, "not a valid safetensors file.*offset")


def test_shard_missing_from_index(checkpoints, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(checkpoints("bf16_sharded"), folder)
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    os.remove(folder / shard)
    one_line_error(folder, f"lacks {shard}, a shard listed")


def test_duplicate_tensor_across_shards(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m")
    from safetensors.numpy import save_file
    save_file({"model.norm.weight": np.ones(32, np.float32)}, os.path.join(folder, "extra.safetensors"))
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "main.safetensors"))
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "main.safetensors"), "numpy") as f:
        weight_map = {name: "main.safetensors" for name in f.keys()}
    weight_map["model.norm.weight"] = "extra.safetensors"      # and main.safetensors holds it too
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    one_line_error(folder, "model.norm.weight is in both")


def test_shard_outside_the_directory_is_refused(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "../model.safetensors"}}, f)
    one_line_error(folder, "not a file name in the directory")


# ----------------------------------------------------------------------------------------------
# memory

RSS_SCRIPT = """
import sys
from llamarun.formats.huggingface import load
import tokenizers, safetensors

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

before = rss()
checkpoint = load(sys.argv[1])
print(rss() - before)
"""


def test_opening_adds_little_memory(tmp_path):
    """Opening a ~100 MB bf16 directory maps it: under 50 MB of RSS before the first forward."""
    folder = write_random_checkpoint(tmp_path / "big", vocab_size=32000, dim=512, hidden=1536, layers=8, heads=8)
    size = os.path.getsize(os.path.join(folder, "model.safetensors"))
    assert size > 80e6
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, folder], capture_output=True, text=True, env=env, check=True)
    added = int(out.stdout.split()[-1])
    assert added < 50e6, f"opening a {size / 1e6:.0f} MB checkpoint added {added / 1e6:.1f} MB of RSS"
