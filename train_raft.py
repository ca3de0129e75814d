"""Retrieval-augmented fine-tuning (RAFT: Zhang et al. 2024, arXiv 2403.10131): teach GPT-2 to answer from the
documents it is given, and to ignore the ones that do not hold the answer.

Each training example is drawn afresh at every step: a question, its gold passage(s) kept with probability --p
and --distractors other passages (--distractor-source random, as the official implementation, or bm25: the
hardest non-gold ones), shuffled, in the RAG layout of nanotune/retrieval.py (<DOCUMENT> blocks, then the
question, inside the chat template). The loss is SFT's (instruct.sft_loss): the NLL of the answer tokens only;
the passages are prompt, masked. A question asked without its gold passage still trains its answer: the paper's
way of keeping what the model knows from the documents it was trained on.

    python train_raft.py --data questions.jsonl --docs docs/ --out out/raft     # records {question, answer, gold}
    python -m nanotune.qa --model out/raft --data test.jsonl --docs out/raft/index --passages 3

Outputs in --out: metrics.jsonl, summary.json (held-out exact match and token F1 with --passages retrieved),
responses.jsonl, loss.svg, index/ (the BM25 index: --docs of the tools reloads it as it is), the weights.
"""

import json
import random
import sys

import torch

from nanotune import load_tokenizer
from nanotune.data.instruct import IGNORE, collate_masked, sft_loss, split_examples, token_logprobs
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.model.loader import load_model
from nanotune.model.peft import PeftSpec, apply_peft, describe_trainable
from nanotune.plot import plot_curves
from nanotune.qa import answer_questions, raft_example, read_questions, scores
from nanotune.retrieval import DEFAULT_PASSAGE_TOKENS, open_index, recall_at_k
from nanotune.utils import NanotuneError, perplexity


# The head (50,257 x width, three quarters of nano's work per token) runs only from the first position where some
# row has an answer token: the passages before it are masked anyway. labels (B, T) -> positions (T - first,)
def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    first = int((labels != IGNORE).any(dim=0).nonzero()[0])
    return torch.arange(first, labels.shape[1], device=labels.device)


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=5e-5, steps=200, batch_size=8)
    p.add_argument("--data", required=True, help="question records, JSON/JSONL {question, answer, gold: id or ids}")
    docs = "the collection: a folder of .txt/.md files, a JSONL of {id, text} records, or a saved index folder"
    p.add_argument("--docs", required=True, help=docs)
    tokens = f"longest passage in tokens (default {DEFAULT_PASSAGE_TOKENS}: four fit nano's context with a question)"
    p.add_argument("--passage-tokens", type=integer(1), default=DEFAULT_PASSAGE_TOKENS, help=tokens)
    p.add_argument("--p", type=real(0, 1), default=0.8, help="probability that the gold passage is kept (0.8)")
    p.add_argument("--distractors", type=integer(0), default=3, help="other passages per example (default 3)")
    source = "random passages (the official implementation) or bm25: the best-scoring non-gold ones (default random)"
    p.add_argument("--distractor-source", default="random", choices=["random", "bm25"], help=source)
    # plain: alpaca's header would take 30 of nano's 256 tokens that a passage needs
    p.add_argument("--template", default="plain", choices=["alpaca", "plain"], help="chat template (default plain)")
    p.add_argument("--max-len", type=integer(2), default=256, help="longest sequence; distractors give way first")
    p.add_argument("--limit", type=integer(1), default=None, help="use only the first N question records")
    p.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--eval-every", type=integer(1), default=25, help="validation loss every N steps (default 25)")
    responses = "held-out questions answered after training, with retrieved passages (default 50; 0: none)"
    p.add_argument("--responses", type=integer(0), default=50, help=responses)
    p.add_argument("--passages", type=integer(1), default=3, help="passages retrieved for those answers (default 3)")
    p.add_argument("--max-new-tokens", type=integer(1), default=32, help="length limit of those answers")
    fixed = "--data --docs --passage-tokens --p --distractors --distractor-source --template --max-len --limit"
    return parse_run_args(p, argv, fixed_on_resume=fixed)


