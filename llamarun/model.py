"""The Llama transformer forward pass and its KV cache, on numpy.

One forward call takes a `Batch`: tokens from one or more independent sequences, each token with its
own position and sequence id (llama.cpp's `llama_batch`). All tokens go through every layer together
as one (n_tokens, dim) matrix, so a prompt is a few large matrix products (BLAS) rather than one
matrix-vector product per token; attention is the only step done per sequence.

A decode-sized batch (up to MATVEC_ROWS tokens) goes another way: numba matrix-vector kernels that
stream each weight once (kernels/matvec.py) and no BLAS call, so that a single thread pool runs
the whole decode step (why that matters: kernels/matvec.py). On the fast path (ggml weights, int8
activations) and for llama2.c's int8 files, a batch of up to 128 tokens runs as one compiled call
for the whole model (`CompiledForward`, kernels/step.py): the same arithmetic, without a return to
Python between kernels; where every matrix is Q8_0, Q4_0 or Q4_1, a longer prompt goes through it in
parts of 128 tokens (faster there than the BLAS tiles: see CompiledForward).
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from . import tensors
from .config import ModelConfig
from .errors import LlamarunError
from .kernels.attention import BLOCK as KEY_BLOCK, attention as attention_kernel, attention_parallel, key_blocks
from .kernels.attention import rope as rope_kernel, store as store_kernel
from .kernels.ggml import kinds_of
from .kernels.matvec import matvec, matvec3, swiglu
from .kernels.norm import rmsnorm as rmsnorm_kernel
from .kernels.step import forward_f32, forward_fast_for, forward_int8, typed_list
from .plan import MATVEC_ROWS, QUERY_BLOCK, ExecutionPlan, choose_plan
from .threads import AdaptiveThreads


# ----------------------------------------------------------------------------------------------
# batch and cache

@dataclass
class Batch:
    tokens: np.ndarray    # (n,) int64   token ids
    pos: np.ndarray       # (n,) int64   position of each token in its sequence
    seq_ids: np.ndarray   # (n,) int64   which sequence (= KV cache slot) each token belongs to
    logits: np.ndarray    # (n,) bool    whether to compute the logits of this token

    @classmethod
    def sequence(cls, tokens, start_pos: int = 0, seq_id: int = 0, all_logits: bool = False) -> Batch:
        """Consecutive tokens of one sequence; logits for the last one (or for all of them)."""
        n = len(tokens)
        want = np.ones(n, bool) if all_logits or n == 1 else np.arange(n) == n - 1
        return cls(np.asarray(tokens, np.int64), np.arange(start_pos, start_pos + n, dtype=np.int64),
                   np.full(n, seq_id, np.int64), want)

    @classmethod
    def of(cls, tokens, pos, seq_ids, logits=None) -> Batch:
        n = len(tokens)
        want = np.ones(n, bool) if logits is None else np.asarray(logits, bool)
        return cls(np.asarray(tokens, np.int64), np.asarray(pos, np.int64), np.asarray(seq_ids, np.int64), want)

    def __len__(self) -> int:
        return len(self.tokens)

    def part(self, start: int, stop: int) -> Batch:
        """Tokens [start, stop) of the batch."""
        return Batch(self.tokens[start:stop], self.pos[start:stop], self.seq_ids[start:stop], self.logits[start:stop])

    def in_order(self) -> bool:
        """Whether each sequence's positions increase along the batch: then its consecutive parts can
        run one after the other, each seeing the earlier ones in the cache."""
        order = np.lexsort((np.arange(len(self)), self.seq_ids))             # by sequence, then batch order
        same = self.seq_ids[order][1:] == self.seq_ids[order][:-1]
        return bool(np.all(np.diff(self.pos[order])[same] > 0))


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros (float32 unless told) whose memory is committed a 4 KiB page at a time, as it is written,
    so that a long context costs memory only as it fills. (np.zeros maps fresh pages too, but asks the kernel for
    transparent huge pages on large arrays: the first token then writes one position in every
    2 MiB slab of a (layer, head), and commits the whole cache: 377 MB for SmolLM2's 8192 positions.)"""
    count, dtype = math.prod(shape), np.dtype(dtype)
    try:
        buffer = mmap.mmap(-1, max(dtype.itemsize * count, 1))    # anonymous, zero-filled
    except (OSError, OverflowError) as e:                          # more than the address space takes
        raise LlamarunError(f"cannot reserve {dtype.itemsize * count / 1e9:.3g} GB for a {shape} cache "
                            f"({getattr(e, 'strerror', None) or e}): ask for a shorter context (--ctx, n_ctx)") from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count).reshape(shape)


