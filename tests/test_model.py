"""The hand-written GPT-2 against transformers: same logits, same greedy text, files both sides can read."""

import json

import pytest
import torch
from helpers import hf_model, write_official, write_prefixed

from nanotune import GPT, PRESETS, GPTConfig, generate

TOL = 1e-4


def max_diff(ours, hf, idx, attention_mask=None):
    with torch.no_grad():
        a = ours(idx, attention_mask=attention_mask)
        b = hf(idx, attention_mask=attention_mask).logits
    assert a.shape == b.shape == (*idx.shape, 50257)
    return (a - b).abs().max().item()


# gpt2 and gpt2-medium at full depth; large and xl cut to 2 layers (their width and heads are what matter)
DEPTH = {"gpt2": 12, "gpt2-medium": 24, "gpt2-large": 2, "gpt2-xl": 2}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_logits_match_transformers_for_each_preset(preset, tmp_path):
    p = PRESETS[preset]
    hf = hf_model(n_layer=DEPTH[preset], n_embd=p["n_embd"], n_head=p["n_head"])
    ours = GPT.from_pretrained(write_official(hf, tmp_path / "official"))
    assert ours.config.n_head == p["n_head"] and ours.config.n_layer == DEPTH[preset]
    g = torch.Generator().manual_seed(1)
    diffs = [
        max_diff(ours, hf, torch.randint(0, 50257, (1, 1), generator=g)),
        max_diff(ours, hf, torch.randint(0, 50257, (3, 17), generator=g)),
        max_diff(ours, hf, torch.randint(0, 50257, (1, 1024), generator=g)),  # the full context
    ]
    prefixed = GPT.from_pretrained(write_prefixed(hf, tmp_path / "prefixed"))
    diffs.append(max_diff(prefixed, hf, torch.randint(0, 50257, (2, 33), generator=g)))
    print(f"\n{preset}: max |logit difference| = {max(diffs):.2e}")
    assert max(diffs) <= TOL


def test_loads_a_bare_safetensors_file_without_config(tmp_path):
    hf = hf_model(n_layer=2, n_embd=768, n_head=12)
    write_official(hf, tmp_path, config=False)
    ours = GPT.from_pretrained(tmp_path / "model.safetensors")
    assert ours.config.n_head == 12  # inferred from the official width
    assert max_diff(ours, hf, torch.randint(0, 50257, (2, 9))) <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_are_upcast(dtype, tmp_path):
    hf = hf_model()
    ours = GPT.from_pretrained(write_official(hf, tmp_path, dtype=dtype))
    assert ours.wte.weight.dtype == torch.float32
    hf_rounded = hf_model()
    hf_rounded.load_state_dict({k: v.to(dtype).float() for k, v in hf.state_dict().items()})
    assert max_diff(ours, hf_rounded, torch.randint(0, 50257, (2, 12))) <= TOL


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64))
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_diff(ours, hf, torch.randint(0, 50257, (2, 30))) <= TOL
    again = GPT.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_random_init_follows_gpt2_scheme():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256))
    assert abs(m.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(m.h[0].mlp.c_proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 1e-3
    assert torch.all(m.h[0].ln_1.weight == 1) and torch.all(m.h[0].attn.c_attn.bias == 0)
    logits = m(torch.randint(0, 50257, (1, 8)))
    assert logits.shape == (1, 8, 50257)


def test_padded_batch_with_attention_mask_matches_unpadded_rows(tmp_path):
    hf = hf_model()
    ours = GPT.from_pretrained(write_official(hf, tmp_path))
    a, b = torch.randint(0, 50257, (7,)), torch.randint(0, 50257, (4,))
    with torch.no_grad():
        right = ours(
            torch.stack([a, torch.cat([b, torch.zeros(3, dtype=torch.long)])]),
            attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
        )
        left = ours(
            torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])]),
            attention_mask=torch.tensor([[1] * 7, [0] * 3 + [1] * 4]),
        )
        alone = ours(b[None])[0]
    assert (right[1, :4] - alone).abs().max() <= TOL
    assert (left[1, 3:] - alone).abs().max() <= TOL
    assert torch.isfinite(left).all()
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    idx = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    with torch.no_grad():
        # transformers' forward counts positions from the left edge unless told; generate() passes these
        theirs = hf(idx, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (left[1, 3:] - theirs[1, 3:]).abs().max() <= TOL


# ---------------------------------------------------------------- generation


def test_gradients_match_transformers(tmp_path):
    # the same loss on both models -> the same gradient for every tensor, the tied wte's being the sum of
    # its embedding part and its head part
    hf = hf_model(n_layer=2, n_embd=64, n_head=4, seed=5)
    ours = GPT.from_pretrained(write_official(hf, tmp_path)).train()
    hf.train()
    idx = torch.randint(0, 50257, (3, 24), generator=torch.Generator().manual_seed(2))
    labels = torch.nn.functional.pad(idx[:, 1:], (0, 1), value=-100)
    for logits in (ours(idx), hf(idx).logits):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    theirs = dict(hf.transformer.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.layout == torch.strided, name
        ref = theirs[name].grad
        assert (p.grad - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), name
        checked += 1
    assert checked == 4 + 12 * 2  # wte, wpe, ln_f weight and bias, 12 tensors per block
    assert ours.wte.weight.grad.abs().sum() > 0


def test_greedy_generation_matches_transformers(tmp_path):
    hf = hf_model(n_layer=2, n_embd=128, n_head=4, seed=3)
    ours = GPT.from_pretrained(write_official(hf, tmp_path))
    prompt = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(0))
    mine = generate(ours, prompt, max_new_tokens=40, temperature=0)
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(mine, theirs)


def test_kv_cache_equals_recomputing_without_cache():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64)).eval()
    prompt = torch.randint(0, 50257, (3, 6))
    cached = generate(m, prompt, max_new_tokens=25, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(25):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_prompts_of_different_lengths_generate_like_one_at_a_time():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64)).eval()
    prompts = [[5, 6, 7, 8, 9], [1000], [42, 43, 44]]
    batched = generate(m, prompts, max_new_tokens=12, temperature=0)
    for prompt, row in zip(prompts, batched):
        alone = generate(m, torch.tensor(prompt), max_new_tokens=12, temperature=0)
        assert row == alone.tolist()


