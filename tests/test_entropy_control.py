"""Negative-gradient clipping and AEPO (qwenlong.algorithms.entropy_control) on hand-computed batches,
and the entropies they use taken from the fused kernel against a float64 softmax."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm

from qwenlong.algorithms import broadcast_to_tokens
from qwenlong.algorithms.entropy_control import (
    aepo_keep,
    aepo_mode,
    batch_entropy,
    negative_gradient_keep,
    response_entropy_sums,
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


def test_responses_of_several_sequences_by_hand():
    """A memory-agent trajectory is one response over its steps' sequences: sums over them, wherever packed."""
    owners = torch.tensor([1, 1, 0])  # sequences 0 and 1 are parts of response 1
    sums = response_entropy_sums(TOKEN_ENTROPY, MASK, CU_SEQLENS, owners, 3)
    assert sums.tolist() == [pytest.approx([0.6, 1 + 2 + 0.5 + 3.5, 0.0]), [2.0, 4.0, 0.0]]
    # another micro-batch holding a third part of response 1 adds in
    more = response_entropy_sums(torch.tensor([0.0, 5.0]), torch.tensor([False, True]), torch.tensor([0, 2]),
                                 torch.tensor([1]), 3)
    assert (sums + more)[:, 1].tolist() == [12.0, 5.0]  # mean 12 / 5 over all of response 1's tokens
    # a padding sequence past the owners is left out
    padded = response_entropy_sums(TOKEN_ENTROPY, MASK, CU_SEQLENS, owners[:2], 2)
    assert padded.tolist() == [[0.0, 7.0], [0.0, 4.0]]


def test_trainer_takes_a_trajectory_as_one_response(tmp_path, torch_backend):
    """The memory agent's steps of one trajectory share its mean entropy (sequence-level clipping drops all of a
    negative trajectory or none) and count once in the batch entropy and the response counts."""
    from qwenlong.trainers.grpo import RolloutBatch

    trainer = _trainer(_tiny_model(5), tmp_path, tau_sequence=1.0, entropy_low=0.0, entropy_high=100.0)
    # two trajectories of two steps each (responses 0 and 1), one of one step (response 2)
    rollout = RolloutBatch([[1, 2, 3, 4], [5, 6, 7], [1, 2, 3], [4, 5, 6, 7], [2, 3, 4]], [2, 1, 1, 2, 1],
                           [[-1.0] * 2, [-1.0] * 2, [-1.0] * 2, [-1.0] * 2, [-1.0] * 2],
                           [-1.0, -1.0, -1.0, -1.0, 0.5], [2, 2, 2, 2, 2], [0.0] * 4 + [1.0],
                           response_of=[0, 0, 1, 1, 2])
    batches = [rollout.pack([0, 2]), rollout.pack([1, 3, 4])]  # each trajectory split over two micro-batches
    # one entropy per step (every position): trajectory 0's steps 0.5 and 2.5, two loss tokens each (trajectory
    # mean 1.5 > tau 1.0), trajectory 1's 0.9 and 0.9 (0.9 < 1.0), the one-step response 2's 3.0
    step_entropy = {0: 0.5, 1: 2.5, 2: 0.9, 3: 0.9, 4: 3.0}
    for batch in batches:
        lengths = batch.cu_seqlens.diff().tolist()
        batch.token_values["entropy"] = torch.tensor([step_entropy[i] for i, n in zip(batch.sequence_ids, lengths,
                                                                                       strict=True) for _ in range(n)])
    metrics = trainer._entropy_control([(rollout, batches)])
    assert metrics["entropy_control/responses"] == 3.0
    assert metrics["entropy_control/batch_entropy"] == pytest.approx((1.5 + 0.9 + 3.0) / 3)
    keep = {i: values.tolist() for batch in batches
            for i, values in zip(batch.sequence_ids, batch.token_values["loss_keep"].split(
                batch.cu_seqlens.diff().tolist()), strict=True)}
    mask = {i: m.tolist() for batch in batches
            for i, m in zip(batch.sequence_ids, batch.mask.split(batch.cu_seqlens.diff().tolist()), strict=True)}
    dropped = {i for i in keep if not any(k for k, m in zip(keep[i], mask[i], strict=True) if m)}
    # both steps of trajectory 0 are dropped (the step of mean 0.5 too); trajectory 1 and the positive 2 stay
    assert dropped == {0, 1}


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


# ---------------------------------------------------------------------------- wired into the GRPO trainer

VOCAB = 53


def _tiny_model(seed: int):
    return tiny_causal_lm(seed=seed, vocab_size=VOCAB, max_positions=128, attention="qwenlong")


