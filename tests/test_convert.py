"""llamarun convert: GGUF files as the gguf package and llama.cpp read them, llama2.c files byte for byte
as llama2.c's export.py writes them, Hugging Face directories as transformers loads them, round trips
that keep the logits, and refusals that leave nothing behind.

References: export.py's own outputs (tiny_q8.v1.bin, tiny_q8.v2.bin, written from tiny_q8.bin),
gguf's GGUFReader, torch's float16 / bfloat16 rounding, transformers' LlamaForCausalLM (on the
fixture converted by llama.cpp's convert_hf_to_gguf.py, rebuilt as tests/test_gguf_rope_freqs.py
does), llama.cpp's llama-bench where $LLAMA_CPP_BIN or PATH has it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import llamarun
from llamarun.cli import main
from llamarun.convert import convert
from llamarun.errors import LlamarunError

from conftest import MODELS, logits_tolerance, require, require_module

torch = require_module("torch")
transformers = require_module("transformers")

FIXTURE = Path(__file__).parent / "fixtures" / "rope_freqs" / "llama3-rope.f16.gguf"
STORIES = MODELS / "stories260K.bin"
IDS = [1, 120, 37, 141, 5, 99, 30, 12, 7, 48, 64, 3, 159, 18, 77, 150]       # within every vocab here (160)


def logits(path, ids=IDS):
    return llamarun.load(path, exact=True).logits(ids)


def reader_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def values(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def stories_gguf(out):
    path = out / "stories.gguf"
    convert(require(STORIES), path)
    return path


@pytest.fixture(scope="module")
def rope_f32(out):
    path = out / "rope.f32.gguf"
    convert(FIXTURE, path, "f32")
    return path


# ------------------------------------------------------------------------------------------------
# GGUF output

def test_llama2c_to_gguf_reads_as_llama_cpp_names_it(stories_gguf):
    reader = gguf.GGUFReader(stories_gguf)
    field = lambda key: reader.fields[key].contents()                          # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert (field("llama.embedding_length"), field("llama.feed_forward_length"), field("llama.block_count"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.context_length"), field("llama.vocab_size")) == (64, 172, 5, 8, 4, 512, 512)
    assert field("llama.rope.freq_base") == 10000.0 and field("llama.rope.dimension_count") == 8
    assert reader.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    tensors = reader_tensors(stories_gguf)
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(5) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == expected                       # shared classifier: no output.weight
    source = llamarun.formats.load_checkpoint(STORIES).weights
    assert np.array_equal(values(tensors["blk.2.attn_k.weight"]), source["wk"][2])    # no permutation
    assert np.array_equal(values(tensors["blk.4.ffn_down.weight"]), source["w2"][4])


def test_llama2c_gguf_llama2c_round_trip_keeps_the_logits(out, stories_gguf):
    expected = logits(STORIES)
    assert np.array_equal(logits(stories_gguf), expected)
    back = out / "stories.v1.bin"
    convert(stories_gguf, back)
    assert np.array_equal(logits(back), expected)


def test_llama2c_outputs_are_export_py_files(out):
    """tiny_q8.bin (legacy float32) as version 1 and 2: the very files llama2.c's export.py wrote."""
    v1, v2 = out / "tiny.v1.bin", out / "tiny.v2.bin"
    convert(require(MODELS / "tiny_q8.bin"), v1, "f32")
    convert(require(MODELS / "tiny_q8.bin"), v2, "int8")
    assert v1.read_bytes() == require(MODELS / "tiny_q8.v1.bin").read_bytes()
    assert v2.read_bytes() == require(MODELS / "tiny_q8.v2.bin").read_bytes()


def test_gguf_copies_tokenizer_metadata_and_rope_freqs(rope_f32):
    source, written = gguf.GGUFReader(FIXTURE), gguf.GGUFReader(rope_f32)
    for key, field in source.fields.items():
        if key.startswith("tokenizer.") or key in ("general.name", "llama.rope.freq_base", "llama.context_length"):
            assert written.fields[key].types == field.types, key
            assert written.fields[key].contents() == field.contents(), key
    assert "messages" in written.fields["tokenizer.chat_template"].contents()
    a, b = reader_tensors(FIXTURE), reader_tensors(rope_f32)
    assert set(a) == set(b)
    assert b["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    for name in a:                                            # F16 values widened exactly, same rows
        assert np.array_equal(values(a[name]).astype(np.float32), values(b[name])), name


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_gguf_types_round_as_the_references(out, rope_f32, qtype):
    path = out / f"rope.{qtype}.gguf"
    convert(rope_f32, path, qtype)
    source, written = reader_tensors(rope_f32), reader_tensors(path)
    for name, t in written.items():
        x = values(source[name]).astype(np.float32)
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(values(t), x)
            continue
        assert t.tensor_type.name == qtype.upper(), name
        if qtype == "q8_0":       # gguf's reference quantizer
            expected = gguf.quants.dequantize(gguf.quants.quantize(x, t.tensor_type), t.tensor_type)
        else:                     # torch's rounding to the half type
            expected = torch.from_numpy(x).to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[qtype])).float().numpy()
        assert np.array_equal(values(t).astype(np.float32), expected), name
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == \
        {"f16": 1, "bf16": 32, "q8_0": 7}[qtype]
    if qtype == "f16":            # the fixture's values were F16 already: nothing rounds, the logits stay
        expected = logits(rope_f32)
        assert np.all(np.abs(logits(path) - expected).max(-1) <= logits_tolerance(expected, 1e-4))


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(out, stories_gguf, capsys):
    path = out / "stories.q8_0.gguf"
    assert main(["convert", str(stories_gguf), str(path), "--type", "q8_0"]) == 0
    assert "written F16, as llama.cpp's converter does" in capsys.readouterr().out
    types = {name: t.tensor_type.name for name, t in reader_tensors(path).items()}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"  # rows of 172, 64


