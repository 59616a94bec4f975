"""qwenlong.integrations.verl inside the real verl (0.9): verl's own actor loss, fused forward and reward loader.

Each test runs verl's code twice on the same inputs, once with verl's implementation and once
with ours swapped in, and compares every output and gradient. Skipped where verl is not
installed (the main CI venv); tools/ci_integrations.sh runs them in a venv that has it.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("verl")
transformers = pytest.importorskip("transformers")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from qwenlong.integrations import verl as qwenlong_verl  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture
def registered(monkeypatch):
    """install() registers our loss as "qwenlong" and swaps the fused kernels; undone after the test."""
    import verl.utils.experimental.torch_functional as verl_torch_functional
    import verl.utils.kernel.linear_cross_entropy as verl_linear_cross_entropy

    monkeypatch.setitem(POLICY_LOSS_REGISTRY, "qwenlong", None)
    kernel = verl_linear_cross_entropy.linear_cross_entropy
    monkeypatch.setattr(verl_linear_cross_entropy, "linear_cross_entropy", kernel)
    monkeypatch.setattr(verl_torch_functional, "FusedLinearForPPO", verl_torch_functional.FusedLinearForPPO)
    original = verl_torch_functional.FusedLinearForPPO
    qwenlong_verl.install()
    assert POLICY_LOSS_REGISTRY["qwenlong"] is qwenlong_verl.compute_policy_loss_vanilla
    return original


def _actor_config(loss_mode: str, agg: str, loss_scale_factor):
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                       clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5, loss_agg_mode=agg,
                       loss_scale_factor=loss_scale_factor, policy_loss=PolicyLossConfig(loss_mode=loss_mode))


def _micro_batch(generator: torch.Generator):
    """verl's no-padding layout: left-padded prompts, right-padded responses, the model's log-probs as one
    flat row of every sequence's tokens. Row 3's response has no loss token (verl skips such rows in the
    seq-mean modes); one token's log-ratio is past verl's +-20 clamp, one is dual-clipped."""
    batch, prompt_len, response_len = 4, 5, 8
    attention_mask = torch.ones(batch, prompt_len + response_len, dtype=torch.long)
    attention_mask[1, :2] = 0
    attention_mask[2, prompt_len + 5:] = 0
    response_mask = attention_mask[:, prompt_len:].clone()
    response_mask[3] = 0
    old_log_probs = -torch.rand(batch, response_len, generator=generator, dtype=torch.float64) * 3
    log_prob = old_log_probs + torch.randn(batch, response_len, generator=generator, dtype=torch.float64) * 0.6
    log_prob[0, 0], log_prob[1, 1] = old_log_probs[0, 0] + 25.0, old_log_probs[1, 1] + 2.0
    advantages = torch.tensor([0.5, -1.0, 1.5, -0.3], dtype=torch.float64)[:, None].expand(batch, response_len)
    data = TensorDict({
        "prompts": torch.randint(0, 50, (batch, prompt_len), generator=generator),
        "responses": torch.randint(0, 50, (batch, response_len), generator=generator),
        "attention_mask": attention_mask, "response_mask": response_mask, "old_log_probs": old_log_probs,
        "advantages": advantages.contiguous(),
        "rollout_is_weights": torch.rand(batch, response_len, generator=generator, dtype=torch.float64) + 0.5,
    }, batch_size=[batch])
    return data, log_prob.requires_grad_()


def _flat_log_probs(log_prob: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The model output verl's ppo_loss expects: per sequence, its tokens' next-token log-probs (the response
    token j is predicted at prompt_len + j - 1), the sequences one after another."""
    rows = []
    for b in range(log_prob.shape[0]):
        n_prompt, n_response = int(attention_mask[b, :prompt_len].sum()), int(attention_mask[b, prompt_len:].sum())
        rows.append(torch.cat([log_prob.new_zeros(n_prompt - 1), log_prob[b, :n_response], log_prob.new_zeros(1)]))
    return torch.cat(rows)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("global_batch", [False, True], ids=["micro-batch", "global-batch"])
