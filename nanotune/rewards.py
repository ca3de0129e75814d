"""What the reinforcement-learning recipes maximise, and the prompts they answer: chosen once, from --reward.

    model:DIR   a train_reward.py model's score of prompt + answer; prompts from instruction data (as SFT's)
    sentiment   VADER's compound sentiment of the answer alone, in [-1, 1]; prompts are windows of books
    letter:X    the share of the answer's tokens whose text contains X; prompts are windows of books

--prompt-source books|instructions overrides where the prompts come from (a reward model trained on book
continuations, as the sentiment frontier's, scores book windows).

A reward is called as score(prompt_ids, answers) -> (B,) float32 on the CPU, answers being token lists without
<|endoftext|>. The letter share is a sum over tokens, so it can also be paid token by token (token_scores).
A prompt source gives training prompts (sample), fixed held-out prompts (heldout) and, for PPO-ptx, training
text (text_batch).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .data.instruct import collate, encode_pair, load_splits, prompt_ids
from .data.sources import GULLIVER_URL, INSTRUCTIONS_URL, default_file, read_book
from .flags import integer
from .model.loader import load_reward_model
from .model.reward_model import PAD
from .tokenizer import letter_tokens
from .utils import NanotuneError

# the default training books of the book rewards (Project Gutenberg; Gulliver is held out)
BOOKS = {"pride-and-prejudice": 1342, "frankenstein": 84, "alice": 11, "sherlock-holmes": 1661, "moby-dick": 2701}


def parse_reward(spec: str) -> tuple[str, str]:
    """--reward -> (kind, target): ("model", DIR), ("sentiment", ""), ("letter", X)."""
    kind, _, target = spec.partition(":")
    if kind not in ("model", "sentiment", "letter") or (kind == "sentiment") == bool(target):
        raise NanotuneError(f"expected model:DIR, sentiment or letter:X, got {spec!r}")
    if kind == "letter" and len(target) != 1:
        raise NanotuneError(f"letter:X needs a single character, got {target!r}")
    return kind, target


def reward_flag(text: str) -> str:
    """An argparse type: --reward, checked as it is parsed (see parse_reward)."""
    try:
        parse_reward(text)
    except NanotuneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# the flags of the reward and its prompts that a --resume must keep (they define what the run measures)
REWARD_FLAGS = "--reward --prompt-source --ref-model --data --books --heldout-book --template --limit --prompt-len"
REWARD_FLAGS += " --max-new-tokens"


def add_reward_args(parser, default: str = "sentiment", reference: bool = True):
    """The flags every recipe that samples answers and scores them shares (train_ppo.py, train_grpo.py,
    nanotune.pairs): the reward, the KL reference (unless reference=False), where the prompts come from, the
    answer length."""
    add = parser.add_argument
    reward = (
        f"model:DIR (a train_reward.py model), sentiment (VADER) or letter:X (default {default}; nanotune/rewards.py)"
    )
    add("--reward", type=reward_flag, default=default, help=reward)
    source = "where the prompts come from (default: instructions for model:DIR, books otherwise)"
    add("--prompt-source", choices=["books", "instructions"], default=None, help=source)
    if reference:
        add("--ref-model", default=None, help="KL reference (default: a frozen copy of --model)")
    data = "instruction prompts: one or more sources of any SFT or preference format in docs/data.md (default: "
    add("--data", nargs="+", action="extend", default=None, metavar="SOURCE", help=data + "download SFT's set)")
    add("--books", nargs="+", metavar="FILE", help="book prompts: the training books (default: download five)")
    add("--heldout-book", metavar="FILE", help="the book of the held-out prompts (default: Gulliver's Travels)")
    add("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (as in SFT)")
    add("--limit", type=integer(1), default=None, help="use only the first N records of each source (quick runs)")
    add("--prompt-len", type=integer(1), default=64, help="book prompts: tokens per window (default 64)")
    add("--max-new-tokens", type=integer(1), help="answer length limit (default 24 for books, 64 for model:DIR)")


def settle_reward_args(args):
    """The defaults that depend on --reward, filled in after parsing."""
    if args.prompt_source is None:
        args.prompt_source = "instructions" if parse_reward(args.reward)[0] == "model" else "books"
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.prompt_source == "instructions" else 24
    return args


class ModelScore:
    """A reward model's score of prompt + answer, read at the last token (right padding never changes it)."""

    def __init__(self, path: str, device, ctx, dtype: str = "float32"):
        self.model = load_reward_model(path, device).requires_grad_(False)
        if dtype == "bfloat16":  # frozen and only read: its weights in bfloat16 too, half the memory
            self.model.to(torch.bfloat16)
        self.device, self.ctx = device, ctx
        self.context = self.model.config.n_positions  # prompt + answer must fit

    @torch.no_grad()
    def __call__(self, prompt_ids, answers):
        rows = [p + a for p, a in zip(prompt_ids, answers)]
        idx = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for b, row in enumerate(rows):
            idx[b, : len(row)] = torch.tensor(row)
        with self.ctx:
            return self.model(idx.to(self.device)).float().cpu()


