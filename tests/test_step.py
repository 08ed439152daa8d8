"""The one-call forward (kernels/step.py): every layer of a kernel-sized batch in one compiled function,
its threads meeting at barriers. It must give what the layer-by-layer path gives, bit for bit: the
logits and the KV cache, for prompts, decode steps of several sequences, and batches that want only
some logits, on one thread and on two. The layer-by-layer path's kernels are tied to gguf's
dequantization (tests/test_kernels.py) and the fast path to the exact one (tests/test_fast_path.py).
"""
import dataclasses

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llamarun.config import ModelConfig
from llamarun.model import MATVEC_ROWS, Batch, CompiledForward, KVCache, Probe, Transformer
from llamarun.plan import choose_plan
from llamarun.tensors import GGMLTensor

import reference
from test_kernels import random_blocks


def random_model(types: dict, seed: int = 0, **plan) -> Transformer:
    """A fast-path model of random ggml blocks: dim 256, hidden 512 (K-quants take rows of 256 values),
    2 layers, 4 heads, 2 kv heads. plan: fields of its plan to replace (plan.ExecutionPlan's)."""
    c = ModelConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64)
    rng = np.random.default_rng(seed)
    shapes = {"wq": (c.dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim), "wo": (c.dim, c.dim),
              "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim)}

    def matrix(name, qtype, shape):
        return GGMLTensor(name, qtype, shape, random_blocks(qtype, *shape, rng, scale=0.05), exact=False)

    weights = {name: [matrix(name, types.get(name, T.Q4_1), shape) for _ in range(c.n_layers)]
               for name, shape in shapes.items()}
    for name in ("attention_norm", "ffn_norm"):
        weights[name] = [rng.uniform(0.5, 1.5, c.dim).astype(np.float32) for _ in range(c.n_layers)]
    weights["norm"] = rng.uniform(0.5, 1.5, c.dim).astype(np.float32)
    weights["tok_embeddings"] = weights["output"] = matrix("token_embd", types.get("output", T.Q8_0),
                                                           (c.vocab_size, c.dim))
    return Transformer(c, weights, dataclasses.replace(choose_plan(c, weights, exact=False), **plan))


# every group kernel in one model (Q5_0's is Q8_0's: TRANSCODED; Q8_0's own is the default classifier's), and
# a Q4_K classifier (python -m llamarun.kernels compiles its forward ahead: kernels/compile.py)
MIXED = {"wq": T.Q5_0, "wk": T.Q4_0, "wv": T.Q6_K, "wo": T.Q5_K, "w1": T.Q4_K, "w2": T.Q5_1, "w3": T.Q4_1,
         "output": T.Q4_K}

BATCHES = [
    Batch.sequence(list(range(5, 17)), 0, 0),                                    # a prompt: 12 tokens
    Batch.of([20, 21, 22], [12, 0, 0], [0, 1, 2]),                               # three sequences
    Batch.of([30, 31, 32, 33, 34], [13, 1, 1, 2, 3], [0, 1, 2, 2, 2], [1, 1, 0, 1, 1]),   # some logits
    Batch.sequence([40], 14, 0),                                                 # one decode step
]


def both_paths(model: Transformer, batches, n_seqs=3, seq_len=64, half=None):
    """(logits and cache of the one-call forward, the same of the layer-by-layer path), on a half-
    precision cache or a float32 one (default: the model's own kind, Transformer.new_cache's)."""
    half = not model.exact if half is None else half
    compiled = model.compiled_forward()
    assert compiled is not None
    results = []
    for use in (compiled, None):
        model._compiled = use
        cache = KVCache(model.config, n_seqs, seq_len, half=half)
        results.append(([model.forward(b, cache) for b in batches], cache))
    model._compiled = compiled
    return results


def assert_same(results):
    (a, cache_a), (b, cache_b) = results
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.all(np.isfinite(x))
        assert np.array_equal(x, y)
    assert np.array_equal(cache_a.k, cache_b.k) and np.array_equal(cache_a.v, cache_b.v)


@pytest.mark.parametrize("types", [
    {},                                                                          # Q4_1, a Q8_0 classifier
    MIXED,
], ids=["q4_1", "mixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_forward_equals_the_layer_by_layer_path(types, threads):
    """On the fast path's own cache, half precision. (The float32 cache's attention is the exact
    path's, which the float32 and int8 tests below take through the one-call forward.)"""
    model = random_model(types)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        assert_same(both_paths(model, BATCHES))
    finally:
        numba.set_num_threads(before)


def test_smollm2_decode_steps_equal_the_layer_by_layer_path(smol_checkpoint):
    model = Transformer(smol_checkpoint.config, smol_checkpoint.weights)          # the fast path: the default
    assert not model.exact and model.compiled_forward().takes_prompts
    prompt = Batch.sequence([1, 504, 3458, 282, 4649, 314, 216], 0, 0)
    steps = [Batch.sequence([100 + i], 7 + i, 0) for i in range(3)]
    two = Batch.of([7, 8], [10, 0], [0, 1])
    assert_same(both_paths(model, [prompt, *steps, two], n_seqs=2, seq_len=128))
    # the model's arithmetic is its own: the checkpoint's (shared, session-wide) tensors keep theirs
    assert all(w.exact for w in smol_checkpoint.weights["wq"]) and not any(w.exact for w in model.w["wq"])


def test_batch_order_and_parts():
    assert Batch.of([1, 2, 3, 4], [5, 6, 0, 7], [0, 0, 1, 0]).in_order()
    assert Batch.of([1, 2], [6, 5], [0, 1]).in_order()               # two sequences: each in order
    assert not Batch.of([1, 2, 3], [6, 7, 5], [0, 0, 0]).in_order()
    part = Batch.of([1, 2, 3, 4], [5, 6, 0, 7], [0, 0, 1, 0], [0, 1, 1, 0]).part(1, 3)
    assert part.tokens.tolist() == [2, 3] and part.pos.tolist() == [6, 0] and part.seq_ids.tolist() == [0, 1]
    assert part.logits.tolist() == [True, True]


@pytest.mark.parametrize("types", [{}, MIXED], ids=["q4_1", "mixed"])
def test_a_long_prompt_runs_in_parts_where_every_matrix_has_a_group_kernel(monkeypatch, types):
    """A batch longer than the plan's compiled_rows (16 here) goes through the one-call forward in parts of
    16, each part seeing the earlier ones in the cache: the logits and cache of the layer-by-layer path
    over the whole batch at once, bit for bit. Every type, mixed (as a Q4_K_M file mixes K-quants),
    takes it too."""
    model = random_model(types, compiled_rows=16)
    compiled = model.compiled_forward()
    assert compiled.rows == 16 and compiled.takes_prompts
    assert model.plan.forward_for(40) == "compiled in parts of 16"
    calls = []
    inner = CompiledForward.__call__
    monkeypatch.setattr(CompiledForward, "__call__", lambda self, x, batch, *rest: calls.append(len(batch))
                        or inner(self, x, batch, *rest))
    prompt = Batch.of(list(range(5, 45)), list(range(40)), [0] * 40, [i % 3 == 0 or i == 39 for i in range(40)])
    two = Batch.of([7] * 20 + [8] * 20, list(range(20)) * 2, [1] * 20 + [2] * 20)    # two sequences, in order
    assert_same(both_paths(model, [prompt, two]))
    assert calls == [16, 16, 8, 16, 16, 8]


def test_exact_weights_and_inspection_keep_the_layer_by_layer_path():
    model = random_model({})
    exact = Transformer(model.config, model.w, choose_plan(model.config, model.w, exact=True))
    assert exact.compiled_forward() is None and exact.plan.forward_for(1) == "layers (matvec kernels)"
    assert all(w.exact for w in exact.layers[1].values() if isinstance(w, GGMLTensor))
    assert model.compiled_forward() is not None                      # the fast model's tensors kept theirs
    model.layers[1] = {name: w.with_exact(True) if isinstance(w, GGMLTensor) else w
                       for name, w in model.layers[1].items()}         # one exact layer: no one-call forward
    assert not CompiledForward.supports(model.w, model.layers)
    model = random_model({})
    seen = []
    probe = Probe(attention=lambda layer, batch, probs: seen.append(layer))
    model.forward(Batch.sequence([1, 2, 3]), KVCache(model.config), probe)
    assert seen == [0, 1]                  # the probe ran: the one-call forward was not taken


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_one_call_forward_equals_the_layer_by_layer_path(threads):
    """llama2.c's version-2 checkpoint (int8 groups of 64, written by llama2.c's export.py)."""
    from conftest import SHARED, require
    from llamarun.formats import load_checkpoint
    checkpoint = load_checkpoint(require(SHARED / "models" / "tiny_q8.v2.bin"))
    model = Transformer(checkpoint.config, checkpoint.weights)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        assert model.compiled_forward() is not None and model.compiled_forward().kind == "int8"
        assert_same(both_paths(model, BATCHES, seq_len=model.config.seq_len))
    finally:
        numba.set_num_threads(before)


def float32_model(seed: int = 0, vocab: int = 301) -> Transformer:
    """A float32 model (run.c's kind), read-only as a checkpoint's memory map, its embedding table shared
    with the classifier. Its products cut into pieces (step.PIECE_ROWS) as the one-call forward shares
    them between threads, with a short last piece: the classifier's 301 rows in 3 (1 a thread's share, 2
    the other's), the hidden layer's 530 in 17, the 32 rows of wk and wv in one (a thread with no share of
    its own takes it from the other's back, if it is first)."""
    c = ModelConfig(dim=64, hidden_dim=530, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, seq_len=64)
    rng = np.random.default_rng(seed)
    shapes = {"wq": (c.dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim), "wo": (c.dim, c.dim),
              "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim)}
    weights = {name: rng.normal(0, 0.1, (c.n_layers, *shape)).astype(np.float32) for name, shape in shapes.items()}
    for name in ("attention_norm", "ffn_norm"):
        weights[name] = rng.uniform(0.5, 1.5, (c.n_layers, c.dim)).astype(np.float32)
    weights["norm"] = rng.uniform(0.5, 1.5, c.dim).astype(np.float32)
    weights["tok_embeddings"] = weights["output"] = rng.normal(0, 0.5, (c.vocab_size, c.dim)).astype(np.float32)
    for w in weights.values():
        w.flags.writeable = False          # as a checkpoint's memory map (and the kernels compiled for it)
    return Transformer(c, weights)


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_one_call_forward_equals_the_layer_by_layer_path(threads):
    """Batches of up to MATVEC_ROWS tokens take the one-call forward; the 12-token prompt goes through
    BLAS layer by layer on both sides."""
    model = float32_model()
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        assert model.compiled_forward().kind == "f32" and model.compiled_forward().rows == MATVEC_ROWS
        results = both_paths(model, BATCHES)
        assert_same(results)
        # the logits are the model's: the last batch is one token of sequence 0, at its last position
        (logits, _), _ = results
        expected = reference.forward(model.w, model.config, sequence_zero(BATCHES)).logits[-1]
        assert np.allclose(logits[-1], expected, atol=1e-4)
    finally:
        numba.set_num_threads(before)


def one_step_at_a_time(model: Transformer, prompt: Batch, steps: int, cache: KVCache):
    """The prompt, then `steps` greedy decode steps of one forward each: -> (tokens run, their logits)."""
    row = model.forward(prompt, cache)[0]
    tokens, rows = [int(np.argmax(row))], []
    for i in range(steps):
        rows.append(model.forward(Batch.sequence([tokens[-1]], len(prompt) + i), cache)[0])
        tokens.append(int(np.argmax(rows[-1])))
    return tokens[:steps], np.stack(rows)


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_steps_in_one_call_equal_one_forward_a_step(threads):
    """Transformer.greedy on float32 weights runs several decode steps in one compiled call, each step's
    token the argmax of the logits before it: every row, the tokens and the cache are what one forward
    a step gives (the layer-by-layer path here), bit for bit; an argmax in `ends` is the last step."""
    model = float32_model()
    compiled = model.compiled_forward()
    assert model.greedy_steps
    prompt = Batch.sequence([5, 6, 7], 0, 0)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        model._compiled = None
        expected_cache = KVCache(model.config, 1, 64, half=False)
        tokens, rows = one_step_at_a_time(model, prompt, 12, expected_cache)
        model._compiled = compiled
        cache = KVCache(model.config, 1, 64, half=False)
        model.forward(prompt, cache)
        ran, got = model.greedy(tokens[0], 3, cache, 12)
        assert ran.tolist() == tokens and np.array_equal(got, rows)
        assert np.array_equal(cache.k, expected_cache.k) and np.array_equal(cache.v, expected_cache.v)
        # an end token: the step whose argmax it is is the last one run
        last = max(i for i in range(1, 12) if tokens[i] not in tokens[1:i])
        ran, got = model.greedy(tokens[0], 3, cache, 12, ends={tokens[last], 10 ** 6})
        assert ran.tolist() == tokens[:last] and np.array_equal(got, rows[:last])
    finally:
        numba.set_num_threads(before)
        model._compiled = compiled


def test_float32_pieces_are_each_computed_once_whichever_thread_takes_them():
    """The threads of the one-call forward claim a float32 product's pieces as they go (step._f32_shared:
    a thread done with its own share takes pieces from the back of the other's), so which thread computes
    which rows changes from run to run. Every run of many steps on two threads still gives what one
    forward a step gives, bit for bit: no row skipped, none added to the residual stream twice."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread: nothing is shared")
    model = float32_model(seed=1)
    compiled = model.compiled_forward()
    prompt = Batch.sequence([5, 6, 7], 0, 0)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        model._compiled = None
        tokens, rows = one_step_at_a_time(model, prompt, 40, KVCache(model.config, 1, 64, half=False))
        model._compiled = compiled
        for _ in range(8):
            cache = KVCache(model.config, 1, 64, half=False)
            model.forward(prompt, cache)
            ran, got = model.greedy(tokens[0], 3, cache, 40)
            assert ran.tolist() == tokens and np.array_equal(got, rows)
    finally:
        numba.set_num_threads(before)
        model._compiled = compiled


def test_greedy_steps_without_the_compiled_call_run_one_forward_a_step():
    """A model whose one-call forward takes no steps (here: ggml weights) runs the same steps one forward
    each: same tokens, same rows."""
    model = random_model({})
    assert not model.greedy_steps
    prompt = Batch.sequence([5, 6, 7], 0, 0)
    tokens, rows = one_step_at_a_time(model, prompt, 6, model.new_cache())
    cache = model.new_cache()
    model.forward(prompt, cache)
    ran, got = model.greedy(tokens[0], 3, cache, 6)
    assert ran.tolist() == tokens and np.array_equal(got, rows)
    with pytest.raises(ValueError, match="do not fit"):
        model.greedy(tokens[0], 60, cache, 6)


def sequence_zero(batches) -> list[int]:
    """Sequence 0's tokens over the batches, in position order (they must cover 0 .. n-1)."""
    rows = sorted((p, t) for b in batches for t, p, s in zip(b.tokens, b.pos, b.seq_ids) if s == 0)
    assert [p for p, _ in rows] == list(range(len(rows)))
    return [int(t) for _, t in rows]


def test_a_threading_layer_that_may_serialize_the_loop_keeps_the_layer_by_layer_path(monkeypatch):
    """Under TBB two iterations of the parallel loop may run on one thread: the barriers would hang."""
    monkeypatch.setattr(numba, "threading_layer", lambda: "tbb")
    model = random_model({})
    assert model.compiled_forward() is None
    assert np.all(np.isfinite(model.forward(Batch.sequence([1, 2, 3]), KVCache(model.config))))
