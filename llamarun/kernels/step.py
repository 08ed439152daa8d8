"""A whole forward pass of a decode-sized batch as one compiled function, on one parallel region.

Why: the kernels of a decode step are short. SmolLM2's step is 30 layers of six kernel calls (norm,
q/k/v, attention, wo, gate/up, down), tens of microseconds each; from Python every call pays its
dispatch and a start and join of numba's thread pool, a cost of the same order as a small product.
Here the threads are started once per step and walk the layers together, each taking its share of
every product, and meet at a barrier where the next product needs the whole of the last one
(llama.cpp's graph compute does the same with its own thread pool); a decode step as one call is
markedly faster than layer by layer (docs/performance.md). Per layer:

    every thread: h = rmsnorm(x), quantized to int8 blocks (its own copy: cheaper than a barrier)
    rows of wq | wk | wv split among the threads                           -> q, k, v      barrier
    (token, kv head) pairs split: rotate k (RoPE), write k and v to the cache             barrier
    (token, kv head) jobs split: attention                                 -> a            barrier
    every thread: quantize a; rows of wo split: x[:, o] += (a @ wo.T)[:, o]                barrier
    every thread: h = rmsnorm(x), quantized; rows of w1 and w3 split: g = silu(h w1) (h w3) barrier
    every thread: quantize g; rows of w2 split: x[:, o] += (g @ w2.T)[:, o]                barrier

and at the end: rmsnorm of the rows whose logits are wanted, rows of the classifier split. Rows of
the ggml matrices are split in whole groups of ROW_GROUP (the kernels take 8 weight rows at once, 16 with AVX512-VNNI).
`forward_fast_for(kinds)` takes ggml weights (int8 activations, the fast path); `forward_int8` llama2.c's int8
groups (runq.c's arithmetic); `forward_f32` float32 weights (run.c's).

No array views in the loops over rows: a view made in compiled code counts a reference to its
array, an atomic add on memory that both threads share; one per weight row made the two-thread
step slower than one thread. The kernels take (matrix, row index) instead.
Every value is computed by the same functions and in the same order as the one-call-per-kernel
path (Transformer.forward on the kernels), so the two agree bit for bit (tests/test_step.py).

The barrier is a counter and a generation number, both atomic: the last thread to arrive resets
the counter and bumps the generation, the others spin on the generation (with x86's `pause`; plainly
on other CPUs), and after SPINS rounds yield the core (sched_yield) at every round: on a busy 2-core
machine the thread being waited for may have lost its core, and spinning on would keep it from
getting it back.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.typed import List

from . import cpu, int8, matvec
from .attention import _store_pairs, attend_heads_range, attend_jobs
from .ggml import (PREFETCH_BYTES, ROW_GROUP, _quantized, _task_rows, gate, group_range, prefetch_bytes, products,
                   quantize_into)
from .norm import rmsnorm, rmsnorm_layer

SPINS = 20000   # pauses (~ 40 ns each) before a waiting thread starts yielding its core


# ----------------------------------------------------------------------------------------------
# the barrier

def _element_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, value=array).data
    return builder.gep(data, [index])


@intrinsic
def _atomic_add(typingctx, array, index, value):
    """array[index] += value as one atomic (sequentially consistent) operation; returns the old value."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, value, "seq_cst")
    return types.int64(array, index, value), codegen


