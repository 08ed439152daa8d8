"""Causal attention over the KV cache, one (query, head) at a time, with run.c's arithmetic (float32
cache) or llama.cpp's (half-precision cache, the fast path: see "the cache's element type" below).

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
- A job is a token and one kv head, with all the query heads that share it (grouped-query
  attention: 3 in SmolLM2): they read the same keys and values, while those are in L1, and each
  score's chain of additions is interleaved with the other heads' (the sums are chains of
  dependent adds: one head alone keeps the CPU waiting on its latency); the gain grows with the
  number of positions (docs/performance.md).
- The caches and the batch's arrays are indexed in place, never sliced into views: a view made in
  compiled code counts a reference to its array, an atomic add on memory that both threads of a
  decode step share (see step.py). With ~15 views per job, a step of 8 tokens spent more time in
  attention than the same jobs took alone.
- error_model="numpy": divisions need no zero check (a float32 divide by zero gives inf, as in C),
  so the loops that divide vectorize.
"""
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .half import float_to_half, half_to_float

BLOCK = 32   # positions per key block (16 measured slower in the prefill, 64 no faster)


@numba.njit
def key_blocks(seq_len):
    """Key blocks needed to cache seq_len positions."""
    return (seq_len + BLOCK - 1) // BLOCK


# ----------------------------------------------------------------------------------------------
# the cache's element type
#
# A float32 cache is run.c's. A half-precision one (KVCache(..., half=True), what the fast path's
# caches are, as llama.cpp's are f16) halves the bytes a decode step reads at depth: SmolLM2 at 1024
# positions reads 47 MB of keys and values per token in float32, more than the weights' 94 MB
# halved. numba has no float16 type, so a half cache holds the numbers' 16 bits (uint16); `_widen`
# converts on reading (exact) and `_narrow` on writing (round to nearest even, as numpy's
# astype(np.float16)). With a half cache the softmax is llama.cpp's kind as well (see _softmax_fast).

@intrinsic
def _widen(typingctx, value):
    """A cached key or value as float32: a float32 as it is, uint16 bits of a half as its value."""
    if value == types.float32:
        return types.float32(value), lambda context, builder, sig, args: args[0]
    if value == types.uint16:
        def codegen(context, builder, sig, args):
            return half_to_float(builder, args[0])
        return types.float32(value), codegen
    return None


@intrinsic
def _narrow(typingctx, cache, value):
    """float32 value as an element of the cache: itself, or the bits of the nearest half."""
    if not (isinstance(cache, types.Array) and value == types.float32):
        return None
    if cache.dtype == types.float32:
        return types.float32(cache, value), lambda context, builder, sig, args: args[1]
    if cache.dtype == types.uint16:
        def codegen(context, builder, sig, args):
            return float_to_half(builder, args[1])
        return types.uint16(cache, value), codegen
    return None


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose bits are the low 32 of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        word = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(word, ir.FloatType())
    return types.float32(bits), codegen


