"""Causal attention over the KV cache, one (query, head) at a time, with run.c's arithmetic.

Why a hand-written kernel rather than numpy matrix products:
- Exactness. run.c sums each score and each weighted value left to right in float32. BLAS sums in
  an order that depends on the matrix shape, so a prompt read in one batched pass rounded
  differently from the same tokens decoded one by one; with int8 activations (runq.c) a one-ulp
  difference can fall on a rounding boundary and move the logits by 1e-2. Here every query is
  computed the same way whatever else is in the batch, and follows the reference engine.
- One call per layer does the whole batch: RoPE, the cache writes and the attention of every
  (token, head); the decode step of a small model is otherwise mostly per-call overhead.

Speed without reordering any sum:
- Keys are cached in blocks of BLOCK positions, each block stored transposed, (head_dim, BLOCK).
  The score loop runs over d outside and over the block's positions inside: each score is still
  summed d = 0..D-1 in float32, but the positions of a block are independent sums over contiguous
  memory, 8 per SIMD instruction, with no remainder loop (the block is padded; scores past the
  last position are computed and ignored). A block of keys is contiguous (8 KB at head_dim 64),
  so a decode step reads the keys as a few sequential streams, and a fresh cache only touches the
  pages of the blocks in use.
- Four consecutive terms of a sum are added in one pass (`s += q0 k0; s += q1 k1; ...`, still in
  order), so each partial sum is loaded and stored once per four terms instead of every term.
- error_model="numpy": divisions need no zero check (a float32 divide by zero gives inf, as in C),
  so the loops that divide vectorize.
"""
import math

import numba
import numpy as np

BLOCK = 32   # positions per key block (16 measured 10% slower in the prefill, 64 no faster)


@numba.njit
def key_blocks(seq_len):
    """Key blocks needed to cache seq_len positions."""
    return (seq_len + BLOCK - 1) // BLOCK


