"""The tests' one reference forward pass: a Llama in plain numpy, float64, written from the model's
definition as llama2.c's run.c computes it (embedding, RMSNorm, RoPE on interleaved pairs,
grouped-query causal attention, SwiGLU, classifier).

It shares no code with llamarun's forward (model.py, kernels/): the tests hold llamarun's logits and
attention weights to it, so a mistake both made alike would pass. It takes dense weights as a
llama2.c float32 checkpoint maps them (llamarun only reads the file); quantized weights must be
dequantized by the caller.
"""
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

NAMES = ("tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "output")


@dataclass
class Forward:
    logits: np.ndarray       # (T, vocab): the next token's logits after each position
    attention: np.ndarray    # (layers, heads, T, T): each query's softmax over the positions up to it


def rmsnorm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * gain, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate each head's pairs (2i, 2i+1) by the angle pos * theta^(-2i/D), as run.c does.
    x: (T, heads, D) -> (T, heads, D)"""
    D = x.shape[-1]
    angle = positions[:, None] * theta ** (-np.arange(0, D, 2) / D)          # (T, D/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]          # (T, 1, D/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(weights: Mapping, config, tokens: Sequence[int]) -> Forward:
    """One sequence, positions 0 .. T-1, from an empty cache.

    weights: llama2.c's NAMES, per-layer ones indexable by layer (stacked, or a list per layer);
    matrices (out, in) as run.c stores them. config: a ModelConfig (dims, rope_theta, norm_eps).
    """
    w = {name: np.asarray(weights[name], np.float64) for name in NAMES}
    c = config
    T, H, KV, D = len(tokens), c.n_heads, c.n_kv_heads, c.dim // c.n_heads
    positions = np.arange(T, dtype=np.float64)
    causal = np.tril(np.ones((T, T), bool))                                   # query i sees keys j <= i
    attention = np.zeros((c.n_layers, H, T, T))

    x = w["tok_embeddings"][np.asarray(tokens)]                               # (T, dim)
    for layer in range(c.n_layers):
        h = rmsnorm(x, w["attention_norm"][layer], c.norm_eps)
        q = rope((h @ w["wq"][layer].T).reshape(T, H, D), positions, c.rope_theta)
        k = rope((h @ w["wk"][layer].T).reshape(T, KV, D), positions, c.rope_theta)
        v = (h @ w["wv"][layer].T).reshape(T, KV, D)
        # grouped-query: query head h reads key/value head h // (H / KV)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)   # (T, H, D)
        scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(D)                 # (H, T, T)
        scores = np.where(causal, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attention[layer] = p
        x = x + np.einsum("hij,jhd->ihd", p, v).reshape(T, H * D) @ w["wo"][layer].T

        h = rmsnorm(x, w["ffn_norm"][layer], c.norm_eps)
        x = x + (silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T

    logits = rmsnorm(x, w["norm"], c.norm_eps) @ w["output"].T               # (T, vocab)
    return Forward(logits, attention)
