"""A reward model: GPT-2's body plus a linear score head (n_embd -> 1, no bias), as InstructGPT trained on human
preferences. The reward of (prompt, response) is the head's output at the last token that is not padding, the
position transformers.GPT2ForSequenceClassification reads when pad_token_id is 50256 (<|endoftext|>): with right
padding, padding never changes a reward. Files are in that class's layout ("transformer." body keys,
score.weight (1, n_embd), num_labels 1, pad_token_id 50256), so transformers loads them as they are."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from .gpt import GPT
from .weights import load_checkpoint, resolve_checkpoint, write_weights

PAD = 50256  # <|endoftext|> doubles as padding, as in transformers' GPT-2 reward models


def last_token_index(idx: torch.Tensor, pad_id: int = PAD) -> torch.Tensor:
    """(B, T) token ids -> (B,) position of each row's last non-padding token (0 for an all-padding row), the
    rule of transformers' GPT2ForSequenceClassification."""
    positions = torch.arange(idx.shape[1], device=idx.device)
    return (positions * (idx != pad_id)).argmax(-1)


class RewardModel(nn.Module):
    def __init__(self, body: GPT):
        super().__init__()
        self.body = body
        self.score = nn.Linear(body.config.n_embd, 1, bias=False, device=body.wte.weight.device)
        nn.init.normal_(self.score.weight, std=0.02)  # transformers' initializer_range

    @property
    def config(self):
        return self.body.config

    def forward(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, all_positions: bool = False
    ) -> torch.Tensor:
        """idx (B, T), right-padded with PAD -> rewards (B,). With all_positions, the head's output at every position,
        (B, T), each from the tokens up to it (PPO's value model, train_ppo.py; attention_mask as in GPT.forward)."""
        hidden = self.body(idx, attention_mask=attention_mask, hidden=True)  # (B, T, C)
        if not all_positions:
            hidden = hidden[torch.arange(idx.shape[0], device=idx.device), last_token_index(idx)]  # (B, C)
        with torch.autocast(hidden.device.type, enabled=False):  # scores in float32, like the LM head's logits
            return F.linear(hidden.float(), self.score.weight.float()).squeeze(-1)  # (B, T) or (B,)

    def save_pretrained(self, directory: str | Path) -> Path:
        tensors = {f"transformer.{k}": v.detach().contiguous().cpu() for k, v in self.body.state_dict().items()}
        tensors["score.weight"] = self.score.weight.detach().contiguous().cpu()
        config = self.config.to_hf_dict() | {
            "architectures": ["GPT2ForSequenceClassification"],
            "num_labels": 1,
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "pad_token_id": PAD,
            "torch_dtype": "float32",
        }
        return write_weights(Path(directory), tensors, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> RewardModel:
        """A train_reward.py output, or any GPT2ForSequenceClassification folder with num_labels 1."""
        file, config_path = resolve_checkpoint(path)
        config = json.loads(config_path.read_text()) if config_path else {}
        if (
            "GPT2ForSequenceClassification" not in (config.get("architectures") or [])
            or config.get("num_labels", 1) != 1
        ):
            raise ValueError(
                f"{path} is not a reward model: its config.json does not describe a "
                "GPT2ForSequenceClassification with num_labels 1 (train one with train_reward.py)"
            )
        with safe_open(str(file), framework="pt") as f:
            if "score.weight" not in f.keys():
                raise KeyError(f"{file}: no score.weight: not a reward model")
            score = f.get_tensor("score.weight").float()
        gpt_config, state = load_checkpoint(file, config_path, skip=("score.weight",))
        if tuple(score.shape) != (1, gpt_config.n_embd):
            raise ValueError(f"{file}: score.weight has shape {tuple(score.shape)}, expected (1, {gpt_config.n_embd})")
        with torch.device("meta"):
            body = GPT(gpt_config)
        body.load_state_dict(
            {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}, strict=True, assign=True
        )
        model = cls(body)
        with torch.no_grad():
            model.score.weight.copy_(score)
        return model.to(device).eval()
