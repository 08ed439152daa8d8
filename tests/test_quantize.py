"""llamarun quantize: llama2.c version 2 files as export.py writes them, GGUF files as the `gguf`
package reads them, the quality report, and refusals that leave nothing behind.

- tiny_q8.bin (float32) -> int8 group 64 must be tiny_q8.v2.bin, which llama2.c's export.py wrote
  from the same weights: byte for byte.
- SmolLM2 (Q4_1, Q8_0 embedding) -> q8_0 / q4_0 / q4_1 GGUF: our loader and gguf's GGUFReader read
  it, the metadata (tokenizer, chat template) comes through with its value types, the logits stay
  near the original's.
- A small synthetic float GGUF (F32 and F16 matrices, untied classifier, custom alignment) runs the
  GGUF path without the SmolLM2 download.
"""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

import llamarun
from llamarun.cli import main
from llamarun.errors import LlamarunError
from llamarun.formats import llama2c, load_checkpoint
from llamarun.formats.gguf import parse_header
from llamarun.quantize import measure_quality, metadata_value_types, quality_ids, quantize, quantize_q80

from conftest import MODELS, require
from test_gguf_format import bits, llamarun_tensor

T = gguf.GGMLQuantizationType
MATRICES = ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
NORMS = ("attention_norm", "ffn_norm", "norm")


def header_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8 << 20)         # the metadata of SmolLM2 (its tokenizer) is ~4 MB


# ------------------------------------------------------------------------------------------------
# llama2.c: float32 -> version 2 int8, against export.py


def test_tiny_q8_int8_equals_export_py(tmp_path):
    out = tmp_path / "tiny_q8.v2.bin"
    assert quantize(require(MODELS / "tiny_q8.bin"), out, "int8") == "llama2.c v2 int8 (group 64), 22 matrices"
    ours, ref = llama2c.load(out), llama2c.load(require(MODELS / "tiny_q8.v2.bin"))
    assert (ours.version, ours.group_size, ours.config) == (2, 64, ref.config)
    for name in MATRICES:
        assert np.array_equal(ours.weights[name].q, ref.weights[name].q), name
        assert np.array_equal(bits(ours.weights[name].scale), bits(ref.weights[name].scale)), name
    for name in NORMS:
        assert np.array_equal(bits(ours.weights[name]), bits(ref.weights[name])), name
    # header, padding, order: the very file export.py wrote (no group of these weights has a rounding tie)
    assert out.read_bytes() == (MODELS / "tiny_q8.v2.bin").read_bytes()


def test_version1_input_gives_the_same_file(tmp_path):
    out = tmp_path / "from_v1.bin"
    quantize(require(MODELS / "tiny_q8.v1.bin"), out, "int8", group_size=64)
    assert out.read_bytes() == require(MODELS / "tiny_q8.v2.bin").read_bytes()


def test_quantize_q80_rounds_ties_to_even_as_torch():
    """export.py's torch.round sends halves to the even integer (runq.c's activations use C's round,
    halves away from zero): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2. An all-zero group is zeros."""
    w = np.array([127, 0.5, 1.5, 2.5, -2.5, -0.5, 3.25, 0] + [0] * 8, np.float32)
    q, scale = quantize_q80(w, 8)
    assert scale.tolist() == [1.0, 0.0]
    assert q.tolist() == [127, 0, 2, 2, -2, 0, 3, 0] + [0] * 8


def test_untied_classifier_and_other_group_size(tmp_path):
    """tiny_untied (dim 48, hidden 128, its own classifier) with groups of 16: the classifier is
    written last, every value is its weight rounded to the nearest step of its group's scale, the
    logits stay close."""
    src = require(MODELS / "tiny_untied.bin")
    out = tmp_path / "untied.v2.bin"
    quantize(src, out, "int8", group_size=16)
    f32, q8 = llama2c.load(src), llama2c.load(out)
    assert not q8.config.shared_classifier and q8.group_size == 16
    for name in MATRICES + ("output",):
        w, t = np.asarray(f32.weights[name], np.float64), q8.weights[name]
        steps = w / np.repeat(t.scale, 16, axis=-1)                    # w in units of its group's step
        assert np.all(np.abs(steps - t.q) <= 0.5 + 1e-5), name         # ties may go either way in float32
        assert np.abs(t.q).max() == 127, name
    ids = [1, 450, 4996, 17354, 1701, 29916]
    before, after = llamarun.load(src).logits(ids), llamarun.load(out).logits(ids)
    assert np.abs(after - before).max() <= 0.05 * (1 + np.abs(before).max())