def test_verl_ppo_loss_with_qwenlong_equals_vanilla(registered, agg, global_batch):
    """verl's actor loss (workers.utils.losses.ppo_loss), which fills config.global_batch_info on every
    call, with loss_mode="qwenlong" gives "vanilla"'s loss, metrics and gradients."""
    data, log_prob = _micro_batch(torch.Generator().manual_seed(0))
    # global: this micro batch is part of a bigger batch over 2 ranks (verl's counts; the scale factor is a constant)
    counts = dict(dp_size=2, batch_num_tokens=57, global_batch_size=11) if global_batch else dict(
        dp_size=1, batch_num_tokens=None, global_batch_size=None)
    results = {}
    for loss_mode in ("vanilla", "qwenlong"):
        config = _actor_config(loss_mode, agg, loss_scale_factor=16 if global_batch else None)
        batch = data.clone()
        tu.assign_non_tensor(batch, **counts)
        leaf = log_prob.detach().clone().requires_grad_()
        loss, metrics = ppo_loss(config, {"log_probs": _flat_log_probs(leaf, batch["attention_mask"], 5)}, batch)
        loss.backward()
        assert config.global_batch_info["dp_size"] == counts["dp_size"]
        results[loss_mode] = loss.detach(), leaf.grad, {k: m.values for k, m in metrics.items()}
    (expected, expected_grad, expected_metrics), (got, grad, got_metrics) = results["vanilla"], results["qwenlong"]
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)  # verl adds 1e-8 to per-sequence counts
    torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-12)
    assert grad[3].abs().sum() == 0 and grad.abs().sum() > 0
    assert set(got_metrics) == set(expected_metrics)
    for name in expected_metrics:
        assert torch.tensor(got_metrics[name], dtype=torch.float64) == pytest.approx(
            torch.tensor(expected_metrics[name], dtype=torch.float64), rel=1e-7), name


