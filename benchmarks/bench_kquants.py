"""Speed of llamarun on K-quant models of the sizes people run (Llama-3.2-1B / 3B shapes), beside the
machine's bounds and llama.cpp measured in the same run.

    python benchmarks/bench_kquants.py [--shape 1b|3b] [--types q4_k_m,q5_k_m,q6_k,q8_0,f16,bf16] [--threads N]
                                       [--runs 3] [--gen 4] [--prompt 512] [--llama-bench PATH]
                                       [--llama-quantize PATH]

The models: random weights (speed does not depend on their values) of Llama-3.2-1B's shape (dim
2048, 16 layers, 32 heads, 8 kv heads, hidden 8192) or Llama-3.2-3B's (dim 3072, 28 layers, 24 heads,
8 kv heads, hidden 8192), vocabulary 49152 with SmolLM2's tokenizer copied in (llama.cpp will not
load a model without one), tied classifier. Written once as an f16 GGUF through the `gguf`
package's writer, then quantized with llama.cpp's `llama-quantize` (found by --llama-quantize, on
PATH, or beside --llama-bench), into $LLAMARUN_HOME/bench (~/.cache/llamarun/bench): never into the
repository. Later runs reuse them.

What is measured, per type (medians of --runs runs after one warm-up run, which pays for numba's
compilation and for paging the file in):
- decode: --gen tokens, one forward per token, greedy, after an 8-token prompt, fresh cache;
- prompt: one forward of --prompt random tokens from an empty cache, last token's logits;
- bounds, measured between llamarun's runs: decode tok/s <= numpy fp32 matvec GB/s / bytes of weights
  one token reads (as the file stores them); prompt tok/s <= numpy sgemm GFLOP/s at one layer's
  shapes / FLOPs per token, and <= the CPU's peak int8 dot-product GOP/s (common.Int8PeakBound: the
  widest byte multiply-add the kernels use, from registers, on all threads) / ops per token, the bound
  of quantized kernels that multiply int8 activations with the weights' integers;
- llama.cpp: `llama-bench -p PROMPT -n GEN -r RUNS -t THREADS` on the same file, when found (--llama-bench
  PATH, or on PATH), right after llamarun's runs of that type.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {   # dim, layers, heads, kv heads, hidden
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
}
VOCAB = 49152
# ours -> llama-quantize's. f16 and bf16: the half-precision matrices a Hugging Face or Meta checkpoint
# holds (kernels/matvec.py's matvec_half), not in the default list
TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q8_0": "Q8_0", "f16": "F16", "bf16": "BF16"}
DEFAULT_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: all cores)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--gen", type=int, default=4, help="decoded tokens per decode run")
    p.add_argument("--prompt", type=int, default=512, help="prompt length in tokens (0: no prompt runs)")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench (default: looked up on PATH)")
    p.add_argument("--llama-quantize", default=None, help="llama.cpp's llama-quantize (default: on PATH or "
                   "beside llama-bench)")
    return p.parse_args()


args = parse_args()
THREADS = args.threads or len(os.sched_getaffinity(0)) or 1
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import gguf  # noqa: E402

from common import (MATRICES, Int8PeakBound, MatvecBound, SgemmBound, decode_rate, find_tool, interleaved, llama_bench,  # noqa: E402
                    prefill_rate, stats)
from llamarun.errors import LlamarunError  # noqa: E402
from llamarun.formats import load_checkpoint  # noqa: E402
from llamarun.hub import home  # noqa: E402
from llamarun.model import Transformer  # noqa: E402


# ----------------------------------------------------------------------------------------------
# the models

def tokenizer_metadata() -> list:
    """SmolLM2's tokenizer keys (vocabulary 49152), from llamarun's default model: (key, value, type)."""
    from llamarun.hub import ensure_default_model
    reader = gguf.GGUFReader(str(ensure_default_model()))
    keys = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            values = field.contents()
            keys.append((name, values, kind, sub))
        else:
            keys.append((name, field.contents(), kind, None))
    return keys


def tensor_shapes(dim, layers, heads, kv_heads, hidden) -> dict:
    """name -> (rows, columns) of the matrices, (n,) of the norms, in llama.cpp's order."""
    kv = dim // heads * kv_heads
    shapes = {"token_embd.weight": (VOCAB, dim), "output_norm.weight": (dim,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.attn_q.weight": (dim, dim),
                       f"blk.{i}.attn_k.weight": (kv, dim), f"blk.{i}.attn_v.weight": (kv, dim),
                       f"blk.{i}.attn_output.weight": (dim, dim), f"blk.{i}.ffn_norm.weight": (dim,),
                       f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_down.weight": (dim, hidden),
                       f"blk.{i}.ffn_up.weight": (hidden, dim)})
    return shapes


