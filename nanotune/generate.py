"""Sampling with a KV cache: the prompt runs once, then each step feeds one new token per row."""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Sequence

import torch

from .data.instruct import format_prompt
from .decoding import KVCache, packed_layers
from .flags import Parser, integer, real
from .model.gpt import GPT
from .model.loader import load_model
from .retrieval import DEFAULT_PASSAGE_TOKENS, answer_reserve, open_index, rag_prompt_ids
from .tokenizer import load_tokenizer
from .utils import NanotuneError, die, pick_device


@torch.no_grad()
def generate(
    model: GPT,
    idx,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    banned_tokens: Sequence[int] = (),
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
    dtype: torch.dtype | None = None,
):
    """Continue prompts by max_new_tokens tokens.

    idx: a (B, T) or (T,) tensor of token ids -> a tensor (B, T + max_new_tokens) (or (T + n,));
         or a list of token-id lists of any lengths -> a list of lists (prompt + continuation).
    temperature 0 is greedy. banned_tokens are never produced. With eos_token, a row stops after
    producing it: tensor outputs fill the rest of that row with eos_token, list outputs end there.
    The prompts run through the model at once; then each token is one GPT.decode_step, whose shapes never
    change. compile: torch.compile that step, once per model (CUDA graphs on a GPU); off by default, as compiling
    takes tens of seconds that only many or long generations (RL rollouts) win back; a string names a backend
    ("eager" in the tests). dtype torch.bfloat16: on a CPU with oneDNN's bfloat16 kernels, the tied head and the
    large layers read packed bfloat16 copies of their weights (nanotune.decoding.packed_layers; activations stay
    float32); on a GPU, bfloat16 autocast. Its logits are rounded, so log-probs that matter are computed again
    in float32, as PPO and GRPO do. In float32 on a CPU, a generation long enough to pay for it (256 tokens for one
    row, 64 for four) reads packed float32 copies of the large layers (gpt2's, not nano's): the same sums in
    another order.
    """
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    device = model.wte.weight.device
    as_list = not isinstance(idx, torch.Tensor)
    squeeze = False
    attention_mask = None
    if as_list:
        rows = [list(map(int, r)) for r in idx]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("generate: every prompt needs at least one token")
        width = max(map(len, rows))
        # left padding, so every row's next token lands in the same column
        idx = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        if any(len(r) != width for r in rows):
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    else:
        if idx.dim() == 1:
            idx, squeeze = idx[None], True
        if idx.shape[1] == 0:
            raise ValueError("generate: the prompt needs at least one token")
        idx = idx.to(device)
    T = idx.shape[1]
    if T + max_new_tokens + model.n_virtual > model.config.n_positions:
        virtual = f" + {model.n_virtual} prompt-tuning embeddings" if model.n_virtual else ""
        raise ValueError(
            f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}){virtual} = "
            f"{T + max_new_tokens + model.n_virtual} exceeds the context of {model.config.n_positions} tokens"
        )
    sampling, B = (temperature, top_k, top_p, banned_tokens, eos_token, generator), idx.shape[0]
    # on a CPU, the large layers read packed copies (decoding.packed_layers; inductor cannot lower the kernel):
    # bfloat16 ones for bfloat16 sampling, float32 ones for several rows when their tokens pay for packing them
    eager_cpu = device.type == "cpu" and not compile
    packed = dtype == torch.bfloat16 and eager_cpu
    # (packing gpt2's layers takes ~0.4 s; whole greedy generations of gpt2's shape with it, packing included,
    # against without: 2 rows x 16 tokens 0.87x, 2 x 24 1.21-1.27x, 4 x 24 1.71x, 8 x 24 1.53x, 16 x 24 1.43x,
    # 64 x 24 (GRPO's rollout) 1.28x, 8 x 8 1.07x: a few tokens never pay, however many rows; one row does not
    # read them)
    packed_fp32 = dtype is None and eager_cpu and B >= 2 and min(B, 8) * max_new_tokens >= 48
    if packed or packed_fp32:
        context = packed_layers(model, torch.bfloat16 if packed else torch.float32)
    elif dtype is not None and device.type != "cpu":
        context = torch.autocast(device.type, dtype=dtype)
    else:
        context = contextlib.nullcontext()
    # a copy of the head (see KVCache) when the tokens pay for making it: one row of 32 tokens or more; several
    # rows, their packed float32 copy (nano ~20 ms, gpt2 ~65 ms to make), when B x tokens >= 1024 (GRPO's rollout
    # of 64 answers of 24 tokens gains 1.2-1.45x for nano; 2-3 rows read it no faster than wte @ x.T)
    copy_head = (B == 1 and max_new_tokens >= 32) or (eager_cpu and B >= 4 and B * max_new_tokens >= 1024)
    with context:
        out = decode(model, idx, attention_mask, max_new_tokens, sampling, compile, packed, copy_head)
    if not as_list:
        return out[0] if squeeze else out
    result = []
    for r, prompt in zip(out.tolist(), rows):
        seq = prompt + r[width:]
        if eos_token is not None and eos_token in r[width:]:
            seq = prompt + r[width : width + r[width:].index(eos_token) + 1]
        result.append(seq)
    return result


