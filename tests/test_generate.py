"""nanotune.generate's one decode path: token for token what a full forward without a cache picks, with left
padding, <|endoftext|> and prompt tuning; compiled equal to eager; one graph for a whole generation; and the
bfloat16 head and cache close to float32."""

from pathlib import Path

import pytest
import torch

from nanotune import GPT, GPTConfig, generate
from nanotune.model.peft import PeftSpec, apply_peft


def model_with(name: str, prompt_tokens: int = 0) -> GPT:
    """The bundled nano model (real text, positions that matter), or a tiny random one."""
    torch.manual_seed(0)
    if name == "nano":
        model = GPT.from_pretrained(Path(__file__).resolve().parent.parent / "weights" / "nano")
    else:
        model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128)).eval()
    if prompt_tokens:
        apply_peft(model, PeftSpec(method="prompt", prompt_tokens=prompt_tokens, seed=0), name)
    return model


@torch.no_grad()
def greedy_without_cache(model, prompts, n):
    """The reference: every step recomputes the whole left-padded batch with its attention mask."""
    rows = [list(p) for p in prompts]
    for _ in range(n):
        width = max(map(len, rows))
        idx = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        for r, t in zip(rows, model(idx, attention_mask=mask)[:, -1].argmax(-1).tolist()):
            r.append(t)
    return rows


@pytest.mark.parametrize("name, prompt_tokens", [("nano", 0), ("tiny", 0), ("nano", 3)])
def test_greedy_equals_recomputing_without_a_cache(name, prompt_tokens):
    model = model_with(name, prompt_tokens)
    prompts = [[464, 3290, 318, 257], [40, 588], [1, 2, 3, 4, 5, 6, 7]]  # left padding: three widths
    expected = greedy_without_cache(model, prompts, 24)
    assert generate(model, prompts, 24, temperature=0) == expected
    # a row ends at its stop token: take one that the second row produces at its 6th step
    stop = expected[1][len(prompts[1]) + 5]
    ends = [r[: r.index(stop, len(p)) + 1] if stop in r[len(p) :] else r for r, p in zip(expected, prompts)]
    assert generate(model, prompts, 24, temperature=0, eos_token=stop) == ends
    assert len(ends[1]) <= len(prompts[1]) + 6  # (it did end early)


def test_compiled_step_equals_eager_and_compiles_once_for_a_whole_generation():
    from torch._dynamo.utils import counters

    model = model_with("tiny")
    prompts = torch.randint(0, 50257, (3, 6), generator=torch.Generator().manual_seed(1))
    eager = generate(model, prompts, 32, temperature=0)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, prompts, 32, temperature=0, compile="eager")
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # 31 steps, one graph
    assert torch.equal(generate(model, prompts[:, :4], 40, temperature=0, compile="eager")[:, :4], prompts[:, :4])
    assert counters["stats"]["unique_graphs"] == 1  # another prompt and length in the same 64 cache slots


def test_sampling_is_reproducible_with_a_seed_and_bfloat16_stays_close():
    model = model_with("tiny")
    prompts = [[464, 3290, 318], [40, 588]]

    def draw(seed):
        return generate(model, prompts, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(seed))

    assert draw(3) == draw(3) and draw(3) != draw(4)
    exact = generate(model, prompts, 20, temperature=0)
    half = generate(model, prompts, 20, temperature=0, dtype=torch.bfloat16)
    agree = sum(a == b for e, h in zip(exact, half) for a, b in zip(e, h)) / sum(map(len, exact))
    assert agree >= 0.8, agree  # greedy paths may part where two logits are within bfloat16's rounding


def test_bfloat16_sampling_packs_large_layers_and_lora_and_leaves_the_model_as_it_was():
    from nanotune.decoding import onednn_bf16
    from nanotune.model.gpt import Conv1D

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=512, n_positions=64)).eval()  # c_fc: 512 x 2048, packed
    apply_peft(model, PeftSpec(method="lora", lora_r=4, lora_alpha=8.0, lora_targets="all"), "wide")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a LoRA that changes the outputs, so that leaving it out would show
    prompts = [[464, 3290, 318], [40, 588]]
    exact = generate(model, prompts, 16, temperature=0)
    half = generate(model, prompts, 16, temperature=0, dtype=torch.bfloat16)
    agree = sum(a == b for e, h in zip(exact, half) for a, b in zip(e, h)) / sum(map(len, exact))
    assert agree >= 0.8, agree
    assert all(m.packed is None for m in model.modules() if isinstance(m, Conv1D))  # the copies are gone
    if onednn_bf16("cpu"):  # where the kernels are there, the large layers and the head did use them
        from nanotune.decoding import packed_layers

        with packed_layers(model, torch.bfloat16):
            packed = [m for m in model.modules() if isinstance(m, Conv1D) and m.packed is not None]
        assert {m.weight.numel() for m in packed} == {512 * 2048, 512 * 1536}  # c_fc, c_proj (MLP), c_attn


