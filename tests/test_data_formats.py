"""Every record shape of docs/data.md read into the same examples; multi-turn SFT's mask and loss by hand; several
sources drawn by weight, with validation per source."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train_sft
from nanotune import GPT, load_tokenizer
from nanotune.data.chat import ALPACA_HEADER
from nanotune.data.formats import examples
from nanotune.data.instruct import IGNORE, Mixture, collate_masked, encode_example, load_splits
from nanotune.utils import NanotuneError
from train_sft import sft_loss

USER, ANSWER = {"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Nile."}


def one(record, kind="sft"):
    (example,) = examples([record], "data.jsonl", kind)
    return example


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [USER, ANSWER]},  # OpenAI's fine-tuning JSONL, TRL's conversational
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "river."}]},
                ANSWER,
            ]
        },
        {"conversations": [{"from": "human", "value": "Name a river."}, {"from": "gpt", "value": "The Nile."}]},
        {"prompt": "Name a river.", "completion": "The Nile."},  # TRL's prompt-completion
        {"prompt": [USER], "completion": [ANSWER]},  # the same, conversational
        {"instruction": "Name a river.", "input": None, "output": "The Nile."},  # Alpaca (a Parquet row's None)
        {"prompt": "Name a river.", "response": "The Nile."},
    ],
)
def test_every_sft_shape_becomes_the_same_conversation(record):
    ex = one(record)
    assert ex["conversation"] == [USER, ANSWER] and ex["prompt"] == [USER] and ex["answer"] == "The Nile."
    assert ex["text"] is None and ex["record"] == 0 and ex["source"] == "data.jsonl"


def test_conversations_keep_system_turns_weights_and_alpaca_input():
    another = [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "The Amazon."}]
    ex = one({"messages": [{"role": "developer", "content": "Be brief."}, USER, ANSWER | {"weight": 0}, *another]})
    assert ex["conversation"][0] == {"role": "system", "content": "Be brief."}
    assert ex["conversation"][2] == ANSWER | {"weight": 0} and ex["answer"] == "The Amazon."
    assert ex["prompt"] == ex["conversation"][:4]  # everything before the last trained answer
    alpaca = one({"instruction": "Translate.", "input": "chat", "output": "Katze"})
    assert alpaca["prompt"] == [{"role": "user", "content": "Translate.", "input": "chat"}]
    assert one({"text": "Call me Ishmael."})["text"] == "Call me Ishmael."


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "Name a river.", "input": "", "chosen": "The Nile.", "rejected": "Paris."},
        {"prompt": "Name a river.", "chosen": "The Nile.", "rejected": "Paris.", "chosen_score": 1.0},  # pairs.jsonl
        {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "Paris."}]},  # TRL
        {"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "Paris."}]},  # implicit prompt
    ],
)
def test_every_preference_shape_becomes_the_same_pair(record):
    ex = one(record, "preference")
    assert (ex["prompt"], ex["chosen"], ex["rejected"]) == ([USER], "The Nile.", "Paris.")


def test_an_implicit_text_prompt_is_cut_as_trl_cuts_it():
    # TRL's extract_prompt: the shared beginning, less the space before the first difference
    human = "Human: Name a river. Assistant:"
    ex = one({"chosen": f"{human} The Nile.", "rejected": f"{human} Paris."}, "preference")
    assert ex["prompt"] == [{"role": "user", "content": "Human: Name a river. Assistant:"}]
    assert (ex["chosen"], ex["rejected"]) == (" The Nile.", " Paris.")


@pytest.mark.parametrize(
    "record, kind, message",
    [
        (
            {"question": "a", "answer": "b"},
            "sft",
            "data.jsonl: record 0 fits no SFT format (its keys: answer, question)",
        ),
        ({"instruction": "a"}, "sft", "record 0 has no 'output' key"),
        ({"messages": [USER, {"role": "tool", "content": "{}"}]}, "sft", "message 1 has role 'tool'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, ANSWER]},
            "sft",
            "content parts of type 'image_url': only text parts are supported",
        ),
        ({"messages": [USER | {"weight": 1}, ANSWER]}, "sft", "only assistant messages take a weight, 0 or 1"),
        ({"messages": [USER, ANSWER | {"weight": 0}]}, "sft", "no assistant message to train on"),
        ({"conversations": [{"from": "narrator", "value": "x"}]}, "sft", "has from 'narrator'"),
        ({"messages": "hello"}, "sft", "the messages must be a non-empty list, got str"),
        ({"prompt": "a", "chosen": "b"}, "preference", "record 0 has no 'rejected' key"),
        ({"prompt": [USER], "chosen": [USER, ANSWER], "rejected": [ANSWER]}, "preference", "expected one assistant"),
        ({"chosen": "yes", "rejected": "no"}, "preference", "chosen and rejected share no beginning"),
        ({"text": "x"}, "preference", "fits no preference format (its keys: text); expected prompt/chosen/rejected"),
        ({"text": "x"}, "prompt", "record 0 is plain text: it has no prompt to answer"),
    ],
)
def test_a_record_that_fits_no_shape_is_one_line_naming_it(record, kind, message):
    with pytest.raises(NanotuneError) as e:
        examples([{"messages": [USER, ANSWER]}, record] if kind == "sft" else [record], "data.jsonl", kind)
    text = str(e.value).replace("record 1", "record 0")
    assert message in text and "\n" not in text and text.startswith("data.jsonl: record")


# ---------------------------------------------------------------- multi-turn SFT: the mask and the loss by hand


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": "The Nile."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "The Amazon."},
]


def by_hand(enc, weights=(1, 1, 1)):
    """The Alpaca layout written out: each exchange's prompt, its answer and <|endoftext|>; the answers train."""
    block = ALPACA_HEADER + "\n\n### Instruction:\n{}\n\n### Response:\n"
    ids, mask = [], []
    for i, (question, answer) in enumerate(
        [("Hi", "Hello."), ("Name a river.", "The Nile."), ("Another?", "The Amazon.")]
    ):
        prompt = enc.encode_ordinary(("Be brief.\n\n" if i == 0 else "") + block.format(question))
        answer = enc.encode_ordinary(answer) + [enc.eot_token]
        ids, mask = ids + prompt + answer, mask + [False] * len(prompt) + [bool(weights[i])] * len(answer)
    return ids, mask


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 0, 1)])
def test_multi_turn_sft_trains_every_assistant_turn_and_nothing_else(tiny, weights):
    enc = load_tokenizer()
    messages = [
        m | ({"weight": weights[i // 2 - 1]} if m["role"] == "assistant" else {}) for i, m in enumerate(CONVERSATION)
    ]
    (ex,) = examples([{"messages": messages}], "x")
    ids, mask, cut = encode_example(enc, ex, "alpaca", 255, "x")
    assert ids.dtype == np.uint16 and mask.dtype == bool  # held compactly: a large dataset is in memory once
    ids, mask = ids.tolist(), mask.tolist()
    assert (ids, mask) == by_hand(enc, weights) and not cut
    # the loss, in float64 by hand: mean NLL of every trained token given all before it
    model = GPT.from_pretrained(tiny).double().eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))  # (1, T, V)
    logprobs = torch.log_softmax(logits[0], -1)
    trained = [t for t in range(1, len(ids)) if mask[t]]
    expected = -sum(logprobs[t - 1, ids[t]].item() for t in trained) / len(trained)
    input_ids, labels = collate_masked([(ids, mask)], enc.eot_token, "cpu")
    assert input_ids[0].tolist() == ids[:-1] and (labels != IGNORE).sum().item() == len(trained)
    assert sft_loss(logits.float(), labels).item() == pytest.approx(expected, rel=1e-5)
    assert enc.eot_token in [ids[t] for t in trained]  # the end of each trained answer is itself learned


def test_a_conversation_cut_at_max_len_keeps_its_first_answers(tiny):
    enc = load_tokenizer()
    (ex,) = examples([{"messages": CONVERSATION}], "x")
    ids, mask, cut = encode_example(enc, ex, "alpaca", 60, "x")
    full, full_mask = by_hand(enc)
    assert cut and ids.tolist() == full[:61] and mask.tolist() == full_mask[:61]
    with pytest.raises(NanotuneError, match="x: the prompt has 36 tokens, leaving no room"):
        encode_example(enc, ex, "alpaca", 30, "x")


# ---------------------------------------------------------------- several sources at once


def test_the_mixture_draws_each_source_as_often_as_its_weight_asks():
    rng = torch.Generator().manual_seed(0)
    draws = Mixture([5, 50], [3, 1]).sample(4000, rng)
    share = sum(s == 0 for s, _ in draws) / len(draws)
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)  # within 4 standard deviations
    assert {i for s, i in draws if s == 0} == set(range(5))  # the small source repeats
    assert all(0 <= i < (5, 50)[s] for s, i in draws)
    # by size (the default): the draws one list of all examples would give, so one source trains as before
    rng_a, rng_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    flat = [s * 5 + i for s, i in Mixture([5, 50]).sample(64, rng_a)]
    assert flat == torch.randint(55, (64,), generator=rng_b).tolist()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.integers(0, 2**31))
