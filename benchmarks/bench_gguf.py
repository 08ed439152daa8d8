"""Speed of llamarun on a GGUF model (SmolLM2-135M-Instruct Q4_1), against the machine's own bounds.

    python benchmarks/bench_gguf.py [-m MODEL] [--runs 5] [--prompt 512] [--gen 32] [--threads N]
                                    [--llama-bench PATH]

The model defaults to llamarun's default model (`llamarun.hub.ensure_default_model()`: pulled into
$LLAMARUN_HOME/models the first time, used from there afterwards).

What is measured (medians of `--runs` runs, min and max beside, after one warm-up run that pays for
numba's compilation and for paging the memory-mapped file in), as benchmarks/bench_llama2c.py does:
- prefill: one batched forward of a `--prompt`-token prompt (random ids) from an empty cache,
  logits of the last token only;
- decode: `--gen` tokens, one forward per token, greedy (argmax), after a short prompt, fresh cache.

The bounds, measured in the same process between the runs of the model (one bound measurement
before each run, medians of both), so a machine that is busier for a while lowers both sides alike:
- decode bound: tok/s <= (numpy fp32 matvec GB/s) / (bytes of weights one token reads), the bytes
  being those the file stores: every matrix of every layer in its quantized blocks, the classifier
  as stored (SmolLM2 ties it to the token embedding, Q8_0), one embedding row, the norms.
- prefill bound: tok/s <= (numpy sgemm GFLOP/s at SmolLM2's matrix shapes with as many rows as the
  prompt) / (FLOPs per token: 2 * matrix params + attention at that prompt length; the classifier
  counts once per prompt, as only the last token's logits are computed).

And, each in fresh processes of this script:
- open: `llamarun.load(path)` (header, metadata, tensor views, and the embedded tokenizer), median
  (min-max) of 5 processes; the imports are done before the clock starts and timed apart;
- peak RSS: the high-water mark (/proc/self/status VmHWM) of one process that loads the model and
  runs one prefill and one decode of the sizes above. (Not getrusage's ru_maxrss: Linux carries it
  over exec from the process that spawned the child, so there it would report this benchmark's own
  peak, with its bound matrices, whenever that is higher.)

And llama.cpp, measured in the same run when its `llama-bench` is found (--llama-bench PATH, or on
PATH): `llama-bench -r 1` on the same file and the same sizes, one run between each pair of ours (beside
each bound measurement), medians of those. The table gives the CPU and the vector features the kernels
use on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OPEN_RUNS = 5              # fresh processes for the open time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=None, help="a GGUF file (default: the default model, SmolLM2 Q4_1)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--prompt", type=int, default=512, help="prefill prompt length in tokens")
    p.add_argument("--gen", type=int, default=32,
                   help="decoded tokens per decode run, after 8 (default 32; the ledger's runs take 64, as "
                        "llama-bench's tg64; at this depth the rate hardly depends on it)")
    p.add_argument("--threads", type=int, default=None, help="BLAS / numba threads (default: all cores)")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench (default: looked up on PATH)")
    p.add_argument("--child", choices=("open", "peak"), help=argparse.SUPPRESS)
    return p.parse_args()


args = parse_args()
THREADS = args.threads or len(os.sched_getaffinity(0)) or 1
# the thread pools are sized when numpy (OpenBLAS) and numba load: set them before importing either
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(THREADS)

IMPORT_START = time.perf_counter()
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import llamarun.formats.gguf  # noqa: E402  (GGUF's reader, and the gguf package, imported before any timed load)
from common import (DECODE_PROMPT, MATRICES, MatvecBound, SgemmBound, decode_rate, find_tool,  # noqa: E402
                    interleaved, llama_bench, prefill_rate, stats)
from llamarun.bench import cpu_summary  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - IMPORT_START



# ----------------------------------------------------------------------------------------------
# what one token costs

def nbytes(t) -> int:
    """Bytes as stored in the file: a GGMLTensor's raw blocks, a float32 array's own bytes."""
    return int(t.nbytes)


def decode_bytes(c, w) -> int:
    """Bytes of weights one decoded token reads, as the file stores them: every matrix of every layer
    once (quantized blocks), the classifier once (as stored; tied to the embedding in SmolLM2), one
    embedding row, the norms."""
    layer = sum(nbytes(m) for k in MATRICES for m in w[k])
    norms = sum(nbytes(v) for k in ("attention_norm", "ffn_norm") for v in w[k]) + nbytes(w["norm"])
    embedding_row = nbytes(w["tok_embeddings"]) // c.vocab_size
    return layer + nbytes(w["output"]) + embedding_row + norms


def matrix_params(c, w) -> tuple[int, int]:
    """(parameters of the layers' matrices, parameters of the classifier)."""
    layers = sum(int(np.prod(m.shape)) for k in MATRICES for m in w[k])
    return layers, int(np.prod(w["output"].shape))


def prefill_flops(c, w, n: int) -> float:
    """FLOPs of one batched prefill of n tokens, per token.

    Matrices: 2 * params per token (the classifier only once, for the last token). Attention:
    token p scores p+1 keys and sums p+1 values, 2 * D FLOPs each, for every head of every layer.
    """
    layers, classifier = matrix_params(c, w)
    attention = c.n_layers * c.n_heads * 4.0 * c.head_dim * (n * (n + 1) / 2)
    return (2.0 * layers * n + 2.0 * classifier + attention) / n


# ----------------------------------------------------------------------------------------------
# the model

def vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(path: str) -> None:
    """One fresh process's part; prints its figures as one JSON line."""
    t0 = time.perf_counter()
    llm = llamarun.load(path)
    opened = time.perf_counter() - t0
    if args.child == "open":
        print(json.dumps({"import_s": IMPORT_SECONDS, "open_s": opened, "tokenizer": llm.tokenizer is not None}))
        return
    prefill_rate(llm.model, args.prompt)
    decode_rate(llm.model, args.gen)
    print(json.dumps({"vmhwm_mb": vm_hwm_mb()}))


def in_child(kind: str, path: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "-m", path, "--threads", str(THREADS),
           "--prompt", str(args.prompt), "--gen", str(args.gen)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"child {kind} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def main():
    if args.model:
        path = args.model
    else:
        from llamarun.hub import ensure_default_model
        path = str(ensure_default_model())
    if args.child:
        child(path)
        return
    runs, n, gen = max(1, args.runs), args.prompt, args.gen
    size_mb = os.path.getsize(path) / 1e6

    llm = llamarun.load(path)
    c, w, model = llm.config, llm.checkpoint.weights, llm.model
    if n + 1 > c.seq_len or DECODE_PROMPT + gen > c.seq_len:
        sys.exit(f"--prompt and --gen must fit the model's context of {c.seq_len}")
    per_token = decode_bytes(c, w)
    print(f"{os.path.basename(path)}: {size_mb:.1f} MB, {llm.checkpoint.description}")
    print(f"dim {c.dim}, {c.n_layers} layers, vocab {c.vocab_size}; {per_token / 1e6:.1f} MB of stored weights "
          "per token")
    print(f"threads {THREADS}, runs {runs} (medians, [min - max]), prefill prompt {n} tokens, decode {gen} "
          f"tokens after {DECODE_PROMPT}; load average {os.getloadavg()[0]:.2f} before", flush=True)

    matvec = MatvecBound(w["output"].shape)
    sgemm = SgemmBound(w, n)
    tool = find_tool(args.llama_bench, "llama-bench")
    peer = {"prompt": [], "decode": []}

    def with_peer(bound, test):
        """The bound, and llama-bench's run of the same test beside it."""
        def measure():
            if tool:
                sizes = (n, 0) if test == "prompt" else (0, gen)
                peer[test].append(llama_bench(tool, path, THREADS, 1, *sizes).get(test, float("nan")))
            return bound()
        return measure

    print(f"prefill ... (llama-bench: {tool or 'not found'})", flush=True)
    gflops, pre = interleaved(lambda: prefill_rate(model, n), with_peer(sgemm.measure, "prompt"), runs)
    print("decode ...", flush=True)
    gbps, dec = interleaved(lambda: decode_rate(model, gen), with_peer(matvec.measure, "decode"), runs)
    gflops, gbps, pre, dec = float(np.median(gflops)), float(np.median(gbps)), stats(pre), stats(dec)
    peer = {test: stats(figures[1:]) if figures else None for test, figures in peer.items()}  # [0]: the warm-up's
    decode_bound = gbps * 1e9 / per_token
    prefill_bound = gflops * 1e9 / prefill_flops(c, w, n)
    del sgemm, matvec          # free their memory before the fresh processes start

    print("open / peak RSS (fresh processes) ...", flush=True)
    opens = [in_child("open", path) for _ in range(OPEN_RUNS)]
    open_ms = stats([1e3 * o["open_s"] for o in opens])
    import_ms = float(np.median([1e3 * o["import_s"] for o in opens]))
    peak = in_child("peak", path)

    print(f"\nmatvec {gbps:.1f} GB/s, sgemm {gflops:.1f} GFLOP/s (at {n} rows); load average "
          f"{os.getloadavg()[0]:.2f} after (this machine is shared: its bounds vary run to run)")
    print(f"  prefill {pre[0]:8.1f} tok/s [{pre[1]:.1f} - {pre[2]:.1f}]   bound {prefill_bound:8.1f}"
          f"   {100 * pre[0] / prefill_bound:5.1f}%")
    print(f"  decode  {dec[0]:8.2f} tok/s [{dec[1]:.2f} - {dec[2]:.2f}]   bound {decode_bound:8.1f}"
          f"   {100 * dec[0] / decode_bound:5.1f}%")
    print(f"  open    {open_ms[0]:8.0f} ms [{open_ms[1]:.0f} - {open_ms[2]:.0f}] (imports before it: "
          f"{import_ms:.0f} ms), tokenizer {'loaded' if opens[0]['tokenizer'] else 'MISSING'}")
    print(f"  peak RSS {peak['vmhwm_mb']:.0f} MiB (VmHWM) after load + prefill "
          f"{n} + decode {gen}; file {size_mb:.1f} MB")

    def theirs(test, ours):
        if not peer[test]:
            return "| not run | |"
        median, low, high = peer[test]
        return f"| {median:.1f} [{low:.1f}-{high:.1f}] | {ours / median:.2f}x |"

    print(f"\n{os.path.basename(path)}, threads {THREADS}, runs {runs}; tok/s median [min-max]; bounds from the "
          f"matvec GB/s ({gbps:.1f}) and sgemm GFLOP/s ({gflops:.1f}) measured between the runs; llama.cpp: "
          "llama-bench on the same file, its runs alternated with ours")
    print(cpu_summary() + "\n")
    print("| | llamarun | bound | % of bound | llama.cpp | llamarun / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| prefill {n} tok, tok/s | {pre[0]:.1f} [{pre[1]:.1f}-{pre[2]:.1f}] | {prefill_bound:.0f} "
          f"| {100 * pre[0] / prefill_bound:.0f}% {theirs('prompt', pre[0])}")
    print(f"| decode {gen} tok, tok/s | {dec[0]:.2f} [{dec[1]:.2f}-{dec[2]:.2f}] | {decode_bound:.0f} "
          f"| {100 * dec[0] / decode_bound:.1f}% {theirs('decode', dec[0])}")
    print(f"| open (load + tokenizer), ms | {open_ms[0]:.0f} [{open_ms[1]:.0f}-{open_ms[2]:.0f}] | | | | |")
    print(f"| peak RSS, MiB | {peak['vmhwm_mb']:.0f} | | | | |")
    print(f"| model file, MB | {size_mb:.1f} | | | | |")


if __name__ == "__main__":
    main()
