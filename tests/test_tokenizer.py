import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from nanotune import load_tokenizer

REFERENCE = tiktoken.get_encoding("gpt2")  # from ../shared/tiktoken-cache (TIKTOKEN_CACHE_DIR, see conftest)


def test_same_tables_as_tiktoken():
    enc = load_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc._mergeable_ranks == REFERENCE._mergeable_ranks


FIXED = [
    "Hello, world! It's 2026.",
    "  leading spaces and\ttabs\n\nnewlines   ",
    "Xylophone XXX x-ray Lilliput Brobdingnag",
    "ünïcödé — emoji 🦜 and 中文",
    "The quick brown fox<|endoftext|>jumps",
]


def test_fixed_texts():
    enc = load_tokenizer()
    for text in FIXED:
        ids = enc.encode(text, allowed_special="all")
        assert ids == REFERENCE.encode(text, allowed_special="all")
        assert enc.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_matches_tiktoken_and_round_trips(text):
    enc = load_tokenizer()
    ids = enc.encode_ordinary(text)
    assert ids == REFERENCE.encode_ordinary(text)
    assert enc.decode(ids) == text
