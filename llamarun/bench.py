"""`llamarun bench`: prompt-processing and text-generation speed, measured as llama.cpp's llama-bench does.

Tests (llama-bench's names):
- ppN: one batched forward of N random token ids (logits of the last token only);
- tgN: N forwards of one token each (the decode loop, without sampling);
- "... @ dD": the KV cache already holds D tokens when the timed part starts. They are prefilled
  once, untimed, before a test's runs: every run writes the positions after them again, so the
  prefix stays valid and each run sees the same D tokens before it.

Each test runs once untimed (a whole ppN, one token of tgN, as llama-bench warms up: numba's
compilation, the memory-mapped weights paged in, the cache's pages touched), then `repetitions`
times; t/s = tokens / seconds of each run, reported as median, min and max. Every run starts after
a pause of SETTLE seconds: OpenBLAS's threads spin for ~0.1 s after a call and numba's for a few ms,
and a spinning thread of one pool slows the next call of the other on a machine with few cores
(see kernels/matvec.py).

When the `llama_cpp` module (the llama-cpp-python package) can be imported and the model is a GGUF
file, llama.cpp runs the same file beside llamarun: the same token ids, the same thread count, a
context that holds the depth and the test, and its runs alternate with llamarun's (test by test, run
by run), so a machine that gets busier for a while slows both alike. ppN is one `Llama.eval` of the N
tokens (llama.cpp splits it into ubatches of 512, as llama-bench does by default); tgN is N evals of
one token.
"""
from __future__ import annotations

import importlib
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import ModelConfig
from .errors import LlamarunError
from .kernels import cpu as cpu_info
from .model import Batch
from .plan import FILL_CHUNK

SETTLE = 0.25              # seconds of idle before every timed run (see the module docstring)
BACKEND = "numpy+numba"
LLAMA_CPP_BATCH, LLAMA_CPP_UBATCH = 2048, 512   # llama-bench's defaults
LLAMA_CPP_MISSING = "llama_cpp not installed: pip install llama-cpp-python (builds from source, ~12 min) to compare"


# ----------------------------------------------------------------------------------------------
# what is measured

@dataclass(frozen=True)
class Test:
    kind: str           # "pp" (prompt processing) or "tg" (text generation)
    n_tokens: int
    depth: int = 0      # tokens already in the cache

    @property
    def name(self) -> str:
        """llama-bench's name: "pp512", "tg128", "pp512 @ d1024"."""
        base = f"{self.kind}{self.n_tokens}"
        return f"{base} @ d{self.depth}" if self.depth else base


@dataclass
class Measurement:
    backend: str
    test: Test
    seconds: list[float] = field(default_factory=list)     # one per timed run

    @property
    def rates(self) -> list[float]:
        return [self.test.n_tokens / s for s in self.seconds]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def low(self) -> float:
        return min(self.rates)

    @property
    def high(self) -> float:
        return max(self.rates)


@dataclass
class ModelInfo:
    name: str           # the file's name
    path: str
    size_bytes: int     # of the file
    params: int         # parameters, counted from the config (the classifier once when it is tied)
    is_gguf: bool


def cpu_summary() -> str:
    """Two lines: the CPU model, and the instructions the kernels use on it (a figure means little
    without them: the same code runs 512-bit VNNI on one machine and AVX2 on the next)."""
    f = cpu_info.features()
    used = [label for name, label in cpu_info.KERNEL_FLAGS.items() if f["target_flags"][name]]
    return (f"cpu: {f['model'] or 'unknown model'} ({f['arch']}), {os.cpu_count()} cores\n"
            f"vector features in use: {' '.join(used) or 'baseline only'}; dot products: {f['dot_products']}; "
            f"half floats: {f['half_conversion']}")