# ------------------------------------------------------------------------------------------------
# GGUF: SmolLM2 -> q8_0, q4_0, q4_1

GGUF_TYPES = ("q8_0", "q4_0", "q4_1")
PROMPT = "The capital of France is Paris, and the capital of Italy is"
# Against the Q4_1 original on PROMPT (13 tokens; mean |logit| 4.8), measured: mean |logit error|
# 0.24, 2.9, 0.51, top-1 agreement 13/13, 3/13, 11/13. q8_0 barely moves; q4_1 changes only the
# embedding (Q8_0 in the original); q4_0 (no per-block offset) moves most. Bounds: about twice that.
# (measure_quality is checked on the small models below: on SmolLM2 it costs two forward passes.)
MEAN_ERROR_BOUND = {"q8_0": 0.5, "q4_0": 6.0, "q4_1": 1.0}
TOP1_BOUND = {"q8_0": 0.9, "q4_0": 0.0, "q4_1": 0.6}


@pytest.fixture(scope="module")
def smol_original(smol_path):
    return llamarun.load(smol_path)


@pytest.fixture(scope="module", params=GGUF_TYPES)
def smol_quantized(request, smol_path, tmp_path_factory):
    qtype = request.param
    out = tmp_path_factory.mktemp("quantized") / f"smol.{qtype}.gguf"
    description = quantize(smol_path, out, qtype)
    assert description == f"GGUF, {qtype.upper()} (211), F32 (61)"
    return qtype, out


def test_smol_gguf_loads_with_the_metadata_of_the_input(smol_path, smol_original, smol_quantized):
    qtype, out = smol_quantized
    original, ours = load_checkpoint(smol_path), load_checkpoint(out)
    assert ours.config == original.config
    assert ours.description == f"GGUF v3 llama, {qtype.upper()} (211), F32 (61)"
    # every key, in order, with its value and its value type; only the file type changes
    expected = dict(original.metadata, **{"general.file_type": int(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])})
    assert list(ours.metadata) == list(expected)
    assert ours.metadata == expected
    assert metadata_value_types(header_bytes(out)) == metadata_value_types(header_bytes(smol_path))
    assert "<|im_start|>" in ours.metadata["tokenizer.chat_template"]
    # tensors: the input's names in the input's order; matrices in the new type, norms float32
    tensors, original_tensors = parse_header(header_bytes(out)).tensors, parse_header(header_bytes(smol_path)).tensors
    assert list(tensors) == list(original_tensors)
    for name, info in tensors.items():
        assert info.dims == original_tensors[name].dims, name
        assert info.type_id == (T[qtype.upper()] if len(info.dims) == 2 else T.F32), name
    # the tokenizer works from the copied metadata
    assert llamarun.load(out).encode("Hello world") == smol_original.encode("Hello world")


def test_smol_gguf_reads_with_gguf_reader(smol_path, smol_quantized):
    """gguf's own reader opens the file, and its tensors (bytes, and dequantized with gguf's
    dequantizer) are ours."""
    qtype, out = smol_quantized
    reader = gguf.GGUFReader(str(out))
    ours = load_checkpoint(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]
    for key, value in ours.metadata.items():                  # the tokenizer, the chat template...
        assert reader.fields[key].contents() == value, key
    assert len(reader.tensors) == 272
    for t in reader.tensors:
        tensor = llamarun_tensor(ours.weights, t.name)
        if t.tensor_type == T.F32:
            assert np.array_equal(bits(t.data), bits(tensor)), t.name
            continue
        assert t.tensor_type == T[qtype.upper()], t.name
        assert np.array_equal(t.data, tensor.raw), t.name
        if t.name.startswith(("blk.0.", "blk.29.")):       # gguf's dequantizer is slow: two layers
            assert np.array_equal(bits(gguf.quants.dequantize(t.data, t.tensor_type)), bits(tensor.dequantize())), t.name


