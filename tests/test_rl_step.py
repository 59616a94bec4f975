"""One RL step as the method defines it, against a plain-PyTorch float64 reference.

The reference computes the old log-probs once from the policy that generated the rollouts, then
takes ``ppo_epochs`` passes over the mini-batches with a clipped surrogate token mean and
``torch.optim.AdamW``; the trainer must give the same ratios, clip fractions and weights.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

pytest.importorskip("transformers")

from qwenlong.config import RLConfig  # noqa: E402
from qwenlong.curriculum import Phase  # noqa: E402
from qwenlong.trainers import GRPOTrainer  # noqa: E402
from qwenlong.trainers.grpo import Group, PromptExample  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def tiny_model(seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenlong.integrations.hf_attention import register

    register()
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="qwenlong", dtype=torch.float32)


def response_logprobs(policy, prompt, response, temperature):
    logits = policy(torch.tensor([prompt + response])).logits[0].double() / temperature
    return torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(1, torch.tensor(response)[:, None])[:, 0]


def make_groups(seed: int, policy, temperature: float, num_groups: int = 3, group_size: int = 4,
                tasks=("a",)) -> list[Group]:
    """Random prompts and responses; the engine's log-probs are the generating policy's own (HF engine)."""
    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 10))]
        responses = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 7))] for _ in range(group_size)]
        rewards = [float(rng.random() < 0.5) for _ in responses]
        rewards[0], rewards[1] = 1.0, 0.0  # every group informative
        with torch.no_grad():
            engine_lp = [response_logprobs(policy, prompt, r, temperature).float().tolist() for r in responses]
        groups.append(Group(PromptExample(f"ex{g}", prompt, tasks[g % len(tasks)], ["x"]), responses, engine_lp,
                            rewards, rewards))
    return groups


def reference_step(policy, groups, cfg: RLConfig):
    """The method's step in float64 PyTorch: returns per-update (ratio_mean, clip_low, clip_high)."""
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    centered = rewards - rewards.mean(1, keepdim=True)
    advantages = centered / (rewards.std(1, keepdim=True) + cfg.advantage_eps)
    with torch.no_grad():  # the policy that generated the rollouts, before any update
        old = [[response_logprobs(policy, g.example.prompt_ids, r, cfg.temperature) for r in g.responses]
               for g in groups]
    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    updates = []
    for _ in range(cfg.ppo_epochs):
        for start in range(0, len(groups), cfg.mini_batch_size):
            losses, ratios, lows, highs = [], [], [], []
            for gi in range(start, min(start + cfg.mini_batch_size, len(groups))):
                g = groups[gi]
                for ri, response in enumerate(g.responses):
                    logp = response_logprobs(policy, g.example.prompt_ids, response, cfg.temperature)
                    adv = advantages[gi, ri]
                    ratio = torch.exp(logp - old[gi][ri])
                    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
                    losses.append(-torch.minimum(ratio * adv, clipped * adv))
                    ratios.append(ratio.detach())
                    lows.append(((adv < 0) & (ratio < 1 - cfg.clip_low)).double())
                    highs.append(((adv > 0) & (ratio > 1 + cfg.clip_high)).double())
            loss = torch.cat(losses).sum() / sum(len(t) for t in losses)  # token mean over the mini-batch
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates.append((float(torch.cat(ratios).mean()), float(torch.cat(lows).mean()),
                            float(torch.cat(highs).mean())))
    return updates


def trainer_for(model, cfg, tmp_path):
    trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
    trainer.backend.start(lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=100, warmup_steps=0,
                          schedule="constant", grad_clip=cfg.grad_clip)
    recorded = []
    accumulate = trainer.accumulate

    def recording(*args):
        metrics = accumulate(*args)
        recorded.append(metrics)
        return metrics

    trainer.accumulate = recording
    return trainer, recorded


def test_step_with_three_mini_batches_and_two_epochs_matches_reference(tmp_path):
    temperature = 0.9
    cfg = RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=1, ppo_epochs=2,
                   temperature=temperature, clip_low=0.2, clip_high=0.28, micro_batch_token_budget=20, lr=3e-2,
                   weight_decay=0.01, grad_clip=1e9, phases=[Phase("p", 64, 8, steps=1)])
    model = tiny_model(seed=1)
    reference = copy.deepcopy(model).double()
    reference.set_attn_implementation("sdpa")
    groups = make_groups(5, model, temperature)

    expected = reference_step(reference, groups, cfg)
    trainer, recorded = trainer_for(model, cfg, tmp_path)
    metrics = trainer.update(groups)

    assert len(recorded) == len(expected) == 6
    for got, (ratio, low, high) in zip(recorded, expected, strict=True):
        assert got["ratio_mean"] == pytest.approx(ratio, abs=2e-5)
        assert got["clip_frac_low"] == pytest.approx(low, abs=1e-6)
        assert got["clip_frac_high"] == pytest.approx(high, abs=1e-6)
    # the first update is on-policy; later ones see how far the earlier updates moved the policy
    assert expected[0][0] == pytest.approx(1.0, abs=1e-9)
    assert any(abs(ratio - 1) > 1e-3 for ratio, _, _ in expected[1:])
    assert any(low + high > 0 for _, low, high in expected)  # the trust region acts at this learning rate
    assert metrics["updates"] == 6
    assert metrics["engine_logprob_abs_diff_mean"] < 1e-5  # the engine's log-probs are the old policy's
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=1e-3, atol=2e-4, msg=name)


def test_old_logprobs_are_computed_once_before_any_update(tmp_path):
    """With one epoch and three mini-batches, today's fix shows as ratios != 1 after the first update."""
    cfg = RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=1,
                   temperature=1.0, micro_batch_token_budget=64, lr=5e-2, grad_clip=1e9,
                   phases=[Phase("p", 64, 8, steps=1)])
    model = tiny_model(seed=2)
    trainer, recorded = trainer_for(model, cfg, tmp_path)
    calls = []
    old_logprobs = trainer._old_logprobs
    trainer._old_logprobs = lambda batches: (calls.append(len(batches)), old_logprobs(batches))
    trainer.update(make_groups(6, model, 1.0))
    assert len(calls) == 1  # once per step, for every mini-batch
    assert recorded[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(recorded[2]["ratio_mean"] - 1.0) > 1e-3


@pytest.mark.parametrize("mode", ["grpo", "mean-only", "task-std"])
def test_advantage_modes(tmp_path, mode):
    cfg = RLConfig(group_size=4, advantage=mode, phases=[Phase("p", 64, 8, steps=1)])
    model = tiny_model(seed=3)
    trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
    groups = make_groups(7, model, 1.0, num_groups=4, tasks=("a", "b"))
    rng = random.Random(0)
    for g in groups:  # task b's rewards are spread wider than task a's
        scale = 1.0 if g.example.data_source == "a" else 5.0
        g.rewards[:] = [scale * rng.random() for _ in g.rewards]
    got = trainer._advantages(groups).double()
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    centered = rewards - rewards.mean(1, keepdim=True)
    if mode == "grpo":
        expected = centered / (rewards.std(1, keepdim=True) + cfg.advantage_eps)
    elif mode == "mean-only":
        expected = centered
    else:
        expected = torch.empty_like(rewards)
        for task in ("a", "b"):
            rows = [i for i, g in enumerate(groups) if g.example.data_source == task]
            expected[rows] = centered[rows] / (rewards[rows].flatten().std() + cfg.advantage_eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
