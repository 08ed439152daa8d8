"""Decode steps of n rows (n sequences decoded together, as the server batches them) on SmolLM2's fast
path: steps/s of the one-call forward (kernels/step.py) and of the layer-by-layer path, interleaved
run by run, with what n rows cost against one.

    python benchmarks/bench_decode_rows.py                  # rows 1, 2, 4, 8; depth 64; 7 runs
    python benchmarks/bench_decode_rows.py --rows 1,8 --depth 1024
"""
from __future__ import annotations

import argparse
import statistics
import time

import llamarun
from llamarun.model import Batch

STEPS = 64          # decode steps per timed run
SETTLE = 0.25       # seconds of idle before each run (thread pools stop spinning)


def steps_per_second(model, cache, rows: int, depth: int) -> float:
    time.sleep(SETTLE)
    t0 = time.perf_counter()
    for i in range(STEPS):
        model.forward(Batch.of([100] * rows, [depth + i] * rows, list(range(rows))), cache)
    return STEPS / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8", help="comma-separated numbers of decode rows")
    ap.add_argument("--depth", type=int, default=64, help="tokens already in each sequence's cache")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    model = llamarun.load().model
    compiled = model.compiled_forward()
    if compiled is None:
        raise SystemExit("the one-call forward does not apply here (exact weights or a TBB threading layer)")
    print(f"SmolLM2 Q4_1, fast path, depth {args.depth}, {STEPS} steps per run, medians of {args.runs} runs")
    print("| rows | one call steps/s | layer by layer steps/s | one call / layer by layer | cost of a step vs one row |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    one_row = None
    for rows in [int(r) for r in args.rows.split(",")]:
        cache = model.new_cache(rows, args.depth + STEPS + 1)
        for s in range(rows):
            model.forward(Batch.sequence(list(range(1, args.depth + 1)), 0, s), cache)
        rates = {True: [], False: []}
        for _ in range(args.runs):
            for use in (True, False):
                model._compiled = compiled if use else None
                rates[use].append(steps_per_second(model, cache, rows, args.depth))
        model._compiled = compiled
        fast, slow = statistics.median(rates[True]), statistics.median(rates[False])
        one_row = one_row or fast
        print(f"| {rows} | {fast:.1f} | {slow:.1f} | {fast / slow:.2f} | {one_row / fast:.2f}x |")


if __name__ == "__main__":
    main()
