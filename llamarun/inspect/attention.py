"""Attention maps: what every head of every layer attended to while the model read a prompt and
wrote its continuation (`llamarun attention`).

The model's attention kernels write each (token, head)'s softmax weights when a forward's
`Probe` asks for them (and do no such work otherwise); `AttentionRecorder` is that probe's
`attention` callback, collecting the rows into one (layers, heads, T, T) matrix per run: row i is token i's
attention over tokens 0..i. The run is an ordinary generation (prefill, then decode token by token,
through `generate_stream`), so the maps show the arithmetic a generation does; the last drawn token
is fed once more so that it has its row too. report.py turns an `AttentionRecord` into the HTML page
and the PNG files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LlamarunError
from ..decoding import Completion
from ..generation import generate_stream
from ..model import Batch, Probe
from ..sampling import make_sampler
from .emphasis import emphasize

# A run's maps take layers * heads * T^2 * 4 bytes (SmolLM2, 512 tokens: 280 MB)
MAX_TOKENS = 512


class AttentionRecorder:
    """A Probe's attention callback that keeps every token's attention, for one sequence."""

    def __init__(self, n_layers: int, n_heads: int, capacity: int):
        self.probs = np.zeros((n_layers, n_heads, capacity, capacity), np.float32)   # (L, H, query, key)
        self.filled = 0          # tokens whose rows are recorded

    def __call__(self, layer: int, batch: Batch, probs: np.ndarray) -> None:
        """probs: (n, H, max_pos + 1), row i holding batch token i's weights over positions 0..pos[i]."""
        for i, p in enumerate(batch.pos):
            self.probs[layer, :, p, :p + 1] = probs[i, :, :p + 1]
            self.filled = max(self.filled, int(p) + 1)


@dataclass
class AttentionRecord:
    ids: list[int]               # the tokens of both axes: prompt then generated
    labels: list[str]            # each token's text
    n_prompt: int                # the first n_prompt tokens are the prompt
    probs: np.ndarray            # (layers, heads, T, T) float32, row = query, column = key, 0 above the diagonal
    model: str = ""
    emphasis: list[str] = field(default_factory=list)         # "'Paris' x5 in layers 0,1", for the page
    emphasized: list[int] = field(default_factory=list)       # the emphasised token positions
    generated: str = ""          # the continuation's text, as generation printed it


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as generation prints it; special tokens (BOS) by name or id."""
    if tokenizer is None:
        return [f"#{t}" for t in ids]
    labels, prev = [], None
    for token in ids:
        text = tokenizer.token_bytes(token, prev).decode("utf-8", errors="replace")
        if not text:
            text = "<bos>" if token == getattr(tokenizer, "bos_id", None) else f"<#{token}>"
        labels.append(text)
        prev = token
    return labels


def record_attention(llama, prompt, max_tokens: int = 16, emphasis: list[str] = (), **sampling) -> AttentionRecord:
    """Generate up to `max_tokens` after `prompt` (a string or ids) and record every attention weight.

    sampling: as Llama.stream (temperature 0 = greedy, the default here); emphasis: --emphasize specs.
    """
    ids = llama.encode(prompt)
    if len(ids) + max_tokens > MAX_TOKENS:
        raise LlamarunError(f"attention maps hold at most {MAX_TOKENS} tokens: the prompt has {len(ids)}, "
                            f"-n asks for {max_tokens} more")
    sampling.setdefault("temperature", 0.0)
    model, config = llama.model, llama.config
    recorder = AttentionRecorder(config.n_layers, config.n_heads, len(ids) + max_tokens)
    cache = model.new_cache()
    emphasis_probe, found = emphasize(llama, ids, list(emphasis))
    probe = Probe(attention=recorder, bias=emphasis_probe.bias if emphasis_probe is not None else None)
    result = Completion("", [])
    sampler = make_sampler("default", tokenizer=llama.tokenizer, **sampling)
    for _ in generate_stream(model, llama.tokenizer, ids, sampler,
                             max_tokens=max_tokens, cache=cache, result=result, probe=probe):
        pass
    walked = ids + result.tokens
    if result.tokens and len(walked) <= cache.seq_len:     # the last drawn token's own row
        model.forward(Batch.sequence(walked[-1:], len(walked) - 1), cache, probe)
    T = recorder.filled
    return AttentionRecord(walked[:T], token_labels(llama.tokenizer, walked[:T]), len(ids),
                           recorder.probs[:, :, :T, :T], model=Path(str(llama.checkpoint.path)).name,
                           emphasis=[str(e) for e, _ in found],
                           emphasized=sorted({p for _, positions in found for p in positions}),
                           generated=result.text)
