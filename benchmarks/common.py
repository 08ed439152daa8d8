"""Measuring helpers shared by the benchmarks: timing, the idle pause between measurements, and the
model's prefill and decode rates. Import it after the thread variables are set (the scripts do)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def generate_rate(model: Transformer, tokenizer, tokens: int) -> float:
    """tok/s of `tokens` greedy decode steps through the generation loop (generation.generate_stream, what
    `llamarun generate` and the Python API run: the decoder's draw and text each token, and greedy steps
    run several a call where the model has them), after a short prompt (fresh cache). run.c's sampler at
    temperature 0, which ends only at BOS, as run.c's loop does."""
    from llamarun.decoding import Completion, end_tokens
    from llamarun.generation import generate_stream
    from llamarun.sampling import Llama2cSampler
    prompt = np.random.default_rng(2).integers(3, model.config.vocab_size, DECODE_PROMPT).tolist()
    sampler, result = Llama2cSampler(temperature=0), Completion("", [])
    for _ in generate_stream(model, tokenizer, prompt, sampler, max_tokens=tokens + 1,
                             end=end_tokens(tokenizer, sampler), result=result):
        pass
    return result.decode_tok_s


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


class Int8PeakBound:
    """The CPU's peak rate of int8 dot products, registers only: the compute bound of the quantized
    kernels, as sgemm's is of float32 BLAS. A loop of independent chains of the widest byte
    multiply-add the kernels use (vpdpbusd on 512-bit vectors with AVX512-VNNI, 256-bit with AVX-VNNI;
    pmaddubsw + pmaddwd + paddd on AVX2), JIT-compiled through llvmlite for this CPU and run on
    `threads` threads at once (ctypes lets go of the GIL). Ops count a multiply and an add per byte
    product, as FLOPs do."""

    CHAINS = 16            # independent accumulators: more than latency x issue rate, so the loop is throughput-bound
    ITERATIONS = 4_000_000

    def __init__(self, threads: int):
        import ctypes

        from llvmlite import binding as llvm

        from llamarun.kernels import cpu
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        self.threads = threads
        self.width = 512 if cpu.VNNI512 else 256
        self.instruction = (f"vpdpbusd {self.width}-bit" if cpu.VNNI else "pmaddubsw+pmaddwd 256-bit")
        module = llvm.parse_assembly(self._loop_ir(cpu.VNNI))
        machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
        self._engine = llvm.create_mcjit_compiler(module, machine)
        self._engine.finalize_object()
        self._loop = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(self._engine.get_function_address("loop"))
        self.ops_per_iteration = 2 * self.CHAINS * self.width // 8
        self.measure()

    def _loop_ir(self, vnni: bool) -> str:
        from llvmlite import ir
        lanes = self.width // 32
        i32, i64 = ir.IntType(32), ir.IntType(64)
        words = ir.VectorType(i32, lanes)
        mod = ir.Module(name="int8_peak")
        fn = ir.Function(mod, ir.FunctionType(i64, [i64]), name="loop")
        entry, body, done = (fn.append_basic_block(n) for n in ("entry", "body", "done"))
        b = ir.IRBuilder(entry)
        # operands from the argument, so that nothing folds at compile time
        seed = b.insert_element(ir.Constant(words, ir.Undefined), b.trunc(fn.args[0], i32), ir.Constant(i32, 0))
        x0 = b.shuffle_vector(seed, ir.Constant(words, ir.Undefined), ir.Constant(words, [0] * lanes))
        y = b.add(x0, ir.Constant(words, [0x01010101] * lanes))
        ys = [b.add(y, ir.Constant(words, [k] * lanes)) for k in range(self.CHAINS)]   # one per chain: no common products
        b.branch(body)
        b = ir.IRBuilder(body)
        i, x_now = b.phi(i64), b.phi(words)
        accs = [b.phi(words) for _ in range(self.CHAINS)]
        x = x_now
        x_next = b.add(x, y)            # new bytes every iteration: no product is loop-invariant
        if vnni:
            dp = ir.Function(mod, ir.FunctionType(words, [words] * 3), name=f"llvm.x86.avx512.vpdpbusd.{self.width}")
            new = [b.call(dp, [a, x, yk]) for a, yk in zip(accs, ys)]
        else:
            bytes_, shorts = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)
            ubsw = ir.Function(mod, ir.FunctionType(shorts, [bytes_, bytes_]), name="llvm.x86.avx2.pmadd.ub.sw")
            wd = ir.Function(mod, ir.FunctionType(words, [shorts, shorts]), name="llvm.x86.avx2.pmadd.wd")
            xb, ones = b.bitcast(x, bytes_), ir.Constant(shorts, [1] * 16)
            new = [b.add(a, b.call(wd, [b.call(ubsw, [xb, b.bitcast(yk, bytes_)]), ones])) for a, yk in zip(accs, ys)]
        step = b.add(i, ir.Constant(i64, 1))
        i.add_incoming(ir.Constant(i64, 0), entry)
        i.add_incoming(step, body)
        x_now.add_incoming(x0, entry)
        x_now.add_incoming(x_next, body)
        for a, v in zip(accs, new):
            a.add_incoming(ir.Constant(words, [0] * lanes), entry)
            a.add_incoming(v, body)
        b.cbranch(b.icmp_unsigned("<", step, ir.Constant(i64, self.ITERATIONS)), body, done)
        b = ir.IRBuilder(done)
        total = new[0]
        for v in new[1:]:
            total = b.add(total, v)
        b.ret(b.zext(b.extract_element(total, ir.Constant(i32, 0)), i64))
        return str(mod)

    def measure(self) -> float:
        """GOP/s on all threads, best of 3 (a compute peak: a slower run is an interruption)."""
        import threading
        best = float("inf")
        for _ in range(3):
            workers = [threading.Thread(target=self._loop, args=(3,)) for _ in range(self.threads)]
            t0 = time.perf_counter()
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            best = min(best, time.perf_counter() - t0)
        return self.threads * self.ITERATIONS * self.ops_per_iteration / best / 1e9


# ----------------------------------------------------------------------------------------------
# llama.cpp, measured in the same run

def find_tool(given: str | None, name: str, beside: str | None = None) -> str | None:
    """A llama.cpp tool: the path given, else `name` beside the tool `beside`, else on PATH."""
    if given:
        return given
    if beside and os.path.exists(os.path.join(os.path.dirname(beside), name)):
        return os.path.join(os.path.dirname(beside), name)
    return shutil.which(name)


def llama_bench(tool: str, path: str, threads: int, runs: int, prompt: int, gen: int) -> dict:
    """{'prompt': tok/s, 'decode': tok/s} (those asked: prompt, gen > 0) from llama.cpp's llama-bench on
    this file, `runs` repetitions (its figure: their mean); {} with a line printed if it failed."""
    cmd = [tool, "-m", path, "-t", str(threads), "-r", str(runs), "-p", str(prompt), "-n", str(gen), "-o", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"llama-bench failed: {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return {}
    out = {}
    for row in json.loads(result.stdout):
        out["decode" if row["n_gen"] else "prompt"] = float(row["avg_ts"])
    return out
