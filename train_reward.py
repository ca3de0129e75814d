"""Train a reward model on human preferences: GPT-2's body plus a scalar head, as in InstructGPT.

Recipe 5 of the research notes. For each prompt, a ranking of answers (best first) gives K(K-1)/2 pairs; the
model learns to score the better answer of every pair higher. Its scores then judge other models
(python -m nanotune.evaluate) and reward PPO (train_ppo.py).

    python train_reward.py --model out/sft --out out/rm        # default data: the DPO preference set
    python train_reward.py --data ranked.jsonl   # {"instruction", "input"?, "responses": [best, ..., worst]}
    python train_reward.py --data pairs.jsonl --template raw   # {"prompt", "chosen", "rejected"}: continuations

Data: preference records of any format in docs/data.md, or ranked records (responses: K >= 2 answers, best
first). The prompt template and the seeded train/validation/test split are the SFT recipe's
(nanotune/data/instruct.py), so a prompt held out there is held out here. The pairs of one prompt stay together,
in one split and in one batch, as InstructGPT did. The reward of (prompt, answer) is the head's output at the
answer's last token. Outputs in --out: metrics.jsonl, summary.json, loss.svg and the reward model in the
transformers.GPT2ForSequenceClassification layout (model.safetensors + config.json).
"""

import sys

import torch
import torch.nn.functional as F

from nanotune import load_tokenizer
from nanotune.data.instruct import TEMPLATES, answers_end, encode_pair, load_splits, prompt_ids
from nanotune.data.sources import PREFERENCES_URL, default_file
from nanotune.flags import Parser, add_common_args, integer, parse_run_args, real
from nanotune.lifecycle.run import Run
from nanotune.lifecycle.step import clip_gradients, lr_at, make_optimizer, no_sync_unless_last, wrap_model
from nanotune.model.loader import load_model
from nanotune.model.peft import PeftSpec, apply_peft, describe_trainable
from nanotune.model.reward_model import PAD, RewardModel
from nanotune.plot import plot_curves
from nanotune.utils import NanotuneError


# loss = mean over pairs of -log sigmoid(r_chosen - r_rejected - margin)        (margin 0 unless given)
#        + center_coef * mean((r_chosen + r_rejected)^2)   keeps rewards near zero (their offset is free)
# chosen_rewards, rejected_rewards (P,); margin a float or (P,) tensor. logsigmoid is finite at any difference.
def reward_loss(chosen_rewards, rejected_rewards, margin=None, center_coef: float = 0.0):
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def encode_rankings(enc, examples, args):
    """Ranked examples -> [(answers, pairs)]: each answer's prompt + answer ids, truncated to --max-len, and the
    pairs (i, j) of answer indices, i ranked above j. -> rankings, how many answers were truncated"""
    rankings, truncated = [], 0
    for ex in examples:
        prompt, where = prompt_ids(enc, ex, args.template), f"{ex['source']}: record {ex['record']}"
        answers = []
        for response in ex["responses"]:
            p, r, cut = encode_pair(enc, prompt, response, args.max_len, where, answers_end(args.template))
            # the reward is read at the last token; the whole sequence is the input (encode_pair leaves max_len + 1
            # tokens, as SFT and DPO drop the last from their inputs), so at most --max-len
            answers.append((p + [t for t in r if t != enc.eot_token])[: args.max_len])
            truncated += cut
        pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]  # i ranked above j
        rankings.append((answers, pairs))
    return rankings, truncated


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, lr=1e-5, steps=200, batch_size=8, peft_methods=("none", "lora"))  # LoRA: merged at the end
    data = "preference or ranked records, one or more sources of any format in docs/data.md (default: download the "
    data += "preference set of 'LLMs from scratch')"
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="SOURCE", help=data)
    template = "prompt layout (as in SFT); raw: the prompt verbatim, the answer continues it (no <|endoftext|>)"
    p.add_argument("--template", default="alpaca", choices=TEMPLATES, help=template)
    max_len = "longest prompt + answer; longer answers are truncated (default 256)"
    p.add_argument("--max-len", type=integer(2), default=256, help=max_len)
    p.add_argument("--limit", type=integer(1), default=None, help="use only the first N records (quick runs)")
    p.add_argument("--margin", type=real(), default=None, help="required reward gap in the loss (default none)")
    center = "weight of mean((r_c + r_r)^2), keeping rewards near zero (default 0)"
    p.add_argument("--center-coef", type=real(0), default=0.0, help=center)
    p.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--eval-every", type=integer(1), default=25, help="held-out accuracy every N steps (default 25)")
    # what this recipe trained and measured: a --resume keeps them (nanotune/flags.py adds the model and --peft)
    return parse_run_args(p, argv, fixed_on_resume="--data --template --limit --max-len --margin --center-coef")


