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
  memory, a block's 32 in one or two SIMD registers, with no remainder loop (the block is padded;
  scores past the last position are computed and ignored). A block of keys is contiguous (8 KB at
  head_dim 64), so a decode step reads the keys as a few sequential streams, and a fresh cache only
  touches the pages of the blocks in use.
- The partial sums stay in vector registers for a whole sum (see "scores and weighted values"
  below): written in LLVM IR, as numba's loops sent them to memory and back every few terms.
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
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import cpu
from .ggml import _splat, exp_fast
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


# ----------------------------------------------------------------------------------------------
# scores and weighted values, their sums kept in vector registers
#
# Each score is a sum over d = 0..D-1 and each weighted value a sum over t = 0..T-1, added in that
# order in float32: on a float32 cache a multiply and then an add per term (run.c's arithmetic), on a
# half one a fused multiply-add (the fast path's: llama.cpp's f16 dot products fuse theirs; half the
# operations: a 512-token prompt's attention ~10% faster, that of 8 decode rows ~25%,
# docs/performance.md). The loops below keep those orders; what they change is where the partial sums
# live. Written as numba loops, the partial sums of a block of positions went to memory and back every
# few terms and each key was widened again for every head of its group: a decode step of 8 tokens
# spent a fifth of its time in attention, at under a tenth of the core's multiply-add rate. Here the
# sums of up to HEADS heads (and, for one head, two key blocks) are vectors that stay in registers for
# the whole sum, each key or value row is loaded and widened once for all the heads reading it, and
# the many independent sums hide the latency of each add. The results are the same, bit for bit, as
# the plain loops' (tests/test_attention.py checks them against scalar loops in the same order).

HEADS = 4 if cpu.AVX512 else 2     # heads summed at once: as many vectors as the registers hold
VALUE_LANES = 64 if cpu.AVX512 else 32   # a value row's columns summed at once


def _cache_row(builder, cache_type, pointer, lanes):
    """<lanes x float> of the cache's elements at `pointer` (float32, or half bits widened: exact)."""
    if cache_type.dtype == types.uint16:
        bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), lanes).as_pointer()), align=2)
        return half_to_float(builder, bits)
    return builder.load(builder.bitcast(pointer, ir.VectorType(ir.FloatType(), lanes).as_pointer()), align=4)


def _sums_loop(builder, count, n_sums, lanes, step):
    """Run `step(builder, i, sums) -> sums` for i = 0..count-1 over n_sums <lanes x float> sums that
    start at zero (allocas LLVM keeps in registers); -> the final sums."""
    vector_type = ir.VectorType(ir.FloatType(), lanes)
    slots = [cgutils.alloca_once(builder, vector_type) for _ in range(n_sums)]
    for slot in slots:
        builder.store(ir.Constant(vector_type, [0.0] * lanes), slot)
    with cgutils.for_range(builder, count) as loop:
        sums = step(builder, loop.index, [builder.load(slot) for slot in slots])
        for slot, value in zip(slots, sums):
            builder.store(value, slot)
    return [builder.load(slot) for slot in slots]