@numba.njit(inline="always", error_model="numpy")
def _exp_fast(x):
    """e^x for float32 x <= 0 (a softmax's shifted scores), within ~2 ulp, with no libm call so that a
    loop of them vectorizes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times
    2^n put into the exponent bits. Below -87 it gives e^-87 (~1.6e-38) rather than less: nothing
    next to a softmax's largest term, whose e^0 = 1 is in every sum."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))          # float32, as every step here
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * _float_of_bits((np.int32(n) + 127) << 23)


@numba.njit(error_model="numpy")
def _scores(qr, G, k_cache, layer, seq, kv, T, scores):
    """scores[g, t] = qr[g] . (key t of sequence seq's kv head kv) for t < T (and up to the end of the
    last block), for the queries g < G.

    qr: (>= G, D) the rotated queries of the heads that share this kv head; k_cache: (n_layers, n_seqs,
    KV, blocks, D, BLOCK), layer `layer` read in place; scores: (>= G, >= blocks * BLOCK).
    """
    D, B = qr.shape[1], k_cache.shape[5]
    # B is read from the array, not the constant BLOCK: with a trip count known at compile time
    # LLVM unrolls the position loop into scalar code; with a run-time one it vectorizes it
    for b in range((T + B - 1) // B):
        t0 = b * B
        for g in range(G):
            for t in range(t0, t0 + B):
                scores[g, t] = 0.0
        d = 0
        while d + 4 <= D:       # four terms per pass, added in order d, d+1, d+2, d+3
            for g in range(G):  # the heads of a group read the same keys while they are in L1
                q0, q1, q2, q3 = qr[g, d], qr[g, d + 1], qr[g, d + 2], qr[g, d + 3]
                for tt in range(B):
                    s = scores[g, t0 + tt]
                    s += q0 * _widen(k_cache[layer, seq, kv, b, d, tt])
                    s += q1 * _widen(k_cache[layer, seq, kv, b, d + 1, tt])
                    s += q2 * _widen(k_cache[layer, seq, kv, b, d + 2, tt])
                    s += q3 * _widen(k_cache[layer, seq, kv, b, d + 3, tt])
                    scores[g, t0 + tt] = s
            d += 4
        while d < D:
            for g in range(G):
                for tt in range(B):
                    scores[g, t0 + tt] += qr[g, d] * _widen(k_cache[layer, seq, kv, b, d, tt])
            d += 1


@numba.njit(error_model="numpy")
def _scaled_max(scores, g, T, scale, bias):
    """scores[g, :T] / scale, plus bias[:T] if given, in place; -> their maximum.

    bias: (S,) added to the scaled scores of key positions (attention emphasis: log(F) at the keys
    to emphasise, so their weights are multiplied by F before renormalising), or empty for none:
    the plain run's arithmetic, untouched.
    """
    for t in range(T):
        scores[g, t] = scores[g, t] / scale
    if bias.shape[0] > 0:
        for t in range(T):
            scores[g, t] += bias[t]
    best = scores[g, 0]
    for t in range(1, T):
        if scores[g, t] > best:
            best = scores[g, t]
    return best


@numba.njit(error_model="numpy")
def _softmax_exact(scores, g, T, scale, bias):
    """The softmax of scores[g, :T] scaled (see _scaled_max), max-subtracted, as run.c (float32,
    sums left to right)."""
    best = _scaled_max(scores, g, T, scale, bias)
    total = np.float32(0.0)
    for t in range(T):
        e = np.float32(math.exp(scores[g, t] - best))
        scores[g, t] = e
        total += e
    for t in range(T):
        scores[g, t] = scores[g, t] / total


@numba.njit(error_model="numpy")
def _softmax_fast(scores, g, T, scale, bias):
    """_softmax_exact as llama.cpp computes it (ggml's soft_max: a vectorized exp, sums in SIMD
    lanes): the exps by _exp_fast, in a loop that vectorizes, and their sum in eight lanes. The
    attention of a half-precision cache (the fast path); at 1024 positions the libm expf of the exact
    softmax was a quarter of SmolLM2's attention time."""
    best = _scaled_max(scores, g, T, scale, bias)
    for t in range(T):
        scores[g, t] = _exp_fast(scores[g, t] - best)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    t = 0
    while t + 8 <= T:
        s0 += scores[g, t]
        s1 += scores[g, t + 1]
        s2 += scores[g, t + 2]
        s3 += scores[g, t + 3]
        s4 += scores[g, t + 4]
        s5 += scores[g, t + 5]
        s6 += scores[g, t + 6]
        s7 += scores[g, t + 7]
        t += 8
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while t < T:
        total += scores[g, t]
        t += 1
    for t in range(T):
        scores[g, t] = scores[g, t] / total


def _softmax(cache, scores, g, T, scale, bias):
    """The softmax of head g's scores that goes with the cache's element type: run.c's for float32,
    llama.cpp's for half (chosen when numba compiles the caller, no test at run time)."""