class SentimentScore:
    """VADER's compound score in [-1, 1] of the answer alone (Ziegler et al. 2019 used a sentiment classifier)."""

    context = None

    def __init__(self, enc):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise NanotuneError(
                'the sentiment reward needs the vaderSentiment package: pip install -e ".[ppo]"'
            ) from None
        self.analyzer, self.enc = SentimentIntensityAnalyzer(), enc

    def __call__(self, prompt_ids, answers):
        return torch.tensor([self.analyzer.polarity_scores(self.enc.decode(a))["compound"] for a in answers])


class LetterShare:
    """The share of the answer's tokens whose text contains the letter (train_xkl.py's goal)."""

    context = None

    def __init__(self, enc, letter: str):
        self.is_letter = letter_tokens(enc, letter)  # (V,) bool

    def __call__(self, prompt_ids, answers):
        return torch.tensor([self.is_letter[a].float().mean().item() if a else 0.0 for a in answers])

    # The same share as parts earned at each token: 1 / length on the tokens that hold the letter (the closing
    # <|endoftext|> is an action but not part of the length). answer_ids, mask (B, L), ended (B,) -> (B, L)
    def token_scores(self, answer_ids, mask, ended):
        lengths = (mask.sum(-1) - ended.to(mask.device).float()).clamp(min=1)  # (B,) tokens the share is over
        return self.is_letter.to(mask.device)[answer_ids] * mask / lengths[:, None]


def make_reward(spec: str, enc, device, ctx, dtype: str = "float32"):
    """The scoring function --reward names (see the module docstring); ctx and dtype: the run's precision."""
    kind, target = parse_reward(spec)
    if kind == "model":
        return ModelScore(target, device, ctx, dtype)
    return SentimentScore(enc) if kind == "sentiment" else LetterShare(enc, target)


@dataclass
class PromptSpec:
    """What a prompt source reads: where the prompts come from, how long an answer may be, how many held-out
    prompts; instruction prompts: their sources, record limit, split seed and template; book prompts: the
    training books, the held-out book and the window length. (prompt_spec(args): these from the flags.)"""

    source: str = "books"  # "books" or "instructions"
    max_new_tokens: int = 24
    eval_prompts: int = 64
    data: list[str] | None = None  # None: SFT's instruction set
    limit: int | None = None
    seed: int = 1337
    template: str = "alpaca"
    books: list[str] | None = None  # None: the five default books
    heldout_book: str | None = None  # None: Gulliver's Travels
    prompt_len: int = 64


def prompt_spec(args, eval_prompts: int) -> PromptSpec:
    """The PromptSpec of add_reward_args's flags (settled) and --seed, with eval_prompts held-out prompts."""
    return PromptSpec(
        source=args.prompt_source,
        max_new_tokens=args.max_new_tokens,
        eval_prompts=eval_prompts,
        data=args.data,
        limit=args.limit,
        seed=args.seed,
        template=args.template,
        books=args.books,
        heldout_book=args.heldout_book,
        prompt_len=args.prompt_len,
    )