@intrinsic
def _term(typingctx, cache, a, b, acc):
    """acc + a * b for float32 scalars, as _multiply_add adds a term for this cache's element type."""
    if not (isinstance(cache, types.Array) and a == b == acc == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return _multiply_add(builder, sig.args[0], *args[1:])
    return types.float32(cache, a, b, acc), codegen


def _multiply_add(builder, cache_type, a, b, acc):
    """acc + a * b for one term of a score or weighted value: a float32 multiply then a float32 add
    (run.c's) on a float32 cache; one fused multiply-add (llama.cpp's kind: its f16 dot products are
    fused) on a half one, the fast path. The same order of terms either way."""
    if cache_type.dtype == types.uint16:
        name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
        return builder.call(fma, [a, b, acc])
    return builder.fadd(acc, builder.fmul(a, b))


def _store_vector(builder, pointer, value):
    builder.store(value, builder.bitcast(pointer, value.type.as_pointer()), align=4)


@intrinsic
def _block_scores(typingctx, heads, blocks, qr, q0, keys, k0, D, scores, s0, stride):
    """scores[s0 + g * stride + t] = qr[q0 + g * D + :] . key t, for g < heads, t < blocks * BLOCK: the
    keys of `blocks` consecutive blocks, the first at flat element k0 of `keys` (a block: (D, BLOCK)
    transposed keys), summed d = 0..D-1 in order. heads, blocks: literals (the number of sums, fixed
    at compile time). All offsets are flat element indices into C-contiguous arrays."""
    if not (isinstance(heads, types.IntegerLiteral) and isinstance(blocks, types.IntegerLiteral)):
        return None
    H, NB = heads.literal_value, blocks.literal_value

    def codegen(context, builder, sig, args):
        _, _, qr_, q0_, keys_, k0_, D_, scores_, s0_, stride_ = args
        qr_p = context.make_array(sig.args[2])(context, builder, value=qr_).data
        k_p = context.make_array(sig.args[4])(context, builder, value=keys_).data
        s_p = context.make_array(sig.args[7])(context, builder, value=scores_).data
        block_elements = builder.mul(D_, ir.Constant(ir.IntType(64), BLOCK))

        def step(builder, d, sums):
            rows = [_cache_row(builder, sig.args[4], builder.gep(k_p, [builder.add(
                        builder.add(k0_, builder.mul(ir.Constant(ir.IntType(64), b), block_elements)),
                        builder.mul(d, ir.Constant(ir.IntType(64), BLOCK)))]), BLOCK) for b in range(NB)]
            out = []
            for g in range(H):
                qv = builder.load(builder.gep(qr_p, [builder.add(builder.add(q0_, builder.mul(ir.Constant(ir.IntType(64), g), D_)), d)]))
                qs = _splat(builder, qv, BLOCK)
                for b in range(NB):
                    out.append(_multiply_add(builder, sig.args[4], qs, rows[b], sums[g * NB + b]))
            return out
        sums = _sums_loop(builder, D_, H * NB, BLOCK, step)
        for g in range(H):
            for b in range(NB):
                offset = builder.add(builder.add(s0_, builder.mul(ir.Constant(ir.IntType(64), g), stride_)),
                                     ir.Constant(ir.IntType(64), b * BLOCK))
                _store_vector(builder, builder.gep(s_p, [offset]), sums[g * NB + b])
        return context.get_dummy_value()
    return types.void(heads, blocks, qr, types.int64, keys, types.int64, types.int64, scores, types.int64,
                      types.int64), codegen


@intrinsic
def _rows_weighted(typingctx, heads, lanes, probs, p0, pstride, values, v0, vstride, T, acc, a0, astride):
    """acc[a0 + g * astride + c] = sum over t < T, in order, of probs[p0 + g * pstride + t] *
    values[v0 + t * vstride + c], for g < heads, c < lanes (heads, lanes: literals). Flat element
    offsets into C-contiguous arrays; values float32 or half bits."""
    if not (isinstance(heads, types.IntegerLiteral) and isinstance(lanes, types.IntegerLiteral)):
        return None
    H, L = heads.literal_value, lanes.literal_value

    def codegen(context, builder, sig, args):
        _, _, probs_, p0_, pstride_, values_, v0_, vstride_, T_, acc_, a0_, astride_ = args
        p_p = context.make_array(sig.args[2])(context, builder, value=probs_).data
        v_p = context.make_array(sig.args[5])(context, builder, value=values_).data
        a_p = context.make_array(sig.args[9])(context, builder, value=acc_).data
        i64 = ir.IntType(64)

        def step(builder, t, sums):
            row = _cache_row(builder, sig.args[5], builder.gep(v_p, [builder.add(v0_, builder.mul(t, vstride_))]), L)
            out = []
            for g in range(H):
                pv = builder.load(builder.gep(p_p, [builder.add(builder.add(p0_, builder.mul(ir.Constant(i64, g), pstride_)), t)]))
                out.append(_multiply_add(builder, sig.args[5], _splat(builder, pv, L), row, sums[g]))
            return out
        sums = _sums_loop(builder, T_, H, L, step)
        for g in range(H):
            offset = builder.add(a0_, builder.mul(ir.Constant(i64, g), astride_))
            _store_vector(builder, builder.gep(a_p, [offset]), sums[g])
        return context.get_dummy_value()
    return types.void(heads, lanes, probs, types.int64, types.int64, values, types.int64, types.int64, types.int64,
                      acc, types.int64, types.int64), codegen


@numba.njit(inline="always")
def _block_scores_of(count, qr, g, k_cache, k0, D, scores, t0):
    """_block_scores for heads g .. g + count - 1 (count <= HEADS) of one key block (two for one head)."""
    stride = scores.shape[1]
    if count >= 4 and HEADS >= 4:
        _block_scores(4, 1, qr, g * D, k_cache, k0, D, scores, g * stride + t0, stride)
    elif count == 3 and HEADS >= 3:
        _block_scores(3, 1, qr, g * D, k_cache, k0, D, scores, g * stride + t0, stride)
    elif count >= 2:
        _block_scores(2, 1, qr, g * D, k_cache, k0, D, scores, g * stride + t0, stride)
    else:
        _block_scores(1, 1, qr, g * D, k_cache, k0, D, scores, g * stride + t0, stride)


@numba.njit(error_model="numpy")
def _scores(qr, G, k_cache, layer, seq, kv, T, scores):
    """scores[g, t] = qr[g] . (key t of sequence seq's kv head kv) for t < T (and up to the end of the
    last block), for the queries g < G, each summed over d in order (see _block_scores).

    qr: (>= G, D) the rotated queries of the heads that share this kv head; k_cache: (n_layers, n_seqs,
    KV, blocks, D, BLOCK), layer `layer` read in place; scores: (>= G, >= blocks * BLOCK).
    """
    D = qr.shape[1]
    _, S, KVH, NBL, _, B = k_cache.shape
    n_blocks = (T + B - 1) // B
    base = (((layer * S + seq) * KVH + kv) * NBL) * D * B       # block 0's first key, flat
    stride = scores.shape[1]
    g = 0
    while g < G:
        count = min(G - g, HEADS)
        b = 0
        if count == 1:          # one head: two blocks at a time, four sums in flight
            while b + 2 <= n_blocks:
                _block_scores(1, 2, qr, g * D, k_cache, base + b * D * B, D, scores, g * stride + b * B, stride)
                b += 2
        while b < n_blocks:
            _block_scores_of(count, qr, g, k_cache, base + b * D * B, D, scores, b * B)
            b += 1
        g += count


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
    # the maximum in eight running maxima (a maximum is the same in any order), not one: a chain of
    # dependent compares per score was a large part of a long prompt's attention
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = scores[g, 0]
    t = 0
    while t + 8 <= T:
        m0 = max(m0, scores[g, t])
        m1 = max(m1, scores[g, t + 1])
        m2 = max(m2, scores[g, t + 2])
        m3 = max(m3, scores[g, t + 3])
        m4 = max(m4, scores[g, t + 4])
        m5 = max(m5, scores[g, t + 5])
        m6 = max(m6, scores[g, t + 6])
        m7 = max(m7, scores[g, t + 7])
        t += 8
    best = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while t < T:
        best = max(best, scores[g, t])
        t += 1
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
    lanes): the exps by exp_fast, in a loop that vectorizes, and their sum in eight lanes. The
    attention of a half-precision cache (the fast path); at 1024 positions the libm expf of the exact
    softmax was a quarter of SmolLM2's attention time."""
    best = _scaled_max(scores, g, T, scale, bias)
    for t in range(T):
        scores[g, t] = exp_fast(scores[g, t] - best)
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


