"""What a model folder holds beside its weights, so that transformers, vLLM, TGI, llama.cpp's converter and
lm-eval read it as nanotune does: GPT-2's tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), generation_config.json (the end-of-text token, the context) and the chat template the
model was trained with (chat_template.jinja, and the same text in tokenizer_config.json: servers differ in
which they read). Every file is written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.chat import CHAT_TEMPLATES, EOT_TEXT, folder_template, jinja_template
from ..tokenizer import EOT, bpe_files
from ..utils import NanotuneError, atomic_write

FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def write_model_files(directory: str | Path, context: int, template: str | None = None):
    """The tokenizer, generation config and chat template of a GPT-2 model with this context, trained with this
    template (alpaca or plain; anything else: a base model's transcript)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges, vocab = bpe_files()
    chat = jinja_template(folder_template(template))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": context,
        **special,
        "add_prefix_space": False,
        "add_bos_token": False,
        # decode as nanotune does: the text as written, no spaces removed before punctuation
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(EOT): {
                "content": EOT_TEXT,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
        "chat_template": chat,
    }
    generation = {"bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT, "max_length": context}
    files = {
        "vocab.json": vocab,
        "merges.txt": merges,
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
        "chat_template.jinja": chat,
    }
    for name, data in files.items():
        atomic_write(directory / name, data)


def read_template(directory: str | Path) -> str | None:
    """The nanotune template a folder's chat_template.jinja is (alpaca, plain, transcript), None when the folder
    has none (one saved before nanotune wrote it); a template nanotune does not render is an error."""
    file = Path(directory) / "chat_template.jinja"
    if not file.is_file():
        return None
    source = file.read_text(encoding="utf-8")
    for name in CHAT_TEMPLATES:
        if source.strip() == jinja_template(name).strip():
            return name
    raise NanotuneError(
        f"{file} is not a chat template nanotune renders ({', '.join(CHAT_TEMPLATES)}); pass --template"
    )