def test_smol_gguf_requantizes_what_was_there(smol_path, smol_quantized):
    """A matrix already in the new type comes back bit for bit (the Q4_1 matrices to q4_1, the Q8_0
    embedding to q8_0: each block's min, max and step are on the grid already); any other is
    gguf.quants.quantize of the dequantized original (checked on a few: it takes a while)."""
    qtype, out = smol_quantized
    original, ours = load_checkpoint(smol_path), load_checkpoint(out)
    names = list(parse_header(header_bytes(smol_path)).tensors)
    unchanged = 0
    for name in names:
        before, after = llamarun_tensor(original.weights, name), llamarun_tensor(ours.weights, name)
        if isinstance(before, np.ndarray):                          # the float32 norms
            assert np.array_equal(bits(after), bits(before)), name
        elif before.qtype == after.qtype:
            assert np.array_equal(after.raw, before.raw), name
            unchanged += 1
        elif name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.17.ffn_down.weight"):
            assert np.array_equal(after.raw, gguf.quants.quantize(before.dequantize(), after.qtype)), name
    assert unchanged == {"q8_0": 1, "q4_0": 0, "q4_1": 210}[qtype]


@pytest.fixture(scope="module")
def smol_prompt(smol_original):
    """PROMPT's ids and the original's logits for them (one forward pass for every type)."""
    ids = smol_original.encode(PROMPT)
    return ids, smol_original.logits(ids)


def test_smol_gguf_logits_stay_close(smol_original, smol_prompt, smol_quantized):
    """The logits of a short prompt stay near the Q4_1 original's (loosely: another quantization). The
    written file's on the exact path: its weights' error alone (the fast path's is tested elsewhere),
    and no compile of a forward for each type set."""
    qtype, out = smol_quantized
    ids, before = smol_prompt
    after = llamarun.load(out, exact=True).logits(ids)
    assert np.abs(after - before).mean() <= MEAN_ERROR_BOUND[qtype]
    assert np.mean(after.argmax(-1) == before.argmax(-1)) >= TOP1_BOUND[qtype]
    if qtype != "q4_0":
        assert smol_original.decode([int(after[-1].argmax())]) == " Rome"


# ------------------------------------------------------------------------------------------------
# GGUF: a small float model (no download needed)

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 96


