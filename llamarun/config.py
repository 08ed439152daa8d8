"""Model hyper-parameters: one dataclass shared by every file format."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    dim: int                 # width of the residual stream
    hidden_dim: int          # width of the SwiGLU feed-forward layer
    n_layers: int
    n_heads: int             # query heads
    n_kv_heads: int          # key/value heads (< n_heads: grouped-query attention)
    vocab_size: int
    seq_len: int             # the context the model was trained for; also the KV cache length
    shared_classifier: bool = True   # output projection is the token embedding table
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
