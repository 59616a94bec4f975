"""One GRPO/DAPO phase: generate, score, compute advantages, update on packed mini-batches.

Per step (method.md section 2): sample prompts, generate ``group_size`` responses each with
the rollout engine, score them with the hybrid reward (each group as soon as the engine
completes it, overlapping the rest of the generation: ``scoring``), keep informative groups (dynamic
sampling, up to ``max_rounds`` generation rounds), add the overlong penalty, compute group
advantages, recompute old log-probs with the fused kernel, then one optimizer update per
mini-batch of groups with the fused GRPO loss, token-mean over the mini-batch's response
tokens. Every random choice is keyed on (seed, phase, step), so a resumed run repeats the
uninterrupted one.

Several processes (``backend.ctx``): every rank draws the same prompts; data-parallel rank d
generates and scores prompts ``d::dp_size`` (within a sequence-parallel group only SP rank 0
generates, its peers wait) and all groups are gathered to every rank, so the reward history,
dynamic sampling and advantages are the same everywhere. Each mini-batch's micro-batches are
then split round-robin over the data-parallel ranks; the token-mean divides by the whole
mini-batch's response tokens, which every rank knows, and the backend sums the gradients.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from qwenlong.algorithms import GroupCollector, group_accuracy_metrics, group_advantages, overlong_penalty
from qwenlong.config import RLConfig
from qwenlong.curriculum import Phase, RewardHistory
from qwenlong.kernels import grpo_loss, linear_logprobs, sp_linear_logprobs
from qwenlong.rewards import HybridReward
from qwenlong.rollout import RolloutEngine, SamplingParams, logprob_mismatch
from qwenlong.trainers.checkpoint import latest_checkpoint
from qwenlong.trainers.metrics_log import MetricsLogger
from qwenlong.trainers.packed import (
    PackedBatch,
    empty_batch,
    micro_batches,
    pack_sequences,
    policy_hidden,
    rank_share,
)
from qwenlong.trainers.scoring import generate_and_score

if TYPE_CHECKING:  # qwenlong.distributed builds on this package's checkpoint and optimizer modules
    from qwenlong.distributed.backend import TrainingBackend

RESPONSE_VALUES = ("engine_logprobs",)
SEQUENCE_VALUES = ("advantages", "response_tokens")


@dataclass(frozen=True)
class PromptExample:
    """A tokenised RL prompt with what the reward needs."""

    id: str
    prompt_ids: list[int]
    data_source: str
    ground_truth: Any
    question: str = ""


@dataclass
class Group:
    """One prompt's ``group_size`` responses and their rewards."""

    example: PromptExample
    responses: list[list[int]]
    engine_logprobs: list[list[float]]
    task_rewards: list[float]  # the hybrid reward: accuracy and the reward history use it
    rewards: list[float]  # task reward plus any overlong penalty: advantages use it