@intrinsic
def _atomic_load(typingctx, array, index):
    """array[index], read atomically (never cached in a register across a spin loop)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_element_pointer(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
    return types.int64(array, index), codegen


def _void_call(name, return_type=ir.VoidType()):
    @intrinsic
    def call(typingctx):
        def codegen(context, builder, sig, args):
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, []), name), [])
            return context.get_dummy_value()
        return types.void(), codegen
    return call


if cpu.X86:
    _pause = _void_call("llvm.x86.sse2.pause")                 # a spin-wait hint to the CPU (SSE2: every x86-64)
else:
    @numba.njit(inline="always")
    def _pause():
        """No hint elsewhere: the loop spins plain (it yields its core after SPINS rounds anyway)."""
_yield = _void_call("sched_yield", ir.IntType(32))              # libc: give the core to another thread


@numba.njit(inline="always")
def barrier(state, n_threads):
    """Wait until all n_threads threads have arrived. state: int64 [count, generation], zeros at first."""
    generation = _atomic_load(state, 1)
    if _atomic_add(state, 0, 1) == n_threads - 1:
        state[0] = 0
        _atomic_add(state, 1, 1)
    else:
        spins = 0
        while _atomic_load(state, 1) == generation:
            spins += 1
            if spins < SPINS:
                _pause()
            else:
                _yield()


@numba.njit(cache=True)
def typed_list(arrays):
    """A numba typed List of the arrays of a tuple (all of one type), as the forward functions take
    each matrix's layers. Built here, in compiled and cached code: `numba.typed.List(...)` called from
    Python compiles the list's methods in every new process, which cost peak memory and cold-start
    time (docs/performance.md)."""
    out = List()
    for a in arrays:
        out.append(a)
    return out


@numba.njit(parallel=True, cache=True)
def _touch(a):
    for i in numba.prange(a.shape[0]):
        a[i] = i


def threads_run_together() -> bool:
    """Whether numba's threading layer runs every iteration of a parallel loop of n_threads iterations
    at once, one per thread, as the barriers need: OpenMP and numba's workqueue do; TBB may run two
    iterations one after the other on one thread, and the first barrier would then wait forever."""
    _touch(np.zeros(2))                        # the layer is chosen at the first parallel call
    return numba.threading_layer() in ("omp", "workqueue")


# ----------------------------------------------------------------------------------------------
# the pieces of a layer, for thread t of n_threads

@numba.njit(inline="always")
def _attention(t, n_threads, state, q, k, v, cos, sin, k_cache, v_cache, layer, seq_ids, pos, out):
    """The attention of layer `layer`, this thread's share, from q, k, v (all complete: after a
    barrier) to out (complete after the last barrier here): keys and values into the caches (every
    layer's, indexed in place), then an even share of the batch's query heads, each as the attention
    kernel computes it (run.c's arithmetic on a float32 cache, llama.cpp's softmax on a half one)."""
    start, stop = _task_rows(t, n_threads, attend_jobs(q, k_cache))
    _store_pairs(start, stop, k, v, cos, sin, k_cache, v_cache, layer, seq_ids, pos)
    barrier(state, n_threads)
    start, stop = _task_rows(t, n_threads, q.shape[0] * q.shape[1])    # this thread's query heads
    attend_heads_range(start, stop, q, cos, sin, k_cache, v_cache, layer, seq_ids, pos, out)
    barrier(state, n_threads)


@numba.njit(inline="always")
def _sizes(x, cos, k_cache, n_heads):
    """(tokens n, dim, heads H, kv heads KV, head_dim D) of a batch x (n, dim) and the caches."""
    return x.shape[0], x.shape[1], n_heads, k_cache.shape[2], k_cache.shape[4]


@numba.njit(inline="always")
def _shared_arrays(n, H, KV, D, hidden):
    """The arrays the threads write their shares of, for a batch of n tokens: q (n, H * D), k and v
    (n, KV * D), the attention's output a (n, H * D) as the products read and write them, the same
    four by head (n, heads, D) as attention reads them (views made once per step: see the module
    doc), the FFN's gate and up projections g and up (n, hidden), g then the gated units; and the
    barrier's state."""
    q, k, v, a = (np.empty((n, H * D), np.float32), np.empty((n, KV * D), np.float32),
                  np.empty((n, KV * D), np.float32), np.empty((n, H * D), np.float32))
    return (q, k, v, a, q.reshape((n, H, D)), k.reshape((n, KV, D)), v.reshape((n, KV, D)), a.reshape((n, H, D)),
            np.empty((n, hidden), np.float32), np.empty((n, hidden), np.float32), np.zeros(2, np.int64))


# A product's code is long: the group kernels of every ggml type the fast path takes (nine
# intrinsics, and the k-quant rows), inlined. LLVM's time grows faster than a function's size, and
# with each of a layer's seven products and the classifier at a call site of its own, forward_fast
# took minutes to compile. So a layer's seven products share one call site, in a loop over them
# (LAYER_COLUMN, LAYER_ADDS), and the classifier has the other: one site a layer rather than four
# (q/k/v, wo, gate/up, w2) compiled the tests' forward of every type in about a third of the time, and
# a decode step was as fast. (A product compiled as a function of its own, called rather than inlined,
# compiled faster still but made a decode step slower; figures in docs/performance.md.) forward_int8 and
# forward_f32 walk their layers the same way, for the same reason: each compiled in about half the time.

# Why each one-call forward sets a product's input (xq ... in forward_fast) before its layer loop, though
# the first product sets it again: a variable first set in some branches of the parallel loop's body
# looks to numba as if it came from outside the body, a parameter of the loop, and numba then searches
# the body for reductions into it, deep-copying each statement that sets it with the whole function's
# variable table. Set before the loop, it is the body's own, and forward_fast compiles faster
# (docs/performance.md, 2026-12-07). (_BODY_LOCALS is this comment's name.)

@numba.njit(inline="always")
def _product(kinds, t, n_threads, qt, raw, xq, xd, xsum, xs, out, block, add):
    """This thread's share of W's rows (whole groups of ROW_GROUP) of (quantized activations) @ W.T,
    put into out, or with `add` added to it (the residual stream). (Each matrix is split between the
    threads on its own: a tuple of matrices indexed per row would count a reference to the shared
    matrix per row, see the module doc.)"""
    start, stop = group_range(t, n_threads, raw.shape[0])
    products(kinds, qt, raw, start, stop, xq, xd, xsum, xs, out, block, add)


# a layer's products in the order the one-call forwards compute them (wq, wk, wv, wo, w1, w3, w2): the
# column of each in qts (wq, wk, wv, wo, w1, w2, w3), and whether its output is added to where it goes
# (wo's and w2's, to the residual stream x) rather than stored (the rest; w1's into g and w3's into up,
# which the gate then turns into silu(g) * up on this thread's units of both: no barrier between)
LAYER_COLUMN = (0, 1, 2, 3, 4, 6, 5)
LAYER_ADDS = (False, False, False, True, False, False, True)

_forward_fast = {}     # (kinds, output_kinds) -> forward_fast compiled for them


def forward_fast_for(kinds: int, output_kinds: int):
    """forward_fast for models whose layers' matrices are of the ggml types in `kinds` and whose
    classifier is of one in `output_kinds` (ggml.kinds_of): the group kernels of the other types are
    left out of its code (pruned before typing, as both are constants of the closure), and so out of
    its compile. One function per pair, each cached on disk (numba keys a closure's cache entries by
    the values it closes over)."""
    if (kinds, output_kinds) not in _forward_fast:
        from . import kernel_cache
        with kernel_cache():
            compiled = numba.njit(parallel=True, nogil=True, cache=True)(_forward_fast_closure(kinds, output_kinds))
        _forward_fast[kinds, output_kinds] = compiled
    return _forward_fast[kinds, output_kinds]


def _forward_fast_closure(kinds, output_kinds):
    def forward_fast(x, qts, wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm, norm, output_qt, output,
                     eps, cos, sin, k_cache, v_cache, seq_ids, pos, wanted, n_heads, logits, n_threads):
        """The forward pass of a batch of n tokens on the fast path (int8 activations, ggml weights).

        x: (n, dim) float32, the tokens' embeddings, updated in place into the last residual stream;
        qts: (n_layers, 7) the ggml types of wq, wk, wv, wo, w1, w2, w3; those seven: typed lists of
        each layer's raw matrix (out_features, row bytes) uint8; attention_norm, ffn_norm: (n_layers,
        dim) float32; norm: (dim,); output: the classifier's raw matrix, of type output_qt;
        cos, sin: (n, head_dim / 2) the tokens' rotations ((n, head_dim): Hugging Face's pairs, attention._pair); k_cache, v_cache: KVCache.k / .v (all layers);
        seq_ids, pos: (n,) int64; wanted: the indices of the tokens whose logits are computed;
        logits: (len(wanted), vocab) float32, written; n_threads: numba.get_num_threads() of the caller
        (one iteration of the parallel loop per thread: the barriers need them all running at once;
        asked by the caller, as numba's get_num_threads in compiled code makes the function uncacheable).
        """
        n, dim, H, KV, D = _sizes(x, cos, k_cache, n_heads)
        n_layers = qts.shape[0]
        hidden = w1[0].shape[0]
        q, k, v, a, qh, kh, vh, ah, g, up, state = _shared_arrays(n, H, KV, D, hidden)
        matrices, outputs = (wq, wk, wv, wo, w1, w3, w2), (q, k, v, x, g, up, x)
        for t in numba.prange(n_threads):
            # this thread's scratch: the normalized x and every product's quantized input
            h = np.empty((n, dim), np.float32)
            hq, hd, hsum, hs = (np.empty((n, dim), np.int8), np.empty((n, dim // 32), np.float32),
                                np.empty((n, dim // 32), np.int32), np.empty((n, dim // 32), np.float32))
            aq, ad, asum, as_ = (np.empty((n, H * D), np.int8), np.empty((n, H * D // 32), np.float32),
                                 np.empty((n, H * D // 32), np.int32), np.empty((n, H * D // 32), np.float32))
            gq, gd, gsum, gs = (np.empty((n, hidden), np.int8), np.empty((n, hidden // 32), np.float32),
                                np.empty((n, hidden // 32), np.int32), np.empty((n, hidden // 32), np.float32))
            block = np.empty((n, ROW_GROUP), np.float32)
            xq, xd, xsum, xs = hq, hd, hsum, hs             # each product's input (see _BODY_LOCALS)
            for layer in range(n_layers):
                # the layer's seven products at one call site (see _product): before the first product of
                # each input, that input, normalized or attended and quantized; a barrier where the next
                # step needs the whole of the last product
                for m in range(7):
                    if m == 0 or m == 4:                    # q, k, v; then the FFN's gate and up
                        rmsnorm_layer(x, attention_norm if m == 0 else ffn_norm, layer, eps, h, True)
                        quantize_into(h, hq, hd, hsum, hs)
                        xq, xd, xsum, xs = hq, hd, hsum, hs
                    elif m == 3:                            # wo, of the attention of q, k, v
                        _attention(t, n_threads, state, qh, kh, vh, cos, sin, k_cache, v_cache, layer, seq_ids, pos, ah)
                        quantize_into(a, aq, ad, asum, as_)
                        xq, xd, xsum, xs = aq, ad, asum, as_
                    elif m == 6:                            # w2, of the gated units
                        quantize_into(g, gq, gd, gsum, gs)
                        xq, xd, xsum, xs = gq, gd, gsum, gs
                    _product(kinds, t, n_threads, qts[layer, LAYER_COLUMN[m]], matrices[m][layer], xq, xd, xsum, xs,
                             outputs[m], block, LAYER_ADDS[m])
                    if m == 5:                              # the gate, on this thread's units of w1 and w3
                        start, stop = group_range(t, n_threads, hidden)
                        gate(g, up, start, stop, True)
                    if m == 2 or m == 3 or m == 5 or m == 6:
                        barrier(state, n_threads)

            # the classifier, for the wanted tokens
            m = wanted.shape[0]
            hw = _normalized_rows(x, wanted, norm, eps, True)
            wq_, wd_, wsum_, ws_ = _quantized(hw)
            _product(output_kinds, t, n_threads, output_qt, output, wq_, wd_, wsum_, ws_, logits, np.empty((m, ROW_GROUP), np.float32), False)
    return forward_fast


# Greedy steps: a one-call forward may run several decode steps of one sequence, each step's token the
# argmax of the logits before it, with no return to Python between them. Why: between two calls a
# decode step pays Python's own work (the batch, the call, the argmax, the sampler), and pays it in
# cache misses, as the step's weight stream has left none of the interpreter's data in the caches;
# a step after the first also starts on cold caches. On s110M that was ~4% of a step, as many tokens
# in one call ran 1.04x the rate of one call a token (median of 10 rounds; docs/performance.md,
# 2026-12-07). The generation loop asks for them where its draw is the argmax (generation.py), and
# checks every step's logits as it checks a draft's. (GREEDY_STEPS is this comment's name.)

@numba.njit(inline="always")
def _argmax(row):
    """The first index of the largest value of row (np.argmax's, but for NaN, which it never picks)."""
    best, at = row[0], 0
    for i in range(1, row.shape[0]):
        if row[i] > best:
            best, at = row[i], i
    return at


@numba.njit(inline="always")
def _next_greedy(t, n_threads, state, logits, tokens, step, ends, ran):
    """After step `step`'s logits (1, vocab) are written by every thread: the next step's token, their
    argmax, into tokens[step + 1] (every thread finds the same one). -> whether it is one of `ends`
    (the last step then), counting the steps run in ran[0]."""
    barrier(state, n_threads)
    token = _argmax(logits[0])
    end = False
    for e in ends:
        end = end or token == e
    if t == 0:
        tokens[step + 1] = token
        ran[0] = step + 1 if end else step + 2
    return end


@numba.njit(inline="always")
def _normalized_rows(x, wanted, norm, eps, fast):
    """rmsnorm (llama.cpp's where fast, else run.c's) of the rows `wanted` of x (the tokens whose logits
    are computed).   -> (len(wanted), dim)"""
    xw = np.empty((wanted.shape[0], x.shape[1]), np.float32)
    for r in range(wanted.shape[0]):
        for i in range(x.shape[1]):
            xw[r, i] = x[wanted[r], i]
    out = np.empty(xw.shape, np.float32)
    rmsnorm(xw, norm, eps, out, fast)
    return out


# ----------------------------------------------------------------------------------------------
# llama2.c's int8 groups (version-2 checkpoints): the same walk, runq.c's products (kernels/int8.py)

@numba.njit(inline="always")
def _int8_rows(t, n_threads, w, ws, layout, layer, xq, xs, gs, out, add):
    """This thread's share of the rows of one layer's matrix times every row of the quantized x (xq (n,
    in), xs (n, G)): out[j, o] = the product, or out[j, o] += it when `add` (the residual stream).

    w, ws: the matrix's int8 values and group scales as flat arrays over every layer; layout: (stride
    of a layer in w, the same in ws, rows, in) (see CompiledForward: a v2 file keeps each layer's
    scales after its values, so the layers are not one contiguous array). Flat indexing throughout:
    no views (int8.row_at)."""
    w_layer, s_layer, rows, n_in = layout[0], layout[1], layout[2], layout[3]
    groups = n_in // gs
    xqf, xsf = xq.reshape(-1), xs.reshape(-1)
    start, stop = _task_rows(t, n_threads, rows)
    for o in range(start, stop):
        p, q = layer * w_layer + o * n_in, layer * s_layer + o * groups
        prefetch_bytes(w, p + PREFETCH_BYTES, n_in)
        for j in range(out.shape[0]):
            value = int8.row_at(w, p, ws, q, xqf, j * n_in, xsf, j * groups, gs, groups)
            out[j, o] = out[j, o] + value if add else value


@numba.njit(parallel=True, nogil=True, cache=True)
def forward_int8(x, values, scales, layouts, gs, attention_norm, ffn_norm, norm, output, outputs, eps, cos, sin,
                 k_cache, v_cache, seq_ids, pos, wanted, n_heads, logits, n_threads):
    """forward_fast for llama2.c's int8 checkpoints: activations quantized per group of gs as runq.c
    quantizes them, runq.c's products; a layer's seven products at one call site, as forward_fast's.

    values, scales: typed lists of wq, wk, wv, wo, w1, w2, w3's int8 values and group scales, each a
    flat view over all layers as the file stores them; layouts: (7, 4) int64, per matrix (layer stride
    of its values, of its scales, rows, in); output, outputs: the classifier's values and scales,
    (vocab, dim) and (vocab, dim / gs), the same layout for one layer. The rest as forward_fast."""
    n, dim, H, KV, D = _sizes(x, cos, k_cache, n_heads)
    n_layers = attention_norm.shape[0]
    hidden = layouts[4, 2]
    q, k, v, a, qh, kh, vh, ah, g, up, state = _shared_arrays(n, H, KV, D, hidden)
    results = (q, k, v, x, g, up, x)            # where each product of LAYER_COLUMN's order goes
    output_layout = np.array([0, 0, output.shape[0], output.shape[1]], np.int64)
    for t in numba.prange(n_threads):
        h = np.empty((n, dim), np.float32)
        hq, hs = np.empty((n, dim), np.int8), np.empty((n, dim // gs), np.float32)
        aq, as_ = np.empty((n, H * D), np.int8), np.empty((n, H * D // gs), np.float32)
        gq, gs_ = np.empty((n, hidden), np.int8), np.empty((n, hidden // gs), np.float32)
        xq, xs = hq, hs                             # each product's input (see _BODY_LOCALS)
        for layer in range(n_layers):
            for m in range(7):                      # the walk of forward_fast's layer loop
                if m == 0 or m == 4:
                    rmsnorm_layer(x, attention_norm if m == 0 else ffn_norm, layer, eps, h, False)
                    int8.quantize(h, gs, hq, hs)
                    xq, xs = hq, hs
                elif m == 3:
                    _attention(t, n_threads, state, qh, kh, vh, cos, sin, k_cache, v_cache, layer, seq_ids, pos, ah)
                    int8.quantize(a, gs, aq, as_)
                    xq, xs = aq, as_
                elif m == 6:
                    int8.quantize(g, gs, gq, gs_)
                    xq, xs = gq, gs_
                c = LAYER_COLUMN[m]
                _int8_rows(t, n_threads, values[c], scales[c], layouts[c], layer, xq, xs, gs, results[m], LAYER_ADDS[m])
                if m == 5:                          # the gate, on this thread's units of w1 and w3
                    start, stop = _task_rows(t, n_threads, hidden)
                    gate(g, up, start, stop, False)
                if m == 2 or m == 3 or m == 5 or m == 6:
                    barrier(state, n_threads)

        m = wanted.shape[0]
        hw = _normalized_rows(x, wanted, norm, eps, False)
        oq, os_ = np.empty((m, dim), np.int8), np.empty((m, dim // gs), np.float32)
        int8.quantize(hw, gs, oq, os_)
        _int8_rows(t, n_threads, output.reshape(-1), outputs.reshape(-1), output_layout, 0, oq, os_, gs, logits, False)


# ----------------------------------------------------------------------------------------------
# float32 weights (llama2.c's version 0 and 1, float32 GGUF or safetensors): the same walk, the
# matrix-vector kernels' products (kernels/matvec.py), activations in float32

# How the threads share a float32 product's rows: each thread owns an even share of the product's pieces
# (PIECE_ROWS rows each) and claims them front to back, half of what it has left at a time; a thread done
# with its own takes the pieces nobody has claimed yet from the back of another's share, one at a time.
# Why: the threads meet at a barrier after most products, and on a shared machine one of them streams
# its rows slower for a while (its core or its memory bandwidth taken by others), so with fixed shares the
# other waits (s110M's barrier waits were 2-5% of a decode step in a timestamped copy). And why this way
# round: every new stream of rows costs its first lines' latency before the CPU's prefetcher follows it
# (kernels/matvec.py), so a thread's own pieces are one stream, front to back, and only a thread that is
# ahead starts new ones. Measured on s110M's decode with the variants' steps alternated in one process
# (docs/performance.md, 2026-12-07 04:45): 1.003-1.035x the way before (medians of eleven runs, pieces of 8
# to 64 rows), where the last 1/16 of the rows went in pieces of 16 to whichever thread was free (fixed even
# shares were 0.96x of that, and the last half in pieces 0.88x). Each value is still one row's dot product
# (matvec.row_into), the same whichever thread computes it.
PIECE_ROWS = 32             # a piece of a layer's product (the classifier's: 4x)


@numba.njit(inline="always")
def _f32_rows(x, w, out, start, stop, add):
    """out[:, start:stop] = x @ w[start:stop].T (or += it): rows of w, one at a time."""
    for o in range(start, stop):
        matvec.row_into(x, w, out, o, add)


@numba.njit(inline="always")
def _f32_rows_gated(x, w, out, add, start, stop, gated, w1, g):
    """Rows start .. stop - 1 of w into out (or added to it). gated (SwiGLU: w is w3, out up): w1's same
    rows into g first, then the gate on them."""
    if gated:
        _f32_rows(x, w1, g, start, stop, False)
    _f32_rows(x, w, out, start, stop, add)
    if gated:
        gate(g, out, start, stop, False)


@numba.njit(inline="always")
def _next_pieces(t, n_threads, claims, slot, pieces, done, k):
    """Thread t's next run of a product's pieces, shared as the comment above says: claims[slot + 2 * u]
    counts the pieces claimed of thread u's share (by anyone), claims[slot + 2 * u + 1] those taken from
    its back. done: how many of its own pieces t has run; k: 0 while on its own, else the share it takes
    from, t + k's. -> (first piece, end piece (equal: none left), done, k)"""
    while k < n_threads:
        u = (t + k) % n_threads
        first, last = _task_rows(u, n_threads, pieces)
        if k == 0:                                  # its own, front to back: one stream
            mine = last - first
            if done < mine:
                want = max(1, (mine - done) // 2)
                got = min(want, mine - _atomic_add(claims, slot + 2 * t, want))
                if got > 0:
                    return first + done, first + done + got, done + got, k
        elif _atomic_add(claims, slot + 2 * u, 1) < last - first:      # another's, from its back
            piece = last - 1 - _atomic_add(claims, slot + 2 * u + 1, 1)
            return piece, piece + 1, done, k
        k += 1
    return 0, 0, done, k


@numba.njit(inline="always")
def _f32_shared(t, n_threads, x, w, out, add, claims, slot, size, gated, w1, g):
    """Thread t's part of a product of w's rows (_f32_rows_gated), in pieces of `size` rows (_next_pieces)."""
    rows = w.shape[0]
    pieces, done, k = (rows + size - 1) // size, 0, 0
    while True:
        first, end, done, k = _next_pieces(t, n_threads, claims, slot, pieces, done, k)
        if first == end:
            return
        _f32_rows_gated(x, w, out, add, first * size, min(end * size, rows), gated, w1, g)


@numba.njit(parallel=True, nogil=True, cache=True)
def forward_f32(x, wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm, norm, output, eps, cos, sin,
                k_cache, v_cache, seq_ids, pos, wanted, n_heads, logits, n_threads, table, tokens, ends):
    """forward_fast for float32 weights: the products of the matrix-vector kernels (run.c's model,
    one weight row at a time), no quantization anywhere; a layer's seven products at one call site,
    as forward_fast's; each product's rows shared as _f32_shared shares them.

    wq ... w3: typed lists of each layer's (out, in) float32 matrix; output: (vocab, dim) float32. The
    rest as forward_fast, and greedy steps (see GREEDY_STEPS): tokens (steps,) int64, whose first is
    x's token; with more than one, cos, sin and pos hold every step's rows one after the other, logits
    every step's, and each step after the first runs the token the last one's logits put first (its
    embedding a row of table (vocab, dim) float32), written into tokens, until one of `ends` comes.
    -> the number of steps run"""
    n, dim, H, KV, D = _sizes(x, cos, k_cache, n_heads)
    n_layers = attention_norm.shape[0]
    hidden = w1[0].shape[0]
    steps, m_rows, slots = tokens.shape[0], wanted.shape[0], n_layers * 7 + 1
    q, k, v, a, qh, kh, vh, ah, g, up, state = _shared_arrays(n, H, KV, D, hidden)
    matrices, results = (wq, wk, wv, wo, w1, w3, w2), (q, k, v, x, g, up, x)
    # pieces claimed, per step, product (layer * 7 + m; the classifier last) and thread (_f32_shared)
    claims = np.zeros(steps * slots * 2 * n_threads, np.int64)
    ran = np.ones(1, np.int64)
    for t in numba.prange(n_threads):
        h = np.empty((n, dim), np.float32)
        xm = h                                      # each product's input (see _BODY_LOCALS)
        for step in range(steps):
            cs, sn, ps = cos[step * n:(step + 1) * n], sin[step * n:(step + 1) * n], pos[step * n:(step + 1) * n]
            out = logits[step * m_rows:(step + 1) * m_rows]
            base = step * slots
            for layer in range(n_layers):
                for m in range(7):                      # the walk of forward_fast's layer loop
                    if m == 0 or m == 4:
                        rmsnorm_layer(x, attention_norm if m == 0 else ffn_norm, layer, eps, h, False)
                        xm = h
                    elif m == 3:
                        _attention(t, n_threads, state, qh, kh, vh, cs, sn, k_cache, v_cache, layer, seq_ids, ps, ah)
                        xm = a
                    elif m == 6:
                        xm = g
                    if m != 4:                          # w1's rows go with w3's (m == 5): the gate needs both
                        _f32_shared(t, n_threads, xm, matrices[m][layer], results[m], LAYER_ADDS[m], claims,
                                    (base + layer * 7 + m) * 2 * n_threads, PIECE_ROWS, m == 5, w1[layer], g)
                    if m == 2 or m == 3 or m == 5 or m == 6:
                        barrier(state, n_threads)

            xw = _normalized_rows(x, wanted, norm, eps, False)
            _f32_shared(t, n_threads, xw, output, out, False, claims, (base + slots - 1) * 2 * n_threads,
                        4 * PIECE_ROWS, False, output, out)
            if step + 1 < steps and _next_greedy(t, n_threads, state, out, tokens, step, ends, ran):
                break
            if step + 1 < steps:                        # the next token's embedding, in x
                if t == 0:
                    x[0, :] = table[tokens[step + 1]]
                barrier(state, n_threads)
    return ran[0]