def llama_bench() -> str | None:
    folder = os.environ.get("LLAMA_CPP_BIN")
    return shutil.which("llama-bench", path=folder) if folder else shutil.which("llama-bench")


@pytest.mark.skipif(llama_bench() is None, reason="llama.cpp's llama-bench is not installed (set LLAMA_CPP_BIN)")
@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_llama_cpp_runs_the_output(out, rope_f32, qtype):
    path = out / f"bench.{qtype}.gguf"
    convert(rope_f32, path, qtype)
    run = subprocess.run([llama_bench(), "-m", str(path), "-p", "8", "-n", "4", "-r", "1", "-t", "1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("all F32" if qtype == "f32" else "Q4_0") in run.stdout


# ------------------------------------------------------------------------------------------------
# Hugging Face output, loaded by transformers

def hf_logits(folder, ids=IDS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_llama2c_to_hf_gives_transformers_the_same_logits(out):
    folder = out / "stories-hf"
    convert(STORIES, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    expected = logits(STORIES)
    got = hf_logits(folder)
    assert np.all(np.abs(got - expected).max(-1) <= logits_tolerance(expected, 1e-4))


def test_rope_freqs_become_llama3_scaling_in_config_json(out, rope_f32):
    """The fixture, converted by llama.cpp from a model with these llama3 parameters: config.json gets
    them back, and transformers on the written directory gives the reference model's logits (the
    reference rebuilt from the fixture's tensors as test_gguf_rope_freqs.py does)."""
    from test_gguf_rope_freqs import HPARAMS, ROPE_SCALING, VOCAB, hf_state_dict
    folder = out / "rope-hf/"
    convert(rope_f32, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == ROPE_SCALING
    reference = transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(vocab_size=VOCAB, rope_scaling=dict(ROPE_SCALING), **HPARAMS),
        attn_implementation="eager").float().eval()
    reference.load_state_dict(hf_state_dict(FIXTURE), strict=False)
    ids = list(range(3, 43))                                    # past the original context of 32
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(hf_logits(folder, ids), expected, rtol=0, atol=1e-5)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<s>" and "messages" in tokenizer_config["chat_template"]


@pytest.mark.parametrize("qtype, torch_dtype", [("bf16", "bfloat16"), ("f16", "float16")])
def test_hf_half_types(out, rope_f32, qtype, torch_dtype):
    safetensors = require_module("safetensors.torch")
    folder = out / f"rope-hf-{qtype}"
    convert(rope_f32, folder, qtype)
    tensors = safetensors.load_file(folder / "model.safetensors")
    source = reader_tensors(rope_f32)
    x = torch.from_numpy(values(source["token_embd.weight"]).astype(np.float32))
    assert tensors["model.embed_tokens.weight"].dtype == getattr(torch, torch_dtype)
    assert torch.equal(tensors["model.embed_tokens.weight"], x.to(getattr(torch, torch_dtype)))
    assert tensors["model.norm.weight"].dtype == torch.float32
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == torch_dtype


def test_byte_level_bpe_tokenizer_json(out, smol_path):
    """SmolLM2's GGUF vocabulary as tokenizer.json: Hugging Face tokenizers encodes as llamarun does."""
    tokenizers = require_module("tokenizers")
    from llamarun.convert import write_bpe_tokenizer
    checkpoint = llamarun.formats.load_checkpoint(smol_path)
    path = out / "smol-tokenizer.json"
    write_bpe_tokenizer(str(path), checkpoint.metadata)
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = llamarun.load(smol_path).tokenizer
    for text in ["Hello world! 1234 lighthouse", "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\nlines"]:
        assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text, bos=False), text


# ------------------------------------------------------------------------------------------------
# refusals: one line, exit 1, nothing written

@pytest.mark.parametrize("target, args, words", [
    ("x.gguf", ["--type", "q5_k"], "--type q5_k cannot be written to a .gguf file"),
    ("x.bin", ["--type", "q8_0"], "takes --type f32 | int8"),
    ("x-hf", ["--type", "q4_0"], "a Hugging Face directory"),
    ("x.txt", [], "cannot tell the output format"),
    ("x.bin", [], "it scales RoPE (llama3 rope_freqs)"),
    ("no/such/x.gguf", [], "does not exist"),
])
def test_bad_requests_exit_1_and_write_nothing(tmp_path, capsys, target, args, words):
    assert main(["convert", str(FIXTURE), str(tmp_path / target), *args]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_force(tmp_path, capsys):
    target = tmp_path / "x.gguf"
    target.write_bytes(b"keep")
    assert main(["convert", str(FIXTURE), str(target)]) == 1
    assert "exists: pass --force" in capsys.readouterr().err and target.read_bytes() == b"keep"
    assert main(["convert", str(FIXTURE), str(target), "--force"]) == 0
    assert gguf.GGUFReader(target).fields["general.architecture"].contents() == "llama"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "old").write_text("x")
    assert main(["convert", str(FIXTURE), str(folder)]) == 1
    assert main(["convert", str(FIXTURE), str(folder), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "x.gguf"]        # no temporaries left
    assert not (folder / "old").exists() and (folder / "model.safetensors").is_file()


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import llamarun.convert as module

    def failing(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(module, "write_safetensors", failing)
    with pytest.raises(LlamarunError, match="No space left"):
        convert(FIXTURE, tmp_path / "hf")
    monkeypatch.setattr(module, "write_llama2c", failing)
    with pytest.raises(LlamarunError, match="No space left"):
        convert(STORIES, tmp_path / "s.bin")
    assert list(tmp_path.iterdir()) == []
