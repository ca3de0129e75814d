"""What sampling adds to the model: the KV cache (with the layouts of the tied head that decoding reads fastest)
and, on a CPU, copies of the large layers' weights in oneDNN's packed layout for one generation (float32, or
bfloat16 where the CPU has kernels for it). The model (model.py) only writes into the cache and reads a packed
weight when one is set; generate.py and serve/engine.py make and own them.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys and values for every layer: generation writes in place instead of concatenating."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_len: int,
        copy_head: bool = True,
        packed: bool = False,
        compiled: bool = False,
    ):
        config, device, dtype = model.config, model.wte.weight.device, model.wte.weight.dtype
        if torch.is_autocast_enabled(device.type):  # keys and values come out in autocast's dtype: keep them so
            dtype = torch.get_autocast_dtype(device.type)
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far
        self.max_len = max_len
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # keys of real tokens
        self.ragged = True  # rows with gaps in their real keys (padding, rows of different lengths): attention
        # over the filled slots needs cache.valid as its mask (the owner clears it when no row has a gap)
        # the tied head. wte (V, C) as it is: one row through its transposed view, which MKL reads 3x slower than
        # a contiguous (C, V) copy (nano: 7.5 against 2.4 ms a token, 2-core CPU), several rows as wte @ x.T.
        # copy_head, for generations long enough to pay for a copy made for them (not kept across generations: a
        # fused optimizer step changes wte without moving its version counter): on a CPU with oneDNN a packed
        # float32 copy, read by every row count: its kernel is faster for one row (nano 1.14 against 1.30 ms,
        # gpt2 7.2 against 8.1) and from 4 rows up (1.1-2.5x wte @ x.T), a tie or slower at 2-3 (gpt2, 2 rows: 8.6
        # against 5.8 ms in one run; python -m nanotune.bench.sampling --head), and it takes about half the time
        # of the (C, V) copy to make (nano 19 against 32 ms, gpt2 65 against 176 ms); elsewhere a (C, V) copy,
        # for one row.
        # packed: sampling that may round its logits, on a CPU with oneDNN's bfloat16 kernels, reads a packed
        # bfloat16 copy instead (see packed_layers). compiled: torch.compile runs the step, and inductor cannot
        # lower oneDNN's kernel on a packed copy: no packed copies then.
        self.wte = model.wte.weight.detach()
        bf16 = packed and onednn_bf16(device) and not compiled
        fp32 = copy_head and onednn(device) and not compiled
        self.packed_dtype = torch.bfloat16 if bf16 else torch.float32 if fp32 else None
        self.packed_head = pack(self.wte, self.packed_dtype) if self.packed_dtype is not None else None
        one_row = copy_head and batch_size <= 1 and self.packed_head is None
        self.head = self.wte.t().contiguous() if one_row else None

    def share_head(self, other: KVCache):
        """Read other's copies of the head (the same model's): the server's prefills read the batch's."""
        self.head, self.packed_head, self.packed_dtype = other.head, other.packed_head, other.packed_dtype

    # ---- rows that join and leave (the server's batch, nanotune/serve/engine.py)

    def add_rows(self, prompts: KVCache, length: int, copies: list[int]) -> torch.Tensor:
        """Rows at the end of the batch that continue `prompts`' rows (their first `length` positions): copies[i]
        rows for its row i (a request's n choices). Each row's real keys move to its first slots, in order (left
        padding goes behind them, masked), so a short prompt that was prefilled beside a long one keeps its own
        room in the context. -> the prompt row of each new row (R',)."""
        valid = prompts.valid[:, :length]  # (R, length)
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # (R, length): real slots first
        slots = order[None, :, None, :, None].expand(prompts.k.shape[0], -1, prompts.k.shape[2], -1, prompts.k.shape[4])
        index = torch.repeat_interleave(torch.arange(len(copies)), torch.tensor(copies)).to(valid.device)
        pad = (0, 0, 0, self.max_len - length)  # (L, R, H, length, D) -> (L, R, H, max_len, D)
        k = F.pad(prompts.k[:, :, :, :length].gather(3, slots), pad)
        v = F.pad(prompts.v[:, :, :, :length].gather(3, slots), pad)
        self.k = torch.cat([self.k, k.index_select(1, index)], dim=1)
        self.v = torch.cat([self.v, v.index_select(1, index)], dim=1)
        self.valid = torch.cat([self.valid, F.pad(valid.gather(1, order), (0, self.max_len - length))[index]])
        return index

    def keep_rows(self, index: torch.Tensor):
        """Only the rows `index` names stay, in that order."""
        self.k, self.v, self.valid = self.k.index_select(1, index), self.v.index_select(1, index), self.valid[index]

    def resize(self, width: int):
        """Every row `width` positions long: new positions empty, positions past `width` cut."""
        extra = width - self.max_len
        if extra < 0:
            self.k, self.v, self.valid = self.k[:, :, :, :width], self.v[:, :, :, :width], self.valid[:, :width]
        elif extra > 0:
            self.k, self.v = F.pad(self.k, (0, 0, 0, extra)), F.pad(self.v, (0, 0, 0, extra))
            self.valid = F.pad(self.valid, (0, extra))
        self.max_len = width

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied head on the last hidden states x (B, C): next-token logits (B, V) in float32, autocast off."""
        with torch.autocast(x.device.type, enabled=False):
            if self.packed_head is not None:
                return linear_packed(x, self.packed_head, None, self.packed_dtype).float()
            if x.shape[0] == 1:
                head = self.head if self.head is not None else self.wte.t()
                return x.float() @ head.float()  # (1, V)
            return (self.wte.float() @ x.float().t()).t()  # (V, B) -> (B, V)


def onednn(device) -> bool:
    """A CPU with PyTorch's oneDNN (mkldnn) kernels."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()


def onednn_bf16(device) -> bool:
    """A CPU whose oneDNN has bfloat16 kernels (AVX512-BF16 or AMX): there they stream packed bfloat16 weights at
    2.5-10x MKL's float32 matrix-vector rate (python -m nanotune.bench.sampling)."""
    return onednn(device) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An (out, in) weight as a copy in oneDNN's blocked layout and `dtype`, PyTorch's own kernel for inference
    (what torch.compile's freezing prepacks for), laid out for up to 8 rows at a time in float32. Made once per
    generation (or once for a server's life); the model's weights stay as they are."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), 8 if dtype == torch.float32 else 1)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias=None, dtype=torch.bfloat16) -> torch.Tensor:
    """x @ weight^T + bias with a packed weight of `dtype`: (..., in) -> (..., out) in that dtype."""
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


class Packed(NamedTuple):
    """A layer's weight and bias in oneDNN's layout, read by inputs of min_rows rows or more (fewer rows read the
    layer's own weight)."""

    weight: torch.Tensor
    bias: torch.Tensor
    min_rows: int = 1

    def reads(self, x: torch.Tensor) -> bool:
        return x.numel() >= self.min_rows * x.shape[-1]  # (x.numel() / in: the rows)


@contextlib.contextmanager
def packed_layers(model: nn.Module, dtype: torch.dtype):
    """For the length of one generation on a CPU, every large Conv1D (LoRA merged in) reads a packed copy of its
    weight: in bfloat16 where oneDNN has bfloat16 kernels (sampling that may round); in float32 on any CPU with
    oneDNN, for 2 rows or more, where its kernel reads each of gpt2's layers 1.2-10x faster than MKL's addmm
    reads the (in, out) layout (python -m nanotune.bench.sampling --layers), exact in float32 (another order of
    sums: ~1e-6 apart); one row keeps addmm, as fast in a whole generation (gpt2, 64 tokens: 0.93x with the
    copies). The training weights are untouched; outside the context nothing changes."""
    # (only large layers: for a small one, as in nano, the kernel's fixed cost outweighs what it saves)
    big = [m for m in model.modules() if hasattr(m, "packed") and m.weight.numel() >= 2**19]  # Conv1D layers
    device = model.wte.weight.device
    usable = onednn_bf16(device) if dtype == torch.bfloat16 else onednn(device)
    layers = big if usable else []
    min_rows = 2 if dtype == torch.float32 else 1
    for m in layers:
        weight = m.merged().weight if hasattr(m, "merged") else m.weight  # (LoRA: W + (alpha / r) A B)
        m.packed = Packed(pack(weight.t(), dtype), m.bias.detach().to(dtype), min_rows)
    try:
        yield model
    finally:
        for m in layers:
            m.packed = None