def write_float_gguf(path, dim: int = DIM) -> dict:
    """A small llama GGUF with F32 and F16 matrices, an untied classifier, alignment 64 and
    metadata of several value types; returns name -> float32 values of what it stored."""
    V = gguf.GGUFValueType
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    for key, value in {"llama.block_count": LAYERS, "llama.context_length": 64, "llama.embedding_length": dim,
                       "llama.feed_forward_length": HIDDEN, "llama.attention.head_count": HEADS,
                       "llama.attention.head_count_kv": KV_HEADS, "llama.vocab_size": VOCAB}.items():
        writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_key_value("test.u64", 2**40 + 3, V.UINT64)
    writer.add_key_value("test.i16s", [-3, 7], V.ARRAY, sub_type=V.INT16)
    writer.add_key_value("test.f64", 0.1, V.FLOAT64)
    writer.add_string("test.text", "h\u00e9llo")
    head = dim // HEADS
    shapes = {"token_embd.weight": (VOCAB, dim), "output_norm.weight": (dim,), "output.weight": (VOCAB, dim)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.attn_q.weight": (dim, dim),
                       f"blk.{i}.attn_k.weight": (KV_HEADS * head, dim), f"blk.{i}.attn_v.weight": (KV_HEADS * head, dim),
                       f"blk.{i}.attn_output.weight": (dim, dim), f"blk.{i}.ffn_norm.weight": (dim,),
                       f"blk.{i}.ffn_gate.weight": (HIDDEN, dim), f"blk.{i}.ffn_down.weight": (dim, HIDDEN),
                       f"blk.{i}.ffn_up.weight": (HIDDEN, dim)})
    stored = {}
    for n, (name, shape) in enumerate(shapes.items()):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        data = values.astype(np.float16) if len(shape) == 2 and n % 2 else values
        writer.add_tensor(name, data)
        stored[name] = data.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_float_gguf_input(tmp_path, qtype):
    src, out = tmp_path / "f.gguf", tmp_path / f"q.{qtype}.gguf"
    stored = write_float_gguf(src)
    quantize(src, out, qtype)
    ours = load_checkpoint(out)
    header = parse_header(header_bytes(out))
    assert list(header.tensors) == list(stored) and header.alignment == 64
    assert not ours.config.shared_classifier
    for name, values in stored.items():
        tensor = llamarun_tensor(ours.weights, name)
        if values.ndim == 1:
            assert np.array_equal(bits(tensor), bits(values)), name
        else:
            assert np.array_equal(tensor.raw, gguf.quants.quantize(values, T[qtype.upper()])), name
    expected = dict(load_checkpoint(src).metadata, **{"general.file_type": int(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])})
    assert ours.metadata == expected | {"general.quantization_version": 2}
    assert list(ours.metadata)[-1] == "general.quantization_version"          # added, as llama.cpp does
    types = metadata_value_types(header_bytes(out))
    assert types == metadata_value_types(header_bytes(src)) | {"general.quantization_version": (gguf.GGUFValueType.UINT32, None)}
    # no tokenizer in this file: the quality check scores pseudo-random ids
    quality = measure_quality(src, out)
    assert quality.scored_on.startswith("pseudo-random") and quality.tokens == 300
    assert 0 < quality.mean_abs_logit_error < 0.5 and quality.top1_agreement > 0.5


# the K-quant mixes of write_float_gguf(dim=256): rows of 256 take K-quants; ffn_down (rows of 128)
# falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); of the 2 layers,
# use_more_bits picks layer 1 (the last eighth) for attn_v and ffn_down
K_MIX_TYPES = {
    "q4_k_m": {"token_embd": "Q4_K", "output": "Q6_K", "attn_v": ("Q4_K", "Q6_K"), "ffn_down": ("Q5_0", "Q8_0"),
               "other": "Q4_K", "file_type": 15},
    "q5_k_m": {"token_embd": "Q5_K", "output": "Q6_K", "attn_v": ("Q5_K", "Q6_K"), "ffn_down": ("Q5_1", "Q8_0"),
               "other": "Q5_K", "file_type": 17},
    "q6_k": {"token_embd": "Q6_K", "output": "Q6_K", "attn_v": ("Q6_K", "Q6_K"), "ffn_down": ("Q8_0", "Q8_0"),
             "other": "Q6_K", "file_type": 18},
}


def expected_k_type(mix: str, name: str) -> str:
    types = K_MIX_TYPES[mix]
    kind = name.split(".")[-2]                       # token_embd, output, attn_v, ffn_down, attn_q...
    if kind in ("attn_v", "ffn_down"):
        return types[kind][int(name.split(".")[1])]
    return types.get(kind, types["other"])


@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_m", "q6_k"])
def test_float_gguf_to_k_quant_mixes(tmp_path, qtype):
    from llamarun.kquants import quantize as kquantize
    src, out = tmp_path / "f.gguf", tmp_path / f"q.{qtype}.gguf"
    stored = write_float_gguf(src, dim=256)
    description = quantize(src, out, qtype)
    assert description.startswith("GGUF, ") and description.endswith("F32 (5)")
    ours = load_checkpoint(out)
    assert ours.metadata["general.file_type"] == K_MIX_TYPES[qtype]["file_type"]
    for name, values in stored.items():
        tensor = llamarun_tensor(ours.weights, name)
        if values.ndim == 1:
            assert np.array_equal(bits(tensor), bits(values)), name
            continue
        expected = T[expected_k_type(qtype, name)]
        assert tensor.qtype == expected, name
        reference = kquantize(values, expected.name) if expected.name.endswith("_K") else \
            gguf.quants.quantize(values, expected)
        assert np.array_equal(tensor.raw, reference), name
        assert np.array_equal(gguf.quants.dequantize(tensor.raw, expected), tensor.dequantize()), name
    quality = measure_quality(src, out)
    assert 0 < quality.mean_abs_logit_error < 0.5 and quality.top1_agreement > 0.5


