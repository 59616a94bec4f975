"""grpo_loss: a hand-computed case, the float64 reference with every option on and off, metrics,
the pure per-token math, and bad input. Both the chunked PyTorch and the Triton path."""

from __future__ import annotations

import math

import pytest
import torch

from qwenlong.kernels import grpo_loss
from qwenlong.kernels.logprobs import grpo as grpo_module
from qwenlong.kernels.logprobs.policy_math import aggregate_tokens, k3_kl, policy_loss_per_token
from qwenlong.kernels.logprobs.reference import reference_grpo_loss, reference_linear_logprobs
from qwenlong.kernels.utils.checks import CHECK_ENV_VAR

IGNORE = -100


def hand_case(device):
    """V = 2 and weight = I, so the logits are the hidden states: p(target 0) = 1/2, 3/4, 1/4."""
    ln3 = math.log(3.0)
    hidden = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln3], [5.0, -5.0]], device=device, requires_grad=True)
    weight = torch.eye(2, device=device, requires_grad=True)
    targets = torch.tensor([0, 0, 0, IGNORE], device=device)
    old = torch.full((4,), math.log(0.5), device=device)
    advantages = torch.tensor([1.0, 2.0, -1.0, 7.0], device=device)
    mask = torch.tensor([True, True, True, False], device=device)
    return hidden, weight, targets, advantages, old, mask