def decode(model: GPT, idx, attention_mask, max_new_tokens: int, sampling, compile, packed: bool, copy_head: bool):
    """The loop of generate: the prompts (B, T) at once into a KV cache, then one decode step per new token.
    -> (B, T + max_new_tokens) token ids, rows that ended filled with eos_token"""
    temperature, top_k, top_p, banned_tokens, eos_token, generator = sampling
    device, (B, T) = idx.device, idx.shape
    total = T + max_new_tokens
    banned = torch.tensor(sorted(set(int(t) for t in banned_tokens)), dtype=torch.long, device=device)
    # cache slots rounded up to 64, so that a compiled step serves generations of nearby lengths alike
    slots = min(model.config.n_positions, -(-(total + model.n_virtual) // 64) * 64)
    cache = KVCache(model, B, slots, copy_head=copy_head, packed=packed, compiled=bool(compile))
    out = torch.empty(B, total, dtype=torch.long, device=device)
    out[:, :T] = idx
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # have all rows ended? Reading that back waits for the device, so off the CPU it is asked every 16 tokens
    # (a row that ended goes on producing eos_token meanwhile, which the output holds anyway)
    ask_every = 1 if device.type == "cpu" else 16
    logits = model(idx, attention_mask=attention_mask, cache=cache)[:, -1, :]  # the prompts at once: (B, V)
    real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    cache.valid[:, : cache.length] = torch.cat([real.new_ones(B, model.n_virtual), real], dim=1)  # (+ prompt tuning)
    cache.ragged = attention_mask is not None  # (left padding: each row's real keys start elsewhere)
    step, at = decode_step(model, compile), torch.tensor([cache.length], device=device)  # at: the next slot
    for t in range(T, total):
        next_token = pick_tokens(logits.float(), temperature, top_k, top_p, banned, generator)  # (B,)
        if eos_token is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_token), next_token)
            done |= next_token == eos_token
        out[:, t] = next_token
        if t + 1 == total or (eos_token is not None and (t - T + 1) % ask_every == 0 and bool(done.all())):
            out[:, t + 1 :] = eos_token if eos_token is not None else 0
            break
        # eager, attention reads the slots filled so far; compiled, all of them (one graph for every token)
        span = None if compile else model.n_virtual + t + 1
        logits = step(next_token[:, None], cache, at, span)  # (B, V)
        at += 1  # (in place, on the device: no wait for it)
    return out


_compiled = weakref.WeakKeyDictionary()  # model -> {backend: its compiled decode step}


