"""Speed of llamarun on the TinyStories shapes, against the machine's own bounds and llama2.c's run.c.

    python benchmarks/bench_llama2c.py [--shapes s15M,s42M,s110M] [--runs 5] [--threads N] [--int8]
                                       [--runc PATH]

Random-weight checkpoints of the three TinyStories shapes are written once by
`../shared/tools/mkmodel.py` into `$LLAMARUN_HOME/bench` (default `~/.cache/llamarun/bench`),
outside the repository, and reused afterwards. With --int8 each is also quantized once by
`llamarun quantize` to llama2.c's version 2 (int8, group 64, as export.py writes it) and that file is
measured instead: runq.c's arithmetic on the int8 kernels (kernels/int8.py). (s15M's rows
of 288 take groups of 32, as export.py would halve 64 to.)

What is measured, per shape (medians of `--runs` runs, min and max beside, after one warm-up run
that pays for numba's compilation and for paging the memory-mapped weights in):
- prefill: one batched forward of a prompt of half the context (at most 256 random token ids) from
  an empty cache, logits for the last token only;
- decode: 128 tokens, greedy, after a short prompt, fresh cache, through the generation loop that
  `llamarun generate` runs (common.generate_rate: run.c's sampler at temperature 0, the text of each
  token from tokenizer.bin where ../shared has it; float32 models run greedy steps several a call),
  as run.c's figure is its own generation loop's.

And the bounds, measured in the same process between the runs of the model (one bound
measurement before each run, medians of both), so a machine that is busier for a while (this one
is shared) lowers both sides alike:
- decode bound: one token must read every weight once (all matrices including the classifier, one
  embedding row, the norms), so tok/s <= (numpy fp32 matvec GB/s) / (weight bytes per token);
- prefill bound: tok/s <= (numpy sgemm GFLOP/s at the model's matrix shapes with as many rows as
  the prompt) / (FLOPs per token: 2 * matrix params + attention at that prompt length; the
  classifier counts once per prompt, as only the last token's logits are computed).

With --runc, llama2.c's run.c (or runq.c, with --int8) decodes the same checkpoint between the runs,
OMP_NUM_THREADS as --threads: its own "achieved tok/s" over 128 steps, greedy. It reads a prompt one
token at a time, so its prefill is no faster than its decode. Each of our decode runs is also set
beside the run.c run and the bound measured just before it, and the medians of those ratios printed
("run by run"): this shared machine's bandwidth moves by a third within minutes, and the medians of
the two sides alone may come from different minutes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import re
import statistics


DECODE_TOKENS = 128
MAX_PREFILL = 256


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="s15M,s42M,s110M", help="comma-separated mkmodel shape names")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=None, help="BLAS / numba threads (default: all cores)")
    p.add_argument("--int8", action="store_true", help="measure the version-2 int8 (group 64) files")
    p.add_argument("--runc", default=None, metavar="PATH",
                   help="llama2.c's run binary (gcc -Ofast -march=native -fopenmp run.c -lm), or runq with --int8: "
                        "run on the same checkpoint, its runs alternated with llamarun's")
    return p.parse_args()


args = parse_args()
THREADS = args.threads or len(os.sched_getaffinity(0)) or 1
# the thread pools are sized when numpy (OpenBLAS) and numba load: set them before importing either
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from llamarun.formats import llama2c  # noqa: E402
from llamarun.model import Transformer  # noqa: E402
from common import MatvecBound, SgemmBound, generate_rate, interleaved, prefill_rate, stats  # noqa: E402
from llamarun.tokenizers import load_tokenizer  # noqa: E402

SHARED = os.environ.get("LLAMARUN_SHARED") or os.path.join(REPO, "..", "shared")   # as tests/conftest.py
MKMODEL = os.path.join(SHARED, "tools", "mkmodel.py")
TOKENIZER = os.path.join(SHARED, "models", "tokenizer.bin")


def runc_decode(path: str) -> float:
    """run.c's decode tok/s on checkpoint `path`: DECODE_TOKENS steps from BOS, greedy, as it reports
    them ("achieved tok/s", timed from its second step). run.c reads a prompt one token at a time, so
    its prefill is no faster than this."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    done = subprocess.run([args.runc, path, "-n", str(DECODE_TOKENS), "-t", "0", "-z", TOKENIZER],
                          capture_output=True, text=True, env=env, check=True)
    return float(re.search(r"achieved tok/s: ([0-9.]+)", done.stderr + done.stdout).group(1))


# ----------------------------------------------------------------------------------------------
# models

def model_path(name: str) -> str:
    """The cached checkpoint of shape `name`, written by mkmodel.py if it is not there yet."""
    home = os.environ.get("LLAMARUN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llamarun")
    folder = os.path.join(home, "bench")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.bin")
    if not os.path.exists(path):
        print(f"writing {path} with mkmodel.py ...", flush=True)
        tmp = path + ".part"          # a killed run leaves no truncated checkpoint behind
        subprocess.run([sys.executable, MKMODEL, name, tmp], check=True)
        os.replace(tmp, path)
    if args.int8:
        fp32, path = path, os.path.join(folder, f"{name}.int8.bin")
        if not os.path.exists(path):
            from llamarun.quantize import quantize
            print(f"writing {path} with llamarun quantize ...", flush=True)
            c = llama2c.load(fp32).config
            group = 64                     # as export.py: halved until it divides the rows (s15M: 32)
            while c.dim % group or c.hidden_dim % group:
                group //= 2
            quantize(fp32, path, "int8", group_size=group)
    return path


