"""GPT-2, written out: embeddings, pre-LayerNorm blocks, causal self-attention, GELU MLP, tied head.

Module names mirror the keys of the official checkpoints (wte, wpe, h.{i}.attn.c_attn, ...), so the
mapping in weights.py is the identity: no renames, no transposes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..decoding import KVCache, linear_packed
from .config import GPTConfig
from .weights import load_checkpoint, resolve_checkpoint, save_checkpoint


class Conv1D(nn.Module):
    """A linear layer y = x @ weight + bias with weight stored (in, out), the layout of GPT-2's checkpoints
    (OpenAI called it Conv1D). Keeping it means no transposes on load and save, and on CPU the matrix-vector
    products of generation stream this layout faster than nn.Linear's (out, in)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.packed = None  # a decoding.Packed copy of weight and bias while a CPU samples (decoding.packed_layers)

    def forward(self, x):
        if x.dim() != 2:  # (B, T, in) as rows (B*T, in), and back to (B, T, out); decoding's rows come as (B, in)
            return self.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        if self.packed is not None and self.packed.reads(x):
            weight, bias, _ = self.packed
            return linear_packed(x, weight, bias, bias.dtype).to(x.dtype)
        return torch.addmm(self.bias, x, self.weight)  # (rows, n_out)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x, attn_mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0 if cache is None else cache.length
        if cache is not None:
            cache.k[layer, :, :, past : past + T] = k
            cache.v[layer, :, :, past : past + T] = v
            k, v = cache.k[layer, :, :, : past + T], cache.v[layer, :, :, : past + T]
        if attn_mask is None:
            # plain causal attention, or, after a filled cache, one new token that sees all of it. (A static
            # condition, not T > 1: under torch.compile T is symbolic and a bool of it breaks the graph.)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def decode(self, x, attn_mask, step: DecodeSlots):
        """GPT.decode_step's attention: one new token per row, x (B, C); its key and value go into the cache slot
        of its row (step.slot), and it attends over the slots step.keys and step.values hold. The rows stay (B, C)
        through every layer, with no split, no transposes and no slicing of the cache here (decode_step makes the
        views once a step): each operator costs a few microseconds however little it does, and this path calls 15
        a layer (through forward, decoding called 37)."""
        B, C = x.shape
        # (B, 3C) -> 3 x (B, n_head, 1, head_dim)
        q, k, v = self.c_attn(x).view(B, 3, self.n_head, 1, C // self.n_head).unbind(1)
        step.keys.scatter_(2, step.slot, k)
        step.values.scatter_(2, step.slot, v)
        y = F.scaled_dot_product_attention(q, step.keys, step.values, attn_mask=attn_mask)  # (B, n_head, 1, head_dim)
        return self.c_proj(y.reshape(B, C))


class DecodeSlots(NamedTuple):
    """What one layer's attention reads in GPT.decode_step: its keys and values in the cache, the slots attention
    sees (views: writing into them writes the cache), and the slot each row's new token goes to (B, n_head, 1,
    head_dim) as scatter_ takes it."""

    keys: torch.Tensor
    values: torch.Tensor
    slot: torch.Tensor


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU ("gelu_new")
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        # bottleneck adapters (nanotune/model/peft.py) go here, between each sublayer and its residual add; plain GPT-2
        # has none, and nn.Identity holds no weights, so the checkpoint layout is unchanged
        self.adapter_attn = nn.Identity()
        self.adapter_mlp = nn.Identity()

    def forward(self, x, attn_mask=None, cache=None, layer=0, step: DecodeSlots | None = None):
        """x (B, T, C); in GPT.decode_step (step given) one token per row, x (B, C)."""
        h = self.ln_1(x)
        h = self.attn(h, attn_mask, cache, layer) if step is None else self.attn.decode(h, attn_mask, step)
        x = x + self.adapter_attn(h)
        x = x + self.adapter_mlp(self.mlp(self.ln_2(x)))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # No separate lm_head: the output projection is wte.weight (tied), see forward().
        # Prompt tuning (peft.py) sets this to learnable embeddings (n_virtual, C) read before every input
        self.register_parameter("prompt", None)
        # activation checkpointing (--activation-checkpointing): in training keep only each block's input and
        # recompute the block during backward; trades about one extra forward for most activation memory.
        # True: every block; an int N: the first N blocks only (N/n_layer of the saving for N/n_layer of the cost)
        self.checkpointing: bool | int = False
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # GPT-2's scheme: N(0, 0.02) weights, zero biases, LayerNorm at identity, and the two projections
        # that write into the residual stream (c_proj) scaled by 1/sqrt(2 * n_layer) so depth keeps it stable
        if self.wte.weight.device.type == "meta":
            return  # from_pretrained assigns every tensor; no need to initialise
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def n_virtual(self) -> int:
        """Learned prompt-tuning embeddings that precede every input (0 for plain GPT-2)."""
        return 0 if self.prompt is None else self.prompt.shape[0]

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        hidden: bool = False,
        positions: slice | torch.Tensor | None = None,
    ):
        """idx (B, T) token ids -> logits (B, T, vocab_size); with hidden, the final hidden states (B, T, C) instead
        (what a scalar head, as in nanotune/model/reward_model.py, reads).

        attention_mask (B, past + T), 1 for real tokens and 0 for padding, makes padded batches exact:
        padding is never attended to and positions count real tokens only (so left padding works).
        cache: a KVCache; the new tokens follow the cache.length tokens already in it, and only the last
        position's logits are returned, (B, 1, vocab_size).
        With prompt tuning the n_virtual learned embeddings enter before the first chunk: they take positions
        and context, the caller's idx and attention_mask cover real tokens only, and no logits are returned
        for the virtual positions.
        positions: the positions whose logits (or hidden states) to return, e.g. only an answer's, as a slice or
        a tensor of indices (a tensor's values never make torch.compile recompile, a slice's ints do); the tied
        head, most of the work for GPT-2's 50257-token vocabulary, then runs on those alone.
        """
        past = cache.length if cache is not None else 0
        check_input(idx, past, cache, self.n_virtual, self.config)
        x = self.wte(idx)  # (B, T, C)
        x, attention_mask, prefix = self._prepend_prompt(x, attention_mask, past)  # (B, prefix + T, C)
        pos, attn_mask = positions_and_mask(x.shape[0], x.shape[1], past, attention_mask, idx.device)
        x = x + self.wpe(pos)  # (B, prefix + T, C)
        recomputed = len(self.h) if self.checkpointing is True else int(self.checkpointing)
        for i, block in enumerate(self.h):
            if i < recomputed and self.training and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        x = x[:, prefix:]  # real tokens only: (B, T, C)
        if positions is not None:
            x = x[:, positions]  # (B, len(positions), C)
        x = self.ln_f(x)
        if hidden:
            return x
        # the tied head, in float32 even under autocast: GPT-2's logits sit around -35 to -120, where bfloat16's
        # steps are 0.25 to 0.5, so bf16 logits would be off by ~0.1 nats per token in every log-prob and ratio
        with torch.autocast(x.device.type, enabled=False):
            if cache is not None:  # generation needs only the next token's logits: (B, 1, vocab_size)
                return cache.logits(x[:, -1])[:, None]
            return F.linear(x.float(), self.wte.weight.float())  # (B, T, vocab_size)

    @torch.no_grad()  # (it writes into the cache through views, which autograd would refuse)
    def decode_step(self, token: torch.Tensor, cache: KVCache, at: torch.Tensor, span: int | None = None):
        """One new token per row, written into cache slot `at`: what torch.compile (and on a GPU a CUDA graph)
        captures once for a whole generation (nanotune/generate.py). `at` is a tensor: one slot for every row (1,),
        or a slot per row (B,), as when rows joined at different times (nanotune/serve/engine.py).
        cache.valid marks the keys of real tokens, so left-padded rows take their own positions.
        span: attention reads only the first span slots, the ones filled so far (eager decoding knows how many;
        the empty ones after them cost time); None: every slot, so that every shape stays fixed (compiled).
        When no row has a gap (cache.ragged False), attention needs no mask.
        token (B, 1) -> the next token's logits (B, vocab_size), float32."""
        B, H, C = token.shape[0], self.config.n_head, self.config.n_embd
        cache.valid.scatter_(1, at.view(-1, 1).expand(B, 1), True)
        pos = cache.valid.sum(-1, keepdim=True) - 1  # (B, 1): the real tokens before this one
        x = (self.wte(token) + self.wpe(pos)).view(B, C)  # (B, C): one token per row, through every layer
        mask = cache.valid[:, None, None, :span] if cache.ragged or span is None else None  # (B, 1, 1, span)
        # each layer's keys and values, and the slot of each row's new ones, as views made once for every layer
        keys, values = cache.k[:, :, :, :span].unbind(0), cache.v[:, :, :, :span].unbind(0)  # (B, H, span, D) each
        slot = at.view(-1, 1, 1, 1).expand(B, H, 1, C // H)
        for block, layer_keys, layer_values in zip(self.h, keys, values):
            x = block(x, mask, step=DecodeSlots(layer_keys, layer_values, slot))
        return cache.logits(self.ln_f(x))  # (B, vocab_size), float32

    def _prepend_prompt(self, x: torch.Tensor, attention_mask: torch.Tensor | None, past: int):
        """Prompt tuning: the learned embeddings go in front of the first chunk, and the caller's attention mask
        (real tokens only) gains ones for them. -> x, attention_mask, how many positions were added."""
        if not self.n_virtual:
            return x, attention_mask, 0
        B, T, _ = x.shape
        prefix = self.n_virtual if past == 0 else 0
        if prefix:
            x = torch.cat([self.prompt.to(x.dtype).expand(B, -1, -1), x], dim=1)  # (B, n_virtual + T, C)
        if attention_mask is not None:
            real = past - (past and self.n_virtual) + T  # real tokens in the cache and in this chunk
            if attention_mask.shape != (B, real):
                raise ValueError(
                    f"GPT.forward: attention_mask must have shape {(B, real)} (real tokens), "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = torch.cat([attention_mask.new_ones(B, self.n_virtual), attention_mask], dim=1)
        return x, attention_mask, prefix

    # ---- weights in the official Hugging Face layout (see weights.py) ----

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> GPT:
        """A preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a directory holding model.safetensors
        (+ config.json), or a .safetensors file: a plain GPT-2 checkpoint in the official layout (or transformers'
        fine-tune layout). LoRA/adapter folders and `auto` are the loader's (nanotune/model/loader.py)."""
        path, config_path = resolve_checkpoint(name_or_path)
        config, state_dict = load_checkpoint(path, config_path)
        with torch.device("meta"):
            model = cls(config)
        state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write model.safetensors + config.json that transformers.GPT2LMHeadModel.from_pretrained loads."""
        return save_checkpoint(self, Path(directory), dtype=dtype)


def positions_and_mask(B: int, T: int, past: int, attention_mask: torch.Tensor | None, device):
    """Position ids (B or 1, T) of the new tokens, and the attention mask SDPA takes ((B, 1, T, past + T)
    booleans, or None for plain causal attention)."""
    q_idx = torch.arange(past, past + T, device=device)
    k_idx = torch.arange(past + T, device=device)
    if attention_mask is None:
        if past > 0 and T > 1:  # a chunk after a filled cache: causal within it, everything before it visible
            return q_idx[None], (k_idx[None, :] <= q_idx[:, None])[None, None]
        return q_idx[None], None  # (1, T)
    if attention_mask.shape != (B, past + T):
        raise ValueError(
            f"GPT.forward: attention_mask must have shape {(B, past + T)}, got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T) positions count real tokens only
    causal = k_idx[None, :] <= q_idx[:, None]  # (T, past + T)
    attn_mask = causal[None] & keep[:, None, :]  # (B, T, past + T)
    # a padding query would see no key at all (NaN softmax): let it see itself; its output is unused
    attn_mask = attn_mask | (k_idx[None, :] == q_idx[:, None])[None]
    return pos, attn_mask[:, None]  # (B, 1, T, past + T), broadcast over heads


def check_input(idx: torch.Tensor, past: int, cache: KVCache | None, n_virtual: int, config: GPTConfig):
    """A clear error for what would otherwise fail deep inside (or silently index out of range)."""
    if idx.dim() != 2:
        raise ValueError(f"GPT.forward: idx must have shape (B, T), got {tuple(idx.shape)}")
    length = past + (n_virtual if past == 0 else 0) + idx.shape[1]
    if length > config.n_positions:
        virtual = f" ({n_virtual} of them prompt-tuning embeddings)" if n_virtual else ""
        raise ValueError(
            f"GPT.forward: sequence of {length} tokens{virtual} is longer than the context of "
            f"{config.n_positions} (n_positions); truncate or split the input"
        )
    if cache is not None and length > cache.max_len:
        raise ValueError(f"GPT.forward: KV cache holds {cache.max_len} positions, {length} needed")
    # read back only from the CPU: on an accelerator it would wait for the device on every forward, every
    # generated token included (there, ids come from the tokenizer or were checked on the CPU); and not
    # inside torch.compile, where reading values breaks the graph
    if torch.compiler.is_compiling() or idx.device.type != "cpu" or not idx.numel():
        return
    if int(idx.min()) < 0 or int(idx.max()) >= config.vocab_size:
        bad = idx[(idx < 0) | (idx >= config.vocab_size)][0].item()
        raise ValueError(f"GPT.forward: token id {bad} is outside the vocabulary [0, {config.vocab_size})")
