"""`python -m llamarun.kernels`: compile the kernels now, rather than in the first use's time.

numba compiles a kernel for each combination of argument types it is called with (a float32 or a
half KV cache, a file's read-only map or a writeable array, ...) and caches each in the kernel cache
(kernels/__init__.py). This runs the forward passes that llamarun's paths take, on small models of
each weight format and on the default model where it is downloaded, so that every specialization the
test suite and `llamarun generate` use is compiled, or found in the cache, here; it prints each part's
time and how many kernels it compiled or loaded. `.ci/run` calls it before pytest, so that pytest's
--durations shows the tests' own cost.
"""
from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

from . import CACHE_DIR, attention, cpu, ggml, int8, matvec, norm, step

MODULES = (attention, ggml, int8, matvec, norm, step)


def dispatchers() -> list[CPUDispatcher]:
    """Every cached kernel entry point of the package (the functions they call are compiled, and
    cached, within them)."""
    return [v for m in MODULES for v in vars(m).values()
            if isinstance(v, CPUDispatcher) and not isinstance(v._cache, NullCache)]


def counts() -> tuple[int, int]:
    """(specializations compiled, specializations loaded from the cache) so far in this process."""
    compiled = loaded = 0
    for d in dispatchers():
        compiled += sum(d.stats.cache_misses.values())
        loaded += sum(d.stats.cache_hits.values())
    return compiled, loaded


# ----------------------------------------------------------------------------------------------
# small models of each format, written where the tests' references are not needed

def write_llama2c(path: Path, dim=64, hidden=192, layers=2, heads=4, kv_heads=2, vocab=320, seq_len=64, seed=0):
    """A random float32 llama2.c checkpoint (legacy header, shared classifier), as run.c reads one."""
    rng = np.random.default_rng(seed)
    head = dim // heads
    shapes = [(vocab, dim), (layers, dim), (layers, dim, dim), (layers, kv_heads * head, dim),
              (layers, kv_heads * head, dim), (layers, dim, dim), (layers, dim), (layers, hidden, dim),
              (layers, dim, hidden), (layers, hidden, dim), (dim,), (seq_len, head // 2), (seq_len, head // 2)]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len))
        for shape in shapes:
            f.write((rng.standard_normal(shape) * 0.1).astype(np.float32).tobytes())
    return path


def run_model(path, exact: bool, prompt_lengths=(1, 5, 12)):
    """Teacher-forced logits of prompts of these lengths, then one decode step after each."""
    import llamarun
    from llamarun.model import Batch

    llama = llamarun.load(path, exact=exact)
    model = llama.model
    ids = [(7 * i + 3) % model.config.vocab_size for i in range(max(prompt_lengths) + 1)]
    for n in prompt_lengths:
        n = min(n, model.config.seq_len - 1)
        cache = model.new_cache(seq_len=n + 1)
        model.forward(Batch.sequence(ids[:n], 0, all_logits=True), cache)
        model.forward(Batch.sequence(ids[n:n + 1], n), cache)


def warm_ups(folder: Path, default_model: Path | None):
    """(what, function) pairs: the forwards that reach every kernel specialization."""
    f32 = write_llama2c(folder / "tiny.bin")
    parts = [("llama2.c float32 (run.c's arithmetic)", lambda: run_model(f32, exact=True)),
             ("llama2.c int8 (runq.c's)", lambda: run_model(quantize_to(f32, folder / "tiny-int8.bin"), True))]
    if default_model is not None:
        parts += [("default model, fast path", lambda: run_model(default_model, exact=False, prompt_lengths=(1, 5, 200))),
                  ("default model, exact path", lambda: run_model(default_model, exact=True, prompt_lengths=(1, 5, 40)))]
    return parts


def quantize_to(src: Path, dst: Path) -> Path:
    from llamarun.quantize import quantize
    quantize(src, dst, "int8", group_size=32)
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamarun.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--no-default-model", action="store_true",
                        help="leave out the default model (compiled anyway for the small models' weight formats)")
    args = parser.parse_args(argv)
    from llamarun.hub import DEFAULT_MODEL, is_cached, known_model, model_path

    print(f"kernel cache: {CACHE_DIR}")
    print(cpu.describe())
    default = None
    if not args.no_default_model:
        if is_cached(known_model(DEFAULT_MODEL)):
            default = model_path(DEFAULT_MODEL)
        else:
            print("the default model is not downloaded (`llamarun pull`): its kernels are left out")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for what, run in warm_ups(Path(folder), default):
            t, (c0, l0) = time.perf_counter(), counts()
            run()
            c1, l1 = counts()
            print(f"  {what:<42} {time.perf_counter() - t:6.1f} s   {c1 - c0:3d} compiled, {l1 - l0:3d} from the cache",
                  flush=True)
    compiled, loaded = counts()
    print(f"{time.perf_counter() - start:.1f} s: {compiled} kernel specializations compiled, {loaded} loaded from the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
