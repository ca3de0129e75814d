"""nanotune: a small, readable GPT-2 fine-tuning lab."""

import warnings

# `python -m nanotune.generate` runs a module this package has already imported (for `from nanotune import
# generate`); runpy warns about that, harmlessly, so the warning is silenced for these modules alone
warnings.filterwarnings("ignore", message=r"'nanotune\.\w+' found in sys\.modules", category=RuntimeWarning)

from .decoding import KVCache
from .generate import generate
from .model.config import PRESETS, GPTConfig
from .model.gpt import GPT
from .tokenizer import load_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "generate", "load_tokenizer"]
