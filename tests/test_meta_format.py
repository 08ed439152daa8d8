"""Meta checkpoint directories (params.json + consolidated.NN.pth), read without torch.

The checkpoints are written here with torch.save in Meta's model-parallel layout; the reference is a
direct float32 implementation of Meta's forward (llama/model.py: complex RoPE with torch.polar and
view_as_complex, repeat_kv, SwiGLU, RMSNorm, and Llama 3.1's apply_scaling), independent of llamarun.
"""
import json
import math
import mmap
import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llamarun  # noqa: E402
from conftest import MODELS, logits_tolerance, require, require_module  # noqa: E402
from llamarun.errors import LlamarunError  # noqa: E402
from llamarun.formats import load_checkpoint  # noqa: E402

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 2, 4, 2, 256
# Meta's FeedForward rule: int(2 * 4 * 64 / 3) = 170, * 1.3 = 221, up to a multiple of 32: 224
MULTIPLE_OF, FFN_MULTIPLIER, HIDDEN = 32, 1.3, 224
PARAMS = dict(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, vocab_size=-1, multiple_of=MULTIPLE_OF,
              ffn_dim_multiplier=FFN_MULTIPLIER, norm_eps=1e-5, rope_theta=10000.0)
IDS = [5, 17, 200, 3, 99, 42, 7, 128, 255, 0, 61]

# the axis each kind of tensor is cut along by Meta's model-parallel layers (None: replicated)
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2", "tok_embeddings")


def split_axis(name):
    kind = name.split(".")[-2]
    return 0 if kind in COLUMN_PARALLEL else 1 if kind in ROW_PARALLEL else None


def random_weights(vocab=VOCAB, seed=0):
    """Meta's names -> bfloat16 tensors of a tiny model."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    D = DIM // N_HEADS
    w = {"tok_embeddings.weight": r(vocab, DIM, scale=1.0), "norm.weight": 1 + r(DIM, scale=0.1),
         "output.weight": r(vocab, DIM, scale=0.2)}
    for layer in range(N_LAYERS):
        p = f"layers.{layer}."
        w[p + "attention.wq.weight"] = r(N_HEADS * D, DIM, scale=0.2)
        w[p + "attention.wk.weight"] = r(N_KV_HEADS * D, DIM, scale=0.2)
        w[p + "attention.wv.weight"] = r(N_KV_HEADS * D, DIM, scale=0.2)
        w[p + "attention.wo.weight"] = r(DIM, N_HEADS * D, scale=0.1)
        w[p + "feed_forward.w1.weight"] = r(HIDDEN, DIM, scale=0.15)
        w[p + "feed_forward.w2.weight"] = r(DIM, HIDDEN, scale=0.07)
        w[p + "feed_forward.w3.weight"] = r(HIDDEN, DIM, scale=0.15)
        w[p + "attention_norm.weight"] = 1 + r(DIM, scale=0.1)
        w[p + "ffn_norm.weight"] = 1 + r(DIM, scale=0.1)
    return w


def shard_dicts(weights, n_shards):
    """Each rank's state dict, as Meta's model-parallel checkpoints hold them (slices with storages of their own)."""
    shards = []
    for rank in range(n_shards):
        shard = {}
        for name, t in weights.items():
            axis = split_axis(name)
            part = t if axis is None else t.chunk(n_shards, axis)[rank]
            shard[name] = part.clone(memory_format=torch.contiguous_format)
        shards.append(shard)
    return shards


def write_checkpoint(path, weights, n_shards=1, params=PARAMS, shards=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shards or shard_dicts(weights, n_shards)):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path


# ----------------------------------------------------------------------------------------------
# Meta's forward (llama/model.py), float32

def apply_scaling(freqs):
    """Llama 3.1's apply_scaling, as Meta wrote it."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def precompute_freqs_cis(dim, end, theta, use_scaled):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if use_scaled:
        freqs = apply_scaling(freqs)
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)          # (end, dim/2) complex64