def main(argv=None):
    args = parse_args(argv)
    show = ("loss", "accuracy", "val_loss", "val_accuracy")
    with Run(args, __file__, outputs=("loss.svg",), show=show) as run:
        train(args, run)
    if run.exit_code:  # 2: the error line is printed; 130: interrupted, the resume command is printed
        sys.exit(run.exit_code)


def train(args, run):
    device = run.device
    enc = load_tokenizer()

    # ---- data: rankings -> token ids per answer; pairs (better, worse) index into a prompt's answers
    sources = args.data or [default_file("instruction-data-with-preference.json", PREFERENCES_URL)]
    path = " ".join(map(str, sources))
    train, val, test = load_splits(sources, "ranked", args.limit, args.seed)  # test stays untouched, for evaluation
    if not train or not val:
        raise NanotuneError(
            f"{path}: {len(train) + len(val) + len(test)} records give {len(train)} training and {len(val)} "
            "validation prompts; need at least one of each"
        )
    (rankings_train, cut_train), (rankings_val, cut_val) = (encode_rankings(enc, s, args) for s in (train, val))
    rankings, truncated = {"train": rankings_train, "val": rankings_val}, cut_train + cut_val
    n_pairs = {name: sum(len(p) for _, p in rankings[name]) for name in rankings}
    # a pair of two identical answers carries no preference: its loss stays log 2, whatever the model learns
    same = sum(answers[i] == answers[j] for answers, pairs in rankings["train"] for i, j in pairs)
    if same == n_pairs["train"]:
        raise NanotuneError(f"{path}: every training pair ranks two identical answers: there is nothing to learn")
    if same and run.master:
        print(
            f"warning: {same} of {n_pairs['train']} training pairs rank two identical answers (they teach nothing)",
            file=sys.stderr,
        )

    body, model_name = load_model(args.model, device, quiet=not run.master)
    if args.max_len > body.config.n_positions:
        raise NanotuneError(f"--max-len {args.max_len} exceeds the model's context of {body.config.n_positions}")
    torch.manual_seed(args.seed)  # the score head's initial weights
    model = RewardModel(body)
    peft = PeftSpec.from_flags(args)
    apply_peft(body, peft, model_name)  # --peft lora: freeze the body, add what trains; the score head trains
    run.summary.update(
        model=model_name,
        train_pairs=n_pairs["train"],
        val_pairs=n_pairs["val"],
        truncated_answers=truncated,
        world_size=run.world,
    )
    if run.master:
        print(
            f"reward model on {model_name} ({args.peft}: {describe_trainable(model)}) on {device} ({run.dtype}); "
            f"{len(train)} train / {len(val)} val prompts, {n_pairs['train']} / {n_pairs['val']} pairs; "
            f"{truncated} answers truncated; {args.batch_size * run.world} prompts a step",
            flush=True,
        )

    def pair_rewards(reward_model, group):
        """Every answer of every prompt in one forward -> (chosen rewards (P,), rejected rewards (P,))."""
        seqs = [a for answers, _ in group for a in answers]
        width = max(map(len, seqs))
        idx = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs], device=device)  # right padding
        with run.ctx:
            rewards = reward_model(idx).float()  # (N,)
        chosen, rejected, offset = [], [], 0
        for answers, pairs in group:
            chosen += [offset + i for i, _ in pairs]
            rejected += [offset + j for _, j in pairs]
            offset += len(answers)
        return rewards[chosen], rewards[rejected]

    @torch.no_grad()
    def evaluate():
        model.eval()
        parts = [
            pair_rewards(model, rankings["val"][i : i + args.batch_size])
            for i in range(0, len(rankings["val"]), args.batch_size)
        ]
        model.train()
        chosen, rejected = torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])
        return {
            "val_loss": reward_loss(chosen, rejected, args.margin, args.center_coef).item(),  # (training's loss)
            "val_accuracy": (chosen > rejected).float().mean().item(),
            "val_margin": (chosen - rejected).mean().item(),
        }

    if run.master and not run.resumed:
        before = evaluate()
        run.summary.update(val_accuracy_before=before["val_accuracy"], val_margin_before=before["val_margin"])
        run.log(0, **before)

    optimizer = make_optimizer(model, "adamw", args.lr, args.weight_decay, device)
    data_rng = torch.Generator().manual_seed(args.seed + run.rank)  # each rank draws its own prompts
    first_step = run.track(model, optimizer, data_rng)
    train_model = wrap_model(model, device, run.world, args.compile, args.activation_checkpointing)
    model.train()
    for step in range(first_step, args.steps + 1):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(len(rankings["train"]), (args.batch_size,), generator=data_rng).tolist()
        batch = [rankings["train"][i] for i in ids]
        batch_pairs = sum(len(pairs) for _, pairs in batch)
        step_loss, accuracy, n_tokens = 0.0, 0.0, 0
        for k in range(args.grad_accum):
            micro = batch[k :: args.grad_accum]  # whole prompts: a prompt's pairs stay in one micro-batch
            micro_pairs = sum(len(pairs) for _, pairs in micro)
            # under DDP the gradients are all-reduced once, in the last micro-batch's backward
            with no_sync_unless_last(train_model, last=k == args.grad_accum - 1):
                chosen_rewards, rejected_rewards = pair_rewards(train_model, micro)
                # prompts rank different numbers of answers: weighting each micro-batch's mean by its share of the
                # batch's pairs makes the sum exactly the batch's per-pair mean
                loss = reward_loss(chosen_rewards, rejected_rewards, args.margin, args.center_coef)
                (loss * micro_pairs / batch_pairs).backward()
            step_loss += loss.detach() * micro_pairs / batch_pairs  # (tensors: read back once, in run.stop_if_diverged)
            accuracy += (chosen_rewards > rejected_rewards).float().sum() / batch_pairs
            n_tokens += sum(len(a) for answers, _ in micro for a in answers)
        grad_norm = clip_gradients(model, args.grad_clip)  # the norm before clipping
        run.stop_if_diverged(step, step_loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.master and (step % args.eval_every == 0 or step == args.steps):
            run.log(step, **evaluate())
        run.log.count(n_tokens)
        if run.log.due(step):
            run.log.step(step, loss=step_loss, accuracy=accuracy, lr=lr, grad_norm=grad_norm)
        if run.checkpoint_due(step):
            run.save_checkpoint(step)
        if run.stop_requested:
            return

    if not run.master:
        return
    after = [m for m in run.log.history if "val_accuracy" in m][-1]
    run.summary.update(
        val_accuracy_after=after["val_accuracy"],
        val_margin_after=after["val_margin"],
        val_loss_after=after["val_loss"],
        steps=args.steps,
        lr=args.lr,
    )
    run.save_model(model, template=args.template)
    with run.optional("the loss plot"):
        plot_curves(
            run.out / "loss.svg",
            {"train": run.log.curve("loss"), "validation": run.log.curve("val_loss")},
            "reward model: -log sigmoid(r_chosen - r_rejected)",
            ylabel="loss",
        )
    s = run.summary
    print(
        f"held-out pairwise accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy_after']:.3f}, margin "
        f"{s['val_margin_before']:.3f} -> {s['val_margin_after']:.3f}; outputs in {run.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