@torch.no_grad()
def test_float32_packed_layers_are_read_by_two_rows_or_more_and_one_row_keeps_the_weights_lora_included(
    monkeypatch,
):
    """In float32 one row reads a layer's own weight (as fast in a whole generation) and several rows its packed
    copy, LoRA merged into it: both give the layer's output with LoRA."""
    from nanotune.decoding import onednn, packed_layers
    from nanotune.model import gpt

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=512, n_positions=64)).eval()  # c_fc: 512 x 2048, packed
    apply_peft(model, PeftSpec(method="lora", lora_r=4, lora_alpha=8.0, lora_targets="all"), "wide")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)
    layer = model.h[0].mlp.c_fc
    one, two = torch.randn(1, 1, 512), torch.randn(2, 1, 512)
    expected = layer(one), layer(two)
    rows_read = []
    original = gpt.linear_packed
    monkeypatch.setattr(gpt, "linear_packed", lambda x, *a: rows_read.append(x.shape[0]) or original(x, *a))
    with packed_layers(model, torch.float32):
        got = layer(one), layer(two)
    assert rows_read == ([2] if onednn("cpu") else [])
    for g, e in zip(got, expected):
        assert (g - e).abs().max() < 1e-5
    assert (expected[0] - torch.addmm(layer.bias, one[0], layer.weight)).abs().max() > 1e-3  # (LoRA's share counts)
    layer.enabled = False  # (without_peft: the base layer alone, which the packed copy, LoRA merged in, is not)
    with packed_layers(model, torch.float32):
        base = layer(two)
    assert (base - torch.addmm(layer.bias, two.view(2, 512), layer.weight).view(2, 1, -1)).abs().max() < 1e-5


@torch.no_grad()
def test_a_batch_greedy_tokens_are_each_rows_alone_for_64_tokens():
    """Eight prompts of different lengths decoded together (left-padded, attention over the filled slots with the
    mask of real keys) pick, position by position, what each prompt decoded alone picks (no mask: no padding).
    Batching changes the order of float sums, so a position whose two best logits lie within 1e-4 may differ,
    and the rest of that row is then another text: such a row is compared up to there."""
    model = model_with("nano")
    lengths = [1, 3, 5, 8, 13, 21, 34, 55]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]
    together = generate(model, prompts, 64, temperature=0)
    compared = 0
    for prompt, row in zip(prompts, together):
        alone = generate(model, [prompt], 64, temperature=0)[0]
        for at in range(len(prompt), len(alone)):
            if row[at] != alone[at]:
                top2 = model(torch.tensor([alone[:at]]))[0, -1].topk(2).values
                assert top2[0] - top2[1] < 1e-4, (len(prompt), at - len(prompt), row[at], alone[at])
                break
            compared += 1
    assert compared >= 8 * 64 * 3 // 4, compared  # most positions compared, not a few before a near tie