def apply_rotary_emb(x, freqs_cis):                            # x (n, heads, D)
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis[:, None, :]).flatten(2)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def meta_forward(weights, params, ids):
    """Every position's logits, (len(ids), vocab) float32."""
    w = {name: t.float() for name, t in weights.items()}
    H, KV = params["n_heads"], params["n_kv_heads"]
    D, eps, n = params["dim"] // H, params["norm_eps"], len(ids)
    freqs_cis = precompute_freqs_cis(D, n, params["rope_theta"], params.get("use_scaled_rope", False))
    mask = torch.full((n, n), float("-inf")).triu(1)
    h = w["tok_embeddings.weight"][torch.tensor(ids)]
    for layer in range(params["n_layers"]):
        p = f"layers.{layer}."
        x = rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = (x @ w[p + "attention.wq.weight"].T).view(n, H, D)
        k = (x @ w[p + "attention.wk.weight"].T).view(n, KV, D)
        v = (x @ w[p + "attention.wv.weight"].T).view(n, KV, D)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        k = k[:, :, None, :].expand(n, KV, H // KV, D).reshape(n, H, D)     # repeat_kv
        v = v[:, :, None, :].expand(n, KV, H // KV, D).reshape(n, H, D)
        scores = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / math.sqrt(D) + mask     # (H, n, n)
        out = (torch.softmax(scores.float(), dim=-1) @ v.transpose(0, 1)).transpose(0, 1).reshape(n, H * D)
        h = h + out @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return (rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T).numpy()


def meta_greedy(weights, params, ids, steps):
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(np.argmax(meta_forward(weights, params, ids)[-1])))
    return ids[-steps:]


def assert_logits_close(ours, reference):
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max(axis=-1)
    assert np.all(error <= logits_tolerance(reference, 1e-4)), error


def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------------------------
# parity

@pytest.fixture(scope="module")
def weights():
    return random_weights()


@pytest.fixture(scope="module")
def two_shards(weights, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("meta") / "llama-tiny", weights, n_shards=2)


@pytest.fixture(scope="module")
def one_shard(weights, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("meta") / "llama-tiny", weights, n_shards=1)


def test_two_bfloat16_shards_give_metas_logits(weights, two_shards):
    model = llamarun.load(two_shards, exact=True)
    c = model.checkpoint.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == \
        (DIM, HIDDEN, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB)
    assert not c.rope_halves and c.rope_factors is None and not c.shared_classifier
    assert c.seq_len == 4096            # Llama 2's (norm_eps 1e-5, rope_theta 10000)
    assert model.checkpoint.description == "Meta checkpoint, 2 shards, bfloat16"
    assert model.checkpoint.metadata["general.name"] == "llama-tiny"
    assert_logits_close(model.logits(IDS), meta_forward(weights, PARAMS, IDS))
    completion = model.generate(IDS, max_tokens=6, temperature=0)
    assert completion.tokens == meta_greedy(weights, PARAMS, IDS, 6)


def test_one_shard_stays_memory_mapped(weights, one_shard):
    model = llamarun.load(one_shard, exact=True)
    assert model.checkpoint.description == "Meta checkpoint, 1 shard, bfloat16"
    for matrix in (model.checkpoint.weights["wq"][1], model.checkpoint.weights["w2"][0],
                   model.checkpoint.weights["tok_embeddings"], model.checkpoint.weights["output"]):
        assert matrix.ggml_type == "BF16" and matrix.raw.dtype == np.uint8
        base = matrix.raw
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, mmap.mmap)          # 2 bytes a weight, read from the file's map, never copied
    assert_logits_close(model.logits(IDS), meta_forward(weights, PARAMS, IDS))


@pytest.mark.parametrize("dtype, n_shards, kind", [(torch.float16, 1, "F16"), (torch.float32, 2, "float32")])
def test_float16_and_float32_checkpoints(weights, tmp_path, dtype, n_shards, kind):
    typed = {name: t.to(dtype) for name, t in weights.items()}
    model = llamarun.load(write_checkpoint(tmp_path / "typed", typed, n_shards=n_shards), exact=True)
    wq = model.checkpoint.weights["wq"][0]
    assert getattr(wq, "ggml_type", str(getattr(wq, "dtype", None))) == kind
    assert_logits_close(model.logits(IDS), meta_forward(typed, PARAMS, IDS))


def test_llama31_scaled_rope_at_long_positions(weights, tmp_path):
    # apply_scaling slows the pairs whose wavelength exceeds 2048 positions (with head_dim 16 and
    # theta 500000: 4 of 8): at position p their angles differ by p * (1 - 1/factor) * freq, which is
    # a large fraction of a turn for a few hundred positions, and nothing near position 0
    params = dict(PARAMS, rope_theta=500000.0, use_scaled_rope=True)
    path = write_checkpoint(tmp_path / "llama31", weights, n_shards=1, params=params)
    model = llamarun.load(path, exact=True)
    assert model.checkpoint.config.seq_len == 131072
    ids = list(np.random.default_rng(1).integers(0, VOCAB, 700))
    reference = meta_forward(weights, params, ids)
    unscaled = meta_forward(weights, dict(params, use_scaled_rope=False), ids)
    assert np.abs(reference - unscaled)[-1].max() > 100 * logits_tolerance(reference, 1e-4)[-1]   # the test can tell
    assert_logits_close(model.logits(ids), reference)