def main(argv=None):
    args = parse_args(argv)
    with Run(args, __file__, outputs=("responses.jsonl", "loss.svg", "index"), show=("loss", "val_ppl")) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def train(args, run):
    device = run.device
    enc = load_tokenizer()

    # ---- data: the collection indexed, every question's gold checked to be in it, a seeded split by question
    index = open_index(args.docs, enc, args.passage_tokens)
    questions = read_questions(args.data, index, args.limit, need_gold=True)
    train_q, val_q, test_q = split_examples(questions, args.seed)
    if not train_q or not val_q:
        raise NanotuneError(
            f"{args.data}: {len(questions)} questions give {len(train_q)} training and {len(val_q)} validation "
            "questions; need at least one of each"
        )
    # the validation examples are drawn once, with the training's p and distractors, so every evaluation sees the same
    val_rng = random.Random(args.seed)
    val_rows = [raft_example(enc, q, index, args, args.template, args.max_len, val_rng)[:2] for q in val_q]

    model, model_name = load_model(args.model, device, quiet=not run.master)
    apply_peft(model, PeftSpec.from_flags(args), model_name)
    context = model.config.n_positions - model.n_virtual
    if args.max_len > context:
        raise NanotuneError(f"--max-len {args.max_len} exceeds the model's context of {context}")
    answered = test_q[: args.responses]
    golds = [q["gold"] for q in answered]
    recall = recall_at_k(index, [q["question"] for q in answered], golds, args.passages) if answered else None
    run.summary.update(
        model=model_name,
        passages=len(index.passages),
        train_questions=len(train_q),
        p=args.p,
        distractors=args.distractors,
        distractor_source=args.distractor_source,
        world_size=run.world,
    )
    if run.master:
        print(
            f"model {model_name} ({args.peft}: {describe_trainable(model)}) on {device} ({run.dtype}); "
            f"{len(index.passages)} passages of <= {index.passage_tokens} tokens from {index.source}; "
            f"{len(train_q)} train / {len(val_q)} val / {len(test_q)} test questions; gold kept with p = {args.p}, "
            f"{args.distractors} {args.distractor_source} distractors; effective batch {args.batch_size * run.world}",
            flush=True,
        )

    @torch.no_grad()
    def validate() -> dict:
        """Mean NLL per answer token of the validation examples, and its perplexity."""
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val_rows), args.batch_size):
            input_ids, labels = collate_masked(val_rows[i : i + args.batch_size], enc.eot_token, device)
            positions = answer_positions(labels)
            with run.ctx:
                logits = model(input_ids, positions=positions)  # (B, len(positions), V)
            total -= token_logprobs(logits, labels[:, positions]).sum().item()
            count += int((labels != IGNORE).sum())
        model.train()
        return {"val_loss": total / count, "val_ppl": perplexity(total / count)}

    if run.master and not run.resumed:
        run.log(0, **validate())

    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own examples
    first_step = run.track(model, optimizer, data_rng)
    train_model = wrap_model(model, device, run.world, args.compile, args.activation_checkpointing)
    model.train()
    gold_kept = 0
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the questions, and each one's passages: drawn from data_rng alone, so a resumed run draws what it would have
        picks = torch.randint(len(train_q), (args.batch_size,), generator=data_rng).tolist()
        seeds = torch.randint(2**62, (args.batch_size,), generator=data_rng).tolist()
        batch = []
        for i, seed in zip(picks, seeds):
            ids, mask, _, kept = raft_example(
                enc, train_q[i], index, args, args.template, args.max_len, random.Random(seed)
            )
            batch.append((ids, mask))
            gold_kept += kept
        n_response = sum(int(mask[1:].sum()) for _, mask in batch)  # the answer tokens that are labels
        step_loss, n_tokens = 0.0, 0
        for k in range(args.grad_accum):
            micro = batch[k :: args.grad_accum]
            input_ids, labels = collate_masked(micro, enc.eot_token, device)  # (b, T): labels only on answers
            positions = answer_positions(labels)
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                with run.ctx:
                    logits = train_model(input_ids, positions=positions)  # (b, len(positions), V)
                loss = sft_loss(logits, labels[:, positions], n_response=n_response)  # the batch's per-token mean
                loss.backward()
            step_loss += loss.detach()
            n_tokens += input_ids.numel()
        grad_norm = clip_gradients(model, args.grad_clip)  # the norm before clipping
        run.stop_if_diverged(step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step, **validate())
        run.log.count(n_tokens)
        if run.log.due(step):
            run.log.step(step, loss=step_loss, lr=lr, grad_norm=grad_norm)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    if not run.master:
        return
    val_losses = [v for _, v in run.log.curve("val_loss")]
    drawn = (args.steps - first_step + 1) * args.batch_size
    run.summary.update(
        val_loss_before=val_losses[0],
        val_loss_after=val_losses[-1],
        val_ppl_before=perplexity(val_losses[0]),
        val_ppl_after=perplexity(val_losses[-1]),
        gold_kept_share=gold_kept / drawn if drawn else None,  # this process's draws: about --p
        steps=args.steps,
        lr=args.lr,
    )
    run.save_model(model, template=args.template)
    index.save(run.out / "index")
    with run.optional("answering the held-out questions"):
        rows, cut = answer_questions(
            model, enc, answered, index, args.passages, False, args.template, args.max_new_tokens
        )
        run.write_text("responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if rows:
            result = scores(rows)
            run.summary.update(heldout=result | {"passages": args.passages, "recall_at_k": recall, "cut": cut})
            print(
                f"{len(rows)} held-out questions, {args.passages} passages retrieved (recall@{args.passages} "
                f"{recall:.1%}): exact match {result['exact_match']:.1%}, token F1 {result['f1']:.3f}",
                flush=True,
            )
    with run.optional("the loss plot"):
        curves = {"train": run.log.curve("loss"), "validation": run.log.curve("val_loss")}
        plot_curves(run.out / "loss.svg", curves, title="RAFT: answer-token NLL (nats)", ylabel="NLL (nats per token)")
    s = run.summary
    print(f"validation perplexity {s['val_ppl_before']:.2f} -> {s['val_ppl_after']:.2f}; outputs in {run.out}")


if __name__ == "__main__":
    main()
