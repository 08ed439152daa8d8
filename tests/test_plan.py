"""The execution plan (llamarun/plan.py): chosen once at load, the same for `load` and `Llama`, what the
forward really does, and `llamarun info`, which prints it with what the model file holds (checked here
against the files themselves, read by other means: gguf's own reader, llama2.c's header)."""
import ast
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import llamarun
from llamarun import plan as plan_module
from llamarun.api import Llama
from llamarun.cli import main
from llamarun.formats import load_checkpoint
from llamarun.model import Batch, CompiledForward, Transformer
from llamarun.plan import choose_plan

from conftest import MODELS, require


# ----------------------------------------------------------------------------------------------
# the plan

def test_load_and_llama_agree_on_the_default_arithmetic(smol_path):
    """Both default to the fast path; both give exact when asked; a llama2.c model is exact either way."""
    checkpoint = load_checkpoint(smol_path)
    assert Llama(checkpoint).plan.arithmetic == llamarun.load(smol_path).plan.arithmetic == "fast"
    assert Llama(checkpoint, exact=True).plan.exact and llamarun.load(smol_path, exact=True).plan.exact
    tiny = require(MODELS / "tiny_gqa.bin")
    assert Llama(load_checkpoint(tiny)).plan.exact and llamarun.load(tiny).plan.exact


def test_the_plan_sets_the_kv_cache_and_the_forward(smol_path):
    fast, exact = llamarun.load(smol_path), llamarun.load(smol_path, exact=True)
    assert fast.model.new_cache(seq_len=8).k.dtype == np.uint16 and fast.plan.kv_dtype == "float16"
    assert exact.model.new_cache(seq_len=8).k.dtype == np.float32 and exact.plan.kv_dtype == "float32"
    assert fast.model.compiled_forward() is not None and exact.model.compiled_forward() is None
    c = fast.config
    assert fast.plan.kv_bytes_per_token == 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2


def test_the_arithmetic_cannot_change_after_load(smol_checkpoint):
    """Two models over one checkpoint keep their own arithmetic: making an exact one after a fast one has
    run (set_exact did this to shared tensors, and left the fast model's one-call forward stale) changes
    nothing of the fast one, and a tensor's arithmetic cannot be assigned."""
    batch = Batch.sequence([1, 504, 3458, 282])
    fast = Transformer(smol_checkpoint.config, smol_checkpoint.weights)
    before = fast.forward(batch, fast.new_cache(seq_len=8))
    exact = Transformer(smol_checkpoint.config, smol_checkpoint.weights,
                        choose_plan(smol_checkpoint.config, smol_checkpoint.weights, exact=True))
    exact_logits = exact.forward(batch, exact.new_cache(seq_len=8))
    after = fast.forward(batch, fast.new_cache(seq_len=8))
    assert np.array_equal(before, after)
    assert not np.allclose(before, exact_logits, atol=1e-3)          # the two arithmetics really differ
    with pytest.raises(AttributeError):
        fast.w["wq"][0].exact = True


def test_forward_for_says_what_the_forward_does(monkeypatch):
    """A float32 llama2.c model: the one-call forward up to MATVEC_ROWS rows, BLAS layer by layer beyond."""
    checkpoint = load_checkpoint(require(MODELS / "tiny_gqa.bin"))
    model = Transformer(checkpoint.config, checkpoint.weights)
    calls = []
    inner = CompiledForward.__call__
    monkeypatch.setattr(CompiledForward, "__call__", lambda self, x, batch, *rest: calls.append(len(batch))
                        or inner(self, x, batch, *rest))
    for n in (1, plan_module.MATVEC_ROWS, plan_module.MATVEC_ROWS + 1, 20):
        calls.clear()
        model.forward(Batch.sequence(list(range(3, 3 + n))), model.new_cache(seq_len=32))
        assert (calls == [n]) == (model.plan.forward_for(n) == "compiled"), n
        assert model.plan.forward_for(n) in ("compiled", "layers (BLAS)")


def test_without_the_fast_kernels_the_plan_takes_the_layer_path(monkeypatch, smol_checkpoint):
    monkeypatch.setattr(plan_module, "fast_kernels_available", lambda: (False, "no such CPU"))
    model = Transformer(smol_checkpoint.config, smol_checkpoint.weights)
    assert model.compiled_forward() is None and "no such CPU" in model.plan.compiled_reason
    assert model.plan.forward_for(1) == "layers (matvec kernels)" and model.plan.forward_for(512) == "layers (BLAS)"


THRESHOLDS = {"MATVEC_ROWS", "FAST_KERNEL_ROWS", "QUERY_BLOCK", "TILE_BYTES", "PREFILL_CHUNK", "PREFILL_SHARE",
              "MIN_TIMING_SAMPLES", "FILL_CHUNK"}


