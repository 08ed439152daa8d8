"""Model hyper-parameters: one dataclass shared by every file format, and the context a model runs with."""
import math
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
    # RoPE's pairs: False, interleaved (x[2i], x[2i+1]): Meta's, run.c's, llama.cpp's llama files;
    # True, halves (x[i], x[i + D/2]): Hugging Face's rotate_half, its checkpoints' Q and K rows as
    # stored (read as they are, not permuted: a permuted copy of wq and wk is memory the map saves)
    rope_halves: bool = False
    # RoPE scaling. rope_factors: per pair i (head_dim / 2 of them) its frequency is divided by
    # rope_factors[i] (Llama 3's "llama3" scaling, llama.cpp's rope_freqs tensor); rope_scale:
    # positions are divided by it ("linear" scaling, llama.cpp's 1 / freq_scale)
    rope_factors: tuple[float, ...] | None = None
    rope_scale: float = 1.0
    # attention reaches back this many positions (Mistral's sliding window), or all of them (None).
    # llamarun attends to every position, so a model with a window runs contexts up to it, where the
    # two are the same (with_context caps the context there)
    sliding_window: int | None = None

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
    if config.sliding_window is not None and config.sliding_window < trained:
        if n_ctx is not None and not isinstance(n_ctx, bool) and isinstance(n_ctx, int) and n_ctx > config.sliding_window:
            raise LlamarunError(f"a context of {n_ctx} tokens exceeds the model's sliding attention window of "
                                f"{config.sliding_window}, which llamarun does not implement: ask for at most "
                                f"{config.sliding_window} (--ctx, n_ctx)")
        trained = config.sliding_window
    if n_ctx is None:
        return replace(config, seq_len=min(trained, DEFAULT_CONTEXT_LIMIT))
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise LlamarunError(f"the context (--ctx, n_ctx) must be a positive number of tokens, not {n_ctx!r}")
    if n_ctx > trained:
        raise LlamarunError(f"a context of {n_ctx} tokens exceeds the model's {trained} (the context it was "
                            f"trained for): ask for at most {trained} (--ctx, n_ctx)")
    return replace(config, seq_len=n_ctx)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_context: int = 8192) -> tuple[float, ...]:
    """Llama 3.1's RoPE scaling ("llama3": Meta's apply_scaling, Hugging Face's rope_type "llama3") as
    one divisor per pair, what llama.cpp's converter stores as the rope_freqs tensor: pairs whose
    wavelength is shorter than original_context / high_freq_factor keep their frequency (1), those
    longer than original_context / low_freq_factor turn `factor` times slower, and the ones between
    move smoothly from one to the other."""
    if not (factor > 0 and high_freq_factor > low_freq_factor > 0 and original_context > 0):
        raise LlamarunError(f"llama3 RoPE scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0 "
                            f"(got factor {factor}, low {low_freq_factor}, high {high_freq_factor})")
    low_wavelength = original_context / low_freq_factor
    high_wavelength = original_context / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)          # 2 pi / frequency
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(float(factor))
        else:
            smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)