@overload(_softmax)
def _softmax_for(cache, scores, g, T, scale, bias):
    if cache.dtype == types.uint16:
        return lambda cache, scores, g, T, scale, bias: _softmax_fast(scores, g, T, scale, bias)
    return lambda cache, scores, g, T, scale, bias: _softmax_exact(scores, g, T, scale, bias)


@numba.njit(error_model="numpy")
def _weighted_values(probs, G, v_cache, layer, seq, kv, T, acc):
    """acc[g, d] = sum over t < T of probs[g, t] * values[t, d] for g < G, each accumulated over t in
    order, values = layer `layer`, sequence seq, kv head kv of v_cache (n_layers, n_seqs, KV, S, D),
    in place.

    probs: (>= G, >= T) the probabilities of each head of the group; acc: (>= G, D). SIMD across d.
    """
    D = acc.shape[1]
    for g in range(G):
        for d in range(D):
            acc[g, d] = 0.0
    t = 0
    while t + 4 <= T:           # four terms per pass, added in order t, t+1, t+2, t+3
        for g in range(G):
            a0, a1, a2, a3 = probs[g, t], probs[g, t + 1], probs[g, t + 2], probs[g, t + 3]
            for d in range(D):
                o = acc[g, d]
                o += a0 * _widen(v_cache[layer, seq, kv, t, d])
                o += a1 * _widen(v_cache[layer, seq, kv, t + 1, d])
                o += a2 * _widen(v_cache[layer, seq, kv, t + 2, d])
                o += a3 * _widen(v_cache[layer, seq, kv, t + 3, d])
                acc[g, d] = o
        t += 4
    while t < T:
        for g in range(G):
            for d in range(D):
                acc[g, d] += probs[g, t] * _widen(v_cache[layer, seq, kv, t, d])
        t += 1


@numba.njit(inline="always")
def _pair(cos, D, j):
    """Where RoPE's pair j lies in a head of D values, told by the tables' width: one column a pair,
    (2j, 2j+1), interleaved (Meta's, run.c's, llama.cpp's llama files); D columns (Hugging Face's
    tables, both halves alike), (j, j + D/2), Hugging Face's rotate_half layout. (The width rather
    than one more argument to every kernel: the tables already travel with every call, and only
    their maker, model.rope_tables, knows the layout.)"""
    if cos.shape[1] == D:
        return j, j + D // 2
    return 2 * j, 2 * j + 1


@numba.njit(inline="always")
def _rotate(x, i, h, cos, sin, j):
    """Pair j of x[i, h] (_pair: x[i, h, 2j], x[i, h, 2j+1] interleaved) rotated by token i's angle j,
    as run.c (and apply_rope) rotate it."""
    a, b = _pair(cos, x.shape[2], j)
    x0, x1 = x[i, h, a], x[i, h, b]
    return x0 * cos[i, j] - x1 * sin[i, j], x0 * sin[i, j] + x1 * cos[i, j]


@numba.njit(error_model="numpy")
def _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos):
    """Rotate the batch's keys (RoPE) and write keys and values into one layer's cache (k_cache,
    v_cache: as the entry points take them, below).

    Every key and value goes in before any query attends: a token of the batch sees the earlier
    tokens of its sequence in the same batch.
    """
    n, KV = k.shape[0], k.shape[1]
    _store_pairs(0, n * KV, k, v, cos, sin, k_cache[None], v_cache[None], 0, seq_ids, pos)


