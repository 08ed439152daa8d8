"""Measuring helpers shared by the benchmarks: timing, the idle pause between measurements, and the
model's prefill and decode rates. Import it after the thread variables are set (the scripts do)."""
from __future__ import annotations

import time

import numpy as np

from llamarun.model import Batch, KVCache, Transformer

DECODE_PROMPT = 8          # the "short prompt" before a timed decode
SETTLE = 0.25              # seconds of idle before each measurement (see settled())


def seconds(fn, reps: int = 1) -> float:
    """Median wall time of fn() over reps calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def prefill_rate(model: Transformer, n: int) -> float:
    """tok/s of one batched forward of n random tokens from an empty cache, last token's logits."""
    c = model.config
    batch = Batch.sequence(np.random.default_rng(1).integers(0, c.vocab_size, n))
    cache = KVCache(c)
    t0 = time.perf_counter()
    model.forward(batch, cache)
    return n / (time.perf_counter() - t0)


def decode_rate(model: Transformer, tokens: int) -> float:
    """tok/s of `tokens` greedy steps, one forward each, after a short prompt (fresh cache)."""
    c = model.config
    prompt = np.random.default_rng(2).integers(0, c.vocab_size, DECODE_PROMPT)
    cache = KVCache(c)
    logits = model.forward(Batch.sequence(prompt), cache)
    token, pos = int(np.argmax(logits[0])), DECODE_PROMPT
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = model.forward(Batch.sequence([token], pos), cache)
        token, pos = int(np.argmax(logits[0])), pos + 1
    return tokens / (time.perf_counter() - t0)


def settled(fn):
    """fn() after a pause that lets idle thread pools stop spinning: OpenBLAS's threads spin for
    ~0.1 s after a call, numba's OpenMP threads for a few ms, and a spinning thread of one pool
    slows the other pool's first calls (the bound's BLAS calls, or the decode's numba kernels)."""
    time.sleep(SETTLE)
    return fn()


def interleaved(run, bound, runs: int) -> tuple[list[float], list[float]]:
    """runs x (measure the bound, run the model), after one warm-up run of each."""
    settled(bound), settled(run)
    pairs = [(settled(bound), settled(run)) for _ in range(runs)]
    return [b for b, _ in pairs], [r for _, r in pairs]


def stats(xs) -> tuple[float, float, float]:
    return float(np.median(xs)), float(np.min(xs)), float(np.max(xs))