def test_rows_that_are_not_whole_blocks_are_refused(tmp_path):
    src = tmp_path / "f48.gguf"
    write_float_gguf(src, dim=48)                      # rows of 48 values: one and a half blocks of 32
    with pytest.raises(LlamarunError, match="token_embd.weight has rows of 48 values, not a whole number of Q8_0 blocks"):
        quantize(src, tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == [src]


# ------------------------------------------------------------------------------------------------
# the quality report


def test_quality_of_tiny_q8_int8(tmp_path):
    out = tmp_path / "tiny.v2.bin"
    src = require(MODELS / "tiny_q8.bin")
    quantize(src, out, "int8")
    q = measure_quality(src, out)          # tokenizer.bin beside tiny_q8.bin: the built-in text
    assert q.scored_on == "the built-in English text" and 250 <= q.tokens <= 350
    assert q.bytes_before == os.path.getsize(src) and q.bytes_after == os.path.getsize(out)
    assert abs(q.ppl_after / q.ppl_before - 1) < 0.01          # random weights: ppl near the vocabulary size
    assert 0 < q.mean_abs_logit_error < 0.1 and q.top1_agreement > 0.7
    text = "\n".join(q.lines())
    assert "perplexity" in text and "top-1 agreement" in text and "MB" in text


def test_quality_without_tokenizer_scores_random_ids(tmp_path, monkeypatch, capsys):
    """stories260K (vocab 512: the tokenizer.bin beside it does not fit) through the command line:
    groups of 4 (hidden_dim 172 = 4 * 43), a fixed pseudo-random id sequence scored."""
    monkeypatch.chdir(tmp_path)            # no tokenizer in the working directory either
    src, out = require(MODELS / "stories260K.bin"), tmp_path / "s260.v2.bin"
    assert main(["quantize", str(src), str(out), "--type", "int8", "--group-size", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out}: llama2.c v2 int8 (group 4), 36 matrices"
    assert printed[2] == "quality on 300 tokens of pseudo-random ids (no tokenizer), against the input model:"
    assert printed[3].startswith("  perplexity ") and printed[4].startswith("  logits: mean |error| ")
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())      # not mkstemp's 0600
    assert llama2c.load(out).group_size == 4
    ids, _ = quality_ids(llamarun.load(src))
    assert quality_ids(llamarun.load(src))[0] == ids and len(ids) == 300 and ids[0] == 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------
# refusals: one line, exit 1, nothing written


@pytest.mark.parametrize("src, out, args, words", [
    ("tiny_q8.bin", "out.bin", ["--type", "q4_0"], "GGUF type"),
    ("tiny_q8.bin", "out.gguf", ["--type", "int8"], "llama2.c .bin"),
    ("tiny_q8.bin", "out.bin", ["--type", "q5_k"], "unknown --type"),
    ("tiny_q8.bin", "out.bin", ["--type", "int8", "--group-size", "48"], "does not divide"),
    ("tiny_q8.bin", "out.bin", ["--type", "int8", "--group-size", "0"], "does not divide"),
    ("tiny_untied.bin", "out.bin", ["--type", "int8"], "e.g. 16"),           # dim 48: 64 does not fit
    ("tiny_q8.bin", "out.gguf", ["--type", "q8_0"], "only from a GGUF input"),
    ("tiny_q8.bin", "out.gguf", ["--type", "q8_0", "--group-size", "32"], "--group-size"),
    ("tiny_q8.v2.bin", "out.bin", ["--type", "int8"], "already quantized"),
    ("tiny_q8.bin", "out.q8", ["--type", "int8"], "cannot tell the output format"),
    ("missing.bin", "out.bin", ["--type", "int8"], "not found"),
    ("tiny_q8.bin", "no/such/folder/out.bin", ["--type", "int8"], "does not exist"),
])
def test_bad_requests_exit_1_and_write_nothing(tmp_path, capsys, src, out, args, words):
    src_path = MODELS / src if src != "missing.bin" else tmp_path / src
    if src != "missing.bin":
        require(src_path)
    assert main(["quantize", str(src_path), str(tmp_path / out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llamarun: error: ") and err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_gguf_input_to_llama2c_output_is_refused(tmp_path):
    src = tmp_path / "f.gguf"
    write_float_gguf(src)
    with pytest.raises(LlamarunError, match="is a GGUF file"):
        quantize(src, tmp_path / "out.bin", "int8")
    assert list(tmp_path.iterdir()) == [src]


def test_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(require(MODELS / "tiny_q8.bin").read_bytes())
    with pytest.raises(LlamarunError, match="is the input file"):
        quantize(src, src, "int8")
    assert src.read_bytes() == (MODELS / "tiny_q8.bin").read_bytes()


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import llamarun.quantize as q

    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")

    def failing(w, group_size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(q, "quantize_q80", failing)
    with pytest.raises(LlamarunError, match="cannot write .*No space left on device"):
        quantize(require(MODELS / "tiny_q8.bin"), out, "int8")
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"previous"


# ----------------------------------------------------------------------------------------------
# quantized in memory at load

@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_load_quantizes_every_matrix_in_memory_as_gguf_quantizes(qtype, tmp_path):
    """llamarun.load(path, quantize=TYPE): each matrix (embedding and classifier included) is gguf's
    quantization of the stored float32 matrix, byte for byte; norms stay float32; the logits come from
    the quantized matrices, and the quality report compares against the weights as stored."""
    from llamarun.kernels.compile import write_llama2c
    path = str(write_llama2c(tmp_path / "tiny.bin"))         # dim 64, hidden 192: whole blocks of 32
    stored = load_checkpoint(path).weights
    llama = llamarun.load(path, quantize=qtype, exact=True)
    ggml_type = gguf.GGMLQuantizationType[qtype.upper()]
    weights = llama.checkpoint.weights
    for name, layer in (("wq", 0), ("w2", 1), ("tok_embeddings", None)):
        ours = weights[name] if layer is None else weights[name][layer]
        theirs = stored[name] if layer is None else stored[name][layer]
        assert ours.qtype == ggml_type
        assert np.array_equal(ours.raw, gguf.quants.quantize(np.asarray(theirs, np.float32), ggml_type))
    assert weights["output"] is weights["tok_embeddings"]          # shared classifier: quantized once
    assert isinstance(weights["attention_norm"][0], np.ndarray)
    ids = [1, 45, 99, 173, 17, 300]
    dequantized = dict(stored)
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        dequantized[name] = [w.dequantize() for w in weights[name]]
    dequantized["tok_embeddings"] = dequantized["output"] = weights["tok_embeddings"].dequantize()
    import reference
    ref = reference.forward(dequantized, llama.config, ids).logits
    assert np.allclose(llama.logits(ids), ref, atol=1e-4 * (1 + np.abs(ref).max()))
    quality = llama.quantization_quality(max_tokens=64)
    assert quality.tokens == 64 and quality.bytes_after < quality.bytes_before / 3
    assert 0.5 < quality.top1_agreement <= 1.0 and quality.ppl_after > 0


def test_load_refuses_a_type_it_cannot_quantize_to():
    path = str(require(MODELS / "tiny_gqa.bin"))                                      # hidden 176
    with pytest.raises(LlamarunError, match="q8_0, q4_0, q4_1"):
        llamarun.load(path, quantize="q3_k")
    with pytest.raises(LlamarunError, match="not whole"):
        llamarun.load(path, quantize="q8_0")


def test_cli_quantize_at_load_reports_the_cost(tmp_path, capsys):
    from llamarun.kernels.compile import write_llama2c
    path = str(write_llama2c(tmp_path / "tiny.bin"))
    assert main(["generate", "-m", path, "--quantize", "q4_0", "--exact", "--ids", "-n", "3", ""]) == 0
    err = capsys.readouterr().err
    assert "quantized to Q4_0 in memory" in err and "perplexity" in err and "top-1 agreement" in err
