"""nanotune: a small, readable GPT-2 fine-tuning lab."""

from .generate import generate
from .config import PRESETS, GPTConfig
from .model import GPT, KVCache
from .tokenizer import load_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "generate", "load_tokenizer"]