def test_draws_by_size_are_uniform_indices_into_the_sources_end_to_end(sizes, seed):
    draws = Mixture(sizes).sample(50, torch.Generator().manual_seed(seed))
    starts = [sum(sizes[:s]) for s in range(len(sizes))]
    expected = torch.randint(sum(sizes), (50,), generator=torch.Generator().manual_seed(seed)).tolist()
    assert [starts[s] + i for s, i in draws] == expected and all(i < sizes[s] for s, i in draws)


def test_sft_on_two_sources_of_different_formats_reports_each(tiny, tmp_path, shared):
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}!"},
                {"role": "user", "content": "Again."},
                {"role": "assistant", "content": f"{i}!"},
            ]
        }
        for i in range(40)
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    alpaca = shared / "data" / "instruction-data.json"
    out = tmp_path / "sft"
    argv = [
        "--model",
        tiny,
        "--data",
        str(tmp_path / "chats.jsonl"),
        str(alpaca),
        "--mix",
        "1,3",
        "--limit",
        "60",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--max-len",
        "96",
        "--responses",
        "2",
        "--out",
        str(out),
    ]
    train_sft.main(argv)
    s = json.loads((out / "summary.json").read_text())
    assert s["sources"] == {"chats": {"train": 34, "weight": 1.0}, "instruction-data": {"train": 51, "weight": 3.0}}
    assert set(s["per_source"]) == {"chats", "instruction-data"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in lines if "val_loss" in m][-1]
    # the overall loss is the token-weighted mean of the sources' (counted here from the same splits)
    enc = load_tokenizer()
    counts = []
    for source in (tmp_path / "chats.jsonl", alpaca):
        _, v, _ = load_splits([source], "sft", 60, 1337)
        counts.append(sum(sum(encode_example(enc, ex, "alpaca", 96, "")[1][1:]) for ex in v))
    mixed = (val["val_loss/chats"] * counts[0] + val["val_loss/instruction-data"] * counts[1]) / sum(counts)
    assert val["val_loss"] == pytest.approx(mixed, rel=1e-6)
    assert s["per_source"]["chats"]["val_ppl_after"] == pytest.approx(math.exp(val["val_loss/chats"]), rel=1e-6)
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer_config.json").is_file()
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["source"] for r in responses] == [str(tmp_path / "chats.jsonl"), str(alpaca)]  # one of each, in turn