def test_banned_tokens_never_sampled_and_seed_reproduces():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # make the banned tokens the most likely ones, so banning is what stops them
        m.ln_f.bias.fill_(1.0)  # every final hidden state gets a +1 component...
        m.wte.weight[[0, 1, 2, 50256]] += 0.5  # ...which these rows turn into a large logit
    banned = [0, 1, 2, 50256]
    prompt = torch.zeros(10, 1, dtype=torch.long) + 7
    out = generate(m, prompt, 100, banned_tokens=banned, generator=torch.Generator().manual_seed(0))
    new = out[:, 1:]
    assert new.numel() == 1000 and not torch.isin(new, torch.tensor(banned)).any()
    unbanned = generate(m, prompt, 100, generator=torch.Generator().manual_seed(0))
    assert torch.isin(unbanned[:, 1:], torch.tensor(banned)).float().mean() > 0.2  # the ban did the work
    again = generate(m, prompt, 100, banned_tokens=banned, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    top = generate(m, prompt, 50, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert top.shape == (10, 51)


def test_generation_stops_each_row_at_eos():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).eval()
    out = generate(m, [[3, 4]], max_new_tokens=10, temperature=0)
    first = out[0][2]
    stopped = generate(m, [[3, 4]], max_new_tokens=10, temperature=0, eos_token=first)
    assert stopped == [[3, 4, first]]
    tensor_out = generate(m, torch.tensor([[3, 4]]), max_new_tokens=10, temperature=0, eos_token=first)
    assert tensor_out.tolist() == [[3, 4] + [first] * 10]


# ---------------------------------------------------------------- sampling: top-k, nucleus, temperature

# one row of fixed logits, drawn N times in a single call; probabilities 0.30, 0.22, 0.16, ... by construction
FIXED_LOGITS = torch.log(torch.tensor([0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.04, 0.02, 0.01]))
N_DRAWS = 40_000


def draw(**kwargs):
    from nanotune.generate import pick_tokens

    logits = FIXED_LOGITS.expand(N_DRAWS, -1)
    kwargs = dict(temperature=1.0, top_k=None, top_p=None, banned=torch.tensor([], dtype=torch.long)) | kwargs
    tokens = pick_tokens(logits, generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(tokens, minlength=len(FIXED_LOGITS)).double() / N_DRAWS


def assert_follows(freqs, expected):
    # each frequency within 5 standard errors of its probability, sqrt(p (1 - p) / N) <= 0.0025 here: a correct
    # sampler misses by that with probability ~1e-6 per token (and the seed is fixed, so the test is repeatable);
    # a sampler that ignores top-k or top-p puts >= 5% of its draws on tokens whose expected share is 0
    expected = expected.double()
    bound = 5 * torch.sqrt(expected * (1 - expected) / N_DRAWS) + 1e-12
    assert torch.all((freqs - expected).abs() <= bound), (freqs, expected)


def test_top_k_samples_only_the_k_best_in_renormalised_proportions():
    p = FIXED_LOGITS.exp()
    expected = torch.zeros_like(p)
    expected[:3] = p[:3] / p[:3].sum()  # 0.441, 0.324, 0.235
    freqs = draw(top_k=3)
    assert freqs[3:].sum() == 0
    assert_follows(freqs, expected)


def test_top_p_samples_the_smallest_set_reaching_p():
    p = FIXED_LOGITS.exp()
    # cumulative 0.30, 0.52, 0.68, 0.80, 0.88: the nucleus for top_p 0.75 is the first four tokens
    expected = torch.zeros_like(p)
    expected[:4] = p[:4] / p[:4].sum()
    freqs = draw(top_p=0.75)
    assert freqs[4:].sum() == 0
    assert_follows(freqs, expected)


def test_temperature_with_top_k_sharpens_then_truncates():
    scaled = torch.softmax(FIXED_LOGITS / 0.5, -1)
    expected = torch.zeros_like(scaled)
    expected[:5] = scaled[:5] / scaled[:5].sum()
    assert_follows(draw(temperature=0.5, top_k=5), expected)
    assert_follows(draw(), FIXED_LOGITS.exp())  # and with no truncation: the distribution itself


def test_generate_passes_top_k_and_top_p_to_the_sampler():
    # top-1 and a nucleus smaller than any token's probability both leave only the argmax: greedy text
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 50257, (4, 3), generator=torch.Generator().manual_seed(1))
    greedy = generate(m, prompt, 20, temperature=0)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-9}):
        assert torch.equal(generate(m, prompt, 20, generator=torch.Generator().manual_seed(2), **kwargs), greedy)
    assert not torch.equal(generate(m, prompt, 20, generator=torch.Generator().manual_seed(2)), greedy)


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, n_positions=64)).train()
    idx = torch.randint(0, 50257, (2, 16))
    calls = []
    for block in model.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing):
        model.zero_grad()
        model.checkpointing = checkpointing
        calls.clear()
        model(idx).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    first, first_calls = grads(1)  # --activation-checkpointing 1: only the first block is recomputed
    assert plain_calls == 2 and ckpt_calls == 4 and first_calls == 3  # each recomputed block ran again in backward
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) < 1e-6
    assert max((plain[n] - first[n]).abs().max().item() for n in plain) < 1e-6
    with torch.no_grad():  # no backward to prepare for: blocks run once
        calls.clear()
        model(idx)
    assert len(calls) == 2


def test_positions_returns_the_same_logits_as_slicing_the_full_output():
    # PPO asks for an answer's logits only; they must be exactly the full forward's, also with left padding
    # and with prompt tuning's virtual tokens in front (positions count real tokens)

    from nanotune.model.peft import PeftSpec, apply_peft

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, n_positions=64)).eval()
    idx = torch.randint(0, 50257, (2, 12))
    attention_mask = torch.ones_like(idx)
    attention_mask[1, :4] = 0  # left padding
    for tuned in (False, True):
        if tuned:
            apply_peft(model, PeftSpec(method="prompt", prompt_tokens=3), "test")
        with torch.no_grad():
            full = model(idx, attention_mask=attention_mask)
            part = model(idx, attention_mask=attention_mask, positions=slice(2, 9))
            hidden = model(idx, attention_mask=attention_mask, hidden=True, positions=slice(2, 9))
        assert full.shape == (2, 12, 50257) and part.shape == (2, 7, 50257) and hidden.shape == (2, 7, 64)
        assert (part - full[:, 2:9]).abs().max().item() < 1e-5
