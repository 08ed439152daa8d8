"""The execution plan: how a loaded model computes, chosen once when it is loaded, and every row and
byte threshold behind that choice, each beside the reason for its value.

A plan says
- the arithmetic: exact (the reference's: run.c's and runq.c's for llama2.c files, float32
  activations times gguf's dequantized weights for GGUF files) or fast (GGUF only: activations
  quantized to int8 blocks in the kernels' products and a prefill attending through BLAS, as
  llama.cpp computes);
- the KV cache's numbers: float32 (exact) or half precision (fast, llama.cpp's default f16 cache);
- which forward a batch of n rows takes (`forward_for`): the one-call forward (kernels/step.py)
  whole or in parts, or layer by layer on the matrix-vector kernels or through BLAS.

It is made from the weights and the CPU by `choose_plan` (llamarun.load, Llama, Transformer) and
never changes: a Transformer gives its weights the plan's arithmetic and builds its one-call forward
from the plan when it is made. Another arithmetic is another plan, and another Transformer (over the
same memory-mapped weights: nothing is copied but small tensor objects).

The kernels' own block sizes (kernels/matvec.ROWS, kernels/attention.BLOCK, kernels/ggml.ROW_GROUP,
...) stay in kernels/: numba compiles them into the cached machine code, and that cache is keyed
by the sources of kernels/ alone (kernels/__init__.py), so a constant read from here would go on
being served at its old value after an edit.
"""
from __future__ import annotations

from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# the thresholds

# Up to this many rows (tokens in a batch), a matrix product is a matrix-vector product bound by
# reading the weights: numba kernels stream each weight once for all rows. Beyond it, BLAS (float32
# weights, or quantized ones a dequantized tile at a time). The exact path's bound for every kind of
# weight; the fast path's kernels go further (FAST_KERNEL_ROWS).
MATVEC_ROWS = 8

# On the fast path the int8 kernels take up to this many rows: short prompts and prompt chunks too,
# and the one-call forward takes batches this long (or a longer prompt in parts this long, where every
# matrix has a group kernel). The kernels share each weight block among 4 rows, and the tiled BLAS path
# has a fixed cost per forward (every tile decoded on one thread, BLAS's threads woken per tile): on
# SmolLM2 the kernels beat BLAS for forwards of 16 to 64 tokens several times over, BLAS wins only from
# ~300 rows, and a 512-token prompt in parts of 128 beat the BLAS tiles (benchmarks/bench_prompt_parts.py;
# the figures, with their CPU, in docs/performance.md).
FAST_KERNEL_ROWS = 128

# Query rows per block of the BLAS attention (the fast path's prefill): each block scores only the keys
# up to its last position, so smaller blocks compute less of the causal square's masked half, and their
# scores stay small ((heads, 64, context) floats). On SmolLM2's 512-token prompt 32 and 64 were alike,
# 128 and 256 slower (docs/performance.md).
QUERY_BLOCK = 64

# A quantized matrix multiplied by BLAS is dequantized a tile of rows at a time into a reused float32
# buffer of about this many bytes: big enough that a BLAS call amortizes its set-up, small enough to stay
# in L2/L3 while BLAS reads it. Never the whole matrix. (Larger tiles were no faster beyond the noise,
# and cost memory at the peak: docs/performance.md.)
TILE_BYTES = 1 << 20

# The server's chunked prefill (server/scheduler.py). With nobody decoding, a prompt goes in forwards of
# PREFILL_CHUNK tokens on the exact path (BLAS: long enough to amortize a forward's fixed costs, short
# enough that a new request waits at most one such forward for its slot); the fast path uses its kernels'
# FAST_KERNEL_ROWS instead.
PREFILL_CHUNK = 256
# While streams decode, a step carrying prompt tokens may cost this much more than a decode-only step
# of as many streams: 1.0 lets a prompt go in at most halving the streams' pace for its duration.
PREFILL_SHARE = 1.0
# Decode-only steps timed (per number of rows) before prompt tokens ride along: one step alone may be
# the first after a pause (cold caches, threads asleep) and set the pace far too slow.
MIN_TIMING_SAMPLES = 2