def _groups(seed: int, num_groups: int = 3, group_size: int = 4):
    import random

    from qwenlong.trainers.grpo import Group, PromptExample

    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 8))]
        responses = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))] for _ in range(group_size)]
        rewards = [1.0, 0.0] + [float(rng.random() < 0.5) for _ in range(group_size - 2)]
        groups.append(Group(PromptExample(f"ex{g}", prompt, "a", ["x"]), responses,
                            [[-1.0] * len(r) for r in responses], rewards, rewards))
    return groups


def _trainer(model, tmp_path, rl=None, **entropy_control):
    """A trainer for ``_groups``; ``rl``: further ``RLConfig`` fields."""
    from qwenlong.config import RLConfig
    from qwenlong.config.schema import EntropyControlConfig
    from qwenlong.curriculum import Phase
    from qwenlong.trainers import GRPOTrainer

    cfg = RLConfig(group_size=4, gen_prompts_per_step=3, train_prompts_per_step=3, mini_batch_size=3, lr=3e-2,
                   grad_clip=1e9, temperature=0.8, entropy_control=EntropyControlConfig(**entropy_control),
                   phases=[Phase("p", 64, 8, steps=1)], **(rl or {}))
    trainer = GRPOTrainer(model, engine=None, reward=None, cfg=cfg, decode=str, output_dir=tmp_path)
    trainer.backend.start(lr=cfg.lr, weight_decay=0.0, total_steps=10, warmup_steps=0, schedule="constant",
                          grad_clip=cfg.grad_clip)
    return trainer


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")


def test_config_checks():
    from qwenlong.config.schema import EntropyControlConfig

    assert not EntropyControlConfig().enabled
    with pytest.raises(ValueError, match="entropy_high"):
        EntropyControlConfig(entropy_low=0.5)
    with pytest.raises(ValueError, match="entropy_low"):
        EntropyControlConfig(entropy_low=2.0, entropy_high=1.0)
    with pytest.raises(ValueError, match="tau_sequence"):
        EntropyControlConfig(tau_sequence=-1.0)


def test_trainer_aepo_positive_only_trains_like_zeroed_negatives(tmp_path, torch_backend):
    """Above entropy_high, the update equals one where every response but the positive ones has advantage 0."""
    import copy

    model = _tiny_model(1)
    baseline = copy.deepcopy(model)
    groups = _groups(4)
    trainer = _trainer(model, tmp_path / "a", entropy_low=0.0, entropy_high=0.1)  # any real entropy is above
    metrics = trainer.update(groups)
    assert trainer.aepo_mode == "positive-only" and metrics["entropy_control/positive_only"] == 1.0
    assert metrics["entropy_control/mode_switched"] == 1.0  # from "all"
    assert metrics["entropy_control/batch_entropy"] > 0.1

    plain = _trainer(baseline, tmp_path / "b")
    advantages = plain._advantages(groups)
    rewards = torch.tensor([g.rewards for g in groups])
    kept = (advantages > 0) & (rewards > 0)
    assert metrics["entropy_control/responses_kept"] == int(kept.sum()) < kept.numel()
    plain._advantages = lambda gs: advantages * kept
    plain.update(groups)
    for (name, p), (_, q) in zip(model.named_parameters(), baseline.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _tiny_model(1).parameters(), strict=True))


def _float64_entropies(model, groups):
    """Each response's token entropies (float64, temperature 0.8) and whether its group advantage is < 0."""
    from qwenlong.algorithms import group_advantages

    advantages = group_advantages(torch.tensor([g.rewards for g in groups]))
    entropies, negative = [], []
    with torch.no_grad():
        for g, group_adv in zip(groups, advantages, strict=True):
            for response, a in zip(g.responses, group_adv.tolist(), strict=True):
                ids = torch.tensor([g.example.prompt_ids + response])
                logits = model(ids).logits[0].double()[len(g.example.prompt_ids) - 1:-1] / 0.8
                logp = torch.log_softmax(logits, -1)
                entropies.append(-(logp.exp() * logp).sum(-1))
                negative.append(a < 0)
    return entropies, negative


def test_trainer_token_level_clipping_counts_match_float64_entropies(tmp_path, torch_backend):
    model = _tiny_model(2)
    groups = _groups(5)
    entropies, negative = _float64_entropies(model, groups)
    tau = float(torch.cat([h for h, n in zip(entropies, negative, strict=True) if n]).median())
    dropped = sum(int((h > tau).sum()) for h, n in zip(entropies, negative, strict=True) if n)
    total = sum(len(h) for h in entropies)
    trainer = _trainer(model, tmp_path, tau_token=tau)
    metrics = trainer.update(groups)
    assert 0 < dropped < sum(len(h) for h, n in zip(entropies, negative, strict=True) if n)
    assert metrics["entropy_control/tokens"] == total
    assert metrics["entropy_control/tokens_kept"] == total - dropped
    assert metrics["entropy_control/positive_only"] == 0.0  # AEPO is off