def test_mix_needs_one_weight_per_source(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--data", "a.jsonl", "b.jsonl", "--mix", "1,2,3"])
    assert "--mix gives 3 weights for 2 --data sources" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--data", "a.jsonl", "--mix", "0"])
    assert "every weight must be a positive number" in capsys.readouterr().err


def test_dpo_reward_and_rl_prompts_take_conversations_whose_prompt_is_all_before_the_last_answer(tmp_path):
    import train_dpo
    import train_reward
    from nanotune.data.chat import render
    from nanotune.rewards import InstructionPrompts, PromptSpec

    enc = load_tokenizer()
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    prompts = [history + [{"role": "user", "content": f"Name river {i}."}] for i in range(40)]
    pairs = [
        {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": "The Nile."}],
            "rejected": [{"role": "assistant", "content": "Paris."}],
        }
        for p in prompts
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    expected = {tuple(render(enc, p, "alpaca", add_generation_prompt=True)[0]) for p in prompts}
    args = train_dpo.parse_args(["--data", str(tmp_path / "pairs.jsonl"), "--max-len", "200"])
    dpo_pairs, _, _ = train_dpo.load_pairs(enc, args, master=True)
    for (prompt, chosen), (same, rejected) in dpo_pairs["train"]:
        assert tuple(prompt) in expected and prompt == same
        assert (chosen, rejected) == (
            enc.encode("The Nile.<|endoftext|>", allowed_special="all"),
            enc.encode("Paris.<|endoftext|>", allowed_special="all"),
        )
    args = train_reward.parse_args(["--data", str(tmp_path / "pairs.jsonl"), "--max-len", "200"])
    rankings, _ = train_reward.encode_rankings(enc, examples(pairs, "x", "ranked"), args)
    nile = enc.encode_ordinary("The Nile.")  # the reward is read at the answer's last token: no <|endoftext|>
    assert all(tuple(best[: -len(nile)]) in expected and best[-len(nile) :] == nile for (best, _), _ in rankings)
    # PPO and GRPO: the held-out and training prompts of conversations, preference data's too
    for records in (pairs, [{"messages": p + [{"role": "assistant", "content": "The Nile."}]} for p in prompts]):
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rl_args = PromptSpec(
            source="instructions",
            data=[str(tmp_path / "data.jsonl")],
            limit=None,
            seed=1337,
            template="alpaca",
            max_new_tokens=16,
            eval_prompts=8,
        )
        rl = InstructionPrompts(rl_args, enc, 256, with_text=True)
        assert {tuple(p) for p in rl.train + rl.heldout} <= expected and len(rl.train) == 34
        assert all(enc.decode(answer) == "The Nile.<|endoftext|>" for _, answer in rl.texts)


def test_the_review_cases_prompt_input_whole_conversations_prefix_answers_and_raw_conversations():
    # a prompt/response record's input, as an Alpaca one's; instruction wins over prompt, as before
    ex = one({"prompt": "Translate.", "input": "chat", "response": "Katze"})
    assert ex["prompt"] == [{"role": "user", "content": "Translate.", "input": "chat"}]
    assert one({"instruction": "A", "prompt": "B", "output": "C"})["prompt"] == [{"role": "user", "content": "A"}]
    # UltraFeedback's layout: a text prompt beside whole conversations; their shared beginning is the prompt
    paris = {"role": "assistant", "content": "Paris."}
    ex = one({"prompt": "Name a river.", "chosen": [USER, ANSWER], "rejected": [USER, paris]}, "preference")
    assert (ex["prompt"], ex["chosen"], ex["rejected"]) == ([USER], "The Nile.", "Paris.")
    # one answer the beginning of the other: TRL's extract_prompt stops one character short of the shorter
    ex = one({"chosen": "Q: a river? The Nile", "rejected": "Q: a river? The Nile, surely"}, "preference")
    assert (ex["prompt"][0]["content"], ex["chosen"], ex["rejected"]) == ("Q: a river? The Nil", "e", "e, surely")
    # a conversation under --template raw: an error that names the record
    from nanotune.data.instruct import prompt_ids

    (pair,) = examples(
        [{"prompt": [{"role": "system", "content": "S"}, USER], "chosen": "a", "rejected": "b"}],
        "pairs.jsonl",
        "preference",
    )
    with pytest.raises(NanotuneError, match="^pairs.jsonl: record 0 is an instruction, and --template raw would"):
        prompt_ids(load_tokenizer(), pair, "raw")


def test_data_given_twice_adds_up_and_a_resume_reads_a_single_saved_source_as_one(tmp_path):
    assert train_sft.parse_args(["--data", "a.jsonl", "--data", "b.jsonl", "c.jsonl"]).data == [
        "a.jsonl",
        "b.jsonl",
        "c.jsonl",
    ]
    # a run saved when --data took one value: resumed, it is still one source, not a list of characters
    state = tmp_path / "checkpoints" / "step-000010"
    state.mkdir(parents=True)
    saved = vars(train_sft.parse_args([])) | {"data": "my.jsonl", "steps": 20}
    (state / "state.json").write_text(json.dumps({"args": saved}))
    assert train_sft.parse_args(["--resume", str(tmp_path)]).data == ["my.jsonl"]


def test_conversations_that_open_with_their_answer_are_split_one_by_one():
    from nanotune.data.instruct import split_examples

    records = [{"messages": [{"role": "assistant", "content": f"Hello {i}."}, USER]} for i in range(40)]
    train, val, test = split_examples(examples(records, "x"), 1337)
    assert (len(train), len(val), len(test)) == (34, 2, 4)  # not all 40 as one prompt (the empty one)


def test_template_raw_on_instructions_is_refused_naming_the_record(tiny, tmp_path, shared, capsys):
    # raw continues a text (nanotune.pairs' book windows); an instruction's answer would be glued onto it
    from helpers import run_main

    import train_dpo

    data = shared / "data" / "instruction-data-with-preference.json"
    argv = ["--model", tiny, "--data", str(data), "--template", "raw", "--limit", "40", "--out", str(tmp_path / "d")]
    assert run_main(train_dpo.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}: record ") and "is an instruction, and --template raw would glue" in err
    assert err.count("\n") == 1 and not (tmp_path / "d" / "metrics.jsonl").exists()
