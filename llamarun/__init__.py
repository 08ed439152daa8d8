"""llamarun: a readable, fast Llama inference engine in Python."""
from .api import Llama, load
from .errors import LlamarunError
from .decoding import Completion, TokenEvent

__all__ = ["load", "Llama", "Completion", "TokenEvent", "LlamarunError"]
__version__ = "0.1.0"
