"""A model folder is a whole Hugging Face model: the real transformers' AutoTokenizer, apply_chat_template and
pipeline, and peft on a LoRA folder, give what nanotune gives."""

import importlib
import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import train_sft
from nanotune import load_tokenizer
from nanotune.data.chat import CHAT_TEMPLATES, render, render_text
from nanotune.lifecycle.folder import FILES, read_template, write_model_files
from nanotune.utils import NanotuneError

NANO = Path(__file__).resolve().parent.parent / "weights" / "nano"
MIXED = "Café naïve — 😀 東京 <|endoftext|> tab\tand  two  spaces\n\nnew para <|endoftext|>"
CONVERSATIONS = [
    [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Nile."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name two rivers."},
        {"role": "assistant", "content": "\nThe Nile, the Amazon."},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Un fleuve ?"},
        {"role": "assistant", "content": "La Seine."},
    ],
]


def hf_ids(tokenizer, messages, add_generation_prompt):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_the_bundled_model_folder_is_complete_and_read_in_float32():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert all((NANO / name).is_file() for name in FILES)
    assert read_template(NANO) == "transcript"  # a base model
    enc, tokenizer = load_tokenizer(), AutoTokenizer.from_pretrained(NANO)
    # the special token as the special token, and (split_special_tokens) as the text it is
    assert tokenizer(MIXED)["input_ids"] == enc.encode(MIXED, allowed_special="all")
    assert tokenizer(MIXED, split_special_tokens=True)["input_ids"] == enc.encode_ordinary(MIXED)
    assert tokenizer.decode(enc.encode_ordinary(MIXED)) == MIXED  # no clean-up of spaces
    assert tokenizer.eos_token_id == enc.eot_token and tokenizer.model_max_length == 256
    # nano is stored in float16 to halve its size; it computes in float32, and transformers reads it so
    assert AutoModelForCausalLM.from_pretrained(NANO).dtype == torch.float32
    generation = json.loads((NANO / "generation_config.json").read_text())
    assert generation["eos_token_id"] == enc.eot_token and generation["max_length"] == 256


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_apply_chat_template_gives_nanotunes_tokens(template, tmp_path):
    from transformers import AutoTokenizer

    write_model_files(tmp_path, 256, None if template == "transcript" else template)
    assert read_template(tmp_path) == template
    enc, tokenizer = load_tokenizer(), AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template == (tmp_path / "chat_template.jinja").read_text()
    for conversation in CONVERSATIONS:
        for whole in (True, False):  # the whole conversation; the prompt for its last answer
            messages = conversation if whole else conversation[:-1]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not whole)
            assert text == render_text(messages, template, add_generation_prompt=not whole)
            ids, _ = render(enc, messages, template, add_generation_prompt=not whole)
            if template == "plain" and any(m["role"] == "assistant" for m in messages):
                # the one documented difference: plain's "Response: " ends in a space, which transformers joins to
                # an earlier answer's first word when it encodes the text at once; nanotune keeps them apart, as
                # when the model wrote that answer
                assert enc.decode(hf_ids(tokenizer, messages, not whole)) == enc.decode(ids)
            else:
                assert hf_ids(tokenizer, messages, not whole) == ids


def test_a_foreign_chat_template_is_refused_by_name(tmp_path):
    write_model_files(tmp_path, 256, "alpaca")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(NanotuneError, match="is not a chat template nanotune renders"):
        read_template(tmp_path)


def nanotune_generate(argv) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        importlib.import_module("nanotune.generate").main(argv + ["--temperature", "0", "--max-new-tokens", "24"])
    return out.getvalue().removesuffix("\n")


def greedy_pipeline(folder, prompt, **kwargs) -> str:
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline("text-generation", model=str(folder), **kwargs)
        result = pipe(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
    return result if isinstance(result, str) else result[-1]["content"]


def test_the_text_generation_pipeline_on_a_base_folder_writes_what_nanotune_generates():
    prompt = "It was a dark and stormy night"
    expected = nanotune_generate(["--model", str(NANO), "--prompt", prompt])
    assert greedy_pipeline(NANO, prompt) == expected and len(expected) > len(prompt) + 20


@pytest.fixture(scope="module")
def sft_folders(tiny, tmp_path_factory, shared):
    """A few SFT steps on the tiny model, in full and with LoRA (lr high enough to move the answers)."""
    out = tmp_path_factory.mktemp("hf-sft")
    data = str(shared / "data" / "instruction-data.json")
    base = [
        "--model",
        tiny,
        "--data",
        data,
        "--limit",
        "60",
        "--steps",
        "4",
        "--lr",
        "3e-3",
        "--max-len",
        "96",
        "--responses",
        "0",
        "--eval-every",
        "4",
        "--save-every",
        "0",
    ]
    train_sft.main(base + ["--out", str(out / "full")])
    train_sft.main(base + ["--out", str(out / "lora"), "--peft", "lora", "--lr", "3e-2"])
    return out / "full", out / "lora"


def test_the_pipeline_on_an_sft_folder_answers_a_chat_as_nanotune_does(sft_folders):
    full, _ = sft_folders
    assert read_template(full) == "alpaca"
    expected = nanotune_generate(["--model", str(full), "--instruction", "Name three rivers."])
    answer = expected.split("### Response:\n", 1)[1]
    chat = [{"role": "user", "content": "Name three rivers."}]
    assert greedy_pipeline(full, chat) == answer and answer.strip()


def test_a_lora_folder_loads_with_peft_on_its_base_and_answers_the_same(sft_folders, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, lora_run = sft_folders
    folder = lora_run / "lora"
    assert all((folder / name).is_file() for name in FILES) and read_template(folder) == "alpaca"
    config = json.loads((folder / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained((folder / config["base_model_name_or_path"]).resolve())
    model, tokenizer = PeftModel.from_pretrained(base, folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode([t for t in out[0, ids.shape[1] :].tolist() if t != tokenizer.eos_token_id])
    expected = nanotune_generate(["--model", str(folder), "--instruction", "Name three rivers."])
    assert answer == expected.split("### Response:\n", 1)[1]
    # the adapter changed the answer: the comparison is not the base model's twice
    plain = nanotune_generate(["--model", tiny, "--instruction", "Name three rivers."])
    assert plain != expected