def decode_bytes(c, w) -> int:
    """Bytes of weights one decoded token reads: every matrix once, one embedding row, the norms."""
    layer = sum(w[k].nbytes for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    norms = w["attention_norm"].nbytes + w["ffn_norm"].nbytes + w["norm"].nbytes
    return layer + w["output"].nbytes + 4 * c.dim + norms


def prefill_flops(c, w, n: int) -> float:
    """FLOPs of one batched prefill of n tokens, per token.

    Matrices: 2 * params per token (the classifier only once, for the last token). Attention:
    token p scores p+1 keys and sums p+1 values, 2 * D FLOPs each, for every head of every layer.
    """
    layer_params = sum(np.prod(w[k][0].shape) for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")) * c.n_layers
    matrices = 2.0 * layer_params * n + 2.0 * np.prod(w["output"].shape)
    attention = c.n_layers * c.n_heads * 4.0 * c.head_dim * (n * (n + 1) / 2)
    return (matrices + attention) / n


# ----------------------------------------------------------------------------------------------
# the model

def main():
    shapes = [s for s in args.shapes.split(",") if s]
    runs = max(1, args.runs)
    paths = {name: model_path(name) for name in shapes}
    print(f"threads {THREADS}, runs {runs} (medians, [min - max]){', int8 (v2)' if args.int8 else ''}",
          flush=True)
    # a s110M-sized classifier, 98 MB: beyond the L2 caches, though not beyond the development
    # machine's L3 (480 MB, shared with the rest of the host); there a 1 GB matrix streamed at about
    # the same rate (27-28 GB/s against 21-31 for this one, 2026-12-02)
    matvec = MatvecBound((32000, 768))

    rows = []
    for name in shapes:
        ck = llama2c.load(paths[name])
        c, w = ck.config, ck.weights
        model = Transformer(c, w)
        tokenizer = load_tokenizer(TOKENIZER, vocab_size=c.vocab_size) if os.path.exists(TOKENIZER) else None
        n = min(c.seq_len // 2, MAX_PREFILL)
        sgemm = SgemmBound(w, n)
        gflops, pre = interleaved(lambda: prefill_rate(model, n), sgemm.measure, runs)
        runc = []
        if args.runc:
            def bound_and_runc():                      # run.c alternates with our runs too
                runc.append(runc_decode(paths[name]))
                return matvec.measure()
            gbps, dec = interleaved(lambda: generate_rate(model, tokenizer, DECODE_TOKENS), bound_and_runc, runs)
        else:
            gbps, dec = interleaved(lambda: generate_rate(model, tokenizer, DECODE_TOKENS), matvec.measure, runs)
        runc = runc[1:]                                # the first ran beside the warm-up
        # each run beside the measurement just before it (this machine's bandwidth moves by a third from one
        # minute to the next, and the medians of both sides may come from different minutes)
        pair_bound = statistics.median(d / (g * 1e9 / decode_bytes(c, w)) for d, g in zip(dec, gbps))
        pair_runc = [d / r for d, r in zip(dec, runc)]
        gflops, gbps, pre, dec = float(np.median(gflops)), float(np.median(gbps)), stats(pre), stats(dec)
        runc_text = f"{statistics.median(runc):.1f} [{min(runc):.1f}-{max(runc):.1f}]" if runc else "not run"
        if runc:
            runc_text += (f", ours / run.c run by run {statistics.median(pair_runc):.2f}x "
                          f"[{min(pair_runc):.2f}-{max(pair_runc):.2f}]")
        decode_bound = gbps * 1e9 / decode_bytes(c, w)
        prefill_bound = gflops * 1e9 / prefill_flops(c, w, n)
        print(f"\n{name}: dim {c.dim}, {c.n_layers} layers, {decode_bytes(c, w) / 1e6:.0f} MB of weights "
              f"per token, prefill prompt {n} tokens; matvec {gbps:.1f} GB/s, sgemm {gflops:.1f} GFLOP/s")
        print(f"  prefill {pre[0]:8.1f} tok/s [{pre[1]:.1f} - {pre[2]:.1f}]   bound {prefill_bound:8.1f}"
              f"   {100 * pre[0] / prefill_bound:5.1f}%")
        print(f"  decode  {dec[0]:8.1f} tok/s [{dec[1]:.1f} - {dec[2]:.1f}]   bound {decode_bound:8.1f}"
              f"   {100 * dec[0] / decode_bound:5.1f}% (run by run {100 * pair_bound:.1f}%)   run.c {runc_text}",
              flush=True)
        rows.append((name, n, pre, prefill_bound, dec, decode_bound, runc_text))
        del model, w, ck

    print(f"\nthreads {THREADS}, runs {runs}; tok/s, median [min-max]; bounds from the matvec GB/s and "
          "sgemm GFLOP/s measured between the runs\n")
    print("| shape | prompt | prefill tok/s | prefill bound | % | decode tok/s | decode bound | % "
          "| run.c decode (= its prefill) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, pre, pb, dec, db, runc_text in rows:
        print(f"| {name} | {n} | {pre[0]:.1f} [{pre[1]:.0f}-{pre[2]:.0f}] | {pb:.0f} | {100 * pre[0] / pb:.0f}% "
              f"| {dec[0]:.1f} [{dec[1]:.1f}-{dec[2]:.1f}] | {db:.1f} | {100 * dec[0] / db:.0f}% "
              f"| {runc_text} |")


if __name__ == "__main__":
    main()