# `llamarun bench` prefills a test's depth in forwards of at most this many tokens: llama.cpp's default
# ubatch, which llama-bench's depth fill uses too, and a bounded scores buffer for deep contexts.
FILL_CHUNK = 512

# The batch sizes `llamarun info` shows the forward of: a decode step, a decode batch of the exact
# path's kernels, the fast path's kernels' limit, a long prompt.
SHOWN_ROWS = (1, MATVEC_ROWS, FAST_KERNEL_ROWS, 512)


# ----------------------------------------------------------------------------------------------
# the plan

COMPILED = "compiled"
MATVEC_LAYERS = "layers (matvec kernels)"
INT8_LAYERS = "layers (int8 kernels)"
BLAS_LAYERS = "layers (BLAS)"


@dataclass(frozen=True)
class ExecutionPlan:
    exact: bool              # the arithmetic: exact (the reference's) or fast (llama.cpp's); see the module docstring
    weights: str             # what the products read: "ggml" (GGUF blocks), "int8" (llama2.c v2), "f32"
    kernel_rows: int         # batches up to this many rows run their products on matrix-vector kernels
    compiled_rows: int       # batches up to this many rows take the one-call forward; 0: none has it
    compiled_parts: bool     # a longer batch (its sequences' positions in order) takes it in parts of compiled_rows
    compiled_reason: str     # why the one-call forward is used, or why not
    fast_kernels: bool       # whether the CPU runs the kernels' vector code (kernels/cpu.py)
    fast_kernels_reason: str
    kv_bytes_per_token: int  # keys and values of one position, every layer

    @property
    def arithmetic(self) -> str:
        return "exact" if self.exact else "fast"

    @property
    def kv_half(self) -> bool:
        """Whether the KV cache holds half-precision numbers (the fast path's, as llama.cpp's f16 cache)."""
        return not self.exact

    @property
    def kv_dtype(self) -> str:
        return "float16" if self.kv_half else "float32"

    @property
    def prefill_attention(self) -> str:
        """How a prompt's attention is computed off the one-call forward: run.c's summation order (so that a
        prompt read in one batch equals it read token by token, bit for bit) or matrix products."""
        return "BLAS" if not self.exact else "kernel (run.c's order)"

    def forward_for(self, n_rows: int) -> str:
        """Which forward a batch of n_rows tokens takes (no inspection hook: that is always the layers)."""
        if n_rows <= self.compiled_rows:
            return COMPILED
        if self.compiled_parts:
            return f"{COMPILED} in parts of {self.compiled_rows}"
        if self.weights == "int8":
            return INT8_LAYERS              # runq.c's products have no BLAS statement worth taking
        return MATVEC_LAYERS if n_rows <= self.kernel_rows else BLAS_LAYERS

    def describe(self) -> list[str]:
        """The plan as `llamarun info` prints it: (label, value) lines."""
        arithmetic = ("exact: float32 activations (the reference's arithmetic)" if self.exact else
                      "fast: int8 activations in the products, a BLAS attention in the prefill (llama.cpp's)")
        if self.exact and self.weights != "ggml":
            arithmetic = "exact: llama2.c weights compute as run.c / runq.c do (their only arithmetic here)"
        forwards = ", ".join(f"{n} -> {self.forward_for(n)}" for n in SHOWN_ROWS)
        return [
            f"arithmetic: {arithmetic}",
            f"KV cache: {self.kv_dtype}, {self.kv_bytes_per_token} bytes per token",
            f"prefill attention: {self.prefill_attention}",
            f"forward by batch rows: {forwards}",
            f"one-call forward: {self.compiled_reason}",
        ]


