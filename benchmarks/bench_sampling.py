"""The general sampler on a SmolLM2-sized vocabulary (49152 logits): microseconds per draw, with the
default settings (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and a repeat penalty over 64
tokens of history, against greedy: a draw should be a small part of a decode step.

    python benchmarks/bench_sampling.py                   # 7 runs of 200 draws
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from llamarun.sampling import Sampler

VOCAB = 49152


def microseconds_per_draw(sampler: Sampler, logits: np.ndarray, history: list[int], draws: int) -> float:
    sampler.sample(logits, history)                  # warm-up
    t0 = time.perf_counter()
    for _ in range(draws):
        sampler.sample(logits, history)
    return (time.perf_counter() - t0) / draws * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--draws", type=int, default=200, help="draws per run")
    args = ap.parse_args()
    logits = (np.random.default_rng(5).standard_normal(VOCAB) * 3).astype(np.float32)
    history = list(range(0, 6400, 100))
    samplers = {"default + repeat penalty 1.1": Sampler(seed=0, repeat_penalty=1.1),
                "default": Sampler(seed=0),
                "greedy": Sampler(temperature=0)}
    print(f"{VOCAB} logits, {len(history)} tokens of history, medians of {args.runs} runs of {args.draws} draws")
    print("| sampler | us per draw | min - max |")
    print("| --- | --- | --- |")
    for name, sampler in samplers.items():
        times = [microseconds_per_draw(sampler, logits, history, args.draws) for _ in range(args.runs)]
        print(f"| {name} | {np.median(times):.0f} | {min(times):.0f} - {max(times):.0f} |")


if __name__ == "__main__":
    main()
