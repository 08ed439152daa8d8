"""The compile step, `python -m llamarun.kernels`: compile the kernels now, rather than in the first use's time.

numba compiles a kernel for each combination of argument types it is called with (a float32 or a
half KV cache, a file's read-only map or a writeable array, ...) and caches each in the kernel cache
(kernels/__init__.py). This runs the forward passes that llamarun's paths take, on small models of
each weight format and on the default model where it is downloaded, so that every specialization the
test suite and `llamarun generate` use is compiled, or found in the cache, here; it prints each part's
time and how many kernels it compiled or loaded. `.ci/run` calls it before pytest, so that pytest's
--durations shows the tests' own cost. (A module of its own, not __main__.py, so that its worker
processes can import it.)
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numba
import numpy as np
from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

from . import CACHE_DIR, attention, cpu, ggml, int8, matvec, norm, select, step

MODULES = (attention, ggml, int8, matvec, norm, select, step)


def dispatchers() -> list[CPUDispatcher]:
    """Every cached kernel entry point of the package (the functions they call are compiled, and
    cached, within them)."""
    made = [v for m in MODULES for v in vars(m).values() if isinstance(v, CPUDispatcher)]
    return [v for v in made + list(step._forward_fast.values()) if not isinstance(v._cache, NullCache)]


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


def run_model(path, exact: bool, prompt_lengths=(1, 5, 12), paths=("plan", "layers")):
    """Teacher-forced logits of prompts of these lengths, then one decode step after each: through the
    plan's forwards ("plan"), and layer by layer ("layers": the path of inspection, and of the tests
    that compare it)."""
    import llamarun
    from llamarun.model import Batch, Probe

    llama = llamarun.load(path, exact=exact)
    model = llama.model
    ids = [(7 * i + 3) % model.config.vocab_size for i in range(max(prompt_lengths) + 1)]
    probes = {"plan": None, "layers": Probe(residual=lambda layer, x: None)}
    for probe in (probes[p] for p in paths):
        for n in prompt_lengths:
            n = min(n, model.config.seq_len - 1)
            cache = model.new_cache(seq_len=n + 1)
            model.forward(Batch.sequence(ids[:n], 0, all_logits=True), cache, probe)
            model.forward(Batch.sequence(ids[n:n + 1], n), cache, probe)


def run_half_precision(path):
    """run_model's forwards for the llama2.c model at `path` with its matrices in bfloat16 (what a Hugging
    Face or Meta checkpoint of bf16 or f16 weights computes with: kernels/matvec.py's matvec_half), on
    either arithmetic."""
    import llamarun
    from gguf import GGMLQuantizationType
    from llamarun.formats import load_checkpoint
    from llamarun.model import Batch
    from llamarun.tensors import GGMLTensor

    def bf16(name, w):
        raw = (np.ascontiguousarray(w, np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        raw.flags.writeable = False                         # as a file's map
        return GGMLTensor(name, GGMLQuantizationType.BF16, w.shape, raw)

    checkpoint = load_checkpoint(path)
    weights = dict(checkpoint.weights)
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        weights[name] = [bf16(name, w) for w in weights[name]]
    weights["tok_embeddings"] = weights["output"] = bf16("tok_embeddings", weights["tok_embeddings"])
    checkpoint.weights = weights
    for exact in (True, False):
        model = llamarun.Llama(checkpoint, exact=exact).model
        ids = [(7 * i + 3) % model.config.vocab_size for i in range(13)]
        for n in (1, 5, 12):
            cache = model.new_cache(seq_len=n + 1)
            model.forward(Batch.sequence(ids[:n], 0, all_logits=True), cache)
            model.forward(Batch.sequence(ids[n:n + 1], n), cache)


def run_samplers():
    """The sampler chain's top-k and top-p (kernels/select.py) on a float32 row of logits, as a model gives
    them, and a float64 one, as penalties leave them."""
    from llamarun.sampling import Sampler

    logits = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    for row in (logits, logits.astype(np.float64)):
        Sampler(seed=0).sample(row)
        Sampler(top_k=0, seed=0).sample(row)


def compile_forward_for_types(path, kinds: int, output_kinds: int):
    """The one-call forward for models of these ggml types (step.forward_fast_for), compiled for the
    argument types that the forward of the model at `path` (a GGUF file) takes: those of every GGUF
    model, and of the tests' random ones (tests/test_step.py), whatever their types. The model's own
    forward is not run (nor compiled): its arguments are taken on the way in."""
    import llamarun
    from llamarun.model import Batch

    model = llamarun.load(path).model
    compiled = model.compiled_forward()
    arguments = []

    def capture(*args):
        arguments.append(args)
        raise _Captured

    compiled.forward_fast = capture
    try:
        model.forward(Batch.sequence([1], 0), model.new_cache(seq_len=2))
    except _Captured:
        pass
    step.forward_fast_for(kinds, output_kinds).compile(tuple(numba.typeof(a) for a in arguments[0]))


class _Captured(Exception):
    pass


def warm_ups(folder: Path, default_model: Path | None) -> list[tuple[str, str, tuple]]:
    """(what, function name, arguments): the forwards that reach every kernel specialization, the
    longest first (the order the workers take them in)."""
    f32 = write_llama2c(folder / "tiny.bin")
    int8 = quantize_to(f32, folder / "tiny-int8.bin")
    parts = []
    if default_model is not None:
        # the tests' model of every type with a group kernel (tests/test_step.py's MIXED), first: the longest.
        # The fast path's two ways are two parts, each about as long as the others: the compile step ends
        # when its longest part does.
        parts += [("every ggml type, a Q4_K classifier (tests)", "compile_forward_for_types",
                   (default_model, ggml.ALL_KINDS, ggml.Q4_K_BIT)),
                  ("default model, fast path", "run_model", (default_model, False, (1, 5, 200), ("plan",))),
                  ("default model, fast path, layer by layer", "run_model",
                   (default_model, False, (1, 5, 200), ("layers",))),
                  ("default model, exact path", "run_model", (default_model, True, (1, 5, 40)))]
    return parts + [("llama2.c int8 (runq.c's arithmetic)", "run_model", (int8, True)),
                    ("bfloat16 matrices (Hugging Face, Meta)", "run_half_precision", (f32,)),
                    ("llama2.c float32 (run.c's)", "run_model", (f32, True)),
                    ("samplers' top-k", "run_samplers", ())]


def quantize_to(src: Path, dst: Path) -> Path:
    from llamarun.quantize import quantize
    quantize(src, dst, "int8", group_size=32)
    return dst


def run_part(function: str, arguments: tuple) -> tuple[float, int, int]:
    """Run one warm-up: (seconds, specializations compiled, loaded from the cache)."""
    start, (c0, l0) = time.perf_counter(), counts()
    globals()[function](*arguments)
    c1, l1 = counts()
    return time.perf_counter() - start, c1 - c0, l1 - l0


def run_parts(parts, jobs: int):
    """Run the warm-ups on `jobs` processes (numba compiles on one thread: a 2-core machine compiles
    twice as fast with two), printing each as it ends. Kernels that two parts share may compile in
    both; the cache takes one save at a time (kernels/__init__.py)."""
    def report(what, result):
        seconds, compiled, loaded = result
        print(f"  {what:<42} {seconds:6.1f} s   {compiled:3d} compiled, {loaded:3d} from the cache", flush=True)
        return compiled, loaded

    if jobs <= 1:
        return [report(what, run_part(function, arguments)) for what, function, arguments in parts]
    # spawned, not forked: a fork of a process that has started numba's threads may hang
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_part, function, arguments): what for what, function, arguments in parts}
        return [report(futures[f], f.result()) for f in as_completed(futures)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamarun.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--no-default-model", action="store_true",
                        help="leave out the default model (compiled anyway for the small models' weight formats)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes compiling at once (default: one per core)")
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
        parts = warm_ups(Path(folder), default)
        results = run_parts(parts, min(args.jobs, len(parts)))
    compiled, loaded = (sum(r[i] for r in results) for i in (0, 1))
    print(f"{time.perf_counter() - start:.1f} s: {compiled} kernel specializations compiled, {loaded} loaded "
          f"from the cache, on {min(args.jobs, len(parts))} processes")
    return 0