@numba.njit(error_model="numpy")
def _store_pairs(start, stop, k, v, cos, sin, k_cache, v_cache, layer, seq_ids, pos):
    """_store for the (token, kv head) pairs start .. stop - 1 (pair = token * KV + kv head), into
    layer `layer` of the caches of every layer (n_layers, n_seqs, ...). (The one-call forward gives
    each thread a share of the pairs.)"""
    KV, D = k.shape[1], k.shape[2]
    for pair in range(start, stop):
        i, kv = pair // KV, pair % KV
        seq, p = seq_ids[i], pos[i]
        b, tt = p // BLOCK, p % BLOCK
        for j in range(D // 2):
            k0, k1 = _rotate(k, i, kv, cos, sin, j)
            d0, d1 = _pair(cos, D, j)
            k_cache[layer, seq, kv, b, d0, tt] = _narrow(k_cache, k0)
            k_cache[layer, seq, kv, b, d1, tt] = _narrow(k_cache, k1)
        for d in range(D):
            v_cache[layer, seq, kv, p, d] = _narrow(v_cache, v[i, kv, d])


@numba.njit(error_model="numpy")
def _attend(job, q, cos, sin, k_cache, v_cache, layer, seq_ids, pos, out, probs_out, record, bias):
    """Attention of token i's query heads that share kv head kv (grouped-query: H / KV of them, heads
    kv * G .. kv * G + G - 1), job = i * KV + kv. The caches: every layer's, this one `layer`."""
    KV = k_cache.shape[2]
    i = job // KV
    _attend_heads(i, job % KV, 0, q.shape[1] // KV, q, cos, sin, k_cache, v_cache, layer, seq_ids, pos,
                  out, probs_out, record, bias, _scratch(q, k_cache, pos[i] + 1))


@numba.njit(error_model="numpy")
def _scratch(q, k_cache, T):
    """The working arrays of _attend_heads for queries of up to T positions: (rotated queries (G, D),
    scores then probabilities (G, key blocks * BLOCK), weighted values (G, D)), G the query heads per kv
    head. The one-call forward's attention (attend_heads_range) makes them once per call, not per job:
    a decode step of 8 tokens is 720 jobs, and their 2160 small allocations took ~30% of its attention's
    time (docs/performance.md). (The per-kernel entry points below still make them per job.)"""
    G, D = q.shape[1] // k_cache.shape[2], q.shape[2]
    return (np.empty((G, D), np.float32), np.empty((G, key_blocks(T) * BLOCK), np.float32),
            np.empty((G, D), np.float32))


@numba.njit(error_model="numpy")
def _attend_heads(i, kv, g0, g1, q, cos, sin, k_cache, v_cache, layer, seq_ids, pos, out, probs_out, record, bias,
                  scratch):
    """Attention of token i's query heads kv * G + g for g0 <= g < g1 (some or all of the G heads that
    share kv head kv). Each head's arithmetic is its own (the heads only share the reading of the
    keys and values), so it does not depend on which others are computed with it. scratch: _scratch's
    arrays for at least token i's positions."""
    n, H, D = q.shape
    KV = k_cache.shape[2]
    G, count = H // KV, g1 - g0
    first = kv * G + g0                                          # the first head computed
    seq, T = seq_ids[i], pos[i] + 1
    qr, scores, acc = scratch                                    # rotated queries; scores, then probabilities
    for g in range(count):
        for j in range(D // 2):
            d0, d1 = _pair(cos, D, j)
            qr[g, d0], qr[g, d1] = _rotate(q, i, first + g, cos, sin, j)
    _scores(qr, count, k_cache, layer, seq, kv, T, scores)
    for g in range(count):
        _softmax(k_cache, scores, g, T, np.float32(math.sqrt(np.float32(D))), bias)
    _weighted_values(scores, count, v_cache, layer, seq, kv, T, acc)
    for g in range(count):
        for d in range(D):
            out[i, first + g, d] = acc[g, d]
        if record:
            for t in range(T):
                probs_out[i, first + g, t] = scores[g, t]


@numba.njit(error_model="numpy")
def attend_heads_range(start, stop, q, cos, sin, k_cache, v_cache, layer, seq_ids, pos, out):
    """Attention of the query heads start .. stop - 1 of the batch, counted token by token (head f is
    token f // H's head f % H), a group sharing a kv head at a time. (The one-call forward gives each
    thread an even share of the heads: one decode token has 3 kv heads in SmolLM2, which two threads
    would share 2 to 1, but 9 query heads, shared 5 to 4.)"""
    H, KV = q.shape[1], k_cache.shape[2]
    G = H // KV
    no_probs, no_bias = np.empty((1, 1, 1), np.float32), np.empty(0, np.float32)
    longest = 0
    for f in range(start, stop):
        longest = max(longest, pos[f // H] + 1)
    scratch = _scratch(q, k_cache, longest)
    f = start
    while f < stop:
        i, h = f // H, f % H
        kv, g0 = h // G, h % G
        g1 = min(G, g0 + stop - f)
        _attend_heads(i, kv, g0, g1, q, cos, sin, k_cache, v_cache, layer, seq_ids, pos, out, no_probs, False, no_bias,
                      scratch)
        f += g1 - g0


@numba.njit(inline="always")
def attend_jobs(q, k_cache):
    """How many _attend jobs a batch of queries q (n, H, D) makes: one per (token, kv head) (k_cache:
    every layer's)."""
    return q.shape[0] * k_cache.shape[2]


@numba.njit(error_model="numpy", cache=True)
def rope(x, cos, sin, out):
    """out[i, h] = x[i, h] rotated by token i's angles (model.apply_rope's arithmetic, as a loop: the
    numpy statement makes four temporaries the size of x).   x, out: (n, heads, D); cos, sin: (n, D/2),
    or (n, D) for Hugging Face's pair layout (_pair)"""
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            for j in range(x.shape[2] // 2):
                d0, d1 = _pair(cos, x.shape[2], j)
                out[i, h, d0], out[i, h, d1] = _rotate(x, i, h, cos, sin, j)


@numba.njit(error_model="numpy", cache=True)
def store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos):
    """Rotate the batch's keys and write keys and values into one layer's cache (`_store`), on its own."""
    _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)


# Two entry points, the same arithmetic. The prefill runs between OpenBLAS's matrix products, whose
# threads spin for a while after each call and keep the other core busy: a parallel region there
# waits for them (see matvec.py), so the prefill attends on one thread. The decode step runs only
# numba kernels, so its attention takes both threads, one (token, kv head) job per task.
# (Two functions rather than one compiled twice: numba's cache would give both the same entry.)

@numba.njit(error_model="numpy", cache=True)
def attention(q, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias):
    """Rotate this batch's queries and keys, store its keys and values, attend.

    q: (n, H, D) queries and k, v: (n, KV, D) keys and values of the batch's tokens, before RoPE;
    cos, sin: (n, D/2) the rotation angles of each token's position (one per pair; (n, D) for
    Hugging Face's pair layout, see _pair);
    k_cache: (n_seqs, KV, blocks, D, BLOCK) keys, block b holding positions b*BLOCK onwards,
    transposed; v_cache: (n_seqs, KV, S, D) values (one layer's caches; float32, or uint16 for a
    half-precision cache);
    seq_ids, pos: (n,) int64; out: (n, H, D) written; probs_out: (n, H, T_max), written if record;
    bias: (S,) float32 added to the scaled scores of key positions 0..S-1, the same for every
    sequence and head of the batch (attention emphasis, llamarun/inspect/emphasis.py), or empty.
    Token i attends to positions 0..pos[i] of cache slot seq_ids[i] (its own key included).
    """
    _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)
    k_all, v_all = k_cache[None], v_cache[None]         # the layer-indexed form the helpers take
    for job in range(attend_jobs(q, k_all)):
        _attend(job, q, cos, sin, k_all, v_all, 0, seq_ids, pos, out, probs_out, record, bias)


@numba.njit(error_model="numpy", parallel=True, cache=True)
def attention_parallel(q, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs_out, record, bias):
    """`attention` with the (token, kv head) jobs shared among numba's threads."""
    _store(k, v, cos, sin, k_cache, v_cache, seq_ids, pos)
    k_all, v_all = k_cache[None], v_cache[None]
    for job in numba.prange(attend_jobs(q, k_all)):
        _attend(job, q, cos, sin, k_all, v_all, 0, seq_ids, pos, out, probs_out, record, bias)
