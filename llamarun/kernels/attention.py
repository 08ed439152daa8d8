"""Causal attention over the KV cache, one (query, head) at a time, with run.c's arithmetic.

Why a hand-written kernel rather than numpy matrix products:
- Exactness. run.c sums each score and each weighted value left to right in float32. BLAS sums in
  an order that depends on the matrix shape, so a prompt read in one batched pass rounded
  differently from the same tokens decoded one by one; with int8 activations (runq.c) a one-ulp
  difference can fall on a rounding boundary and move the logits by 1e-2. Here every query is
  computed the same way whatever else is in the batch, so prefill equals decode bit for bit, and
  both follow the reference engine.
- No Python loop over sequences or queries: one call does the whole batch, parallel over
  (token, head) pairs.
The score loop cannot use SIMD across head_dim without reordering the sum; it is a small part of the
decode step next to reading the weights.
"""
import math

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def attention(q, k_cache, v_cache, seq_ids, pos, out, probs_out, record):
    """q: (n, H, D) rotated queries; k_cache, v_cache: (n_seqs, KV, S, D) of one layer;
    seq_ids, pos: (n,) int64; out: (n, H, D) written; probs_out: (n, H, T_max), written if record.
    Token i attends to positions 0..pos[i] of cache slot seq_ids[i] (its own key included).
    """
    n, H, D = q.shape
    group = H // k_cache.shape[1]
    scale = np.float32(math.sqrt(np.float32(D)))
    for job in numba.prange(n * H):
        i = job // H
        h = job % H
        kv = h // group
        seq = seq_ids[i]
        T = pos[i] + 1
        scores = np.empty(T, np.float32)
        best = np.float32(-np.inf)
        for t in range(T):                       # scores: q . k_t / sqrt(D)
            s = np.float32(0.0)
            for d in range(D):
                s += q[i, h, d] * k_cache[seq, kv, t, d]
            s = s / scale
            scores[t] = s
            if s > best:
                best = s
        total = np.float32(0.0)
        for t in range(T):                       # softmax, max-subtracted
            e = np.float32(math.exp(scores[t] - best))
            scores[t] = e
            total += e
        for t in range(T):
            scores[t] = scores[t] / total
        for d in range(D):
            out[i, h, d] = 0.0
        for t in range(T):                       # weighted sum of the values
            a = scores[t]
            for d in range(D):
                out[i, h, d] += a * v_cache[seq, kv, t, d]
        if record:
            for t in range(T):
                probs_out[i, h, t] = scores[t]