class InstructionPrompts:
    """Instruction prompts in the SFT template: the training split is sampled, the test split held out (the same
    seeded split as SFT and DPO); prompts too long to leave room for a whole answer are skipped. PPO-ptx text:
    the SFT examples, loss on their response tokens."""

    def __init__(self, spec: PromptSpec, enc, context: int, with_text: bool = False):
        sources = spec.data or [default_file("instruction-data.json", INSTRUCTIONS_URL)]
        train, _, test = load_splits(sources, "prompt", spec.limit, spec.seed)  # a conversation: all before its answer
        encoded = {
            name: [prompt_ids(enc, ex, spec.template) for ex in split]
            for name, split in (("train", train), ("test", test))
        }
        fitting = {name: [p for p in ids if len(p) + spec.max_new_tokens <= context] for name, ids in encoded.items()}
        self.skipped = sum(len(encoded[name]) - len(fitting[name]) for name in encoded)
        self.train, self.heldout = fitting["train"], fitting["test"][: spec.eval_prompts]
        if not self.train or not self.heldout:
            raise NanotuneError(
                f"no prompt leaves room for --max-new-tokens {spec.max_new_tokens} in the context of {context}: "
                "lower --max-new-tokens"
            )
        self.texts = [  # the SFT examples whose prompt fits, their response cut to the context
            encode_pair(enc, ids, ex["answer"], context - 1, "")[:2]
            for ex, ids in zip(train, encoded["train"])
            if with_text and len(ids) < context - 1
        ]
        self.eot, self.described = enc.eot_token, f"{len(self.train)} training prompts"

    def sample(self, n: int, rng: torch.Generator) -> list[list[int]]:
        return [self.train[i] for i in torch.randint(len(self.train), (n,), generator=rng).tolist()]

    def text_batch(self, n: int, rng: torch.Generator, device):
        """n SFT examples -> input_ids, labels (n, T); labels IGNORE on the prompt and padding."""
        pairs = [self.texts[i] for i in torch.randint(len(self.texts), (n,), generator=rng).tolist()]
        return collate(pairs, self.eot, device)


class BookPrompts:
    """Windows of --prompt-len tokens: random ones from the training books, evenly spread fixed ones from the
    held-out book. PPO-ptx text: random windows of prompt + answer length."""

    def __init__(self, spec: PromptSpec, enc, context: int, with_text: bool = False):
        self.prompt_len, self.text_len = spec.prompt_len, spec.prompt_len + spec.max_new_tokens
        if self.text_len > context:
            raise NanotuneError(
                f"--prompt-len {spec.prompt_len} + --max-new-tokens {spec.max_new_tokens} exceed the models' "
                f"context of {context}"
            )
        url = "https://www.gutenberg.org/cache/epub/{0}/pg{0}.txt"
        books = spec.books or [default_file(f"{n}.txt", url.format(i), "--books") for n, i in BOOKS.items()]
        self.tokens = torch.cat([torch.tensor(enc.encode_ordinary(read_book(book) + "\n\n")) for book in books])
        heldout_book = spec.heldout_book or default_file("gulliver.txt", GULLIVER_URL, "--heldout-book")
        heldout = enc.encode_ordinary(read_book(heldout_book))
        if len(self.tokens) <= self.text_len or len(heldout) <= self.prompt_len:
            raise NanotuneError(
                f"the books hold {len(self.tokens)} and {len(heldout)} tokens: too few for --prompt-len "
                f"{spec.prompt_len} + --max-new-tokens {spec.max_new_tokens}"
            )
        starts = torch.linspace(0, len(heldout) - self.prompt_len, spec.eval_prompts).long().tolist()
        self.heldout = [heldout[s : s + self.prompt_len] for s in starts]
        self.skipped, self.described = 0, f"{len(self.tokens)} book tokens"

    def sample(self, n: int, rng: torch.Generator) -> list[list[int]]:
        starts = torch.randint(0, len(self.tokens) - self.prompt_len, (n,), generator=rng)
        return [self.tokens[s : s + self.prompt_len].tolist() for s in starts.tolist()]

    def text_batch(self, n: int, rng: torch.Generator, device):
        """n windows of the books -> input_ids, labels (n, T): the next token at every position."""
        starts = torch.randint(0, len(self.tokens) - self.text_len - 1, (n,), generator=rng).tolist()
        windows = torch.stack([self.tokens[s : s + self.text_len + 1] for s in starts]).to(device)
        return windows[:, :-1], windows[:, 1:]


def make_prompts(spec: PromptSpec, enc, context: int, with_text: bool = False):
    """The prompt source spec.source names (--prompt-source; see settle_reward_args for its default)."""
    source = InstructionPrompts if spec.source == "instructions" else BookPrompts
    return source(spec, enc, context, with_text)