def test_logged_metrics_average_over_the_tokens_left_in_the_loss(tmp_path, torch_backend):
    """With tokens dropped unevenly across micro-batches, ``entropy_mean`` is the mean over the kept tokens."""
    model = _tiny_model(2)
    groups = _groups(5)
    entropies, negative = _float64_entropies(model, groups)
    tau = float(torch.cat([h for h, n in zip(entropies, negative, strict=True) if n]).median())
    kept = torch.cat([h[h <= tau] if n else h for h, n in zip(entropies, negative, strict=True)])
    # micro-batches of about two responses each: their kept fractions differ
    trainer = _trainer(model, tmp_path, rl={"entropy_coef": 1e-3, "micro_batch_token_budget": 24}, tau_token=tau)
    metrics = trainer.update(groups)
    assert metrics["entropy_control/tokens_kept"] == len(kept) < sum(len(h) for h in entropies)
    assert metrics["entropy_mean"] == pytest.approx(float(kept.mean()), rel=1e-5)


def test_aepo_positive_reward_is_the_task_reward_not_the_length_shaped_one(tmp_path, torch_backend):
    """A right answer at the length limit (overlong penalty -1: shaped reward 0) still counts as positive."""
    groups = _groups(4)
    for g in groups:
        g.rewards = [r - 1.0 for r in g.task_rewards]  # every response at the limit: same advantages
    trainer = _trainer(_tiny_model(1), tmp_path, entropy_low=0.0, entropy_high=0.1)
    metrics = trainer.update(groups)
    assert trainer.aepo_mode == "positive-only"
    positive = (trainer._advantages(groups) > 0) & (torch.tensor([g.task_rewards for g in groups]) > 0)
    lengths = torch.tensor([[len(r) for r in g.responses] for g in groups])
    assert metrics["entropy_control/responses_kept"] == int(positive.sum()) > 0
    assert metrics["entropy_control/tokens_kept"] == int(lengths[positive].sum())


class _RandomEngine:
    """Random responses (token ids and log-probs), ``n`` per prompt, seeded by the sampling params."""

    synced = False

    def generate(self, prompts, params, on_complete=None):
        import random

        from qwenlong.rollout import Completion

        rng = random.Random(params.seed)
        groups = [[Completion([rng.randrange(VOCAB) for _ in range(rng.randint(2, params.max_new_tokens))],
                              [-1.0] * params.max_new_tokens, "length") for _ in range(params.n)] for _ in prompts]
        for group in groups:
            for c in group:
                c.logprobs = c.logprobs[:len(c.token_ids)]
        for index, group in enumerate(groups):
            on_complete(index, group)
        return groups

    def update_weights(self, named_tensors):
        pass


class _AlternatingReward:
    """1, 0, 1, 0, ... : every group is informative."""

    def score(self, items):
        from types import SimpleNamespace

        return [SimpleNamespace(score=float(i % 2 == 0)) for i in range(len(items))]


def test_aepo_mode_is_checkpointed_and_resumed(tmp_path, torch_backend):
    """Inside the band the mode persists: a run resumed after a positive-only step stays positive-only."""
    from qwenlong.config import RLConfig
    from qwenlong.config.schema import EntropyControlConfig
    from qwenlong.curriculum import Phase
    from qwenlong.trainers import GRPOTrainer
    from qwenlong.trainers.grpo import PromptExample

    examples = [PromptExample(f"ex{i}", [i + 1, i + 2, i + 3], "a", ["x"]) for i in range(6)]

    def run(steps: int, resume: bool, mode: str) -> list[dict]:
        cfg = RLConfig(group_size=4, gen_prompts_per_step=2, train_prompts_per_step=2, mini_batch_size=2, lr=1e-3,
                       entropy_control=EntropyControlConfig(entropy_low=0.0, entropy_high=100.0),
                       phases=[Phase("p", 64, 6, steps=steps)])
        model = _tiny_model(3)
        trainer = GRPOTrainer(model, _RandomEngine(), _AlternatingReward(), cfg, decode=str, output_dir=tmp_path,
                              save_every_steps=1)
        trainer.aepo_mode = mode
        return trainer.train_phase(cfg.phases[0], examples, resume=resume)

    [first] = run(1, resume=False, mode="positive-only")
    assert first["entropy_control/positive_only"] == 1.0 and first["entropy_control/mode_switched"] == 0.0
    assert first["entropy_control/responses_kept"] == 4  # the two groups' rewarded responses
    assert first["task_reward/a"] == first["reward_mean"] == 0.5  # the per-task reward curve of the one task
    [second] = run(2, resume=True, mode="all")  # a fresh trainer: the checkpoint brings the mode back
    assert second["entropy_control/positive_only"] == 1.0
    assert second["entropy_control/responses_kept"] < second["entropy_control/responses"] == 8


