"""Measuring helpers shared by the benchmarks: timing, the idle pause between measurements, and the
model's prefill and decode rates. Import it after the thread variables are set (the scripts do)."""
from __future__ import annotations

import time

import numpy as np

from llamarun.model import Batch, Transformer

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
    cache = model.new_cache()
    t0 = time.perf_counter()
    model.forward(batch, cache)
    return n / (time.perf_counter() - t0)


def decode_rate(model: Transformer, tokens: int, probe=None) -> float:
    """tok/s of `tokens` greedy steps, one forward each, after a short prompt (fresh cache); probe:
    what each forward is asked to show (llamarun.model.Probe), if anything."""
    c = model.config
    prompt = np.random.default_rng(2).integers(0, c.vocab_size, DECODE_PROMPT)
    cache = model.new_cache()
    logits = model.forward(Batch.sequence(prompt), cache, probe)
    token, pos = int(np.argmax(logits[0])), DECODE_PROMPT
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = model.forward(Batch.sequence([token], pos), cache, probe)
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


# ----------------------------------------------------------------------------------------------
# the machine's bounds, measured between a model's runs

MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def as_float32(t) -> np.ndarray:
    """A weight matrix for BLAS: numpy arrays as they are, quantized tensors dequantized to float32."""
    return t if isinstance(t, np.ndarray) else t.dequantize()


class MatvecBound:
    """numpy fp32 W @ x on a matrix of `shape` big enough to stream from memory (a classifier's)."""

    def __init__(self, shape):
        rng = np.random.default_rng(0)
        self.W = rng.standard_normal(shape, dtype=np.float32)
        self.x = rng.standard_normal(shape[1], dtype=np.float32)
        self.measure()                      # warm-up: page-in, BLAS threads start

    def measure(self) -> float:
        """GB/s, median of 7 products."""
        return self.W.nbytes / seconds(lambda: self.W @ self.x, 7) / 1e9


class SgemmBound:
    """numpy x @ W.T for one layer's matrices (layer 0's, as float32: BLAS has no quantized product),
    x with n rows."""

    def __init__(self, w, n: int):
        rng = np.random.default_rng(0)
        self.mats = [np.ascontiguousarray(as_float32(w[k][0])) for k in MATRICES]
        self.xs = [rng.standard_normal((n, m.shape[1]), dtype=np.float32) for m in self.mats]
        self.flops = sum(2.0 * n * m.size for m in self.mats)
        self.measure()

    def measure(self) -> float:
        """GFLOP/s, median of 3 passes over the layer."""
        def layer():
            for x, m in zip(self.xs, self.mats):
                x @ m.T
        return self.flops / seconds(layer, 3) / 1e9
