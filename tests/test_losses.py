"""The recipes' loss functions against reference maths (float64 NumPy, torch built-ins, transformers)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nanotune.data.instruct import IGNORE, collate, sequence_logprobs, token_logprobs
from train_dpo import dpo_loss
from train_gulliver import next_token_nll
from train_sft import sft_loss
from train_xkl import target_distribution, xkl_loss

finite = st.floats(-30, 30, allow_nan=False, width=32)


@st.composite
def logits_and_targets(draw):
    n, v = draw(st.integers(1, 6)), draw(st.integers(2, 40))
    logits = draw(arrays(np.float32, (n, v), elements=finite))
    weights = draw(arrays(np.float64, (n, v), elements=st.floats(0, 10)))
    zeros = draw(arrays(np.bool_, (n, v)))
    weights[zeros] = 0.0  # targets with exact zeros (0 log 0 = 0)
    weights[np.arange(n), draw(st.integers(0, v - 1))] += 1.0  # every row has some mass
    return logits, weights / weights.sum(-1, keepdims=True)


# ---------------------------------------------------------------- X-KL


@settings(max_examples=200, deadline=None)
@given(logits_and_targets())
def test_xkl_loss_equals_kl_div_and_float64_sum(data):
    logits, p = data
    lt, pt = torch.tensor(logits), torch.tensor(p, dtype=torch.float32)
    ours = xkl_loss(lt, pt).item()
    log_q = torch.log_softmax(lt, -1)
    assert ours == pytest.approx(F.kl_div(log_q, pt, reduction="batchmean").item(), rel=1e-4, abs=1e-4)
    l64 = logits.astype(np.float64)
    log_q64 = l64 - l64.max(-1, keepdims=True)
    log_q64 = log_q64 - np.log(np.exp(log_q64).sum(-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - log_q64), 0.0)
    reference = terms.sum(-1).mean()
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-4)
    assert ours >= -1e-5


@settings(max_examples=100, deadline=None)
@given(logits_and_targets())
def test_xkl_gradient_is_softmax_minus_target_over_rows(data):
    logits, p = data
    lt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    pt = torch.tensor(p)
    xkl_loss(lt, pt).backward()
    expected = (torch.softmax(lt.detach(), -1) - pt) / lt.shape[0]
    assert torch.allclose(lt.grad, expected.to(lt.grad.dtype), atol=1e-6)


def test_xkl_is_zero_when_model_equals_target():
    p = torch.softmax(torch.randn(3, 50), -1)
    assert xkl_loss(torch.log(p), p).item() == pytest.approx(0.0, abs=1e-6)
    broadcast = torch.softmax(torch.randn(50), -1)  # one target for every row
    assert xkl_loss(torch.log(broadcast).expand(4, 50), broadcast).item() == pytest.approx(0.0, abs=1e-6)


def test_target_distributions():
    is_letter = torch.tensor([True, False, True, False, False])
    uniform = target_distribution(is_letter, "uniform", 0.0)
    assert torch.allclose(uniform, torch.tensor([0.5, 0, 0.5, 0, 0]))
    smoothed = target_distribution(is_letter, "smoothed", 0.9)
    assert torch.allclose(smoothed, torch.tensor([0.45, 0.1 / 3, 0.45, 0.1 / 3, 0.1 / 3]))
    assert smoothed.sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- next-token NLL


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_next_token_nll_equals_shifted_cross_entropy(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits, tokens = torch.randn(B, T, V, generator=g) * 5, torch.randint(0, V, (B, T), generator=g)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    # abs 5e-6: log p = logit - logsumexp rounds at the logits' scale (float32's step near |logsumexp| ~ 20 is 2e-6),
    # where cross_entropy's log_softmax is exact for the top token; it keeps no (B, T, V) tensor for backward
    assert next_token_nll(logits, tokens).item() == pytest.approx(expected.item(), rel=1e-5, abs=5e-6)


def test_next_token_nll_equals_transformers_labels_loss(tmp_path):
    from helpers import hf_model, write_official

    from nanotune import GPT

    hf = hf_model()
    ours = GPT.from_pretrained(write_official(hf, tmp_path))
    tokens = torch.randint(0, 50257, (3, 20))
    with torch.no_grad():
        theirs = hf(tokens, labels=tokens).loss.item()
        mine = next_token_nll(ours(tokens), tokens).item()
    assert mine == pytest.approx(theirs, abs=1e-5)


# ---------------------------------------------------------------- SFT masking


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 10)), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_labels_unmask_exactly_the_response_and_its_endoftext(lengths, seed):
    rng = np.random.default_rng(seed)
    eot = 50256
    pairs = []
    for n_prompt, n_response in lengths:
        prompt = rng.integers(0, 50000, n_prompt).tolist()
        response = rng.integers(0, 50000, n_response).tolist() + [eot]
        pairs.append((prompt, response))
    input_ids, labels = collate(pairs, eot, "cpu")
    T = max(len(p) + len(r) for p, r in pairs) - 1
    assert input_ids.shape == labels.shape == (len(pairs), T)
    for b, (prompt, response) in enumerate(pairs):
        row = prompt + response
        unmasked = (labels[b] != IGNORE).nonzero().flatten().tolist()
        # exactly the positions whose next token is a response token (or the closing <|endoftext|>)
        assert unmasked == list(range(len(prompt) - 1, len(row) - 1))
        assert labels[b, unmasked].tolist() == response  # response tokens, then the first <|endoftext|>
        assert labels[b, 0].item() == IGNORE or len(prompt) == 1  # position 0 predicts a prompt token
        assert input_ids[b, : len(row) - 1].tolist() == row[:-1]
        assert (labels[b, len(row) - 1 :] == IGNORE).all()  # padding
        # labels are the inputs shifted by one wherever they are kept
        for t in unmasked[:-1]:
            assert labels[b, t].item() == input_ids[b, t + 1].item()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 10), st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_sft_response_loss_equals_float64_and_cross_entropy(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 4
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.5] = IGNORE
    labels[0, 0] = 1  # at least one kept
    ours = sft_loss(logits, labels).item()  # L2: the mean NLL of the response tokens
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE).item()
    assert ours == pytest.approx(expected, rel=1e-5, abs=5e-6)  # (logsumexp's rounding, as above)
    l64 = logits.double().numpy()
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if labels[b, t] != IGNORE:
                row = l64[b, t]
                total += -(row[labels[b, t]] - row.max() - math.log(np.exp(row - row.max()).sum()))
                count += 1
    assert ours == pytest.approx(total / count, rel=1e-5, abs=5e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_sequence_logprobs_equals_a_python_loop(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 11, generator=g)
    labels = torch.randint(0, 11, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE
    ours = sequence_logprobs(logits, labels)
    for b in range(B):
        expected = sum(
            torch.log_softmax(logits[b, t].double(), -1)[labels[b, t]].item()
            for t in range(T)
            if labels[b, t] != IGNORE
        )
        assert ours[b].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(token_logprobs(logits, labels)[labels == IGNORE], torch.zeros(int((labels == IGNORE).sum())))


# ---------------------------------------------------------------- DPO

logps = st.floats(-500, 0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(logps, logps, logps, logps), min_size=1, max_size=8), st.floats(0.01, 2.0), st.floats(0.0, 0.49)
)
def test_dpo_loss_equals_float64_closed_form(rows, beta, eps):
    pc, pr, rc, rr = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, eps)
    expected = 0.0
    for a, b, c, d in rows:
        z = beta * ((a - c) - (b - d))
        log_sig = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
        expected += -(1 - eps) * log_sig(z) - eps * log_sig(-z)
    assert loss.item() == pytest.approx(expected / len(rows), rel=1e-9, abs=1e-12)
    assert torch.allclose(chosen_rewards, beta * (pc - rc)) and torch.allclose(rejected_rewards, beta * (pr - rr))


def test_dpo_loss_is_log2_when_policy_equals_reference():
    x, y = torch.randn(16) * 50, torch.randn(16) * 50
    loss, chosen, rejected = dpo_loss(x, y, x.clone(), y.clone(), beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


@settings(max_examples=100, deadline=None)
@given(st.tuples(logps, logps, logps, logps), st.floats(0.01, 2.0))
def test_swapping_chosen_and_rejected_negates_z(row, beta):
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in row)
    z = beta * ((pc - rc) - (pr - rr))
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta)
    assert swapped.item() == pytest.approx(-F.logsigmoid(-z).item(), rel=1e-9, abs=1e-12)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-10.0, -20.0], requires_grad=True)
    pr = torch.tensor([-12.0, -15.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-11.0, -19.0]), torch.tensor([-12.5, -16.0]), beta=0.1)
    loss.backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # descent moves chosen up, rejected down


def test_dpo_loss_is_finite_for_extreme_margins():
    big = torch.tensor([1e4, -1e4, 0.0])
    zero = torch.zeros(3)
    for eps in (0.0, 0.2):
        loss, _, _ = dpo_loss(big, zero, zero, zero, beta=1.0, label_smoothing=eps)  # |z| up to 1e4
        assert torch.isfinite(loss)
    pc = big.clone().requires_grad_(True)
    dpo_loss(pc, zero, zero, zero, beta=1.0)[0].backward()
    assert torch.isfinite(pc.grad).all()
