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

from helpers import record_learning_rates, tiny_causal_lm  # noqa: E402

from qwenlong.config import RLConfig  # noqa: E402
from qwenlong.curriculum import Phase  # noqa: E402
from qwenlong.rewards import HybridReward  # noqa: E402
from qwenlong.trainers import GRPOTrainer  # noqa: E402
from qwenlong.trainers.grpo import Group, PromptExample  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def tiny_model(seed: int):
    return tiny_causal_lm(seed=seed, vocab_size=VOCAB, max_positions=256, tie_word_embeddings=False,
                          attention="qwenlong")


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


def test_a_step_logs_the_mean_learning_rate_its_updates_used(tmp_path):
    """Each update reads the rate before the optimizer steps (it logged the rate after: the schedule's next one,
    so warm-up looked an update ahead)."""
    cfg = RLConfig(group_size=2, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=1,
                   micro_batch_token_budget=20, lr=1e-3, phases=[Phase("p", 64, 8, steps=1)])
    model = tiny_model(seed=2)
    groups = make_groups(3, model, 1.0)
    trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
    trainer.backend.start(lr=cfg.lr, weight_decay=0.0, total_steps=12, warmup_steps=6, schedule="cosine",
                          grad_clip=1.0)
    used = record_learning_rates(trainer.backend.optimizer)
    logged = [trainer.update(groups)["lr"] for _ in range(2)]
    assert len(used) == 6 and used[:3] == pytest.approx([cfg.lr / 6, 2 * cfg.lr / 6, 3 * cfg.lr / 6])
    assert logged == pytest.approx([sum(used[:3]) / 3, sum(used[3:]) / 3])


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


# ---------------------------------------------------------------------------- which prompts a step draws


def test_prompt_sampler_draws_without_replacement_epoch_by_epoch():
    from qwenlong.curriculum import PromptSampler

    sampler = PromptSampler(["t"] * 10, key="k")
    first = sampler.draw(4) + sampler.draw(4)
    rest = sampler.draw(4)  # crosses into the second epoch
    assert len(set(first)) == 8 and len(rest) == 4 and len(set(rest)) == 4
    assert set(first) | set(rest[:2]) == set(range(10))  # the first epoch visits every prompt once
    epoch = sampler.draw(10, exclude=set())
    assert sorted(epoch) == list(range(10)) or len(set(epoch)) == 10
    # one step never holds a prompt twice, whatever the rounds
    step: set[int] = set()
    for _ in range(5):
        picks = sampler.draw(3, exclude=step)
        assert not step & set(picks)
        step |= set(picks)
    assert len(step) == 10  # ran out: only 10 distinct prompts exist


def test_prompt_sampler_resumes_exactly():
    from qwenlong.curriculum import PromptSampler

    straight = PromptSampler(["a", "b", "b", "c"] * 5, key="seed:phase", balanced=True)
    for _ in range(3):
        straight.draw(6)
    state = straight.state_dict()
    resumed = PromptSampler(["a", "b", "b", "c"] * 5, key="seed:phase", balanced=True)
    resumed.load_state_dict(state)
    for _ in range(4):
        assert straight.draw(6) == resumed.draw(6)


def test_task_balanced_draws_equal_counts_per_task():
    from qwenlong.curriculum import PromptSampler

    tasks = ["big"] * 40 + ["small"] * 4 + ["mid"] * 12
    balanced = PromptSampler(tasks, key="k", balanced=True)
    plain = PromptSampler(tasks, key="k", balanced=False)
    for _ in range(5):
        counts = {t: 0 for t in set(tasks)}
        for i in balanced.draw(9):
            counts[tasks[i]] += 1
        assert counts == {"big": 3, "small": 3, "mid": 3}
    plain_counts = {t: 0 for t in set(tasks)}
    for _ in range(20):
        for i in plain.draw(9):
            plain_counts[tasks[i]] += 1
    assert plain_counts["big"] > 3 * plain_counts["small"]  # the knob changes what is drawn


def test_task_balanced_draw_keeps_its_size_when_a_task_runs_short():
    """A task with fewer prompts than its share gives them all; the others share the rest evenly."""
    from collections import Counter

    from qwenlong.curriculum import PromptSampler

    tasks = ["tiny"] * 3 + ["small"] * 7 + ["big"] * 200 + ["huge"] * 300
    sampler = PromptSampler(tasks, key="k", balanced=True)
    for _ in range(3):
        drawn = sampler.draw(64)
        assert len(drawn) == len(set(drawn)) == 64
        assert Counter(tasks[i] for i in drawn) == {"tiny": 3, "small": 7, "big": 27, "huge": 27}
    # what ``exclude`` takes counts too: 2 of tiny's 3 are taken by an earlier round of the step
    for _ in range(5):
        drawn = sampler.draw(9, exclude={0, 1})
        counts = Counter(tasks[i] for i in drawn)
        assert len(set(drawn)) == 9 and not {0, 1} & set(drawn) and counts["tiny"] == 1
        assert sorted(counts[t] for t in ("small", "big", "huge")) == [2, 3, 3]  # 8 shared as evenly as can be
    # the last prompt outside ``exclude`` is found wherever the walk's cursor stands, across an epoch's end too
    one_left = PromptSampler(["a"] * 3, key="k")
    assert [one_left.draw(1, exclude={0, 1}) for _ in range(12)] == [[2]] * 12
    # fewer than asked only when the phase has fewer prompts outside ``exclude``
    assert sorted(PromptSampler(tasks[:10], key="k", balanced=True).draw(64, exclude={4})) == \
        [i for i in range(10) if i != 4]