@dataclass
class BenchReport:
    model: ModelInfo
    threads: int
    repetitions: int
    results: list[Measurement]                      # llamarun's, one per test
    peak_rss_mib: float                             # after loading and one run of every test, llamarun alone
    reference: list[Measurement] = field(default_factory=list)   # llama.cpp's, when it ran
    reference_version: str | None = None
    reference_note: str | None = None               # why llama.cpp did not run
    peak_rss_total_mib: float | None = None         # with llama.cpp loaded too, at the end
    load_average: tuple[float, float] | None = None  # 1-minute load average before and after (Unix)
    cpu: str = field(default_factory=cpu_summary)   # the CPU and the vector features the kernels use

    def ratios(self) -> list[tuple[Test, float]]:
        """(test, llamarun t/s / llama.cpp t/s) of the medians, for each test both ran."""
        theirs = {m.test: m for m in self.reference}
        return [(m.test, m.median / theirs[m.test].median) for m in self.results if m.test in theirs]


def plan_tests(n_prompt: int, n_gen: int, depth: int) -> list[Test]:
    tests = []
    if n_prompt:
        tests.append(Test("pp", n_prompt, depth))
    if n_gen:
        tests.append(Test("tg", n_gen, depth))
    return tests


def check_settings(n_prompt: int, n_gen: int, depth: int, repetitions: int) -> None:
    """The settings that can be judged before the model is loaded; LlamarunError otherwise."""
    for flag, value in (("-p", n_prompt), ("-n", n_gen), ("-d", depth)):
        if value < 0:
            raise LlamarunError(f"{flag} must be >= 0 (0 skips that test), not {value}" if flag != "-d"
                                else f"-d must be >= 0, not {value}")
    if repetitions < 1:
        raise LlamarunError(f"-r must be >= 1, not {repetitions}")
    if n_prompt == 0 and n_gen == 0:
        raise LlamarunError("nothing to measure: -p and -n are both 0")


def context_needed(n_prompt: int, n_gen: int, depth: int) -> int:
    return depth + max(n_prompt, n_gen)


def check_context(config: ModelConfig, n_prompt: int, n_gen: int, depth: int) -> None:
    need = context_needed(n_prompt, n_gen, depth)
    if need > config.seq_len:
        raise LlamarunError(f"-d {depth} + {max(n_prompt, n_gen)} tokens = {need} do not fit the model's context "
                            f"of {config.seq_len} tokens")


def model_params(c: ModelConfig) -> int:
    """Parameters of a llama model of this shape: embedding, every layer's matrices and norms, the final
    norm, and the classifier unless it is the embedding table."""
    layer = 2 * c.dim * c.dim + 2 * c.dim * c.kv_dim + 3 * c.dim * c.hidden_dim + 2 * c.dim
    classifiers = 1 if c.shared_classifier else 2
    return classifiers * c.vocab_size * c.dim + c.n_layers * layer + c.dim