class KVCache:
    """Keys and values of every layer, for `n_seqs` independent sequences of up to `seq_len` tokens.

    Values are laid out (layer, seq, kv_head, position, head_dim). Keys are stored in blocks of
    B = KEY_BLOCK positions, each block transposed: (layer, seq, kv_head, position // B, head_dim,
    position % B), so that the attention kernel computes the scores of consecutive positions
    together (SIMD across positions, each score still summed over d in order); see
    kernels/attention.py.

    float32 (run.c's) unless `half`: then half-precision numbers, as llama.cpp's default f16 cache,
    held as their 16 bits (uint16: numba has no float16), with the fast path's softmax; what the
    fast path's models make (`Transformer.new_cache`). A decode step at depth reads half the bytes.
    """

    def __init__(self, config: ModelConfig, n_seqs: int = 1, seq_len: int | None = None, half: bool = False):
        self.seq_len = seq_len or config.seq_len
        L, KV, S, D = config.n_layers, config.n_kv_heads, self.seq_len, config.head_dim
        dtype = np.uint16 if half else np.float32
        self.k = lazy_zeros((L, n_seqs, KV, key_blocks(S), D, KEY_BLOCK), dtype)
        self.v = lazy_zeros((L, n_seqs, KV, S, D), dtype)

    @property
    def half(self) -> bool:
        return self.k.dtype == np.uint16

    @property
    def n_seqs(self) -> int:
        return self.k.shape[1]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Sequence dst's first n positions := sequence src's (the server's n > 1 choices share their
        prompt's keys and values). Keys go by whole blocks: the positions past n in the last one are
        written over before anything reads them, as for any sequence."""
        blocks = key_blocks(n)
        self.k[:, dst, :, :blocks] = self.k[:, src, :, :blocks]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]


# ----------------------------------------------------------------------------------------------
# inspection: what one forward call is asked to show

NO_BIAS = np.zeros(0, np.float32)


@dataclass
class Probe:
    """What an inspection tool asks of a forward call, for that call only (an argument, never model
    state: one caller's attention bias cannot reach another's sequences). A forward with an active
    probe runs layer by layer, the arithmetic the tools show.

    attention: called as attention(layer, batch, probs) with probs (n, n_heads, max_pos + 1), row i
      batch token i's softmax weights over positions 0..pos[i];
    residual: called as residual(layer, x) after each layer, x the (n, dim) residual stream;
    bias: per layer, (seq_len,) float32 added to the scaled attention scores of the keys at each
      position (attention emphasis, inspect/emphasis.py); an empty row (or None) for none.
    """
    attention: Callable | None = None
    residual: Callable | None = None
    bias: list[np.ndarray] | None = None

    @property
    def active(self) -> bool:
        return (self.attention is not None or self.residual is not None
                or (self.bias is not None and any(len(b) for b in self.bias)))

    def bias_of(self, layer: int) -> np.ndarray:
        return self.bias[layer] if self.bias is not None else NO_BIAS


# ----------------------------------------------------------------------------------------------
# the building blocks

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, fast: bool = False) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, row by row, the squares summed as run.c sums them, or (fast)
    as llama.cpp does (kernels/norm.py).   x: (n, dim)"""
    out = np.empty(x.shape, np.float32)
    rmsnorm_kernel(x, weight, eps, out, fast)
    return out


def rope_tables(config: ModelConfig, n_positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the (position, pair) rotation angles of positions 0..n_positions-1 (default: the
    whole context), each (n_positions, head_dim // 2); (n_positions, head_dim) for a model in Hugging
    Face's pair layout (config.rope_halves), both halves alike, as its own tables are: the kernels
    read the layout from the width (kernels/attention.py, _pair). A position's rows do not depend on
    n_positions.

    Computed in float32 as run.c does (freq = 1/theta^(2i/D), angle = pos * freq), so positions far
    into the context rotate exactly as the reference engine rotates them. Scaled RoPE divides each
    pair's frequency by its factor (rope_factors: Llama 3's) and by rope_scale (linear scaling: as
    positions divided by it), in float32, as transformers divides its inv_freq.
    """
    D = config.head_dim
    freqs = np.float32(1.0) / np.power(np.float32(config.rope_theta),
                                       np.arange(0, D, 2, dtype=np.float32) / np.float32(D))
    if config.rope_factors is not None:
        freqs = freqs / np.asarray(config.rope_factors, np.float32)
    if config.rope_scale != 1.0:
        freqs = freqs / np.float32(config.rope_scale)
    n = config.seq_len if n_positions is None else n_positions
    angles = np.arange(n, dtype=np.float32)[:, None] * freqs[None, :]                # (n, D/2)
    if config.rope_halves:
        angles = np.concatenate([angles, angles], axis=1)                          # (n, D)
    return np.cos(angles.astype(np.float64)).astype(np.float32), np.sin(angles.astype(np.float64)).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each pair of every head by its angle: interleaved pairs (x[2i], x[2i+1]), llama2.c's
    layout, for tables of one column a pair; (x[i], x[i + D/2]), Hugging Face's, for tables of D.

    x: (n, heads, head_dim); cos, sin: (n, head_dim // 2) (or (n, head_dim)) for the tokens' positions.
    The forward pass does this rotation inside the attention kernel (with the same float32
    arithmetic, fused with the cache writes); this is its plain numpy statement.
    """
    D = x.shape[-1]
    if cos.shape[1] == D:                           # halves: pair i is (x[i], x[i + D/2])
        x0, x1 = x[..., :D // 2], x[..., D // 2:]
        c, s = cos[:, None, :D // 2], sin[:, None, :D // 2]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    pairs = x.reshape(*x.shape[:-1], -1, 2)        # (n, heads, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(pairs)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(x.shape)


def widened(cached: np.ndarray) -> np.ndarray:
    """Keys or values of a KV cache as float32 (a half cache holds the 16 bits of each number)."""
    return cached.view(np.float16).astype(np.float32) if cached.dtype == np.uint16 else cached


def attention_blas(q, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs, record: bool, bias):
    """The prefill's attention as matrix products (the fast path): what the attention kernel computes,
    with BLAS's summation order instead of run.c's, and the scores scaled through q (q / sqrt(D):
    exact when D is a power of 4, as 64 and 256 are). Why: on a long prompt the one-thread kernel was
    a large share of the prefill (docs/performance.md).

    q: (n, H, D), k, v: (n, KV, D) before RoPE; k_cache, v_cache: one layer's caches (KVCache's
    layouts); seq_ids, pos: (n,) the tokens' sequences and positions; out: (n, H, D) written; probs:
    (n, H, T_max) written if record; bias: (S,) added to the scaled scores of each key position, or
    empty. (The attention kernels' arguments, with the same meaning.)
    """
    n, H, D = q.shape
    KV = k.shape[1]
    G = H // KV                                             # query heads per kv head
    rotated = np.empty_like(q)
    rope_kernel(q, cos, sin, rotated)                       # apply_rope's arithmetic, as a loop
    q = rotated
    q *= np.float32(1.0) / np.float32(np.sqrt(np.float32(D)))
    store_kernel(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)    # k rotated, into the blocked layout
    for s in np.unique(seq_ids):
        rows = np.flatnonzero(seq_ids == s)
        rows = rows[np.argsort(pos[rows], kind="stable")]
        blocks = int(pos[rows].max()) // KEY_BLOCK + 1                            # the blocks in use, not the context
        keys = widened(k_cache[s, :, :blocks]).transpose(0, 1, 3, 2).reshape(KV, -1, D)   # (KV, S', D), a copy
        values = widened(v_cache[s, :, :int(pos[rows].max()) + 1])                 # (KV, S'', D), once per sequence
        for start in range(0, len(rows), QUERY_BLOCK):
            r = rows[start:start + QUERY_BLOCK]
            m, T = len(r), int(pos[r].max()) + 1
            qb = q[r].reshape(m, KV, G, D).transpose(1, 2, 0, 3).reshape(KV, G * m, D)
            scores = (qb @ keys[:, :T].transpose(0, 2, 1)).reshape(KV, G, m, T)     # (KV, G, m, T)
            if len(bias):
                scores += bias[:T]
            lo = int(pos[r].min())                          # keys before every query of the block: never masked
            scores[..., lo:] += np.where(np.arange(lo, T)[None, :] > pos[r][:, None], np.float32(-np.inf), np.float32(0.0))
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            if record:
                probs[r, :, :T] = scores.reshape(H, m, T).transpose(1, 0, 2)
            heads_out = scores.reshape(KV, G * m, T) @ values[:, :T]                  # (KV, G*m, D)
            out[r] = heads_out.reshape(KV, G, m, D).transpose(2, 0, 1, 3).reshape(m, H, D)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), rounded as run.c writes it (a multiply by the reciprocal, not a division).

    In place, overwriting x: at prefill sizes each temporary of the plain expression is megabytes
    of fresh pages; this needs one.
    """
    s = np.negative(x)
    with np.errstate(over="ignore"):    # exp(-x) = inf for x < -88: silu is then -0.0, as in run.c
        np.exp(s, out=s)
    s += np.float32(1.0)
    np.reciprocal(s, out=s)         # 1 / (1 + exp(-x)), rounded as the division
    x *= s
    return x


def few_rows(x: np.ndarray, w) -> bool:
    """Whether x @ w.T goes to the matrix-vector kernels (float32 weights, a decode-sized batch)."""
    return x.shape[0] <= MATVEC_ROWS and isinstance(w, np.ndarray) and w.dtype == np.float32


def on_numba(x: np.ndarray, w) -> bool:
    """Whether x @ w.T runs on a numba matrix-vector kernel (no BLAS): a decode step whose products
    all do can run its attention on numba's threads too (kernels/matvec.py says why it matters)."""
    return few_rows(x, w) or (isinstance(w, (tensors.GGMLTensor, tensors.GroupQuantized)) and w.on_kernels(x))


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a weight stored (out_features, in_features).   x: (n, in) -> (n, out)

    float32 weights: the numba matrix-vector kernels for a few rows, BLAS beyond. Quantized weights
    (llamarun/tensors.py) bring their own product.
    """
    if not isinstance(w, np.ndarray):
        return w.linear(x)
    if few_rows(x, w):
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        matvec(x, w, out)
        return out
    return x @ w.T


def linear3(x: np.ndarray, wa, wb, wc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x @ wa.T, x @ wb.T, x @ wc.T): attention's q, k and v from one x, in one pass over the
    three weights when decoding (one kernel call instead of three)."""
    if few_rows(x, wa) and few_rows(x, wb) and few_rows(x, wc):
        outs = tuple(np.empty((x.shape[0], w.shape[0]), np.float32) for w in (wa, wb, wc))
        matvec3(x, wa, wb, wc, *outs)
        return outs
    if tensors.fusable(x, wa, wb, wc):
        return tensors.linear3(x, wa, wb, wc)
    return linear(x, wa), linear(x, wb), linear(x, wc)


def gated_units(x: np.ndarray, w1, w3) -> np.ndarray:
    """silu(x @ w1.T) * (x @ w3.T): SwiGLU's hidden units, one pass over w1 and w3 when decoding."""
    if few_rows(x, w1) and few_rows(x, w3):
        gate = np.empty((len(x), w1.shape[0]), np.float32)
        swiglu(x, w1, w3, gate, numba.get_num_threads())
        return gate
    if tensors.fusable(x, w1, w3):
        return tensors.swiglu(x, w1, w3)
    gate = silu(linear(x, w1))                                                   # (n, hidden)
    gate *= linear(x, w3)
    return gate


def embed(table, tokens: np.ndarray) -> np.ndarray:
    """Rows of the token embedding table, as float32.   -> (n, dim)"""
    if isinstance(table, np.ndarray):
        return table[tokens].astype(np.float32)
    return table.rows(tokens)


# ----------------------------------------------------------------------------------------------
# the whole forward pass in one compiled call (the fast path's decode steps)

def _layers_of_rows(a: np.ndarray) -> bool:
    """Whether a (layers, rows, cols) array has contiguous rows in each layer (the layers themselves
    may lie apart, by any stride that is a whole number of elements)."""
    return (a.strides[2] == a.itemsize and a.strides[1] == a.shape[2] * a.itemsize
            and a.strides[0] % a.itemsize == 0 and a.strides[0] >= a.shape[1] * a.strides[1])


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of the memory from a's first element to its last (a (layers, rows, cols) array whose
    layers lie apart: the gaps are seen too, never read). No copy."""
    span = (a.shape[0] - 1) * (a.strides[0] // a.itemsize) + a.shape[1] * a.shape[2]
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(a.itemsize,), writeable=False)


class CompiledForward:
    """Transformer.forward for a batch the kernels take whole (a decode step, a short prompt) as one
    call of kernels/step.py, which runs every layer on one start of the thread pool: the same values,
    bit for bit, without ~6 kernel calls from Python per layer. Three kinds of weights have it:
    ggml types with a kernel on the fast path (`forward_fast_for` the model's types), llama2.c's int8 groups
    (`forward_int8`), and float32 matrices (`forward_f32`).

    A longer prompt goes through it in parts of `rows` tokens when every matrix has a group kernel
    (`takes_prompts`: Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K, which share each block among
    8 rows of x): there parts of 128 beat the BLAS tiles, with VNNI and without
    (benchmarks/bench_prompt_parts.py, benchmarks/bench_kquants.py; docs/performance.md). llama2.c's
    int8 rows do not share blocks among rows: BLAS is left those prompts.

    It holds the weights as those functions take them, made once, no copies: for ggml, numba typed
    lists of each layer's raw bytes (views of the file's memory map); for int8, the file's stacked
    (n_layers, out, in) values and scales; for float32, typed lists of each layer's matrix. The norms
    are stacked (a few KB).

    float32 weights take batches of up to MATVEC_ROWS tokens (the matrix-vector kernels' batches: a
    longer one goes through BLAS, layer by layer). As one call, with the kernels reading one row at a
    time (kernels/matvec.py), the decode step's products stream faster than with one kernel call per
    product from Python (s110M: docs/performance.md).
    The plan (llamarun/plan.py) says whether a model has one and for how many rows (`rows`, and
    `takes_prompts`: longer batches in parts of `rows`)."""

    MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")     # the order of the step functions' arguments

    def __init__(self, config: ModelConfig, weights: dict, layers: list[dict], plan: ExecutionPlan):
        self.config = config
        self.attention_norm = np.stack([lw["attention_norm"] for lw in layers]).astype(np.float32)
        self.ffn_norm = np.stack([lw["ffn_norm"] for lw in layers]).astype(np.float32)
        # a copy, as the stacked norms are: a norm read-only in one file (a GGUF's map) and writeable in
        # another would make numba compile the step function a second time (over a minute more of compiling)
        self.norm = np.array(weights["norm"], np.float32)
        self.norms, self.eps = (self.attention_norm, self.ffn_norm, self.norm), np.float32(config.norm_eps)
        output = weights["output"]
        self.rows = plan.compiled_rows
        self.takes_prompts = plan.compiled_parts
        self.threads = AdaptiveThreads()
        if isinstance(output, tensors.GGMLTensor):
            self.kind = "ggml"
            self.qts = np.array([[lw[name].kernel_type for name in self.MATRICES] for lw in layers], np.int64)
            self.raws = tuple(typed_list(tuple(lw[name].kernel_bytes for lw in layers)) for name in self.MATRICES)
            self.output_qt, self.output = output.kernel_type, output.kernel_bytes
            self.forward_fast = forward_fast_for(kinds_of(self.qts.ravel()), kinds_of([self.output_qt]))
        elif isinstance(output, tensors.GroupQuantized):
            self.kind = "int8"
            self.group_size = output.group_size
            stacked = [weights[name] for name in self.MATRICES]
            self.values, self.scales = (typed_list(tuple(_flat(w.q) for w in stacked)),
                                        typed_list(tuple(_flat(w.scale) for w in stacked)))
            self.layouts = np.array([(w.q.strides[0], w.scale.strides[0] // 4, *w.q.shape[1:]) for w in stacked], np.int64)
            self.output = (output.q, output.scale)
        else:
            self.kind = "f32"
            self.matrices = tuple(typed_list(tuple(lw[name] for lw in layers)) for name in self.MATRICES)
            self.output = output
        # greedy steps (kernels/step.py, GREEDY_STEPS): float32 weights with a float32 embedding table,
        # of the classifier's array type (one compiled signature); the other kinds run one step a call
        table = weights["tok_embeddings"]
        self.takes_steps = (self.kind == "f32" and isinstance(table, np.ndarray) and table.dtype == np.float32
                            and table.ndim == 2 and table.flags.c_contiguous
                            and table.flags.writeable == output.flags.writeable)
        self.table = table if self.takes_steps else None
        # tokens of a forward of one step (never written), no end tokens; the one row wanted of a step
        self._one_step, self._no_ends, self._first_row = np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64)

    @staticmethod
    def supports(weights: dict, layers: list[dict]) -> bool:
        """Whether every product has a kernel the step functions take: ggml types on the fast path,
        llama2.c int8 groups of one size stored stacked by layer, or float32 matrices."""
        output = weights["output"]
        matrices = [lw[name] for lw in layers for name in CompiledForward.MATRICES] + [output]
        if not layers:
            return False
        if all(isinstance(w, tensors.GGMLTensor) for w in matrices):
            return all(not w.exact and w.qtype in tensors.KERNEL_TYPES for w in matrices)
        if all(isinstance(w, tensors.GroupQuantized) for w in matrices):
            stacked = [weights[name] for name in CompiledForward.MATRICES]
            return (all(w.q.ndim == 3 and w.q.shape[0] == len(layers) and _layers_of_rows(w.q) and _layers_of_rows(w.scale)
                        for w in stacked)
                    and output.q.flags.c_contiguous and output.scale.flags.c_contiguous
                    and len({w.group_size for w in matrices}) == 1)
        # float32: one array type for every matrix (a typed list holds one), as the kernels take them
        return (all(isinstance(w, np.ndarray) and w.dtype == np.float32 and w.ndim == 2 and w.flags.c_contiguous
                    for w in matrices)
                and len({w.flags.writeable for w in matrices}) == 1)

    def __call__(self, x: np.ndarray, batch: Batch, cache: KVCache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        wanted = np.flatnonzero(batch.logits)
        logits = np.empty((len(wanted), c.vocab_size), np.float32)
        with self.threads.count(len(x)) as n_threads:      # all of numba's, or fewer on a busy machine
            rest = (cos, sin, cache.k, cache.v, batch.seq_ids, batch.pos, wanted, c.n_heads, logits, n_threads)
            if self.kind == "int8":
                forward_int8(x, self.values, self.scales, self.layouts, self.group_size, *self.norms, *self.output,
                             self.eps, *rest)
            elif self.kind == "f32":
                forward_f32(x, *self.matrices, *self.norms, self.output, self.eps, *rest,
                            self.table if self.takes_steps else self.output, self._one_step, self._no_ends)
            else:
                self.forward_fast(x, self.qts, *self.raws, *self.norms, self.output_qt, self.output, self.eps, *rest)
        return logits

    def greedy(self, x: np.ndarray, tokens: np.ndarray, pos: np.ndarray, seq_id: int, cache: KVCache, cos: np.ndarray,
               sin: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """len(tokens) greedy decode steps of one sequence in one call (`takes_steps` only): step i runs
        tokens[i] at pos[i], the first from x (1, dim), each later one the argmax of the logits before it
        (written into tokens), until one of `ends`. cos, sin: every step's rows.
        -> (the tokens run, their logits rows (steps run, vocab))"""
        logits = np.empty((len(tokens), self.config.vocab_size), np.float32)
        block = self.threads.count(1)
        with block as n_threads:
            ran = forward_f32(x, *self.matrices, *self.norms, self.output, self.eps, cos, sin, cache.k, cache.v,
                              np.full(1, seq_id, np.int64), pos, self._first_row, self.config.n_heads, logits,
                              n_threads, self.table, tokens, ends)
            block.steps = ran       # the thread count's times are per step
        return tokens[:ran], logits[:ran]


# ----------------------------------------------------------------------------------------------
# the transformer

# RoPE's tables start with this many positions (or the context, if shorter) and double as later ones
# come: a short prompt's tables are a few hundred KB whatever the context.
ROPE_START = 1024

# the per-layer weights (the checkpoint formats' names)
LAYER_WEIGHTS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


class Transformer:
    def __init__(self, config: ModelConfig, weights: dict, plan: ExecutionPlan | None = None):
        """plan: how it computes (llamarun/plan.py; default: `choose_plan`'s, the fast arithmetic where the
        weights have one). It holds for the model's life: another arithmetic is another Transformer."""
        self.config = config
        self.plan = plan if plan is not None else choose_plan(config, weights)
        self.w = tensors.with_arithmetic(weights, self.plan.exact)      # the plan's arithmetic, the same bytes
        # each layer's weights, indexed once: a layer of a stacked llama2.c tensor is a view made at
        # every access (for s15M's int8 layers, a noticeable part of a decode step: docs/performance.md)
        self.layers = [{name: self.w[name][i] for name in LAYER_WEIGHTS} for i in range(config.n_layers)]
        # RoPE's tables grow with the positions used (rope_rows), not with the context a header claims
        self._rope = rope_tables(config, min(config.seq_len, ROPE_START))
        self._compiled = (CompiledForward(config, self.w, self.layers, self.plan) if self.plan.compiled_rows
                          else None)

    @property
    def rope_cos(self) -> np.ndarray:
        return self._rope[0]

    @property
    def rope_sin(self) -> np.ndarray:
        return self._rope[1]

    def rope_rows(self, pos: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of these positions' rotations.   pos: n ints -> (n, D/2) each

        The tables cover the positions used so far, doubling when a later one comes (up to the
        context), so a model whose header claims a huge context costs nothing for it until it is used.
        Swapped as one tuple: another thread reading them sees the old tables or the new, whole."""
        need = max(pos, default=-1) + 1
        if need > len(self._rope[0]):
            self._rope = rope_tables(self.config, min(max(need, 2 * len(self._rope[0])), self.config.seq_len))
        cos, sin = self._rope
        if len(pos) == 1:                     # a decode step: views, not copies (fewer cache misses after a step)
            return cos[pos[0]:need], sin[pos[0]:need]
        return cos[pos], sin[pos]

    @property
    def exact(self) -> bool:
        """The plan's arithmetic. Exact: a prefill attends with run.c's arithmetic (the attention kernel: its
        summation order, so that a prompt read in one batch equals the same prompt read token by token, bit
        for bit); else through BLAS (attention_blas). Decode steps always take the kernel."""
        return self.plan.exact

    @property
    def matvec_rows(self) -> int:
        """Batches up to this many tokens run on the matrix-vector kernels (each token's arithmetic then
        independent of the others in the batch); larger ones through BLAS. The fast path's quantized
        kernels take short prompts too (plan.FAST_KERNEL_ROWS)."""
        return self.plan.kernel_rows

    def new_cache(self, n_seqs: int = 1, seq_len: int | None = None) -> KVCache:
        """A KV cache for this model: float32 on the exact path (run.c's), half precision on the fast
        path (llama.cpp's f16 cache; see KVCache)."""
        return KVCache(self.config, n_seqs, seq_len, half=self.plan.kv_half)

    def forward(self, batch: Batch, cache: KVCache, probe: Probe | None = None) -> np.ndarray:
        """Run the batch through the model, filling the cache. -> (n_wanted, vocab) float32 logits.

        probe: what an inspection tool asks of this call only (attention maps, the residual stream,
        an attention bias); it then takes the layer-by-layer path, whose arithmetic it shows."""
        c, w = self.config, self.w
        probe = probe if probe is not None and probe.active else None
        # as Python ints: numpy's reductions take microseconds each on a decode step's one position
        positions = batch.pos.tolist()
        if positions and (max(positions) >= cache.seq_len or min(positions) < 0):
            raise ValueError(f"positions must lie in [0, {cache.seq_len})")
        cos, sin = self.rope_rows(positions)                                     # (n, D/2)
        x = embed(w["tok_embeddings"], batch.tokens)                            # (n, dim)
        compiled = self.compiled_forward()
        if compiled is not None and probe is None:
            if len(batch) <= compiled.rows:
                return compiled(x, batch, cache, cos, sin)
            if compiled.takes_prompts and batch.in_order():
                # a long prompt: parts of ROWS tokens through the one-call forward (see CompiledForward)
                rows = compiled.rows
                return np.concatenate([compiled(x[i:i + rows], batch.part(i, i + rows), cache, cos[i:i + rows],
                                                sin[i:i + rows])
                                       for i in range(0, len(batch), rows)])
        for layer in range(c.n_layers):
            lw = self.layers[layer]
            h = rmsnorm(x, lw["attention_norm"], c.norm_eps, not self.exact)
            x = x + linear(self.attention(h, layer, batch, cache, cos, sin, probe), lw["wo"])
            h = rmsnorm(x, lw["ffn_norm"], c.norm_eps, not self.exact)
            x = x + self.feed_forward(h, layer)
            if probe is not None and probe.residual is not None:
                probe.residual(layer, x)                                         # x: (n, dim) residual stream
        x = rmsnorm(x[batch.logits], w["norm"], c.norm_eps, not self.exact)      # (n_wanted, dim)
        return linear(x, w["output"])                                            # (n_wanted, vocab)

    @property
    def greedy_steps(self) -> bool:
        """Whether `greedy` runs its steps in one compiled call (float32 weights; kernels/step.py), rather
        than one forward a step."""
        return self._compiled is not None and self._compiled.takes_steps

    def greedy(self, token: int, pos: int, cache: KVCache, steps: int, ends=(), seq_id: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `steps` greedy decode steps of one sequence: `token` at `pos`, then at each next position
        the argmax of the logits before it, stopping after an argmax in `ends`. The same logits, bit for
        bit, as one forward a step. -> (the tokens run (n,), their logits (n, vocab)); the argmax of
        the last row is the caller's to take (it is not run)."""
        if not 1 <= steps <= cache.seq_len - pos or pos < 0:
            raise ValueError(f"{steps} steps from position {pos} do not fit the cache's {cache.seq_len}")
        if not self.greedy_steps:
            tokens, rows = [token], []
            for i in range(steps):
                rows.append(self.forward(Batch.sequence([tokens[-1]], pos + i, seq_id), cache)[0])
                if i + 1 < steps:
                    tokens.append(int(np.argmax(rows[-1])))
                    if tokens[-1] in ends:
                        break
            return np.array(tokens[:len(rows)], np.int64), np.stack(rows)
        positions = list(range(pos, pos + steps))
        cos, sin = self.rope_rows(positions)                                      # (steps, D/2)
        x = embed(self.w["tok_embeddings"], [token])                              # (1, dim)
        tokens = np.zeros(steps, np.int64)
        tokens[0] = token
        return self._compiled.greedy(x, tokens, np.array(positions, np.int64), seq_id, cache, cos, sin,
                                     np.array(sorted(ends), np.int64))

    def compiled_forward(self) -> CompiledForward | None:
        """The one-call forward for kernel-sized batches, where the plan has one (else None): made with the
        model, as its weights' arithmetic is."""
        return self._compiled

    def feed_forward(self, h: np.ndarray, layer: int) -> np.ndarray:
        """SwiGLU: w2(silu(w1 h) * w3 h).   (n, dim) -> (n, dim)"""
        lw = self.layers[layer]
        w1, w2, w3 = lw["w1"], lw["w2"], lw["w3"]
        return linear(gated_units(h, w1, w3), w2)                                # (n, hidden) -> (n, dim)

    def attention(self, h, layer, batch: Batch, cache: KVCache, cos, sin, probe: Probe | None = None) -> np.ndarray:
        """Causal grouped-query self-attention; writes this batch's keys/values into the cache.

        h: (n, dim) -> (n, n_heads * head_dim)
        """
        c, lw = self.config, self.layers[layer]
        n, D = len(batch), c.head_dim
        wq, wk, wv = lw["wq"], lw["wk"], lw["wv"]
        decode = on_numba(h, wq) and on_numba(h, wk) and on_numba(h, wv)
        q, k, v = linear3(h, wq, wk, wv)
        q = q.reshape(n, c.n_heads, D)        # (n, H, D)
        k = k.reshape(n, c.n_kv_heads, D)     # (n, KV, D)
        v = v.reshape(n, c.n_kv_heads, D)     # (n, KV, D)

        out = np.empty((n, c.n_heads, D), np.float32)
        record = probe is not None and probe.attention is not None
        bias = probe.bias_of(layer) if probe is not None else NO_BIAS
        probs = np.zeros((n, c.n_heads, int(batch.pos.max()) + 1) if record else (1, 1, 1), np.float32)
        # the kernel applies RoPE to q and k (as apply_rope does), writes k and v into the cache, attends;
        # on both threads when decoding (numba's pool only); a prefill: run.c's arithmetic on one thread
        # between its BLAS calls (exact), or matrix products (attention_blas, the fast path)
        kernel = attention_parallel if decode else attention_kernel if self.exact else attention_blas
        kernel(q, k, v, cos, sin, cache.k[layer], cache.v[layer], batch.seq_ids, batch.pos, out, probs, record, bias)
        if record:
            probe.attention(layer, batch, probs)        # probs[i, h, :pos[i]+1]: token i's attention
        return out.reshape(n, c.n_heads * D)