@numba.njit(error_model="numpy")
def _scores(qr, keys, T, scores):
    """scores[t] = qr . keys[t] for t < T (and up to the end of the last block).

    qr: (D,) the rotated query; keys: (blocks, D, BLOCK) one sequence's and kv head's key cache.
    """
    D, B = qr.shape[0], keys.shape[2]
    # B is read from the array, not the constant BLOCK: with a trip count known at compile time
    # LLVM unrolls the position loop into scalar code; with a run-time one it vectorizes it
    for b in range((T + B - 1) // B):
        t0 = b * B
        for t in range(t0, t0 + B):
            scores[t] = 0.0
        d = 0
        while d + 4 <= D:       # four terms per pass, added in order d, d+1, d+2, d+3
            q0, q1, q2, q3 = qr[d], qr[d + 1], qr[d + 2], qr[d + 3]
            for tt in range(B):
                s = scores[t0 + tt]
                s += q0 * keys[b, d, tt]
                s += q1 * keys[b, d + 1, tt]
                s += q2 * keys[b, d + 2, tt]
                s += q3 * keys[b, d + 3, tt]
                scores[t0 + tt] = s
            d += 4
        while d < D:
            for tt in range(B):
                scores[t0 + tt] += qr[d] * keys[b, d, tt]
            d += 1


@numba.njit(error_model="numpy")
def _softmax(scores, T, scale, bias):
    """scores[:T] / scale, plus bias[:T] if given, then softmax, max-subtracted, as run.c (float32,
    sums left to right).

    bias: (S,) added to the scaled scores of key positions (attention emphasis: log(F) at the keys
    to emphasise, so their weights are multiplied by F before renormalising), or empty for none:
    the plain run's arithmetic, untouched.
    """
    for t in range(T):
        scores[t] = scores[t] / scale
    if bias.shape[0] > 0:
        for t in range(T):
            scores[t] += bias[t]
    best = scores[0]
    for t in range(1, T):
        if scores[t] > best:
            best = scores[t]
    total = np.float32(0.0)
    for t in range(T):
        e = np.float32(math.exp(scores[t] - best))
        scores[t] = e
        total += e
    for t in range(T):
        scores[t] = scores[t] / total


@numba.njit(error_model="numpy")
def _weighted_values(probs, values, T, acc):
    """acc[d] = sum over t < T of probs[t] * values[t, d], each accumulated over t in order.

    values: (S, D) one sequence's and kv head's value cache. SIMD across d.
    """
    D = acc.shape[0]
    for d in range(D):
        acc[d] = 0.0
    t = 0
    while t + 4 <= T:           # four terms per pass, added in order t, t+1, t+2, t+3
        a0, a1, a2, a3 = probs[t], probs[t + 1], probs[t + 2], probs[t + 3]
        for d in range(D):
            o = acc[d]
            o += a0 * values[t, d]
            o += a1 * values[t + 1, d]
            o += a2 * values[t + 2, d]
            o += a3 * values[t + 3, d]
            acc[d] = o
        t += 4
    while t < T:
        for d in range(D):
            acc[d] += probs[t] * values[t, d]
        t += 1


@numba.njit(error_model="numpy")
def _rope(x, cos, sin, out):
    """Rotate each interleaved pair (x[2j], x[2j+1]) by angle j, as run.c (and apply_rope) do."""
    for j in range(x.shape[0] // 2):
        x0, x1 = x[2 * j], x[2 * j + 1]
        out[2 * j] = x0 * cos[j] - x1 * sin[j]
        out[2 * j + 1] = x0 * sin[j] + x1 * cos[j]


@numba.njit(error_model="numpy")
def _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos):
    """Rotate the batch's keys (RoPE) and write keys and values into the cache.

    Every key and value goes in before any query attends: a token of the batch sees the earlier
    tokens of its sequence in the same batch.
    """
    n, KV, D = k.shape
    _store_pairs(0, n * KV, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, np.empty(D, np.float32))


@numba.njit(error_model="numpy")
def _store_pairs(start, stop, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, kr):
    """_store for the (token, kv head) pairs start .. stop - 1 (pair = token * KV + kv head), kr: (D,)
    scratch. (The one-call forward gives each thread a share of the pairs.)"""
    KV, D = k.shape[1], k.shape[2]
    for pair in range(start, stop):
        i, kv = pair // KV, pair % KV
        seq, p = seq_ids[i], pos[i]
        _rope(k[i, kv], cos[i], sin[i], kr)
        b, tt = p // BLOCK, p % BLOCK
        for d in range(D):
            k_cache[seq, kv, b, d, tt] = kr[d]
            v_cache[seq, kv, p, d] = v[i, kv, d]


@numba.njit(error_model="numpy")
def _attend(job, q, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias):
    """Attention of one (token i, head h) pair, job = i * H + h."""
    n, H, D = q.shape
    i, h = job // H, job % H
    seq, T = seq_ids[i], pos[i] + 1
    kv = h // (H // k_cache.shape[1])                # grouped-query: H / KV query heads per kv head
    qr = np.empty(D, np.float32)                     # the rotated query
    scores = np.empty(key_blocks(T) * BLOCK, np.float32)     # scores, then probabilities
    acc = np.empty(D, np.float32)
    _rope(q[i, h], cos[i], sin[i], qr)
    _scores(qr, k_cache[seq, kv], T, scores)
    _softmax(scores, T, np.float32(math.sqrt(np.float32(D))), bias)
    _weighted_values(scores, v_cache[seq, kv], T, acc)
    for d in range(D):
        out[i, h, d] = acc[d]
    if record:
        for t in range(T):
            probs_out[i, h, t] = scores[t]


@numba.njit(error_model="numpy", cache=True)
def rope(x, cos, sin, out):
    """out[i, h] = x[i, h] rotated by token i's angles (model.apply_rope's arithmetic, as a loop: the
    numpy statement makes four temporaries the size of x).   x, out: (n, heads, D); cos, sin: (n, D/2)"""
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            for j in range(x.shape[2] // 2):        # _rope's arithmetic, indexed in place (no views)
                x0, x1 = x[i, h, 2 * j], x[i, h, 2 * j + 1]
                out[i, h, 2 * j] = x0 * cos[i, j] - x1 * sin[i, j]
                out[i, h, 2 * j + 1] = x0 * sin[i, j] + x1 * cos[i, j]


@numba.njit(error_model="numpy", cache=True)
def store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos):
    """Rotate the batch's keys and write keys and values into one layer's cache (`_store`), on its own."""
    _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)


# Two entry points, the same arithmetic. The prefill runs between OpenBLAS's matrix products, whose
# threads spin for a while after each call and keep the other core busy: a parallel region there
# waits for them (see matvec.py), so the prefill attends on one thread. The decode step runs only
# numba kernels, so its attention takes both threads, one (token, head) pair per task.
# (Two functions rather than one compiled twice: numba's cache would give both the same entry.)

@numba.njit(error_model="numpy", cache=True)
def attention(q, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias):
    """Rotate this batch's queries and keys, store its keys and values, attend.

    q: (n, H, D) queries and k, v: (n, KV, D) keys and values of the batch's tokens, before RoPE;
    cos, sin: (n, D/2) the rotation angles of each token's position;
    k_cache: (n_seqs, KV, blocks, D, BLOCK) keys, block b holding positions b*BLOCK onwards,
    transposed; v_cache: (n_seqs, KV, S, D) values (one layer's caches);
    seq_ids, pos: (n,) int64; out: (n, H, D) written; probs_out: (n, H, T_max), written if record;
    bias: (S,) float32 added to the scaled scores of key positions 0..S-1, the same for every
    sequence and head of the batch (attention emphasis, llamarun/inspect/emphasis.py), or empty.
    Token i attends to positions 0..pos[i] of cache slot seq_ids[i] (its own key included).
    """
    _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)
    for job in range(q.shape[0] * q.shape[1]):
        _attend(job, q, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias)


@numba.njit(error_model="numpy", parallel=True, cache=True)
def attention_parallel(q, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias):
    """`attention` with the (token, head) pairs shared among numba's threads."""
    _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)
    for job in numba.prange(q.shape[0] * q.shape[1]):
        _attend(job, q, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias)