def test_a_compressed_entry_is_read_into_memory(weights, one_shard, tmp_path):
    path = tmp_path / "deflated"
    path.mkdir()
    (path / "params.json").write_text((one_shard / "params.json").read_text())
    rezip(one_shard / "consolidated.00.pth", path / "consolidated.00.pth", compression=zipfile.ZIP_DEFLATED)
    model = llamarun.load(path, exact=True)
    assert "compressed" in model.checkpoint.description and "read into memory" in model.checkpoint.description
    assert_logits_close(model.logits(IDS), meta_forward(weights, PARAMS, IDS))


def test_tokenizer_model_becomes_gguf_metadata(tmp_path):
    spm = require_module("sentencepiece")
    tokenizer_file = require(MODELS / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    path = write_checkpoint(tmp_path / "Llama-2-tiny", random_weights(vocab=sp.vocab_size()))
    (path / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    model = llamarun.load(path, exact=True)
    text = "Hello world, it's 2024!"
    assert model.encode(text) == [sp.bos_id()] + sp.encode(text)
    meta = model.checkpoint.metadata
    assert meta["general.name"] == "Llama-2-tiny" and meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert meta["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    types = meta["tokenizer.ggml.token_type"]
    assert (types[0], types[1], types[2], types[3 + ord("A")], types[1000]) == (2, 3, 3, 6, 1)   # unk, bos, eos, <0x41>
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    from llamarun.tokenizers import tokenizer_from_gguf      # what a GGUF file written from this metadata reads
    assert tokenizer_from_gguf(meta).encode(text) == [sp.bos_id()] + sp.encode(text)


# ----------------------------------------------------------------------------------------------
# safety: nothing in the file runs

class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_pth(path, marker):
    """A zip laid out as torch.save's whose pickle calls os.system("touch MARKER") when unpickled."""
    payload = pickle.dumps({"tok_embeddings.weight": _RunsCommand(f"touch {marker}")}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("consolidated/data.pkl", payload)
        z.writestr("consolidated/version", "3\n")
    return payload


def test_a_pickle_that_calls_os_system_is_refused(tmp_path, capsys):
    path = tmp_path / "evil"
    path.mkdir()
    (path / "params.json").write_text(json.dumps(PARAMS))
    marker = tmp_path / "pwned"
    payload = malicious_pth(path / "consolidated.00.pth", marker)
    with pytest.raises(LlamarunError) as excinfo:
        llamarun.load(path)
    one_line_error(excinfo, f"{os.system.__module__}.system", "never runs code")
    from llamarun.cli import main
    assert main(["info", "-m", str(path)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()
    live = tmp_path / "fired"         # (as long as "pwned") the same payload does run under a plain unpickler: the test can tell
    pickle.loads(payload.replace(str(marker).encode(), str(live).encode()))
    assert live.exists()


# ----------------------------------------------------------------------------------------------
# bad input: one line each

def rezip(src, dst, compression=zipfile.ZIP_STORED, change=lambda name, data: data):
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for info in old.infolist():
            new.writestr(info.filename, change(info.filename, old.read(info.filename)))


@pytest.fixture
def checkpoint(weights, tmp_path):
    return write_checkpoint(tmp_path / "ckpt", weights, n_shards=2)


def edit_params(path, **changes):
    params = {**json.loads((path / "params.json").read_text()), **changes}
    (path / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))


@pytest.mark.parametrize("changes, words", [
    (dict(dim=None), "no 'dim'"),
    (dict(n_heads="4"), "n_heads is '4'"),
    (dict(n_layers=0), "n_layers is 0"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(use_scaled_rope="yes"), "use_scaled_rope"),
    (dict(n_heads=5), "does not split into 5 heads"),
    (dict(n_kv_heads=4), "layers.0.attention.wk.weight is (32, 64)"),
    (dict(multiple_of=256), "feed_forward.w1.weight is (224, 64)"),
    (dict(n_layers=3), "lacks layers.2"),
    (dict(vocab_size=300), "tok_embeddings.weight is (256, 64)"),
])
def test_bad_params(checkpoint, changes, words):
    edit_params(checkpoint, **changes)
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(checkpoint)
    one_line_error(excinfo, words)


def test_bad_json_and_a_missing_params_file(checkpoint):
    (checkpoint / "params.json").write_text("{dim: 64")
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(checkpoint)
    one_line_error(excinfo, "params.json is not valid JSON")
    (checkpoint / "params.json").unlink()
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(checkpoint)
    one_line_error(excinfo, "neither a params.json")


def test_shards_that_do_not_fit_together(weights, tmp_path):
    good = shard_dicts(weights, 2)
    cases = [
        ({"layers.0.attention.wq.weight": torch.zeros(8, 48, dtype=torch.bfloat16)}, "do not join along axis 0"),
        ({"layers.1.ffn_norm.weight": torch.zeros(DIM, dtype=torch.bfloat16)}, "differs in consolidated.01.pth"),
        ({"layers.0.attention.wo.weight": good[1]["layers.0.attention.wo.weight"].float()}, "bfloat16 and float32"),
        ({"layers.0.attention.wo.weight": None}, "consolidated.00.pth has layers.0.attention.wo.weight and "
                                                  "consolidated.01.pth does not"),
        ({"layers.0.attention.bias": torch.zeros(3)}, "consolidated.01.pth has layers.0.attention.bias"),
    ]
    for i, (change, words) in enumerate(cases):
        second = {**good[1], **change}
        second = {name: t for name, t in second.items() if t is not None}
        path = write_checkpoint(tmp_path / str(i), weights, shards=[good[0], second])
        with pytest.raises(LlamarunError) as excinfo:
            load_checkpoint(path)
        one_line_error(excinfo, "do not fit together", words)


def test_a_missing_shard(checkpoint):
    (checkpoint / "consolidated.01.pth").rename(checkpoint / "consolidated.02.pth")
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(checkpoint)
    one_line_error(excinfo, "consolidated.01.pth is missing")


def test_a_name_given_twice_in_a_shard(checkpoint):
    shard = checkpoint / "consolidated.00.pth"
    rezip(shard, checkpoint / "tmp.pth", change=lambda name, data: data.replace(
        b"layers.0.attention.wk.weight", b"layers.0.attention.wq.weight") if name.endswith("data.pkl") else data)
    (checkpoint / "tmp.pth").replace(shard)
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(checkpoint)
    one_line_error(excinfo, "gives a tensor name twice (layers.0.attention.wq.weight)")


@pytest.mark.parametrize("dtype, words", [
    (torch.float64, "layers.0.attention.wq.weight is float64"),
    (torch.complex64, "torch.ComplexFloatStorage, a type llamarun does not read"),
])
def test_an_unknown_dtype(weights, tmp_path, dtype, words):
    odd = dict(weights, **{"layers.0.attention.wq.weight": weights["layers.0.attention.wq.weight"].to(dtype)})
    path = write_checkpoint(tmp_path / "odd", odd)
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, words)


def test_truncated_legacy_and_foreign_files(one_shard, weights, tmp_path):
    path = tmp_path / "broken"
    path.mkdir()
    (path / "params.json").write_text(json.dumps(PARAMS))
    shard = path / "consolidated.00.pth"
    data = (one_shard / "consolidated.00.pth").read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "consolidated.00.pth is truncated")
    torch.save(weights, shard, _use_new_zipfile_serialization=False)
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "legacy format")
    shard.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "is not a PyTorch checkpoint")


def test_a_llama3_tiktoken_tokenizer_is_refused(one_shard, tmp_path):
    path = tmp_path / "llama3"
    path.mkdir()
    for name in ("params.json", "consolidated.00.pth"):
        (path / name).write_bytes((one_shard / name).read_bytes())
    (path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(LlamarunError) as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, "tiktoken")


def test_a_pickle_that_would_change_a_stand_in_is_refused(tmp_path):
    # BUILD on the storage-type stand-in would rename torch.FloatStorage for every later load
    payload = (b"\x80\x02ctorch\nFloatStorage\nN}X\x04\x00\x00\x00nameX\x0f\x00\x00\x00BFloat16Storages\x86b0}.")
    path = tmp_path / "consolidated.00.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("consolidated/data.pkl", payload)
    from llamarun.formats import pth
    with pytest.raises(LlamarunError) as excinfo:
        pth.load(path)
    one_line_error(excinfo, "sets the state of a StorageType")