def model_info(llama) -> ModelInfo:
    from .formats.gguf import GGUFCheckpoint
    path = str(llama.checkpoint.path)
    return ModelInfo(Path(path).name, path, os.path.getsize(path), model_params(llama.config),
                     isinstance(llama.checkpoint, GGUFCheckpoint))


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB: VmHWM where /proc has it, else getrusage's ru_maxrss.

    (On Linux, ru_maxrss of a process started by a larger one, e.g. from pytest, can report the
    parent's peak: it is carried over exec. VmHWM belongs to this program's memory alone.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024     # bytes on macOS, KiB elsewhere


def load_average() -> float | None:
    """The 1-minute load average, where the system has one: on a machine others use, their work
    slows every measurement, the more so the more threads wait on each other (a high load beside
    wide min - max ranges says the figures are the machine's, not the engines')."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def current_threads() -> int:
    """Threads of numba's pool as this thread uses it (what --threads set; all cores by default)."""
    import numba
    return numba.get_num_threads()


# ----------------------------------------------------------------------------------------------
# the two engines, behind one interface: fill(depth tokens), then timed pp/tg runs after that depth

class LlamarunRunner:
    backend = BACKEND

    def __init__(self, model, n_ctx: int):
        self.model = model
        self.cache = model.new_cache(seq_len=n_ctx)
        self.depth = 0

    def fill(self, tokens: list[int]) -> None:
        """Prefill the depth tokens (untimed), in forwards of at most FILL_CHUNK tokens."""
        for start in range(0, len(tokens), FILL_CHUNK):
            self.model.forward(Batch.sequence(tokens[start:start + FILL_CHUNK], start), self.cache)
        self.depth = len(tokens)

    def pp(self, tokens: list[int]) -> float:
        t0 = time.perf_counter()
        self.model.forward(Batch.sequence(tokens, self.depth), self.cache)
        return time.perf_counter() - t0

    def tg(self, tokens: list[int]) -> float:
        t0 = time.perf_counter()
        for i, token in enumerate(tokens):
            self.model.forward(Batch.sequence([token], self.depth + i), self.cache)
        return time.perf_counter() - t0


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's `Llama`: `eval` runs tokens after the `n_tokens` it holds
    (removing any cache cells past them first), so setting n_tokens back to the depth starts each run
    from the same prefix."""
    backend = "llama.cpp"

    def __init__(self, module, path: str, threads: int, n_ctx: int):
        self.llm = module.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(LLAMA_CPP_BATCH, n_ctx),
                                n_ubatch=LLAMA_CPP_UBATCH, n_threads=threads, n_threads_batch=threads,
                                verbose=False)
        self.depth = 0

    def fill(self, tokens: list[int]) -> None:
        self.llm.reset()
        if tokens:
            self.llm.eval(tokens)
        self.depth = len(tokens)

    def pp(self, tokens: list[int]) -> float:
        self.llm.n_tokens = self.depth
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - t0

    def tg(self, tokens: list[int]) -> float:
        self.llm.n_tokens = self.depth
        t0 = time.perf_counter()
        for token in tokens:
            self.llm.eval([token])
        return time.perf_counter() - t0

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def find_llama_cpp():
    """(the llama_cpp module, None), or (None, a line saying why there is none)."""
    try:
        return importlib.import_module("llama_cpp"), None
    except ImportError:
        return None, LLAMA_CPP_MISSING
    except Exception as e:          # installed, but its shared library does not load
        return None, f"llama_cpp could not be loaded ({type(e).__name__}: {e}): no comparison"


# ----------------------------------------------------------------------------------------------
# the benchmark

def run_bench(llama, n_prompt: int = 512, n_gen: int = 128, depth: int = 0, repetitions: int = 5,
              compare: bool = True, progress: Callable[[str], None] | None = None, seed: int = 0) -> BenchReport:
    """Measure `llama` (an llamarun.api.Llama) and, when it can, llama.cpp on the same file.

    Raises LlamarunError for settings that make no sense or do not fit the model's context.
    """
    check_settings(n_prompt, n_gen, depth, repetitions)
    check_context(llama.config, n_prompt, n_gen, depth)
    load_before = load_average()
    say = progress or (lambda message: None)
    info = model_info(llama)
    threads = current_threads()
    tests = plan_tests(n_prompt, n_gen, depth)
    rng = np.random.default_rng(seed)
    vocab = llama.config.vocab_size
    depth_tokens = [int(t) for t in rng.integers(0, vocab, depth)]
    tokens = {test: [int(t) for t in rng.integers(0, vocab, test.n_tokens)] for test in tests}
    n_ctx = context_needed(n_prompt, n_gen, depth)

    def warm_up(runner):
        if depth:
            say(f"{runner.backend}: filling the cache with {depth} tokens")
        runner.fill(depth_tokens)
        for test in tests:
            say(f"{runner.backend}: {test.name} warm-up")
            if test.kind == "pp":
                runner.pp(tokens[test])
            else:
                runner.tg(tokens[test][:1])

    runners = [LlamarunRunner(llama.model, n_ctx)]
    warm_up(runners[0])
    report = BenchReport(info, threads, repetitions, [], peak_rss_mib())

    if compare:
        module, report.reference_note = find_llama_cpp()
        if module is not None and not info.is_gguf:
            module, report.reference_note = None, "llama.cpp comparison: GGUF files only (this is a llama2.c checkpoint)"
        if module is not None:
            say("llama.cpp: loading the model")
            try:
                runners.append(LlamaCppRunner(module, info.path, threads, n_ctx))
            except Exception as e:      # a file llama.cpp refuses (or a build that cannot run it)
                report.reference_note = f"llama.cpp could not load {info.name} ({type(e).__name__}: {e}): no comparison"
            else:
                report.reference_version = getattr(module, "__version__", None)
                warm_up(runners[1])

    measured = {(runner.backend, test): Measurement(runner.backend, test) for runner in runners for test in tests}
    try:
        for rep in range(repetitions):
            for test in tests:
                for runner in runners:
                    say(f"{runner.backend}: {test.name} run {rep + 1}/{repetitions}")
                    time.sleep(SETTLE)
                    run = runner.pp if test.kind == "pp" else runner.tg
                    measured[runner.backend, test].seconds.append(run(tokens[test]))
    finally:
        for runner in runners[1:]:
            runner.close()
    report.results = [measured[BACKEND, test] for test in tests]
    if len(runners) > 1:
        report.reference = [measured[runners[1].backend, test] for test in tests]
        report.peak_rss_total_mib = peak_rss_mib()
    if load_before is not None:
        report.load_average = (load_before, load_average())
    return report


# ----------------------------------------------------------------------------------------------
# the report

def format_size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def format_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_report(report: BenchReport) -> str:
    """A markdown table as llama-bench prints it (t/s: the median, min - max beside), the ratios to
    llama.cpp when it ran, and notes."""
    m = report.model
    lines = ["| model | size | params | backend | threads | test | t/s | min - max |",
             "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |"]
    theirs = {r.test: r for r in report.reference}
    rows = [r for ours in report.results for r in (ours, theirs.get(ours.test)) if r is not None]
    for r in rows:
        lines.append(f"| {m.name} | {format_size(m.size_bytes)} | {format_params(m.params)} | {r.backend} "
                     f"| {report.threads} | {r.test.name} | {r.median:.2f} | {r.low:.2f} - {r.high:.2f} |")
    ratios = report.ratios()
    if ratios:
        lines += ["", "| test | llamarun t/s | llama.cpp t/s | llamarun / llama.cpp |", "| --- | ---: | ---: | ---: |"]
        for test, ratio in ratios:
            ours = next(r for r in report.results if r.test == test)
            lines.append(f"| {test.name} | {ours.median:.2f} | {theirs[test].median:.2f} | {ratio:.2f} |")
    lines.append("")
    runs = "repetition" if report.repetitions == 1 else "repetitions"
    lines.append(f"t/s: median of {report.repetitions} {runs} after a warm-up run, min - max beside; "
                 f"{report.threads} thread{'s' if report.threads != 1 else ''}")
    memory = f"peak memory: {report.peak_rss_mib:.1f} MiB (llamarun: load and one run of each test)"
    if report.peak_rss_total_mib is not None:
        memory += f"; {report.peak_rss_total_mib:.1f} MiB with llama.cpp loaded too"
    lines.append(memory)
    lines += report.cpu.splitlines()
    if report.load_average is not None:
        lines.append(f"load average: {report.load_average[0]:.2f} before, {report.load_average[1]:.2f} after, "
                     f"on {os.cpu_count()} cores (the benchmark's own threads count in it; more than that is other work, "
                     "which slows the runs it overlaps)")
    if report.reference:
        version = f" {report.reference_version}" if report.reference_version else ""
        lines.append(f"llama.cpp: llama-cpp-python{version}, n_batch {LLAMA_CPP_BATCH}, n_ubatch {LLAMA_CPP_UBATCH}, "
                     "same token ids, its runs alternated with llamarun's")
    if report.reference_note:
        lines.append(report.reference_note)
    return "\n".join(lines)