@torch.no_grad()
def test_float32_sampling_on_a_cpu_reads_packed_large_layers_and_picks_the_forwards_tokens(monkeypatch):
    """A generation of 64 tokens for 16 rows on a CPU reads oneDNN's packed float32 copies of the large layers (here
    c_fc and c_attn, 2^19 weights or more) and of the head: the same greedy tokens as a full forward without a
    cache (up to a near tie, within 1e-4, after which that row is another text), and the model as it was
    afterwards."""
    import importlib

    from nanotune.decoding import onednn
    from nanotune.model.gpt import Conv1D

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=512, n_positions=128)).eval()
    for m in model.modules():
        if isinstance(m, Conv1D):
            m.weight.mul_(4.0)  # logits spread further apart than a fresh model's: fewer near ties
    generate_module = importlib.import_module("nanotune.generate")  # (the package's name for it is the function)
    seen = []
    original = generate_module.packed_layers

    def spy(model, dtype):
        seen.append(dtype)
        return original(model, dtype)

    monkeypatch.setattr(generate_module, "packed_layers", spy)
    caches = []

    class SeenCache(generate_module.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(generate_module, "KVCache", SeenCache)
    prompts = [[464, 3290, 318, 257], [40, 588, 11, 12, 13, 14, 15, 16], [1], [9, 8, 7]]
    prompts += [[1000 + 7 * i + j for j in range(1 + i % 6)] for i in range(12)]  # 16 rows: the head packed too
    out = generate(model, prompts, 64, temperature=0)
    assert seen == [torch.float32]
    assert len(caches) == 1 and (caches[0].packed_head is not None) == onednn("cpu")  # the head's packed copy read
    reference = greedy_without_cache(model, prompts[:4], 64)  # (four rows of the batch suffice, and are quicker)
    compared = 0
    for prompt, row, expected in zip(prompts[:4], out, reference):
        for at in range(len(prompt), len(expected)):
            if row[at] != expected[at]:
                top2 = model(torch.tensor([expected[:at]]))[0, -1].topk(2).values
                assert top2[0] - top2[1] < 1e-4, (len(prompt), at - len(prompt))
                break
            compared += 1
    assert compared >= 4 * 64 // 2, compared
    assert all(m.packed is None for m in model.modules() if isinstance(m, Conv1D))
    if onednn("cpu"):
        with original(model, torch.float32):
            packed = {m.weight.numel() for m in model.modules() if isinstance(m, Conv1D) and m.packed is not None}
        assert packed == {512 * 2048, 512 * 1536}


@torch.no_grad()
def test_one_row_reads_the_heads_packed_copy_on_a_cpu_and_a_compiled_step_its_contiguous_copy(monkeypatch):
    """One row of 32 tokens or more reads the tied head through a copy made for it: on a CPU with oneDNN the packed
    float32 copy (its kernel reads it faster than MKL reads the (C, V) copy), with the tokens of a full forward;
    fewer tokens read wte as it is; a compiled step (inductor cannot lower oneDNN's kernel) the (C, V) copy."""
    import importlib

    from nanotune.decoding import KVCache, onednn

    generate_module = importlib.import_module("nanotune.generate")
    caches = []

    class SeenCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(generate_module, "KVCache", SeenCache)
    decoding, reads = importlib.import_module("nanotune.decoding"), []
    linear_packed = decoding.linear_packed
    monkeypatch.setattr(decoding, "linear_packed", lambda *a: reads.append(a[1]) or linear_packed(*a))
    model = model_with("nano")
    prompt = [464, 3290, 318, 257]
    assert generate(model, [prompt], 40, temperature=0) == greedy_without_cache(model, [prompt], 40)
    assert caches[0].packed_dtype == (torch.float32 if onednn("cpu") else None)
    assert len(reads) == (40 if onednn("cpu") else 0) and all(r is caches[0].packed_head for r in reads)
    assert (caches[0].head is None) == onednn("cpu")  # (elsewhere the (C, V) copy)
    generate(model, [prompt], 8, temperature=0)
    assert caches[1].packed_head is None and caches[1].head is None
    compiled = KVCache(model, 1, 64, copy_head=True, compiled=True)
    assert compiled.packed_head is None and compiled.head.shape == (model.config.n_embd, model.config.vocab_size)


def test_a_generation_after_a_fused_optimizer_step_samples_the_new_weights():
    """Nothing that decoding makes from the weights (the head's (C, V) copy, packed layers) outlives a generation:
    a fused AdamW step changes wte without moving its version counter, so a copy kept on that evidence would go
    stale (as one briefly did: the xkl recipe then sampled its trained model as the untrained one)."""
    model = model_with("tiny")
    prompt = torch.tensor([[1, 2, 3]])
    before = generate(model, prompt, 40, temperature=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model.wte.weight.grad = torch.randn_like(model.wte.weight)
    optimizer.step()
    after = generate(model, prompt, 40, temperature=0)
    assert torch.equal(after, torch.tensor(greedy_without_cache(model, prompt.tolist(), 40)))
    assert not torch.equal(after, before)


def test_a_decode_step_runs_with_autograd_on_and_gives_the_forwards_logits():
    """decode_step writes into the cache through views, which autograd would refuse: it runs without it, whatever
    mode its caller is in."""
    from nanotune.decoding import KVCache

    model = model_with("tiny")
    tokens = torch.tensor([[464, 3290, 318, 257]])
    cache = KVCache(model, 1, 8, copy_head=False)
    with torch.no_grad():
        model(tokens[:, :3], cache=cache)
    cache.valid[:, :3] = True
    logits = model.decode_step(tokens[:, 3:], cache, torch.tensor([3]), 4)  # (1, V), autograd on
    with torch.no_grad():
        assert torch.allclose(logits, model(tokens)[:, -1], atol=1e-5)
