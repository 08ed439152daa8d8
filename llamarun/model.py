"""The Llama transformer forward pass and its KV cache, on numpy.

One forward call takes a `Batch`: tokens from one or more independent sequences, each token with its
own position and sequence id (llama.cpp's `llama_batch`). All tokens go through every layer together
as one (n_tokens, dim) matrix, so a prompt is a few large matrix products (BLAS) rather than one
matrix-vector product per token; attention is the only step done per sequence.

A decode-sized batch (up to MATVEC_ROWS tokens) goes another way: numba matrix-vector kernels that
stream each weight once (kernels/matvec.py) and no BLAS call, so that a single thread pool runs
the whole decode step (why that matters: kernels/matvec.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .kernels.attention import BLOCK as KEY_BLOCK, attention as attention_kernel, attention_parallel, key_blocks
from .kernels.matvec import matvec, matvec3, swiglu
from .kernels.norm import rmsnorm as rmsnorm_kernel


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
        want = np.ones(n, bool) if all_logits else np.arange(n) == n - 1
        return cls(np.asarray(tokens, np.int64), np.arange(start_pos, start_pos + n, dtype=np.int64),
                   np.full(n, seq_id, np.int64), want)

    @classmethod
    def of(cls, tokens, pos, seq_ids, logits=None) -> Batch:
        n = len(tokens)
        want = np.ones(n, bool) if logits is None else np.asarray(logits, bool)
        return cls(np.asarray(tokens, np.int64), np.asarray(pos, np.int64), np.asarray(seq_ids, np.int64), want)

    def __len__(self) -> int:
        return len(self.tokens)


class KVCache:
    """Keys and values of every layer, for `n_seqs` independent sequences of up to `seq_len` tokens.

    Values are laid out (layer, seq, kv_head, position, head_dim). Keys are stored in blocks of
    B = KEY_BLOCK positions, each block transposed: (layer, seq, kv_head, position // B, head_dim,
    position % B), so that the attention kernel computes the scores of consecutive positions
    together (SIMD across positions, each score still summed over d in order); see
    kernels/attention.py.
    """

    def __init__(self, config: ModelConfig, n_seqs: int = 1, seq_len: int | None = None):
        self.seq_len = seq_len or config.seq_len
        L, KV, S, D = config.n_layers, config.n_kv_heads, self.seq_len, config.head_dim
        # np.zeros maps untouched pages lazily, so a long context costs memory only as it fills
        self.k = np.zeros((L, n_seqs, KV, key_blocks(S), D, KEY_BLOCK), np.float32)
        self.v = np.zeros((L, n_seqs, KV, S, D), np.float32)

    @property
    def n_seqs(self) -> int:
        return self.k.shape[1]


# ----------------------------------------------------------------------------------------------
# the building blocks

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, row by row, summed as run.c sums.   x: (n, dim)"""
    out = np.empty(x.shape, np.float32)
    rmsnorm_kernel(x, weight, eps, out)
    return out


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every (position, pair) rotation angle, each (seq_len, head_dim // 2).

    Computed in float32 as run.c does (freq = 1/theta^(2i/D), angle = pos * freq), so positions far
    into the context rotate exactly as the reference engine rotates them.
    """
    D = config.head_dim
    freqs = np.float32(1.0) / np.power(np.float32(config.rope_theta),
                                       np.arange(0, D, 2, dtype=np.float32) / np.float32(D))
    angles = np.arange(config.seq_len, dtype=np.float32)[:, None] * freqs[None, :]   # (seq_len, D/2)
    return np.cos(angles.astype(np.float64)).astype(np.float32), np.sin(angles.astype(np.float64)).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its angle (llama2.c's layout).

    x: (n, heads, head_dim); cos, sin: (n, head_dim // 2) for the tokens' positions.
    The forward pass does this rotation inside the attention kernel (with the same float32
    arithmetic, fused with the cache writes); this is its plain numpy statement.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)        # (n, heads, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(pairs)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(x.shape)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), rounded as run.c writes it (a multiply by the reciprocal, not a division).

    In place, overwriting x: at prefill sizes each temporary of the plain expression is megabytes
    of fresh pages; this needs one.
    """
    s = np.negative(x)
    np.exp(s, out=s)
    s += np.float32(1.0)
    np.reciprocal(s, out=s)         # 1 / (1 + exp(-x)), rounded as the division
    x *= s
    return x


# Up to this many rows (tokens in a batch), a matrix product is a matrix-vector product bound by
# reading the weights: numba kernels that stream each weight once for all rows. Beyond it, BLAS.
MATVEC_ROWS = 8


def few_rows(x: np.ndarray, w) -> bool:
    """Whether x @ w.T goes to the matrix-vector kernels (float32 weights, a decode-sized batch)."""
    return x.shape[0] <= MATVEC_ROWS and isinstance(w, np.ndarray) and w.dtype == np.float32


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


def embed(table, tokens: np.ndarray) -> np.ndarray:
    """Rows of the token embedding table, as float32.   -> (n, dim)"""
    if isinstance(table, np.ndarray):
        return table[tokens].astype(np.float32)
    return table.rows(tokens)


# ----------------------------------------------------------------------------------------------
# the transformer

class Transformer:
    def __init__(self, config: ModelConfig, weights: dict):
        self.config = config
        self.w = weights
        self.rope_cos, self.rope_sin = rope_tables(config)
        self.attention_hook = None   # inspection tools set it: called as hook(layer, batch, probs)

    def forward(self, batch: Batch, cache: KVCache) -> np.ndarray:
        """Run the batch through the model, filling the cache. -> (n_wanted, vocab) float32 logits."""
        c, w = self.config, self.w
        if len(batch) and (batch.pos.max() >= cache.seq_len or batch.pos.min() < 0):
            raise ValueError(f"positions must lie in [0, {cache.seq_len})")
        cos, sin = self.rope_cos[batch.pos], self.rope_sin[batch.pos]            # (n, D/2)
        x = embed(w["tok_embeddings"], batch.tokens)                            # (n, dim)
        for layer in range(c.n_layers):
            h = rmsnorm(x, w["attention_norm"][layer], c.norm_eps)
            x = x + linear(self.attention(h, layer, batch, cache, cos, sin), w["wo"][layer])
            h = rmsnorm(x, w["ffn_norm"][layer], c.norm_eps)
            x = x + self.feed_forward(h, layer)
        x = rmsnorm(x[batch.logits], w["norm"], c.norm_eps)                      # (n_wanted, dim)
        return linear(x, w["output"])                                            # (n_wanted, vocab)

    def feed_forward(self, h: np.ndarray, layer: int) -> np.ndarray:
        """SwiGLU: w2(silu(w1 h) * w3 h).   (n, dim) -> (n, dim)"""
        w1, w2, w3 = self.w["w1"][layer], self.w["w2"][layer], self.w["w3"][layer]
        if few_rows(h, w1) and few_rows(h, w3):
            gate = np.empty((len(h), w1.shape[0]), np.float32)
            swiglu(h, w1, w3, gate)                                              # one pass over w1, w3
        else:
            gate = silu(linear(h, w1))                                           # (n, hidden)
            gate *= linear(h, w3)
        return linear(gate, w2)

    def attention(self, h, layer, batch: Batch, cache: KVCache, cos, sin) -> np.ndarray:
        """Causal grouped-query self-attention; writes this batch's keys/values into the cache.

        h: (n, dim) -> (n, n_heads * head_dim)
        """
        c, w = self.config, self.w
        n, D = len(batch), c.head_dim
        wq, wk, wv = w["wq"][layer], w["wk"][layer], w["wv"][layer]
        decode = few_rows(h, wq) and few_rows(h, wk) and few_rows(h, wv)
        if decode:                                                    # one pass over wq, wk, wv
            q = np.empty((n, wq.shape[0]), np.float32)
            k = np.empty((n, wk.shape[0]), np.float32)
            v = np.empty((n, wv.shape[0]), np.float32)
            matvec3(h, wq, wk, wv, q, k, v)
        else:
            q, k, v = linear(h, wq), linear(h, wk), linear(h, wv)
        q = q.reshape(n, c.n_heads, D)        # (n, H, D)
        k = k.reshape(n, c.n_kv_heads, D)     # (n, KV, D)
        v = v.reshape(n, c.n_kv_heads, D)     # (n, KV, D)

        out = np.empty((n, c.n_heads, D), np.float32)
        record = self.attention_hook is not None
        probs = np.zeros((n, c.n_heads, int(batch.pos.max()) + 1) if record else (1, 1, 1), np.float32)
        # the kernel applies RoPE to q and k (as apply_rope does), writes k and v into the cache, attends;
        # on both threads when decoding (numba's pool only), on one between the prefill's BLAS calls
        kernel = attention_parallel if decode else attention_kernel
        kernel(q, k, v, cos, sin, cache.k[layer], cache.v[layer], batch.seq_ids, batch.pos, out, probs, record)
        if record:
            self.attention_hook(layer, batch, probs)    # probs[i, h, :pos[i]+1]: token i's attention
        return out.reshape(n, c.n_heads * D)