def test_every_threshold_is_defined_in_plan_py_only():
    package = Path(llamarun.__file__).parent
    defined = Counter()
    for source in package.rglob("*.py"):
        for node in ast.parse(source.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id in THRESHOLDS:
                    defined[(target.id, source.relative_to(package).as_posix())] += 1
    assert sorted(defined) == sorted((name, "plan.py") for name in THRESHOLDS)


# ----------------------------------------------------------------------------------------------
# llamarun info

def info(capsys, *args) -> dict[str, str]:
    """`llamarun info` -> {label: value} of its "  label: value" lines."""
    assert main(["info", *args]) == 0
    out = capsys.readouterr().out
    return dict(line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  "))


def test_info_on_smollm2(smol_path, capsys):
    from gguf import GGUFReader
    reader = GGUFReader(smol_path)

    def field(key):
        return reader.fields[key].contents()

    shown = info(capsys, "-m", str(smol_path))
    layers, heads, kv_heads = field("llama.block_count"), field("llama.attention.head_count"), \
        field("llama.attention.head_count_kv")
    dim = field("llama.embedding_length")
    assert shown["format"].startswith("GGUF v3 llama")
    assert f"layers {layers}," in shown["config"] and f"dim {dim}," in shown["config"]
    assert f"kv heads {kv_heads}," in shown["config"] and f"context {field('llama.context_length')}," in shown["config"]
    types = Counter(t.tensor_type.name for t in reader.tensors)
    assert shown["tensors"] == ", ".join(f"{name} {n}" for name, n in sorted(types.items(), key=lambda kv: (-kv[1],
                                                                                                          kv[0])))
    assert shown["parameters"] == f"{sum(int(t.n_elements) for t in reader.tensors):,}"
    assert shown["size"].endswith(f"({Path(smol_path).stat().st_size} bytes)")
    assert shown["arithmetic"].startswith("fast")
    assert shown["KV cache"] == f"float16, {2 * layers * kv_heads * dim // heads * 2} bytes per token"
    # every matrix Q4_1 or Q8_0 (group kernels): a long prompt goes through the one-call forward in parts
    fast_kernels, _ = plan_module.fast_kernels_available()
    expected = ("1 -> compiled, 8 -> compiled, 128 -> compiled, 512 -> compiled in parts of 128" if fast_kernels else
                "1 -> layers (matvec kernels), 8 -> layers (matvec kernels), 128 -> layers (matvec kernels), "
                "512 -> layers (BLAS)")
    assert shown["forward by batch rows"] == expected
    assert shown["fast kernels"].startswith("yes" if fast_kernels else "no")
    assert "cpu features" in shown


@pytest.mark.parametrize("name", ["tiny_gqa.bin", "stories260K.bin"])
def test_info_on_a_llama2c_model(name, capsys):
    """Legacy llama2.c files: a header of 7 int32 (a negative vocab: a separate classifier), then float32
    tensors, among them two RoPE tables of (seq_len, head_dim / 2) that llamarun does not use."""
    path = require(MODELS / name)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", path.read_bytes()[:28])
    shown = info(capsys, "-m", str(path))
    assert shown["format"] == "llama2.c legacy float32"
    assert shown["config"].startswith(f"dim {dim}, hidden {hidden}, layers {layers}, heads {heads}, "
                                      f"kv heads {kv_heads}, head dim {dim // heads}, vocab {abs(vocab)}, "
                                      f"context {seq_len},")
    tensors = 9 * layers + 2 + (vocab < 0)           # 9 per layer; embeddings, final norm, own classifier
    assert shown["tensors"] == f"F32 {tensors}"
    floats = (path.stat().st_size - 28) // 4 - seq_len * (dim // heads)     # minus the two RoPE tables
    assert shown["parameters"] == f"{floats:,}"
    assert shown["arithmetic"].startswith("exact")
    assert shown["KV cache"] == f"float32, {2 * layers * kv_heads * (dim // heads) * 4} bytes per token"
    assert shown["prefill attention"] == "kernel (run.c's order)"
    assert shown["forward by batch rows"].startswith("1 -> compiled, 8 -> compiled, 128 -> layers (BLAS)")


def test_info_on_an_int8_llama2c_model(capsys):
    """Version 2 (int8 groups): every matrix and the embeddings int8, the norms float32."""
    path = require(MODELS / "tiny_q8.v2.bin")
    shown = info(capsys, "-m", str(path))
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", path.read_bytes(), 8)
    group, = struct.unpack_from("<i", path.read_bytes(), 37)
    assert shown["format"] == f"llama2.c v2 int8 (group {group})"
    assert shown["tensors"] == f"INT8/{group} {7 * layers + 1}, F32 {2 * layers + 1}"
    kv_dim = dim // heads * kv_heads
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim
    assert shown["parameters"] == f"{vocab * dim + layers * per_layer + dim:,}"
    assert shown["forward by batch rows"] == ("1 -> compiled, 8 -> compiled, 128 -> compiled, "
                                              "512 -> layers (int8 kernels)")