def choose_plan(config, weights: dict, exact: bool = False) -> ExecutionPlan:
    """The plan for a model of these weights on this CPU: exact arithmetic if asked or if the weights have
    no other (llama2.c's), and the one-call forward where the weights, the CPU and numba's threads allow."""
    # model.py and tensors.py import this module's thresholds: their types are read here, at call time
    from . import tensors
    from .model import LAYER_WEIGHTS, CompiledForward

    wq = weights["wq"][0]
    kind = ("ggml" if isinstance(wq, tensors.GGMLTensor) else
            "int8" if isinstance(wq, tensors.GroupQuantized) else "f32")
    exact = exact or kind != "ggml"
    weights = tensors.with_arithmetic(weights, exact)
    layers = [{name: weights[name][i] for name in LAYER_WEIGHTS} for i in range(config.n_layers)]
    matrices = [weights["output"]] + [lw[name] for lw in layers for name in CompiledForward.MATRICES]

    # the fast kernels take short prompts (FAST_KERNEL_ROWS) where the attention's matrices have them
    fast_products = kind == "ggml" and not exact and wq.qtype in tensors.KERNEL_TYPES
    kernel_rows = FAST_KERNEL_ROWS if fast_products else MATVEC_ROWS
    fast_ok, fast_why = fast_kernels_available()
    rows, reason = _one_call_rows(kind, exact, weights, layers, matrices, fast_ok, fast_why)
    # where every matrix has a group kernel (8 weight rows share each block of x: every type with a
    # kernel now, the K-quants included), a long prompt goes in parts: faster there than the BLAS tiles
    parts = rows > 0 and kind == "ggml" and all(w.qtype in tensors.GROUP_KERNEL_TYPES for w in matrices)
    itemsize = 2 if not exact else 4
    return ExecutionPlan(exact=exact, weights=kind, kernel_rows=kernel_rows, compiled_rows=rows, compiled_parts=parts,
                         compiled_reason=reason, fast_kernels=fast_ok, fast_kernels_reason=fast_why,
                         kv_bytes_per_token=2 * config.n_layers * config.kv_dim * itemsize)


def _one_call_rows(kind, exact, weights, layers, matrices, fast_ok, fast_why) -> tuple[int, str]:
    """(the longest batch the one-call forward takes, 0 if it is not used; the reason)."""
    from . import tensors
    from .kernels.step import threads_run_together
    from .model import CompiledForward

    if not CompiledForward.supports(weights, layers):
        if kind == "ggml" and exact:
            why = "exact arithmetic: the one-call forward computes with the fast (int8) kernels only"
        elif kind == "ggml":
            missing = sorted({getattr(w, "ggml_type", "F32") for w in matrices
                              if not (isinstance(w, tensors.GGMLTensor) and w.qtype in tensors.KERNEL_TYPES)})
            why = f"{', '.join(missing)} matrices have no fast kernel"
        elif kind == "int8":
            why = "the int8 matrices are not stacked by layer with one group size"
        else:
            why = "the float32 matrices are not all contiguous and alike (one typed list holds them)"
        return 0, f"not used, layer by layer: {why}"
    if not fast_ok:
        return 0, f"not used, layer by layer: {fast_why}"
    if not threads_run_together():
        import numba
        return 0, (f"not used, layer by layer: numba's threading layer ({numba.threading_layer()}) may run two "
                   "threads' shares on one thread, and the forward's barriers would wait forever")
    # float32 weights: the matrix-vector kernels' batches (a longer one is BLAS's, layer by layer)
    rows = MATVEC_ROWS if kind == "f32" else FAST_KERNEL_ROWS
    return rows, f"used for batches of up to {rows} rows ({kind} weights, every matrix on a kernel)"


# ----------------------------------------------------------------------------------------------
# the CPU: kernels/cpu.py decides (branch wip-kernels); until it is merged, the small fallback below

def fast_kernels_available() -> tuple[bool, str]:
    """(whether the one-call forward's and the fast kernels' machine code runs on this CPU, why)."""
    from .kernels import cpu
    return cpu.fast_kernels_available()


def cpu_description() -> list[str]:
    """Lines for `llamarun info`: the CPU, the features of it the kernels use, whether the fast kernels run."""
    from .kernels import cpu
    return cpu.describe().splitlines()
