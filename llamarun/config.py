"""Model hyper-parameters: one dataclass shared by every file format, and the context a model runs with."""
from dataclasses import dataclass, replace

from .errors import LlamarunError

# The longest context a model gets unless asked for more (--ctx N, llamarun.load(n_ctx=N)): its trained
# context up to this many positions. A file's header may claim any context (a corrupt or hostile one:
# 4294967295), and a cache sized by the header alone cost gigabytes before the first token; llama.cpp
# caps alike with its default -c of 4096. 8192 is SmolLM2's own (the default model runs as trained) and
# Llama 3's; a model trained longer (Llama 3.1: 131072) runs 8192 positions unless given --ctx.
DEFAULT_CONTEXT_LIMIT = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int                 # width of the residual stream
    hidden_dim: int          # width of the SwiGLU feed-forward layer
    n_layers: int
    n_heads: int             # query heads
    n_kv_heads: int          # key/value heads (< n_heads: grouped-query attention)
    vocab_size: int
    seq_len: int             # the context: a file's config holds the one the model was trained for (its
                             # header's); a loaded model's, the one it runs with (with_context): the KV
                             # cache length, the bound every "does it fit" check uses
    shared_classifier: bool = True   # output projection is the token embedding table
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def with_context(config: ModelConfig, n_ctx: int | None = None) -> ModelConfig:
    """The config a model runs with: `config` (a file's: its trained context) with seq_len the context
    to use, n_ctx if given (at most the trained context), else the trained one up to DEFAULT_CONTEXT_LIMIT."""
    trained = config.seq_len
    if n_ctx is None:
        return replace(config, seq_len=min(trained, DEFAULT_CONTEXT_LIMIT))
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise LlamarunError(f"the context (--ctx, n_ctx) must be a positive number of tokens, not {n_ctx!r}")
    if n_ctx > trained:
        raise LlamarunError(f"a context of {n_ctx} tokens exceeds the model's {trained} (the context it was "
                            f"trained for): ask for at most {trained} (--ctx, n_ctx)")
    return replace(config, seq_len=n_ctx)
