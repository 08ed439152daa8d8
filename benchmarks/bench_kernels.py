"""Speed of the native quantized matrix-vector kernels (llamarun/kernels/ggml.py), beside numpy's fp32.

    python benchmarks/bench_kernels.py [--runs 7] [--types Q4_1,Q8_0] [--threads N] [--min-time 0.05]
                                       [--shapes smollm2|1b] [--rows 1,8]

For each type with a kernel (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), at SmolLM2-135M's matrix shapes
(out_features x in_features: 576x1536 the FFN down projection, 1536x576 up/gate, 576x576 attention,
and 49152x576, the Q8_0 classifier, for Q8_0 only) or, with --shapes 1b, Llama-3.2-1B's (2048x8192,
8192x2048, 2048x2048), with 1 and 8 rows of activations (--rows: a prompt's part is 128):
- exact: float32 activations times the weights as gguf dequantizes them;
- fast: activations quantized to int8 blocks of 32, integer dot products (quantizing x included);
each through GGMLTensor.linear (what the engine calls, so its per-call cost is counted), as
G weights/s and GB/s of weight bytes read (the blocks as stored). Beside them, numpy's fp32 product
on the same shape, float32 weights (`w @ x` for one row, sgemv; `x @ w.T` for eight, sgemm), measured
in the same run, just before the kernels' runs on that shape. (Not interleaved with them call by
call: OpenBLAS's threads spin for a while after each call, and a numba kernel started meanwhile
waits for a scheduler time slice to get its second core, ~10 ms; see kernels/matvec.py. The
kernels' runs are interleaved exact, fast, exact, ... so that a machine that is busier for a while
slows both alike.)

INT8 is llama2.c's version-2 format (int8 groups of 64, a float32 scale each) on its own kernel
(kernels/int8.py, runq.c's arithmetic: int8 activations too, so its figure is in the exact column
and the fast one is empty), at the s110M TinyStories shapes.

The K-quants' super-blocks are 256 values: their rows of 576 are benchmarked as 768 (the next multiple
of 256; SmolLM2's own files use no K-quant at 576).

Each figure is the median of --runs runs (best beside it); a run repeats the call for at least
--min-time seconds. --cpu-time measures the process's CPU time instead of the wall clock: with
--threads 1 and OPENBLAS_NUM_THREADS=1 in the environment, that is the speed of one core even while
other processes share the machine (on a busy 2-core machine the wall clock of a 2-thread call is
mostly the wait for the second core's time slice). Weights are random valid blocks (every byte pattern of the quants is valid; the f16
scales are small finite numbers), which the kernels read exactly as they read a model's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llamarun.tensors import GGMLTensor, GroupQuantized, quantize_groups  # noqa: E402

# block values, block bytes, byte offsets of the f16 scales in a block
LAYOUTS = {T.Q8_0: (32, 34, [0]), T.Q4_0: (32, 18, [0]), T.Q4_1: (32, 20, [0, 2]),
           T.Q4_K: (256, 144, [0, 2]), T.Q5_K: (256, 176, [0, 2]), T.Q6_K: (256, 210, [208])}
SHAPES = {"smollm2": [(576, 1536), (1536, 576), (576, 576), (49152, 576)],
          "1b": [(2048, 8192), (8192, 2048), (2048, 2048)]}
# llama2.c's int8 groups (type INT8: version-2 checkpoints, group 64), at the s110M TinyStories shapes
INT8_SHAPES = [(768, 2048), (2048, 768), (768, 768), (32000, 768)]


def random_blocks(qtype, rows: int, n_in: int, rng) -> np.ndarray:
    values, size, scale_offsets = LAYOUTS[qtype]
    blocks = rng.integers(0, 256, (rows, n_in // values, size), dtype=np.uint8)
    for offset in scale_offsets:
        d = (rng.uniform(-1, 1, blocks.shape[:2]) * 0.01).astype(np.float16)
        blocks[..., offset:offset + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


CLOCK = time.perf_counter


def seconds_per_call(fn, min_time: float) -> float:
    """Mean seconds per call over a loop of at least min_time seconds."""
    calls, start = 0, CLOCK()
    while True:
        fn()
        calls += 1
        elapsed = CLOCK() - start
        if elapsed >= min_time:
            return elapsed / calls


def measure(candidates: dict, runs: int, min_time: float) -> dict:
    """{name: (median, best) seconds per call}, the candidates' runs interleaved."""
    for fn in candidates.values():
        seconds_per_call(fn, min_time)                         # compile, page in, warm the caches
    times = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            times[name].append(seconds_per_call(fn, min_time))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--types", default="Q4_1,Q4_0,Q8_0,Q4_K,Q6_K,INT8")
    parser.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per run (default 0.05)")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time (see above)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--rows", default="1,8", help="rows of activations, comma-separated (default 1,8)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    clock = "process CPU time" if args.cpu_time else "wall clock"
    print(f"numba threads: {numba.get_num_threads()}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}; "
          f"{clock}; medians of {args.runs} runs (best in brackets)")
    print(f"{'type':5} {'shape':>10} {'rows':>4} | {'exact G w/s':>17} {'GB/s':>5} | {'fast G w/s':>17} {'GB/s':>5}"
          f" | {'numpy fp32 G w/s':>17} {'GB/s':>5}")
    for name in args.types.split(","):
        if name.strip() == "INT8":
            bench_int8(rng, args)
            continue
        qtype = T[name.strip()]
        block = LAYOUTS[qtype][0]
        for out_features, in_features in SHAPES[args.shapes]:
            if out_features == 49152 and qtype != T.Q8_0:
                continue
            n_in = -(-in_features // block) * block
            raw = random_blocks(qtype, out_features, n_in, rng)
            tensor = GGMLTensor("w", qtype, (out_features, n_in), raw)
            fast = GGMLTensor("w", qtype, (out_features, n_in), raw, exact=False)
            w32 = tensor.dequantize()
            for n in (int(r) for r in args.rows.split(",")):
                x = rng.standard_normal((n, n_in)).astype(np.float32)
                numpy_product = (lambda: w32 @ x[0]) if n == 1 else (lambda: x @ w32.T)
                result = measure({"numpy": numpy_product}, args.runs, args.min_time)
                result |= measure({"exact": lambda: tensor.linear(x), "fast": lambda: fast.linear(x)},
                                  args.runs, args.min_time)
                weights = out_features * n_in
                cells = []
                for key, nbytes in (("exact", raw.nbytes), ("fast", raw.nbytes), ("numpy", w32.nbytes)):
                    median, best = result[key]
                    cells.append(f"{weights / median / 1e9:7.2f} [{weights / best / 1e9:7.2f}] "
                                 f"{nbytes / median / 1e9:5.1f}")
                gmacs = n * weights / result["fast"][0] / 1e9
                print(f"{name:5} {f'{out_features}x{n_in}':>10} {n:4} | " + " | ".join(cells)
                      + f" | fast {gmacs:6.1f} GMAC/s", flush=True)


def bench_int8(rng, args) -> None:
    """llama2.c's int8 groups (kernels/int8.py: runq.c's arithmetic, its only one: in the exact column)
    beside numpy's fp32 product."""
    for out_features, in_features in INT8_SHAPES:
        g = quantize_groups(rng.standard_normal((out_features, in_features)).astype(np.float32), 64)
        tensor = GroupQuantized(g.q, g.scale, 64)
        w32 = tensor.dequantize()
        for n in (1, 8):
            x = rng.standard_normal((n, in_features)).astype(np.float32)
            numpy_product = (lambda: w32 @ x[0]) if n == 1 else (lambda: x @ w32.T)
            result = measure({"numpy": numpy_product}, args.runs, args.min_time)
            result |= measure({"exact": lambda: tensor.linear(x)}, args.runs, args.min_time)
            weights = out_features * in_features
            cells = []
            for key, nbytes in (("exact", tensor.nbytes), ("numpy", w32.nbytes)):
                median, best = result[key]
                cells.append(f"{weights / median / 1e9:7.2f} [{weights / best / 1e9:7.2f}] {nbytes / median / 1e9:5.1f}")
            print(f"{'INT8':5} {f'{out_features}x{in_features}':>10} {n:4} | {cells[0]} | {'-':>23} | {cells[1]}",
                  flush=True)


if __name__ == "__main__":
    main()
