"""Negative-gradient clipping and AEPO (qwenlong.algorithms.entropy_control) on hand-computed batches,
and the entropies they use taken from the fused kernel against a float64 softmax."""

from __future__ import annotations

import pytest
import torch

from qwenlong.algorithms import broadcast_to_tokens
from qwenlong.algorithms.entropy_control import (
    aepo_keep,
    aepo_mode,
    batch_entropy,
    negative_gradient_keep,
    response_mean_entropy,
)
from qwenlong.kernels import grpo_loss, linear_logprobs

# three packed responses of 3, 2 and 4 positions; the mask marks the positions that carry loss
CU_SEQLENS = torch.tensor([0, 3, 5, 9])
MASK = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
TOKEN_ENTROPY = torch.tensor([9.0, 1.0, 2.0, 0.5, 3.5, 7.0, 0.2, 0.4, 7.0], dtype=torch.float64)
ADVANTAGES = torch.tensor([-1.0, -0.5, 1.0], dtype=torch.float64)
# by hand: (1 + 2) / 2, (0.5 + 3.5) / 2, (0.2 + 0.4) / 2 (masked positions ignored)
RESPONSE_ENTROPY = [1.5, 2.0, 0.3]


def test_response_and_batch_entropy_by_hand():
    per_response = response_mean_entropy(TOKEN_ENTROPY, MASK, CU_SEQLENS)
    assert per_response.tolist() == pytest.approx(RESPONSE_ENTROPY)
    assert float(batch_entropy(per_response)) == pytest.approx((1.5 + 2.0 + 0.3) / 3)
    # a response without loss tokens has mean entropy 0, not NaN
    empty = response_mean_entropy(torch.tensor([5.0, 1.0]), torch.tensor([False, True]), torch.tensor([0, 1, 2]))
    assert empty.tolist() == [0.0, 1.0]
    assert float(batch_entropy(torch.empty(0))) == 0.0


def _keep(tau_token, tau_sequence):
    per_response = response_mean_entropy(TOKEN_ENTROPY, MASK, CU_SEQLENS)
    return negative_gradient_keep(broadcast_to_tokens(ADVANTAGES, CU_SEQLENS), TOKEN_ENTROPY,
                                  broadcast_to_tokens(per_response, CU_SEQLENS), tau_token, tau_sequence).tolist()


def test_negative_gradient_clipping_by_hand():
    T, F = True, False
    # token level at 1.5: negative responses 0 and 1 lose their tokens of entropy 9, 2.0 and 3.5;
    # response 2 (positive advantage) keeps its tokens of entropy 7
    assert _keep(1.5, None) == [F, T, F, T, F, T, T, T, T]
    # sequence level at 1.8: response 1 (mean 2.0, negative) is dropped whole; response 0 (mean 1.5) stays
    assert _keep(None, 1.8) == [T, T, T, F, F, T, T, T, T]
    assert _keep(1.5, 1.8) == [F, T, F, F, F, T, T, T, T]
    assert _keep(None, None) == [T] * 9
    # thresholds are strict: an entropy equal to tau keeps its token
    assert _keep(2.0, 2.0) == [F, T, T, T, F, T, T, T, T]
    with pytest.raises(ValueError, match="tau_token"):
        _keep(-1.0, None)


def test_aepo_hysteresis_by_hand():
    mode, modes = "all", []
    for entropy in (1.0, 2.5, 1.5, 2.0, 0.9, 0.5, 0.4, 1.2, 3.0):
        mode = aepo_mode(mode, entropy, entropy_low=0.5, entropy_high=2.0)
        modes.append(mode)
    # above 2.0 switches to positive-only, below 0.5 back to all, the bounds themselves and the band keep the mode
    assert modes == ["all", "positive-only", "positive-only", "positive-only", "positive-only", "positive-only",
                     "all", "all", "positive-only"]
    with pytest.raises(ValueError, match="entropy_low"):
        aepo_mode("all", 1.0, entropy_low=2.0, entropy_high=1.0)
    with pytest.raises(ValueError, match="previous"):
        aepo_mode("negative-only", 1.0, 0.5, 2.0)


def test_aepo_keep_by_hand():
    advantages = torch.tensor([0.5, -0.5, 0.0, 1.0])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    assert aepo_keep("all", advantages, rewards).tolist() == [True] * 4
    assert aepo_keep("positive-only", advantages).tolist() == [True, False, False, True]
    # the snippet's extra condition: a positive advantage with reward 0 (e.g. penalised less than its group) is out
    assert aepo_keep("positive-only", advantages, rewards).tolist() == [True, False, False, False]


def test_entropy_from_fused_kernel_matches_float64_softmax():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 16, generator=gen)
    weight = torch.randn(37, 16, generator=gen)
    targets = torch.randint(0, 37, (9,), generator=gen)
    targets[~MASK] = -100
    temperature = 0.7
    _, entropy = linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=True)
    log_p = torch.log_softmax(hidden.double() @ weight.double().T / temperature, dim=-1)
    reference = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(entropy.double()[MASK], reference[MASK], atol=1e-5)
    got = response_mean_entropy(entropy.double(), MASK, CU_SEQLENS)
    expected = [reference[s:e][MASK[s:e]].mean().item() for s, e in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:], strict=True)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_dropped_tokens_carry_no_gradient():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(37, 16, generator=gen)
    targets = torch.randint(0, 37, (9,), generator=gen)
    targets[~MASK] = -100
    keep = torch.tensor(_keep(1.5, 1.8))
    advantages = broadcast_to_tokens(ADVANTAGES.float(), CU_SEQLENS)
    old = linear_logprobs(hidden.detach(), weight, targets)
    loss, _ = grpo_loss(hidden, weight, targets, advantages, old, MASK & keep)
    loss.backward()
    trained = (MASK & keep).tolist()
    for t, grad in enumerate(hidden.grad):
        assert (grad.abs().sum() > 0) == trained[t], t