@numba.njit(inline="always")
def _rows_weighted_of(count, lanes, probs, g, v_cache, v0, D, T, acc, c):
    """_rows_weighted for heads g .. g + count - 1 (count <= HEADS), columns c .. c + lanes - 1."""
    ps, a_s = probs.shape[1], acc.shape[1]
    if count >= 4 and HEADS >= 4:
        _rows_weighted(4, lanes, probs, g * ps, ps, v_cache, v0 + c, D, T, acc, g * a_s + c, a_s)
    elif count == 3 and HEADS >= 3:
        _rows_weighted(3, lanes, probs, g * ps, ps, v_cache, v0 + c, D, T, acc, g * a_s + c, a_s)
    elif count >= 2:
        _rows_weighted(2, lanes, probs, g * ps, ps, v_cache, v0 + c, D, T, acc, g * a_s + c, a_s)
    else:
        _rows_weighted(1, lanes, probs, g * ps, ps, v_cache, v0 + c, D, T, acc, g * a_s + c, a_s)


@numba.njit(error_model="numpy")
def _weighted_values(probs, G, v_cache, layer, seq, kv, T, acc):
    """acc[g, d] = sum over t < T of probs[g, t] * values[t, d] for g < G, each accumulated over t in
    order, values = layer `layer`, sequence seq, kv head kv of v_cache (n_layers, n_seqs, KV, S, D),
    in place.

    probs: (>= G, >= T) the probabilities of each head of the group; acc: (>= G, D). Columns in
    vectors of VALUE_LANES (then 32, 16: head sizes are multiples of 16), the rest one at a time.
    """
    D = acc.shape[1]
    _, S, KVH, SL, _ = v_cache.shape
    v0 = ((layer * S + seq) * KVH + kv) * SL * D                # value row 0, flat
    g = 0
    while g < G:
        count = min(G - g, HEADS)
        c = 0
        while c + VALUE_LANES <= D:
            _rows_weighted_of(count, VALUE_LANES, probs, g, v_cache, v0, D, T, acc, c)
            c += VALUE_LANES
        while c + 32 <= D:
            _rows_weighted_of(count, 32, probs, g, v_cache, v0, D, T, acc, c)
            c += 32
        while c + 16 <= D:
            _rows_weighted_of(count, 16, probs, g, v_cache, v0, D, T, acc, c)
            c += 16
        for h in range(g, g + count):
            for d in range(c, D):
                a = np.float32(0.0)
                for t in range(T):
                    a = _term(v_cache, probs[h, t], _widen(v_cache[layer, seq, kv, t, d]), a)
                acc[h, d] = a
        g += count


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