def test_report_l15_counts_steps_not_rows(tmp_path):
    """With ``output.log_every_steps`` > 1 a logged row holds the means of several steps: the report's AEPO line
    gives the same step counts, kept responses and mode switches as a run that logged every step, also when some
    steps trained nothing (and logged no entropy control)."""
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from qwenlong.config import Config, RLConfig
    from qwenlong.config.schema import EntropyControlConfig
    from qwenlong.pipeline.report import l15_lines
    from qwenlong.trainers.metrics_log import MetricsLogger

    # batch entropy, positive-only, mode switched, responses kept
    steps = [(0.5, 0.0, 0.0, 8.0), (0.7, 1.0, 1.0, 3.0), (0.5, 1.0, 0.0, 4.0), (0.2, 0.0, 1.0, 8.0),
             (0.3, 0.0, 0.0, 7.0)]
    lines = []
    for every in (1, 2, 3, 4):
        logger = MetricsLogger(tmp_path / str(every), every_steps=every)
        for i, (entropy, positive, switched, kept) in enumerate(steps):
            logger.log("rl/p", 2 * i + 1, {"entropy_control/steps": 1.0, "entropy_control/batch_entropy": entropy,
                                           "entropy_control/positive_only": positive,
                                           "entropy_control/mode_switched": switched,
                                           "entropy_control/responses_kept": kept, "entropy_control/responses": 8.0,
                                           "entropy_control/tokens_kept": 3 * kept, "entropy_control/tokens": 24.0})
            # a step that trained nothing (no group left after dynamic sampling) logs no entropy control
            logger.log("rl/p", 2 * i + 2, {"groups_trained": 0}, flush=i + 1 == len(steps))
        cfg = Config(rl=RLConfig(entropy_control=EntropyControlConfig(entropy_low=0.3, entropy_high=0.6)))
        run = SimpleNamespace(cfg=cfg, dir=tmp_path / str(every), state={}, logger=logger)
        [line] = [line for line in l15_lines(run) if line.startswith("AEPO")]
        lines.append(line.split("; batch entropy")[0])
    assert lines == ["AEPO positive-only in 2 of 5 steps (2 mode switches); responses kept 30 of 40"] * 4


def test_report_l15_section(tmp_path):
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from qwenlong.config import Config, RLConfig
    from qwenlong.config.schema import EntropyControlConfig
    from qwenlong.pipeline.report import l15_lines

    rows = [{"stage": "rl/p", "step": i + 1, "task_reward/a": 0.1 * i, "task_reward/b": 0.5,
             "entropy_control/batch_entropy": h, "entropy_control/positive_only": mode,
             "entropy_control/responses_kept": kept, "entropy_control/responses": 8.0,
             "entropy_control/tokens_kept": 30.0, "entropy_control/tokens": 40.0}
            for i, (h, mode, kept) in enumerate([(0.5, 0.0, 8.0), (0.7, 1.0, 3.0), (0.5, 1.0, 4.0), (0.2, 0.0, 8.0)])]
    rows.append({"stage": "rl/memory-agent", "step": 1, "agent_steps_per_trajectory": 3.0})
    rows.append({"stage": "sft", "step": 1, "loss": 1.0})
    cfg = Config(rl=RLConfig(entropy_control=EntropyControlConfig(entropy_low=0.3, entropy_high=0.6)))
    run = SimpleNamespace(cfg=cfg, dir=tmp_path, state={"agent_evals": {"expert-agent": 12.5}},
                          logger=SimpleNamespace(records=lambda stage=None: rows))
    text = "\n".join(l15_lines(run))
    assert "positive-only in 2 of 4 steps (2 mode switches)" in text
    assert "responses kept 23 of 32" in text and "0.50 at the first step, 0.20 at the last" in text
    assert "3.0 policy calls per trajectory" in text
    assert "| expert-agent | 12.5 |" in text
    assert (tmp_path / "l15_curves.png").stat().st_size > 0
    # a run without any of it gets no section
    plain = SimpleNamespace(cfg=Config(), dir=tmp_path, state={}, logger=SimpleNamespace(records=lambda stage=None: []))
    assert l15_lines(plain) == []