def write_f16(path: str, shape: str) -> None:
    """The random-weight f16 GGUF of this shape, tensor by tensor (a 3B model does not fit in memory twice)."""
    dim, layers, heads, kv_heads, hidden = SHAPES[shape]
    shapes = tensor_shapes(dim, layers, heads, kv_heads, hidden)
    rng = np.random.default_rng(0)
    tmp = path + ".part"
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(f"random llama {shape}")
    for key, value in {"llama.block_count": layers, "llama.context_length": 4096, "llama.embedding_length": dim,
                       "llama.feed_forward_length": hidden, "llama.attention.head_count": heads,
                       "llama.attention.head_count_kv": kv_heads, "llama.rope.dimension_count": dim // heads,
                       "llama.vocab_size": VOCAB}.items():
        writer.add_uint32(key, value)
    writer.add_float32("llama.rope.freq_base", 500000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, kind, sub in tokenizer_metadata():
        writer.add_key_value(key, value, kind, sub_type=sub)
    for name, s in shapes.items():
        dtype = np.float16 if len(s) == 2 else np.float32
        writer.add_tensor_info(name, s, np.dtype(dtype), int(np.prod(s)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, s in shapes.items():
        if len(s) == 1:
            values = np.ones(s, np.float32)
        else:
            values = (rng.standard_normal(s, np.float32) * np.float32(0.02)).astype(np.float16)
        writer.write_tensor_data(values)
    writer.close()
    os.replace(tmp, path)


def model_path(shape: str, qtype: str, quantizer: str | None) -> str:
    """The cached model of this shape and type, made now if it is missing."""
    folder = home() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = str(folder / f"random-{shape}.f16.gguf")
    out = str(folder / f"random-{shape}.{qtype}.gguf")
    if os.path.exists(out):
        return out
    if qtype == "f16" and not os.path.exists(f16):
        print(f"writing {f16} ...", flush=True)
        write_f16(f16, shape)
        return f16
    if quantizer is None:
        raise LlamarunError(f"{out} is missing and no llama-quantize was found: pass --llama-quantize PATH")
    if not os.path.exists(f16):
        print(f"writing {f16} ...", flush=True)
        write_f16(f16, shape)
    print(f"quantizing to {TYPES[qtype]} ...", flush=True)
    subprocess.run([quantizer, f16, out + ".part", TYPES[qtype], str(THREADS)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(out + ".part", out)
    return out


# ----------------------------------------------------------------------------------------------
# what a token costs

def decode_bytes(c, w) -> int:
    """Bytes of weights one decoded token reads as stored: every matrix once, the classifier once, one
    embedding row, the norms."""
    layer = sum(int(m.nbytes) for k in MATRICES for m in w[k])
    norms = sum(int(v.nbytes) for k in ("attention_norm", "ffn_norm") for v in w[k]) + int(w["norm"].nbytes)
    return layer + int(w["output"].nbytes) + int(w["tok_embeddings"].nbytes) // c.vocab_size + norms


def prompt_flops(c, w, n: int) -> float:
    """FLOPs per token of an n-token prompt: 2 per matrix parameter (the classifier once), attention."""
    layers = sum(int(np.prod(m.shape)) for k in MATRICES for m in w[k])
    attention = c.n_layers * c.n_heads * 4.0 * c.head_dim * (n * (n + 1) / 2)
    return (2.0 * layers * n + 2.0 * int(np.prod(w["output"].shape)) + attention) / n


def types_of(w) -> str:
    counts = {}
    for k in (*MATRICES, "output"):
        for m in (w[k] if k != "output" else [w[k]]):
            counts[getattr(m, "ggml_type", "F32")] = counts.get(getattr(m, "ggml_type", "F32"), 0) + 1
    return " ".join(f"{n} {t}" for t, n in sorted(counts.items()))


# ----------------------------------------------------------------------------------------------
# llama.cpp

def llama_cpp(tool: str, path: str) -> dict:
    """llama-bench's prompt and decode tok/s on this file."""
    return llama_bench(tool, path, THREADS, args.runs, args.prompt, max(args.gen, 16))


# ----------------------------------------------------------------------------------------------

def measure(path: str, bench_tool: str | None) -> dict:
    ck = load_checkpoint(path)
    c, w = ck.config, ck.weights
    model = Transformer(c, w)
    print(f"  {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.0f} MB; {types_of(w)}; one-call forward: "
          f"{model.plan.compiled_reason}", flush=True)
    per_token = decode_bytes(c, w)
    row = {"types": types_of(w)}
    matvec = MatvecBound(w["output"].shape)
    gbps, dec = interleaved(lambda: decode_rate(model, args.gen), matvec.measure, args.runs)
    row["decode"], row["decode_bound"] = stats(dec), float(np.median(gbps)) * 1e9 / per_token
    del matvec
    if args.prompt:
        sgemm = SgemmBound(w, args.prompt)
        gflops, pre = interleaved(lambda: prefill_rate(model, args.prompt), sgemm.measure, args.runs)
        row["prompt"], row["prompt_bound"] = stats(pre), float(np.median(gflops)) * 1e9 / prompt_flops(c, w, args.prompt)
        row["prompt_int8_bound"] = INT8_PEAK.measure() * 1e9 / prompt_flops(c, w, args.prompt)
        del sgemm
    if bench_tool:
        row["llama.cpp"] = llama_cpp(bench_tool, path)
    return row


def main():
    bench_tool = find_tool(args.llama_bench, "llama-bench")
    quantizer = find_tool(args.llama_quantize, "llama-quantize", bench_tool)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for t in types:
        if t not in TYPES:
            sys.exit(f"unknown type {t}: pick from {', '.join(TYPES)}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"shape {args.shape} {SHAPES[args.shape]}, vocab {VOCAB}; {cpu}; threads {THREADS}; runs {args.runs}; "
          f"decode {args.gen} tokens, prompt {args.prompt}; llama-bench: {bench_tool or 'not found'}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    global INT8_PEAK
    INT8_PEAK = Int8PeakBound(THREADS)
    print(f"int8 peak ({INT8_PEAK.instruction}, {THREADS} threads): {INT8_PEAK.measure():.0f} GOP/s", flush=True)
    results = {}
    for t in types:
        t0 = time.perf_counter()
        results[t] = measure(model_path(args.shape, t, quantizer), bench_tool)
        print(f"  {t}: {json.dumps(results[t])} ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\n{args.shape}, {cpu}, threads {THREADS}; tok/s, median [min-max] of {args.runs}; bounds from numpy "
          f"fp32 matvec GB/s, sgemm GFLOP/s and the int8 dot-product peak, measured between the runs; llama.cpp: "
          f"llama-bench, same run\n")
    print("| type | decode | bound | % | llama.cpp | ratio | prompt | bound | % | int8 bound | % | llama.cpp | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, r in results.items():
        lc = r.get("llama.cpp", {})
        cells = [t]
        for kind in ("decode", "prompt"):
            if kind not in r:
                cells += [""] * (7 if kind == "prompt" else 5)
                continue
            med, lo, hi = r[kind]
            bound = r[f"{kind}_bound"]
            peer = lc.get(kind)
            cells += [f"{med:.2f} [{lo:.2f}-{hi:.2f}]", f"{bound:.1f}", f"{100 * med / bound:.0f}%"]
            if kind == "prompt":
                int8 = r["prompt_int8_bound"]
                cells += [f"{int8:.1f}", f"{100 * med / int8:.0f}%"]
            cells += [f"{peer:.2f}" if peer else "-", f"{med / peer:.2f}x" if peer else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