class _ScriptedEngine:
    """Every response is the same two tokens: every group's rewards are equal (all 0, no answer)."""

    synced = False
    model = None

    def generate(self, prompts, params, on_complete=None):
        from qwenlong.rollout import Completion

        out = [[Completion([1, 2], [-0.5, -0.5], "stop") for _ in range(params.n)] for _ in prompts]
        if on_complete is not None:
            for i, group in enumerate(out):
                on_complete(i, group)
        return out


def test_on_exhausted_error_raises_and_train_counts(tmp_path):
    from qwenlong.config.schema import DynamicSamplingConfig

    examples = [PromptExample(f"e{i}", [3, 4, 5], "synthetic_copy", ["x"]) for i in range(6)]
    for mode in ("train", "error"):
        cfg = RLConfig(group_size=2, gen_prompts_per_step=2, train_prompts_per_step=2, mini_batch_size=2,
                       dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=2, on_exhausted=mode),
                       phases=[Phase("p", 64, 8, steps=1)])
        trainer = GRPOTrainer(tiny_model(seed=4), engine=_ScriptedEngine(), reward=HybridReward(), cfg=cfg,
                              decode=str, output_dir=tmp_path / mode)
        from qwenlong.curriculum import PromptSampler

        sampler = PromptSampler([e.data_source for e in examples], key="k")
        if mode == "error":
            with pytest.raises(RuntimeError, match="on_exhausted"):
                trainer.collect(cfg.phases[0], examples, 0, sampler)
        else:
            groups, metrics = trainer.collect(cfg.phases[0], examples, 0, sampler)
            assert groups == [] and metrics["dynamic_sampling/exhausted"] == 1.0
            assert metrics["dynamic_sampling/rounds"] == 2


def test_log_every_steps_aggregates_rows(tmp_path):
    from qwenlong.trainers.metrics_log import MetricsLogger

    every = MetricsLogger(tmp_path / "a", every_steps=3)
    each = MetricsLogger(tmp_path / "b")
    for step in range(1, 8):
        for logger in (every, each):
            extra = {"judge/failures": 2} if step == 2 else {}  # a counter only some steps report
            logger.log("rl/p", step, {"loss": float(step), "time_train": 1.0, "label": f"s{step}", **extra},
                       flush=step == 7)
    rows = every.records()
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert [r["loss"] for r in rows] == [2.0, 5.0, 7.0]  # means
    assert [r["time_train"] for r in rows] == [3.0, 3.0, 1.0]  # seconds add up
    assert rows[0]["judge/failures"] == 2 and "judge/failures" not in rows[1]  # counters too, kept when not last
    assert [r["label"] for r in rows] == ["s3", "s6", "s7"]
    assert len(each.records()) == 7


# ---------------------------------------------------------------------------- per-token math


def test_masked_positions_never_reach_loss_or_gradient():
    from qwenlong.kernels.logprobs.policy_math import aggregate_tokens, masked_mean, policy_loss_per_token

    logp = torch.randn(6, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.1
    old[0], old[3] = float("nan"), -float("inf")  # undefined values at masked positions
    adv = torch.tensor([float("nan"), 1.0, -1.0, 2.0, 0.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([False, True, True, False, True, True])
    loss, ratio = policy_loss_per_token(logp, old, adv)
    for normalizer in (None, 4, torch.full((6,), 8.0, dtype=torch.float64)):
        total = aggregate_tokens(loss, mask, normalizer)
        (grad,) = torch.autograd.grad(total, logp, retain_graph=True)
        assert torch.isfinite(total) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert torch.isfinite(masked_mean(ratio, mask))
    clean = aggregate_tokens(loss[mask], torch.ones(4, dtype=torch.bool), 4)
    assert float(aggregate_tokens(loss, mask, 4)) == pytest.approx(float(clean), rel=1e-12)


def test_k3_and_ratio_are_clamped():
    from qwenlong.kernels.logprobs.policy_math import k3_kl, policy_loss_per_token

    logp = torch.tensor([0.0, -50.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-60.0, 0.0, -1.0], dtype=torch.float64)
    kl = k3_kl(logp, ref)
    assert torch.isfinite(kl).all() and float(kl.max()) <= 10.0 and float(kl[2]) == 0.0
    _, ratio = policy_loss_per_token(torch.tensor([0.0]), torch.tensor([-1000.0]), torch.tensor([1.0]))
    assert torch.isfinite(ratio).all()
    loss, _ = policy_loss_per_token(torch.tensor([0.0, 0.0]), torch.tensor([-3.0, -3.0]),
                                    torch.tensor([-1.0, -1.0]), dual_clip=3.0)
    assert float(loss[0]) == pytest.approx(3.0)  # capped at c * |A| (the unclipped loss is e^3)


def test_clip_ratio_c_changes_the_trainer_loss(tmp_path):
    cfgs = [RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=3, lr=1e-3,
                     clip_ratio_c=c, phases=[Phase("p", 64, 8, steps=1)]) for c in (None, 1.5)]
    losses = []
    for cfg in cfgs:
        model = tiny_model(seed=5)
        trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
        groups = make_groups(8, model, 1.0)
        for g in groups:  # a stale engine: old log-probs far below the current ones make ratios huge
            g.engine_logprobs = [[v - 3.0 for v in lp] for lp in g.engine_logprobs]
        from qwenlong.trainers.grpo import RolloutBatch

        batches = trainer._micro_batches(RolloutBatch.from_groups(groups, trainer._advantages(groups)))
        trainer._old_logprobs(batches)
        for b in batches:
            b.token_values["old_logprobs"] = b.token_values["old_logprobs"] - 3.0
        num_tokens = sum(int(b.mask.sum()) for b in batches)
        losses.append(trainer.accumulate(batches, num_tokens, 12)["loss"])
    assert losses[1] < losses[0]  # the dual clip caps the negative tokens' huge losses