def decode_step(model: GPT, compile: bool | str):
    """model.decode_step, or with compile its torch.compile'd form, made once per model and backend (shapes fixed:
    no recompiling from one token to the next; on a GPU, CUDA graphs replay the whole step)."""
    if not compile:
        return model.decode_step
    backend = compile if isinstance(compile, str) else "inductor"
    steps = _compiled.setdefault(model, {})
    if backend not in steps:
        mode = "reduce-overhead" if backend == "inductor" and model.wte.weight.device.type == "cuda" else None
        steps[backend] = torch.compile(model.decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return steps[backend]


def pick_tokens(logits, temperature, top_k, top_p, banned, generator):
    """logits (B, V) -> next token ids (B,): greedy at temperature 0, else sampled (top-k, nucleus); banned: ids
    never picked."""
    if banned.numel():
        logits = logits.index_fill(1, banned, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # nucleus: keep the smallest set of tokens whose probability adds up to top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > top_p  # tokens past the nucleus (first one always kept)
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def add_docs_args(p):
    """--docs, --passages and --passage-tokens: retrieval-augmented prompts (nanotune/retrieval.py)."""
    docs = "answer from documents: a collection (folder of .txt/.md, JSONL of {id, text}) or a saved index folder "
    p.add_argument("--docs", default=None, help=docs + "(a train_raft.py run's index/); see docs/raft.md")
    passages = "with --docs: passages retrieved (BM25) and put before the question (default 3)"
    p.add_argument("--passages", type=integer(1), default=None, help=passages)
    tokens = f"with a --docs collection: longest passage in tokens (default {DEFAULT_PASSAGE_TOKENS})"
    p.add_argument("--passage-tokens", type=integer(1), default=DEFAULT_PASSAGE_TOKENS, help=tokens)


def passages_prompt(args, model, enc) -> list[int]:
    """The instruction (and its input) as the question, the top --passages passages before it; each passage used
    is named on stderr, and whole passages give way when the context is short."""
    index = open_index(args.docs, enc, args.passage_tokens)
    question = args.instruction + (f"\n{args.input}" if args.input else "")
    hits = index.top_k(question, args.passages or 3)
    context = model.config.n_positions - model.n_virtual
    reserve = answer_reserve(args.max_new_tokens, context)
    ids, kept = rag_prompt_ids(enc, question, [text for _, _, text, _ in hits], args.template, context, reserve)
    for _, passage_id, _, score in hits[:kept]:
        print(f"passage {passage_id} (BM25 score {score:.2f})", file=sys.stderr, flush=True)
    return ids


def main(argv=None):
    """python -m nanotune.generate: sample from a model, to look at what it writes.

    python -m nanotune.generate --model out/sft --instruction "Name three rivers." --temperature 0
    python -m nanotune.generate --model gpt2 --prompt "It was a dark and stormy night" --samples 3
    """
    p = Parser(main.__doc__, prog="python -m nanotune.generate")
    p.add_argument("--model", default="auto", help="auto, a preset, an output folder or a .safetensors file")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text to continue as it is")
    text.add_argument("--instruction", help="an instruction, wrapped in the SFT recipe's template")
    p.add_argument("--input", default="", help="with --instruction: its input field")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "plain"], help="prompt layout (as in SFT)")
    p.add_argument("--max-new-tokens", type=integer(1), default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=real(0), default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=integer(0), default=50, help="sample among the k most likely tokens (0: all)")
    top_p = "nucleus sampling: the smallest set reaching p (default: off)"
    p.add_argument("--top-p", type=real(0, 1, low_open=True), default=None, help=top_p)
    p.add_argument("--samples", type=integer(1), default=1, help="how many continuations (default 1)")
    p.add_argument("--seed", type=int, default=1337, help="random seed of the sampling")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    add_docs_args(p)
    args = p.parse_args(argv)
    if args.instruction is not None and not args.instruction.strip():
        die("--instruction is empty: give the model something to answer")
    if args.passages is not None and args.docs is None:
        die("--passages needs --docs")
    if args.docs is not None and args.prompt is not None:
        die("--docs needs --instruction: the passages go into the chat template, before the question")
    try:
        device = pick_device(args.device)
        model, _ = load_model(args.model, device)
        enc = load_tokenizer()
        text = (
            args.prompt
            if args.prompt is not None
            else format_prompt({"instruction": args.instruction, "input": args.input}, args.template)
        )
        ids = enc.encode_ordinary(text) or [enc.eot_token]
        if args.docs is not None:  # the question with its retrieved passages, in the layout RAFT trains on
            ids = passages_prompt(args, model, enc)
            text = enc.decode(ids)
        room = model.config.n_positions - model.n_virtual - len(ids)
        if room < 1:
            raise NanotuneError(
                f"the prompt has {len(ids)} tokens: no room left in the context of {model.config.n_positions}"
            )
        if args.max_new_tokens > room:
            print(
                f"warning: --max-new-tokens {args.max_new_tokens} does not fit the model's context of "
                f"{model.config.n_positions} after the prompt; generating {room}",
                file=sys.stderr,
            )
        generator = torch.Generator(device).manual_seed(args.seed)
        outputs = generate(
            model,
            [ids] * args.samples,
            min(args.max_new_tokens, room),
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            eos_token=enc.eot_token,
            generator=generator,
        )
    except (NanotuneError, ValueError) as e:
        die(str(e))
    for i, seq in enumerate(outputs):
        if args.samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text + enc.decode([t for t in seq[len(ids) :] if t != enc.eot_token]), flush=True)


if __name__ == "__main__":
    main()