class GRPOTrainer:
    """Runs the RL phases of a curriculum on one policy, keeping one reward history."""

    def __init__(self, model: torch.nn.Module, engine: RolloutEngine, reward: HybridReward, cfg: RLConfig, *,
                 decode, output_dir: str | Path, seed: int = 0, logger: MetricsLogger | None = None,
                 history: RewardHistory | None = None, save_every_steps: int = 0, keep_checkpoints: int = 0,
                 backend: TrainingBackend | None = None):
        self.model, self.engine, self.reward, self.cfg = model, engine, reward, cfg
        if backend is None:
            from qwenlong.distributed.backend import TrainingBackend

            backend = TrainingBackend(model)
        self.backend = backend
        self.ctx = self.backend.ctx
        self.decode = decode  # token ids -> text, for the reward
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.logger = logger or MetricsLogger(self.output_dir)
        self.history = history if history is not None else RewardHistory()
        self.save_every_steps, self.keep_checkpoints = save_every_steps, keep_checkpoints
        self._timings: dict[str, float] = {}  # this rank's generation and scoring seconds in the current step
        self.device = next(model.parameters()).device
        # KL is measured against the policy the RL run starts from (the SFT model), frozen
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = self.backend.frozen_copy()

    # ------------------------------------------------------------------ rollouts and rewards

    def _generate_round(self, phase: Phase, examples: Sequence[PromptExample], rng: random.Random) -> list[Group]:
        prompts = rng.sample(list(examples), k=min(self.cfg.gen_prompts_per_step, len(examples)))
        params = SamplingParams(max_new_tokens=phase.max_output_tokens, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, n=self.cfg.group_size, seed=rng.randrange(2**31))
        completions, scores = self._generate_and_score(prompts, params)
        groups = []
        for i, (example, group) in enumerate(zip(prompts, completions, strict=True)):
            task_rewards = scores[i * self.cfg.group_size:(i + 1) * self.cfg.group_size]
            lengths = [len(c.token_ids) for c in group]
            self.history.record(example.id, task_rewards, lengths, phase=phase.name)
            rewards = torch.tensor(task_rewards, dtype=torch.float32)
            if self.cfg.overlong.enabled:
                rewards = rewards + overlong_penalty(torch.tensor(lengths), phase.max_output_tokens,
                                                     self.cfg.overlong.buffer, self.cfg.overlong.penalty_factor)
            groups.append(Group(example, [c.token_ids for c in group], [c.logprobs for c in group], task_rewards,
                                rewards.tolist()))
        return groups

    def _generate_and_score(self, prompts: list[PromptExample], params: SamplingParams) -> tuple[list, list[float]]:
        """Completions per prompt and the flat list of their scores, this rank's share gathered from all."""
        ctx = self.ctx
        mine = prompts[ctx.dp_rank::ctx.dp_size] if ctx.sp_rank == 0 else []
        completions, scores = [], []
        if mine or self.engine.synced:
            completions, scores, timings = generate_and_score(self.engine, self.reward, self.decode, mine, params)
            for key, seconds in timings.items():
                self._timings[key] = self._timings.get(key, 0.0) + seconds
        if ctx.world_size == 1:
            return completions, scores
        shares = ctx.gather((completions, scores))[::ctx.sp_size]  # SP rank 0 of every data-parallel rank
        by_prompt = [None] * len(prompts)
        for dp_rank, (share_completions, share_scores) in enumerate(shares):
            for k, group in enumerate(share_completions):
                index = dp_rank + k * ctx.dp_size
                by_prompt[index] = (group, share_scores[k * params.n:(k + 1) * params.n])
        return [c for c, _ in by_prompt], [score for _, s in by_prompt for score in s]

    def collect(self, phase: Phase, examples: Sequence[PromptExample], step: int) -> tuple[list[Group], dict]:
        """Generate and score until the step's batch of groups is full (or rounds run out)."""
        rng = random.Random(f"rl:{self.seed}:{phase.name}:{step}")
        collector = GroupCollector(self.cfg.train_prompts_per_step, self.cfg.dynamic_sampling.max_rounds,
                                   enabled=self.cfg.dynamic_sampling.enabled)
        self._timings = dict.fromkeys(("time_generate", "time_score", "time_score_wait"), 0.0)  # over all rounds
        seen: list[Group] = []
        while not collector.done:
            groups = self._generate_round(phase, examples, rng)
            seen += groups
            # informative = accuracy differs within the group (DAPO): the overlong penalty alone
            # must not make an all-wrong group count as signal
            collector.add(groups, torch.tensor([g.task_rewards for g in groups]))
            if not self.cfg.dynamic_sampling.enabled:
                break
        metrics = {**collector.metrics(), **group_accuracy_metrics(torch.tensor([g.task_rewards for g in seen])),
                   "shaped_reward_mean": float(torch.tensor([g.rewards for g in seen]).mean()),
                   "response_tokens_mean": float(torch.tensor(
                       [len(r) for g in seen for r in g.responses], dtype=torch.float32).mean()), **self._timings}
        return collector.batch(), metrics

    # ------------------------------------------------------------------ policy update

    def _sequences(self, groups: Sequence[Group]) -> tuple[list, list, dict, dict]:
        advantages = group_advantages(torch.tensor([g.rewards for g in groups]),
                                      normalize_std=self.cfg.advantage != "mean-only", eps=self.cfg.advantage_eps)
        sequences, prompt_lengths, adv, engine_lp = [], [], [], []
        for g, group_adv in zip(groups, advantages.tolist(), strict=True):
            for response, logprobs, a in zip(g.responses, g.engine_logprobs, group_adv, strict=True):
                sequences.append(g.example.prompt_ids + response)
                prompt_lengths.append(len(g.example.prompt_ids))
                adv.append(a)
                engine_lp.append(logprobs)
        response_tokens = [len(seq) - n for seq, n in zip(sequences, prompt_lengths, strict=True)]
        return (sequences, prompt_lengths, {"engine_logprobs": engine_lp},
                {"advantages": adv, "response_tokens": response_tokens})

    def _micro_batches(self, sequences, prompt_lengths, response_values, sequence_values) -> list[PackedBatch]:
        """This rank's share of the micro-batches (all of them in a single process), packed to the
        token budget of its sequence-parallel group."""
        budget = self.cfg.micro_batch_token_budget * self.ctx.sp_size
        groups = micro_batches([len(s) for s in sequences], budget)
        out = []
        for ids in rank_share(groups, self.ctx.dp_rank, self.ctx.dp_size, pad=list):
            if not ids:
                out.append(empty_batch(RESPONSE_VALUES, SEQUENCE_VALUES).to(self.device))
                continue
            out.append(pack_sequences([sequences[i] for i in ids], [prompt_lengths[i] for i in ids],
                                      {k: [v[i] for i in ids] for k, v in response_values.items()},
                                      {k: [v[i] for i in ids] for k, v in sequence_values.items()},
                                      sequence_ids=ids).to(self.device))
        return out

    @torch.no_grad()
    def _old_logprobs(self, batches: list[PackedBatch]) -> None:
        """Old-policy (and reference-policy) log-probs of the sampled tokens, in each batch's token values."""
        self.model.eval()
        policies = {"old_logprobs": self.model, "ref_logprobs": self.reference}
        sp_group = self.ctx.sp_group
        for name, policy in policies.items():
            if policy is None:
                continue
            with self.backend.output_weight(policy) as weight:
                for batch in batches:
                    hidden, local = policy_hidden(policy, batch, sp_group)
                    if sp_group is None:
                        logp = linear_logprobs(hidden, weight, batch.targets, temperature=self.cfg.temperature)
                    else:  # every SP rank gets the whole batch's log-probs; the loss shards them again
                        logp = sp_linear_logprobs(hidden, weight, local.targets, sp_group,
                                                  num_tokens=batch.num_tokens, temperature=self.cfg.temperature)
                    batch.token_values[name] = logp.float()
        self.model.train()

    def _normalizer(self, batch: PackedBatch, num_tokens: int, num_sequences: int):
        """What ``grpo_loss`` divides by, per ``rl.loss_aggregation`` (method.md section 2).

        token-mean: every response token of the mini-batch counts once (DAPO); seq-mean-token-mean:
        the mean over sequences of each sequence's token mean; seq-mean-token-sum: the mean over
        sequences of each sequence's token sum.
        """
        mode = self.cfg.loss_aggregation
        if mode == "token-mean":
            return max(1, num_tokens)
        if mode == "seq-mean-token-mean":
            return num_sequences * batch.token_values["response_tokens"].clamp(min=1.0)
        return torch.full_like(batch.token_values["response_tokens"], float(num_sequences))

    def update(self, groups: Sequence[Group]) -> dict[str, float]:
        """One optimizer update per mini-batch of groups; returns averaged metrics."""
        sums: dict[str, float] = {}
        updates = 0
        mini = self.cfg.mini_batch_size
        for start in range(0, len(groups), mini):
            sequences = self._sequences(groups[start:start + mini])
            batches = self._micro_batches(*sequences)
            self._old_logprobs(batches)
            # the whole mini-batch's counts, over every rank's micro-batches
            num_tokens = sum(sequences[3]["response_tokens"])
            num_sequences = len(sequences[0])
            mismatch = self._engine_mismatch(batches)
            for _ in range(self.cfg.ppo_epochs):
                step_metrics = self._optimizer_step(batches, num_tokens, num_sequences)
                for key, value in {**step_metrics, **{f"engine_{k}": v for k, v in mismatch.items()}}.items():
                    sums[key] = sums.get(key, 0.0) + value
                updates += 1
        return {key: value / max(1, updates) for key, value in sums.items()}

    def _engine_mismatch(self, batches: list[PackedBatch]) -> dict[str, float]:
        """``logprob_mismatch`` of the engine's log-probs against the trainer's, over every rank's micro-batches
        (each rank's rollouts come from its own engine: one that missed a weight sync shows here): means
        weighted by response tokens, the max over ranks."""
        mask = torch.cat([b.mask for b in batches])
        local = logprob_mismatch(torch.cat([b.token_values["engine_logprobs"] for b in batches]),
                                 torch.cat([b.token_values["old_logprobs"] for b in batches]), mask)
        shares = self.ctx.gather((int(mask.sum()), local))
        tokens = max(1, sum(count for count, _ in shares))
        return {key: (max(m[key] for _, m in shares) if key.endswith("_max")
                      else sum(count * m[key] for count, m in shares) / tokens) for key in local}

    def accumulate(self, batches: list[PackedBatch], num_tokens: int, num_sequences: int) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches (gradients accumulate); returns the loss and
        the token-weighted loss metrics, each summed over every rank."""
        loss_total, metric_sums = 0.0, {}
        with self.backend.output_weight(self.model) as weight:
            for batch in batches:
                hidden, local = policy_hidden(self.model, batch, self.ctx.sp_group)
                values = local.token_values
                loss, metrics = grpo_loss(hidden, weight, local.targets, values["advantages"], values["old_logprobs"],
                                          local.mask, ref_logprobs=values.get("ref_logprobs"),
                                          kl_coef=self.cfg.kl_coef, clip_low=self.cfg.clip_low,
                                          clip_high=self.cfg.clip_high, entropy_coef=self.cfg.entropy_coef,
                                          temperature=self.cfg.temperature,
                                          num_tokens=self._normalizer(local, num_tokens, num_sequences))
                self.backend.backward(loss)
                loss_total += loss.item()
                count = int(local.mask.sum())
                share = count / max(1, num_tokens)  # token-weighted average of local means
                for key, value in metrics.items():  # every rank sums the same keys (no loss tokens: empty means)
                    metric_sums[key] = metric_sums.get(key, 0.0) + (float(value) * share if count else 0.0)
        return self.ctx.sum({"loss": loss_total, **metric_sums})

    def _optimizer_step(self, batches: list[PackedBatch], num_tokens: int, num_sequences: int) -> dict[str, float]:
        metrics = self.accumulate(batches, num_tokens, num_sequences)
        grad_norm = self.backend.step()
        return {"loss": metrics.pop("loss"), "grad_norm": grad_norm, "lr": self.backend.lr, **metrics}

    # ------------------------------------------------------------------ phases

    def _checkpoint_name(self, phase: Phase, step: int) -> str:
        return f"rl-{phase.name}-step{step:06d}"

    def train_phase(self, phase: Phase, examples: Sequence[PromptExample], *, resume: bool = False) -> list[dict]:
        """Run ``phase.steps`` RL steps on ``examples`` (prompts that fit the phase)."""
        if not examples:
            raise ValueError(f"examples: phase {phase.name!r} has no prompt within {phase.max_input_tokens} tokens")
        steps = phase.steps if phase.steps is not None else max(
            1, round(phase.epochs * len(examples) / self.cfg.train_prompts_per_step))
        updates_per_step = -(-self.cfg.train_prompts_per_step // self.cfg.mini_batch_size) * self.cfg.ppo_epochs
        self.backend.start(lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, total_steps=steps * updates_per_step,
                           warmup_steps=self.cfg.warmup_steps, schedule=self.cfg.lr_schedule,
                           grad_clip=self.cfg.grad_clip)
        step = 0
        checkpoints = self.output_dir / "checkpoints"
        latest = latest_checkpoint(checkpoints, prefix=f"rl-{phase.name}-") if resume else None
        if latest is not None:
            state = self.backend.load(latest)
            step = state["step"]
            self.history = RewardHistory.from_json(state["history"])
        history = []
        with tqdm(total=steps, initial=step, desc=f"rl {phase.name}", unit="step", dynamic_ncols=True,
                  disable=not self.ctx.is_main) as bar:
            while step < steps:
                t0 = time.perf_counter()
                groups, metrics = self.collect(phase, examples, step)
                t1 = time.perf_counter()
                if groups:
                    metrics.update(self.update(groups))
                    if getattr(self.engine, "model", None) is not self.model:  # the engine holds its own copy
                        self.engine.update_weights(self.backend.full_parameters())
                t2 = time.perf_counter()
                step += 1
                tokens = sum(len(g.example.prompt_ids) + len(r) for g in groups for r in g.responses)
                metrics.update({"time_rollout": t1 - t0, "time_train": t2 - t1, "groups_trained": len(groups),
                                "train_tokens_per_s": tokens / max(t2 - t1, 1e-9)})
                if self.ctx.is_main:
                    self.logger.log(f"rl/{phase.name}", step, metrics)
                history.append(metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}")
                bar.update(1)
                if (self.save_every_steps and step % self.save_every_steps == 0) or step == steps:
                    self.backend.save(checkpoints / self._checkpoint_name(phase, step),
                                      state={"stage": "rl", "phase": phase.name, "step": step,
                                             "history": self.history.to_json()}, keep=self.keep_checkpoints)
        return history