def test_hand_computed_case(backend, device):
    hidden, weight, targets, advantages, old, mask = hand_case(device)
    # ratios 1, 1.5, 0.5. Token 2 is clipped high (-min(3, 1.28 * 2)), token 3 clipped low (-min(-0.5, -0.8)).
    loss, metrics = grpo_loss(hidden, weight, targets, advantages, old, mask)
    assert loss.item() == pytest.approx((-1.0 - 2.56 + 0.8) / 3, abs=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 3, abs=1e-6)
    assert "kl_mean" not in metrics and "entropy_mean" not in metrics
    # clipped tokens pass no gradient: only token 1 moves, d(-rho * A)/dz = -(onehot - p) = (-1/2, +1/2) / 3
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    expected = torch.zeros(4, 2, device=device)
    expected[0] = torch.tensor([-0.5, 0.5], device=device) / 3
    torch.testing.assert_close(grad_hidden, expected, atol=1e-6, rtol=0)

    # KL to a reference at p = 1/2 and an entropy bonus; the global count 6 replaces the local 3
    ref = torch.full((4,), math.log(0.5), device=device)
    kl = [0.0, 2 / 3 - math.log(2 / 3) - 1, 2 - math.log(2) - 1]
    entropy = [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    entropy = [entropy[0], entropy[1], entropy[1]]
    loss, metrics = grpo_loss(hidden, weight, targets, advantages, old, mask, ref_logprobs=ref, kl_coef=0.1,
                              entropy_coef=0.01, num_tokens=6)
    want = (-1.0 - 2.56 + 0.8 + 0.1 * sum(kl) - 0.01 * sum(entropy)) / 6
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert metrics["kl_mean"].item() == pytest.approx(sum(kl) / 3, abs=1e-6)
    assert metrics["entropy_mean"].item() == pytest.approx(sum(entropy) / 3, abs=1e-6)


def test_hand_computed_dual_clip(backend, device):
    """p = 1/4 against an old p of 1/16: ratio 4 on a negative advantage, loss 4, capped at 3 by dual clip."""
    hidden = torch.tensor([[0.0, math.log(3.0)]], device=device)
    weight = torch.eye(2, device=device)
    args = (hidden, weight, torch.tensor([0], device=device), torch.tensor([-1.0], device=device),
            torch.tensor([math.log(1 / 16)], device=device), torch.tensor([1.0], device=device))
    assert grpo_loss(*args)[0].item() == pytest.approx(4.0, abs=1e-5)
    assert grpo_loss(*args, dual_clip=3.0)[0].item() == pytest.approx(3.0, abs=1e-6)


OPTIONS = [
    {},
    {"clip_low": 0.2, "clip_high": 0.2},
    {"dual_clip": 3.0},
    {"kl_coef": 0.05},
    {"entropy_coef": 0.01},
    {"temperature": 0.7},
    {"num_tokens": 1000},
    {"num_tokens": "per_sequence"},
    {"dual_clip": 2.0, "kl_coef": 0.1, "entropy_coef": 0.02, "temperature": 1.3, "num_tokens": 777},
]


def make_grpo_inputs(num_tokens, dim, vocab, dtype, seed, options, device="cpu"):
    """Drawn on the CPU (the same values on every device), then every tensor moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    mask = torch.rand(num_tokens, generator=gen) > 0.2
    targets[~mask & (torch.rand(num_tokens, generator=gen) > 0.5)] = IGNORE
    temperature = options.get("temperature", 1.0)
    current = reference_linear_logprobs(hidden, weight, targets, temperature).float()
    # old and reference policies a little off the current one, so that some ratios clip on either side
    old = current + 0.3 * torch.randn(num_tokens, generator=gen)
    ref = current + 0.3 * torch.randn(num_tokens, generator=gen)
    advantages = torch.randn(num_tokens, generator=gen)
    kwargs = dict(options)
    if kwargs.get("num_tokens") == "per_sequence":  # 3 sequences: the mean of per-sequence token means
        seq_id = torch.arange(num_tokens) * 3 // num_tokens
        lengths = torch.zeros(3).index_add_(0, seq_id, mask.float())
        kwargs["num_tokens"] = (3 * lengths[seq_id]).to(device)
    if kwargs.get("kl_coef"):
        kwargs["ref_logprobs"] = ref.to(device)
    hidden, weight = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    return (hidden, weight, *(t.to(device) for t in (targets, advantages, old, mask))), kwargs


@pytest.mark.parametrize("option_index", range(len(OPTIONS)))
def test_matches_reference_with_every_option(backend, option_index, device):
    shape = (300, 16, 2003) if backend == "torch" else (40, 16, 300)
    args, kwargs = make_grpo_inputs(*shape, torch.float32, seed=option_index, options=OPTIONS[option_index],
                                    device=device)
    hidden, weight = args[:2]
    loss, metrics = grpo_loss(*args, **kwargs)
    ref = reference_grpo_loss(*args, **kwargs)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4
    assert all(not value.requires_grad for value in metrics.values())
    assert ("kl_mean" in metrics) == ("ref_logprobs" in kwargs)
    assert ("entropy_mean" in metrics) == bool(kwargs.get("entropy_coef"))


def test_metrics_match_reference(backend, device):
    options = {"kl_coef": 0.1, "entropy_coef": 0.01, "temperature": 0.9}
    args, kwargs = make_grpo_inputs(40, 16, 300, torch.float32, seed=17, options=options, device=device)
    hidden, weight, targets, advantages, old, mask = args
    _, metrics = grpo_loss(*args, **kwargs)
    logp, entropy = reference_linear_logprobs(hidden, weight, targets, 0.9, return_entropy=True)
    ratio = torch.exp(logp - old.double())[mask]
    adv = advantages.double()[mask]
    log_ratio = kwargs["ref_logprobs"].double() - logp
    expected = {
        "ratio_mean": ratio.mean(),
        "clip_frac_low": ((ratio < 0.8) & (adv < 0)).double().mean(),
        "clip_frac_high": ((ratio > 1.28) & (adv > 0)).double().mean(),
        "kl_mean": (torch.exp(log_ratio) - log_ratio - 1)[mask].mean(),
        "entropy_mean": entropy[mask].mean(),
    }
    assert expected["clip_frac_low"] > 0 and expected["clip_frac_high"] > 0
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value.item(), abs=1e-5), name


def test_bf16_every_option_on(backend, device):
    args, kwargs = make_grpo_inputs(40, 32, 700, torch.bfloat16, seed=23, options=OPTIONS[-1], device=device)
    hidden, weight = args[:2]
    loss, _ = grpo_loss(*args, **kwargs)
    ref = reference_grpo_loss(*args, **kwargs)
    torch.testing.assert_close(loss.double(), ref, atol=2e-4, rtol=1e-3)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-2


@pytest.mark.parametrize("entropy_coef", (0.0, 0.05))
def test_entropy_computed_only_when_used(monkeypatch, entropy_coef):
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    asked = []
    original = grpo_module.linear_logprobs

    def spy(*args, **kwargs):
        asked.append(kwargs["return_entropy"])
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "linear_logprobs", spy)
    args, kwargs = make_grpo_inputs(20, 8, 50, torch.float32, seed=3, options={"entropy_coef": entropy_coef})
    grpo_loss(*args, **kwargs)
    assert asked == [entropy_coef != 0]


def test_policy_math_pieces():
    logp = torch.tensor([0.0, 0.5, -0.5, 0.5, -0.5], requires_grad=True)
    old = torch.zeros(5)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    loss, ratio = policy_loss_per_token(logp, old, adv, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # e^0.5 > 1.28 with A > 0 and e^-0.5 < 0.8 with A < 0 are clipped: no gradient there
    assert grad[1] == 0 and grad[4] == 0 and grad[0] != 0 and grad[2] != 0 and grad[3] != 0
    torch.testing.assert_close(ratio, logp.detach().exp())
    kl = k3_kl(torch.randn(100), torch.randn(100))
    assert (kl >= 0).all()
    assert k3_kl(torch.ones(3), torch.ones(3)).abs().max() == 0

    # the per-token num_tokens for a sequence mean: the mean over sequences of per-sequence means
    values = torch.randn(10)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0, 1], dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    per_seq = [values[(seq == s) & mask].mean() for s in (0, 1)]
    lengths = torch.stack([((seq == s) & mask).sum() for s in (0, 1)])
    got = aggregate_tokens(values, mask, 2 * lengths[seq])
    torch.testing.assert_close(got, (per_seq[0] + per_seq[1]) / 2)
    torch.testing.assert_close(aggregate_tokens(values, mask), values[mask].mean())
    torch.testing.assert_close(aggregate_tokens(values, mask, 20), values[mask].sum() / 20)


def _bad_cases(device="cpu"):
    args, _ = make_grpo_inputs(6, 8, 20, torch.float32, seed=1, options={}, device=device)
    hidden, weight, targets, advantages, old, mask = (a.detach() for a in args)
    good = dict(hidden=hidden, weight=weight, targets=targets, advantages=advantages, old_logprobs=old, mask=mask)
    return good, [
        ("advantages", dict(advantages=advantages[:5])),
        ("advantages", dict(advantages=advantages.to("meta"))),
        ("old_logprobs", dict(old_logprobs=old.long())),
        ("mask", dict(mask=mask[None])),
        ("ref_logprobs", dict(kl_coef=0.1)),
        ("ref_logprobs", dict(ref_logprobs=old[:3])),
        ("clip_low", dict(clip_low=1.5)),
        ("clip_high", dict(clip_high=-0.1)),
        ("dual_clip", dict(dual_clip=0.5)),
        ("num_tokens", dict(num_tokens=0)),
        ("num_tokens", dict(num_tokens=torch.ones(4, device=device))),
        ("targets", dict(targets=targets + 100)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_names_the_argument(case):
    good, cases = _bad_cases()
    name, change = cases[case]
    with pytest.raises(ValueError, match=name):
        grpo_loss(**(good | change))


def test_nan_and_inf_at_masked_positions_reach_nothing(backend, device):
    """NaN / -inf old log-probs, advantages, reference log-probs and hidden rows where mask = 0 change
    neither the loss nor any gradient bit, and masked rows get exactly zero gradient."""
    options = {"kl_coef": 0.1, "entropy_coef": 0.01, "num_tokens": "per_sequence"}
    args, kwargs = make_grpo_inputs(40, 16, 300, torch.float32, seed=29, options=options, device=device)
    hidden, weight, targets, advantages, old, mask = args
    masked = ~mask
    assert masked.any() and mask.any()

    def run(hidden_in, advantages_in, old_in, ref_in):
        h, w = hidden_in.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, metrics = grpo_loss(h, w, targets, advantages_in, old_in, mask, **(kwargs | {"ref_logprobs": ref_in}))
        return (loss, *torch.autograd.grad(loss, (h, w)), *metrics.values())

    clean = run(hidden, advantages, old, kwargs["ref_logprobs"])
    poisoned = run(
        torch.where(masked[:, None], float("nan"), hidden.detach()),
        torch.where(masked, float("nan"), advantages),
        torch.where(masked, float("-inf"), old),
        torch.where(masked, float("nan"), kwargs["ref_logprobs"]),
    )
    for got, want in zip(poisoned, clean, strict=True):
        assert torch.isfinite(got).all() and torch.equal(got, want)
    assert (poisoned[1][masked] == 0).all()
    ref = reference_grpo_loss(*args, **kwargs)
    torch.testing.assert_close(clean[0].double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("option_index", [0, len(OPTIONS) - 1, len(OPTIONS) - 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_in_forward_match_the_reference(backend, option_index, dtype, device):
    """grad_in_forward=True: same loss, metrics and gradients (hidden, weight) as the reference, and
    backward scales the stored gradients by the incoming one."""
    args, kwargs = make_grpo_inputs(40, 16, 300, dtype, seed=31 + option_index, options=OPTIONS[option_index],
                                    device=device)
    hidden, weight = args[:2]
    loss, metrics = grpo_loss(*args, **kwargs, grad_in_forward=True)
    _, plain_metrics = grpo_loss(*args, **kwargs)
    ref = reference_grpo_loss(*args, **kwargs)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))
    ref_grads = torch.autograd.grad(3.0 * ref, (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < (1e-4 if tol == 1e-5 else 2e-2)
    assert set(metrics) == set(plain_metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(value, plain_metrics[name], atol=tol, rtol=tol)


def _misread_cases(device):
    good, _ = _bad_cases(device)
    targets, mask = good["targets"], good["mask"]
    assert mask.any() and not mask.all()
    ignored_at_loss_token = targets.clone()
    ignored_at_loss_token[mask.nonzero()[0, 0]] = IGNORE
    half = mask.float()
    half[mask.nonzero()[0, 0]] = 0.5
    per_token = torch.full(mask.shape, 4.0, device=device)
    per_token[mask.nonzero()[0, 0]] = 0.0
    return good, [
        ("targets", dict(targets=targets[:1])),  # broadcast to every token before
        ("targets", dict(targets=targets.float())),
        ("targets .* where mask is set", dict(targets=ignored_at_loss_token)),  # counted as logp = 0 before
        ("mask must hold only 0 and 1", dict(mask=half)),  # counted as 1 before
        ("mask must hold only 0 and 1", dict(mask=torch.where(mask, float("nan"), 0.0))),
        ("num_tokens must be > 0 at every token where mask is set", dict(num_tokens=per_token)),  # NaN before
    ]


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("case", range(6))
def test_inputs_it_would_misread_are_refused(backend, case, grad_in_forward, device, monkeypatch):
    """Targets that are not one int per token, an ignored target at a loss token, a mask that is not 0/1 and a
    per-token num_tokens of 0 at a loss token: each a ValueError naming the argument (they were silently
    broadcast, counted as logp = 0, counted as 1, or gave NaN). A 0/1 float mask is the bool mask."""
    monkeypatch.setenv(CHECK_ENV_VAR, "1")  # on a GPU, the checks that read tensor values run only when asked for
    good, cases = _misread_cases(device)
    message, change = cases[case]
    with pytest.raises(ValueError, match=message):
        grpo_loss(**(good | change), grad_in_forward=grad_in_forward)
    as_bool = grpo_loss(**good, grad_in_forward=grad_in_forward)[0]
    as_float = grpo_loss(**(good | {"mask": good["mask"].float()}), grad_in_forward=grad_in_forward)[0]
    assert torch.equal(as_bool, as_float)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_fp16_gradients_in_forward_under_a_loss_scale(backend, grad_in_forward, device):
    """fp16 under a GradScaler-style scale of 65536 (inf in fp16), with hidden states and weight of 2**-16, so
    both gradients (2**-20 and below) are under fp16's normal range (2**-14) until scaled: both as the float64
    reference's (grad_in_forward gave NaN before)."""
    args, kwargs = make_grpo_inputs(40, 16, 300, torch.float32, seed=41, options={"kl_coef": 0.05}, device=device)
    hidden, weight = (args[0].detach() * 2**-16).half(), (args[1].detach() * 2**-16).half()
    targets, advantages, old, mask = args[2:]
    exact = [t.double().requires_grad_() for t in (hidden, weight)]
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    loss, _ = grpo_loss(hidden, weight, targets, advantages, old, mask, **kwargs, grad_in_forward=grad_in_forward)
    grads = torch.autograd.grad(loss * 65536.0, (hidden, weight))
    ref = reference_grpo_loss(*exact, targets, advantages, old, mask, **kwargs)
    ref_grads = torch.autograd.grad(ref * 65536.0, exact)
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), name
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-3, name


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_double_backward_is_refused(backend, grad_in_forward, device):
    """grpo_loss's gradient is not differentiable again: differentiating it raises, naming the fused LM head."""
    args, kwargs = make_grpo_inputs(8, 16, 40, torch.float32, seed=43, options={"entropy_coef": 0.01},
                                    device=device)
    hidden, weight = args[:2]
    with pytest.raises(RuntimeError, match="fused LM head .* does not support double backward"):
        (first,) = torch.autograd.grad(grpo_loss(*args, **kwargs, grad_in_forward=grad_in_forward)[0], hidden,
                                       create_graph=True)
        torch.autograd.grad((first**2).sum() + hidden.sum() + weight.sum(), (hidden, weight))
