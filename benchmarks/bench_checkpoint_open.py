"""Opening a ~1 GB bf16 Hugging Face checkpoint directory: time, memory added, and peak memory in use.

    python benchmarks/bench_checkpoint_open.py [--runs 3] [--vocab-gguf PATH]

The directory is written once into $LLAMARUN_HOME/bench/ (numpy only, no torch): a LlamaForCausalLM
of random bf16 weights, dim 1536, 16 layers, 12 heads (4 kv heads), hidden 4096 and the vocabulary of
a GGUF file (default: SmolLM2's 49152 tokens, whose tokens and merges become the tokenizer.json),
~0.95 GB of model.safetensors. Then, per run, one fresh Python process, with a warm page cache (the
files are read through once before the runs):
- open: the wall time of `llamarun.load(DIR)` alone (imports done before it);
- RSS added: the growth of VmRSS across that call, before the first forward (issue 20: < 50 MB);
- peak RSS: VmHWM after generating 16 tokens (greedy) from an 8-token prompt, against the budget
  weights as stored + KV cache + 200 MB (the KV cache at the context the model runs with, in the
  plan's cache type).
Medians of `--runs` processes, min-max beside.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=4096)
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def home() -> Path:
    return Path(os.environ.get("LLAMARUN_HOME", "~/.cache/llamarun")).expanduser()


def tensor_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    dim, hidden = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = dim // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for n in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (kv, dim),
                       p + "self_attn.v_proj.weight": (kv, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden)})
    return shapes


def write_checkpoint(folder: Path, vocab_gguf: Path) -> None:
    """config.json, model.safetensors (bf16, streamed tensor by tensor) and the GGUF's tokenizer."""
    from llamarun.formats.gguf import _map_file, parse_header
    from llamarun.tokenizers.gguf import tokenizer_from_gguf

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_from_gguf(parse_header(_map_file(str(vocab_gguf))).metadata)   # (a vocabulary-only GGUF too)
    tokenizer.hf.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.vocab_size
    shapes = tensor_shapes(vocab)
    header, offset = {}, 0
    for name, shape in shapes.items():
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * int(np.prod(shape))]}
        offset += 2 * int(np.prod(shape))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    partial = folder / "model.safetensors.partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            values = np.ones(shape, np.float32) if len(shape) == 1 else \
                rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            f.write((values.view(np.uint32) >> 16).astype(np.uint16).tobytes())     # bf16: the upper halves
    partial.rename(folder / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, **SHAPE}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    texts = tokenizer.vocab.tokens
    special = {"bos_token": texts[tokenizer.bos_id], "eos_token": texts[tokenizer.eos_id],
               "add_bos_token": tokenizer.vocab.add_bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(folder: str) -> None:
    """One open and one generation in this (fresh) process; prints its figures as JSON."""
    import llamarun
    import llamarun.formats.huggingface  # noqa: F401  (imports, not the open, are outside the timing)
    import safetensors  # noqa: F401
    import tokenizers  # noqa: F401

    before = rss_mb()
    start = time.perf_counter()
    llama = llamarun.load(folder)
    seconds = time.perf_counter() - start
    added = rss_mb() - before
    llama.generate(list(range(100, 108)), max_tokens=16, temperature=0, ignore_eos=True)
    c = llama.config
    kv_bytes = 2 * c.n_layers * c.seq_len * c.kv_dim * (2 if llama.plan.kv_half else 4)
    print(json.dumps({"seconds": seconds, "rss_added_mb": added, "peak_mb": rss_mb("VmHWM"),
                      "kv_mb": kv_bytes / 2**20, "context": c.seq_len}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes")
    parser.add_argument("--vocab-gguf", type=Path, default=home() / "models" / SMOL_FILE,
                        help="the GGUF file whose tokenizer the checkpoint gets (default: SmolLM2's)")
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if not args.vocab_gguf.is_file():
        sys.exit(f"{args.vocab_gguf} not found: run `llamarun pull` (the default model) or pass --vocab-gguf PATH")
    folder = home() / "bench" / f"hf-bf16-{args.vocab_gguf.stem}"
    if not (folder / "model.safetensors").is_file():
        print(f"writing {folder} (once) ...", flush=True)
        write_checkpoint(folder, args.vocab_gguf)
    files = sorted(folder.iterdir())
    weights = (folder / "model.safetensors").stat().st_size
    for file in files:                                   # a warm page cache
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, __file__, "--child", str(folder)], env=env, capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

    def spread(key: str, scale: float = 1.0, digits: int = 2) -> str:
        values = [scale * r[key] for r in runs]
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    budget = weights / 2**20 + runs[0]["kv_mb"] + 200
    print(f"{folder.name}: model.safetensors {weights / 2**20:.0f} MiB, context {runs[0]['context']}, "
          f"KV cache {runs[0]['kv_mb']:.0f} MiB; median (min-max) of {args.runs} fresh processes")
    print(f"  open (llamarun.load)        {spread('seconds', 1, 3)} s      target < 2 s")
    print(f"  RSS added by opening        {spread('rss_added_mb', 1, 1)} MiB   target < 50 MB")
    print(f"  peak RSS, 16 tokens         {spread('peak_mb', 1, 0)} MiB   budget {budget:.0f} MiB "
          "(weights + KV cache + 200 MB)")


if __name__ == "__main__":
    main()