def test_verl_agg_loss_modes_and_arguments_are_verls():
    """Every mode and argument verl's agg_loss has, ours has (a new one in verl fails here), same values."""
    import inspect

    from verl.trainer.ppo.core_algos import agg_loss

    assert list(inspect.signature(agg_loss).parameters) == list(inspect.signature(qwenlong_verl.agg_loss).parameters)
    generator = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=generator) > 0.4
    mask[2] = False
    settings = ({}, dict(loss_scale_factor=9), dict(dp_size=3, batch_num_tokens=40, global_batch_size=12,
                                                     loss_scale_factor=9),
                dict(dp_size=2, batch_num_tokens=torch.tensor(23.0, dtype=torch.float64),
                     global_batch_size=torch.tensor(8.0, dtype=torch.float64)),
                dict(dp_size=8, batch_num_tokens=150, global_batch_size=30, loss_scale_factor=4096))
    ones = torch.ones(2, 4, dtype=torch.float64)  # the four tokens' sum per sequence, / 2 sequences, / 4 (horizon)
    assert agg_loss(ones, ones, "seq-mean-token-sum-norm").item() == 1.0
    assert qwenlong_verl.agg_loss(ones, ones, "seq-mean-token-sum-norm").item() == 1.0
    for agg in AGG_MODES:
        for extra in settings:
            torch.testing.assert_close(qwenlong_verl.agg_loss(loss_mat, mask, agg, **extra),
                                       agg_loss(loss_mat, mask, agg, **extra), rtol=1e-7, atol=1e-12)
        with pytest.raises(ValueError):
            agg_loss(loss_mat, mask, "no-such-mode")
        if agg != "token-sum":  # both refuse a local count on several ranks
            with pytest.raises(ValueError):
                agg_loss(loss_mat, mask, agg, dp_size=2)
            with pytest.raises(ValueError, match="batch_num_tokens|global_batch_size"):
                qwenlong_verl.agg_loss(loss_mat, mask, agg, dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        qwenlong_verl.agg_loss(loss_mat, mask, "no-such-mode")


def _tiny_qwen2():
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_verl_fused_forward_with_our_kernels(registered, monkeypatch, backend):
    """verl's fused model forward (what apply_monkey_patch installs with use_fused_kernels; called here
    through patch_forward_with_backends, as apply_monkey_patch's TRL value-head patch needs trl < 1.0):
    the "torch" backend builds FusedLinearForPPO(impl_backend=...), the "triton" one calls
    linear_cross_entropy(...). With ours installed, log-probs, entropies and gradients equal those of
    verl's own FusedLinearForPPO."""
    import verl.utils.experimental.torch_functional as verl_torch_functional
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")  # our kernels' PyTorch path: the interpreter is too slow here
    reference = _tiny_qwen2()
    ours = copy.deepcopy(reference)
    monkeypatch.setattr(type(reference), "forward", type(reference).forward)  # verl patches the class: undone after
    # one packed row of two sequences, as verl's remove-padding path calls the model
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 96, (1, 13), generator=generator)
    position_ids = torch.cat([torch.arange(8), torch.arange(5)])[None]
    upstream = torch.randn(2, 1, 13, generator=generator)
    outputs = []
    for model, model_backend, implementation in ((reference, "torch", registered),
                                                 (ours, backend, qwenlong_verl.FusedLinearForPPO)):
        monkeypatch.setattr(verl_torch_functional, "FusedLinearForPPO", implementation)
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=model_backend)
        out = model(input_ids=input_ids, position_ids=position_ids, temperature=0.7, return_dict=True)
        (out.log_probs * upstream[0] + out.entropy * upstream[1]).sum().backward()
        outputs.append((out.log_probs.detach(), out.entropy.detach(), [p.grad for p in model.parameters()]))
    (ref_logp, ref_entropy, ref_grads), (logp, entropy, grads) = outputs
    assert logp.shape == entropy.shape == (1, 13) and logp.dtype == ref_logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_verl_loads_our_compute_score_with_its_keyword_arguments():
    """verl's get_custom_reward_fn loads compute_score from the package path and calls it as its reward
    managers do, with reward_router_address / reward_model_tokenizer when a reward model is configured."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    def loaded(**reward_kwargs):
        config = OmegaConf.create({"reward": {"custom_reward_function": {
            "path": "pkg://qwenlong.integrations.verl", "name": "compute_score", "reward_kwargs": reward_kwargs}}})
        return get_custom_reward_fn(config)

    score = loaded()
    right = dict(data_source="synthetic_arithmetic", solution_str="<think>2 + 2 = 4</think> The answer is 4.",
                 ground_truth="4", extra_info={"num_turns": None, "rollout_reward_scores": {}})
    assert score(**right) == 1.0
    assert score(**{**right, "ground_truth": "5"}) == 0.0
    with pytest.warns(UserWarning, match="reward_router_address"):
        assert score(**right, reward_router_address="127.0.0.1:1", reward_model_tokenizer=object()) == 1.0
    assert score(**right, reward_router_address=None, reward_model_tokenizer=None) == 1.0  # no reward model
    with pytest.raises(TypeError, match="judge_temperature"):
        loaded(judge_temperature=0.3)(**right)


def test_example_verl_functions(monkeypatch):
    import importlib.util

    from transformers import Qwen2ForCausalLM

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)  # the example patches the class
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")  # our kernels' PyTorch path: the interpreter is too slow here
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "verl_functions.py"
    spec = importlib.util.spec_from_file_location("example_verl_functions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(batch=2, length=10)
    assert results["score"] == 1.0 and results["lm_head_grad_norm"] > 0
    # fp32 losses that are small sums of +-O(1) terms: compare at the terms' scale
    assert results["qwenlong_pg_loss"] == pytest.approx(results["vanilla_pg_loss"], abs=1e-6)
