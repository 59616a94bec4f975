"""One GRPO/DAPO phase: generate, score, compute advantages, update on packed mini-batches.

Per step (method.md section 2): sample prompts, generate ``group_size`` responses each with
the rollout engine, score them with the hybrid reward (each group as soon as the engine
completes it, overlapping the rest of the generation: ``scoring``), keep informative groups (dynamic
sampling, up to ``max_rounds`` generation rounds), add the overlong penalty, compute group
advantages over the whole batch, then the old (and reference) log-probs of every sampled token
with the fused kernel, once, before any update: they belong to the policy that generated the
rollouts. Then ``ppo_epochs`` passes over the mini-batches of groups, one optimizer update each,
with the fused GRPO loss, so from the second mini-batch on the importance ratio measures how far
the updates moved the policy and the clip bounds it. Prompts are drawn without replacement from
a shuffled per-phase order (``PromptSampler``), optionally balanced over tasks. Every random choice
is keyed on (seed, phase, step) or stored in the checkpoint, so a resumed run repeats the
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qwenlong.algorithms import (
    GroupCollector,
    broadcast_to_tokens,
    group_accuracy_metrics,
    group_advantages,
    overlong_penalty,
    task_normalized_advantages,
)
from qwenlong.algorithms.entropy_control import aepo_keep, aepo_mode, negative_gradient_keep, response_entropy_sums
from qwenlong.config import RLConfig
from qwenlong.curriculum import Phase, PromptSampler, RewardHistory
from qwenlong.distributed.backend import TrainingBackend
from qwenlong.kernels import grpo_loss, linear_logprobs, sp_linear_logprobs
from qwenlong.kernels.logprobs.policy_math import loss_normalizer
from qwenlong.rewards import HybridReward
from qwenlong.rollout import RolloutEngine, SamplingParams, logprob_mismatch
from qwenlong.state.checkpoint import latest_checkpoint, model_weights
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

RESPONSE_VALUES = ("engine_logprobs",)
SEQUENCE_VALUES = ("advantages", "response_tokens", "rewards")
METRIC_SUMS = ("time_generate", "time_score", "time_score_wait")  # seconds summed over a step's rounds


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


@dataclass
class RolloutBatch:
    """A set of groups flattened to sequences (prompt + response), what packing and the loss need."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    engine_logprobs: list[list[float]]
    advantages: list[float]
    response_tokens: list[int]
    rewards: list[float]  # each sequence's task reward, without overlong shaping (AEPO's positive-reward test)
    # the response each sequence is part of (a memory-agent trajectory's steps share one); None: its own
    response_of: list[int] | None = None

    @property
    def owners(self) -> list[int]:
        """The response of each sequence, as indices ``0 .. num_responses - 1``."""
        return list(range(len(self.sequences))) if self.response_of is None else self.response_of

    @property
    def num_responses(self) -> int:
        return max(self.owners, default=-1) + 1

    @classmethod
    def from_groups(cls, groups: Sequence[Group], advantages: torch.Tensor) -> RolloutBatch:
        """``advantages``: ``[len(groups), group_size]``, one per response."""
        batch = cls([], [], [], [], [], [])
        for g, group_adv in zip(groups, advantages.tolist(), strict=True):
            batch.rewards += g.task_rewards  # a right answer cut at the length limit still counts as positive
            for response, logprobs, a in zip(g.responses, g.engine_logprobs, group_adv, strict=True):
                batch.sequences.append(g.example.prompt_ids + response)
                batch.prompt_lengths.append(len(g.example.prompt_ids))
                batch.engine_logprobs.append(logprobs)
                batch.advantages.append(a)
                batch.response_tokens.append(len(response))
        return batch

    def pack(self, ids: Sequence[int]) -> PackedBatch:
        """The sequences ``ids`` as one packed micro-batch."""
        return pack_sequences([self.sequences[i] for i in ids], [self.prompt_lengths[i] for i in ids],
                              {"engine_logprobs": [self.engine_logprobs[i] for i in ids]},
                              {"advantages": [self.advantages[i] for i in ids],
                               "response_tokens": [self.response_tokens[i] for i in ids],
                               "rewards": [self.rewards[i] for i in ids]}, sequence_ids=ids)


def _response_values(rollout: RolloutBatch, with_rewards: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each response's advantage and (``with_rewards``) task reward: those of its first sequence (a trajectory's
    steps all carry the trajectory's)."""
    first = {}
    for sequence, owner in enumerate(rollout.owners):
        first.setdefault(owner, sequence)
    index = [first[owner] for owner in range(rollout.num_responses)]
    advantages = torch.tensor([rollout.advantages[i] for i in index])
    return advantages, torch.tensor([rollout.rewards[i] for i in index]) if with_rewards else None


class GRPOTrainer:
    """Runs the RL phases of a curriculum on one policy, keeping one reward history."""

    def __init__(self, model: torch.nn.Module, engine: RolloutEngine, reward: HybridReward, cfg: RLConfig, *,
                 decode, output_dir: str | Path, seed: int = 0, logger: MetricsLogger | None = None,
                 history: RewardHistory | None = None, save_every_steps: int = 0, keep_checkpoints: int = 0,
                 backend: TrainingBackend | None = None, task_balanced: bool = False,
                 reference: torch.nn.Module | None = None, aepo_start_mode: str = "all"):
        self.model, self.engine, self.reward, self.cfg = model, engine, reward, cfg
        if backend is None:
            backend = TrainingBackend(model)
        self.backend = backend
        self.ctx = self.backend.ctx
        self.decode = decode  # token ids -> text, for the reward
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.logger = logger or MetricsLogger(self.output_dir)
        self.history = history if history is not None else RewardHistory()
        self.save_every_steps, self.keep_checkpoints = save_every_steps, keep_checkpoints
        self.task_balanced = task_balanced
        # AEPO's mode (rl.entropy_control), carried from step to step and phase to phase, in checkpoints, and
        # given back by the caller (``aepo_start_mode``) when a run resumes at a phase that has no checkpoint yet
        self.aepo_mode = aepo_start_mode
        self._timings: dict[str, float] = {}  # this rank's generation and scoring seconds in the current step
        self.device = next(model.parameters()).device
        # KL is measured against a frozen policy: the one the RL run starts from (rl.kl_reference: sft)
        # unless set_reference says otherwise, or each phase's starting policy (phase_start); ``reference``:
        # one already frozen (a later trainer of the same run shares it), else the policy as it is now
        self.reference = reference
        if reference is None:
            self.set_reference()

    def set_reference(self, checkpoint: str | Path | None = None) -> None:
        """Freeze the KL reference policy: the current policy, or the weights of a checkpoint folder."""
        if self.cfg.kl_coef == 0:
            return
        self.reference = self.backend.frozen_copy()
        if checkpoint is not None:
            self.reference.load_state_dict(model_weights(checkpoint))

    # ------------------------------------------------------------------ rollouts and rewards

    def _generate_round(self, phase: Phase, examples: Sequence[PromptExample], sampler: PromptSampler,
                        drawn: set[int], rng: random.Random) -> list[Group]:
        picks = sampler.draw(self.cfg.gen_prompts_per_step, exclude=drawn)
        drawn.update(picks)
        if not picks:
            return []
        prompts = [examples[i] for i in picks]
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

    def collect(self, phase: Phase, examples: Sequence[PromptExample], step: int,
                sampler: PromptSampler) -> tuple[list[Group], dict]:
        """Generate and score until the step's batch of groups is full, or rounds (or unused prompts) run
        out: then ``rl.dynamic_sampling.on_exhausted`` says whether the smaller batch trains."""
        rng = random.Random(f"rl:{self.seed}:{phase.name}:{step}")
        sampling = self.cfg.dynamic_sampling
        collector = GroupCollector(self.cfg.train_prompts_per_step, sampling.max_rounds, enabled=sampling.enabled)
        self._timings = dict.fromkeys(METRIC_SUMS, 0.0)  # over all rounds
        seen: list[Group] = []
        drawn: set[int] = set()  # a prompt appears at most once in a step
        while not collector.done:
            groups = self._generate_round(phase, examples, sampler, drawn, rng)
            if not groups:
                break
            seen += groups
            # informative = accuracy differs within the group (DAPO): the overlong penalty alone
            # must not make an all-wrong group count as signal
            collector.add(groups, torch.tensor([g.task_rewards for g in groups]))
            if not sampling.enabled:
                break
        exhausted = sampling.enabled and not collector.full
        if exhausted and sampling.on_exhausted == "error":
            raise RuntimeError(
                f"rl.dynamic_sampling: step {step + 1} of phase {phase.name!r} kept {len(collector.batch())} "
                f"informative groups of {self.cfg.train_prompts_per_step} after {collector.rounds} rounds "
                f"(max_rounds {sampling.max_rounds}); set on_exhausted: train to train on them")
        metrics = {**collector.metrics(), "dynamic_sampling/exhausted": float(exhausted),
                   **group_accuracy_metrics(torch.tensor([g.task_rewards for g in seen])),
                   "shaped_reward_mean": float(torch.tensor([g.rewards for g in seen]).mean()),
                   "response_tokens_mean": float(torch.tensor(
                       [len(r) for g in seen for r in g.responses], dtype=torch.float32).mean()), **self._timings}
        for task in sorted({g.example.data_source for g in seen}):  # per-task reward curves (task-balanced runs)
            metrics[f"task_reward/{task}"] = float(torch.tensor(
                [r for g in seen if g.example.data_source == task for r in g.task_rewards]).mean())
        return collector.batch(), metrics

    # ------------------------------------------------------------------ policy update

    def _advantages(self, groups: Sequence[Group]) -> torch.Tensor:
        """``[len(groups), group_size]`` advantages over the whole step's batch (``rl.advantage``): ``grpo``
        (group std), ``mean-only``, or ``task-std`` (QwenLong-L1.5: the std of all of the batch's rewards
        of the prompt's task, the example's data source)."""
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        if self.cfg.advantage == "task-std":
            names = sorted({g.example.data_source for g in groups})
            task_ids = torch.tensor([names.index(g.example.data_source) for g in groups])
            return task_normalized_advantages(rewards, task_ids, eps=self.cfg.advantage_eps)
        return group_advantages(rewards, normalize_std=self.cfg.advantage == "grpo", eps=self.cfg.advantage_eps)

    def _micro_batches(self, rollout: RolloutBatch) -> list[PackedBatch]:
        """This rank's share of the micro-batches (all of them in a single process), packed to the
        token budget of its sequence-parallel group."""
        budget = self.cfg.micro_batch_token_budget * self.ctx.sp_size
        groups = micro_batches([len(s) for s in rollout.sequences], budget)
        return [(rollout.pack(ids) if ids else empty_batch(RESPONSE_VALUES, SEQUENCE_VALUES)).to(self.device)
                for ids in rank_share(groups, self.ctx.dp_rank, self.ctx.dp_size, pad=list)]

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
                # entropy control reads the generating policy's token entropies, from the same fused pass
                entropy = name == "old_logprobs" and self.cfg.entropy_control.enabled
                for batch in batches:
                    hidden, local = policy_hidden(policy, batch, sp_group)
                    if sp_group is None:
                        logp = linear_logprobs(hidden, weight, batch.targets, temperature=self.cfg.temperature,
                                               return_entropy=entropy)
                    else:  # every SP rank gets the whole batch's log-probs; the loss shards them again
                        logp = sp_linear_logprobs(hidden, weight, local.targets, sp_group, num_tokens=batch.num_tokens,
                                                  temperature=self.cfg.temperature, return_entropy=entropy)
                    if entropy:
                        logp, batch.token_values["entropy"] = logp[0], logp[1].float()
                    batch.token_values[name] = logp.float()
        self.model.train()

    def update(self, groups: Sequence[Group]) -> dict[str, float]:
        """``ppo_epochs`` passes over the mini-batches of ``groups``, one optimizer update each; the old
        log-probs are computed once, before any update. Returns metrics averaged over the updates."""
        advantages = self._advantages(groups)
        mini = self.cfg.mini_batch_size
        minibatches = []
        for start in range(0, len(groups), mini):
            rollout = self._rollout_batch(groups[start:start + mini], advantages[start:start + mini])
            minibatches.append((rollout, self._micro_batches(rollout)))
        every_batch = [batch for _, batches in minibatches for batch in batches]
        self._old_logprobs(every_batch)  # the policy that generated the rollouts: before any update
        control = self._entropy_control(minibatches) if self.cfg.entropy_control.enabled else {}
        sums: dict[str, float] = {}
        for _ in range(self.cfg.ppo_epochs):
            for rollout, batches in minibatches:
                # the whole mini-batch's counts, over every rank's micro-batches
                step_metrics = self._optimizer_step(batches, sum(rollout.response_tokens), len(rollout.sequences))
                for key, value in step_metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
        updates = self.cfg.ppo_epochs * len(minibatches)
        mismatch = self._engine_mismatch(every_batch)
        return {**{key: value / updates for key, value in sums.items()},
                **{f"engine_{key}": value for key, value in mismatch.items()}, "updates": float(updates), **control}

    def _rollout_batch(self, groups: Sequence[Group], advantages: torch.Tensor) -> RolloutBatch:
        """The sequences ``groups`` train on: one per response (the memory agent's trainer: one per step)."""
        return RolloutBatch.from_groups(groups, advantages)

    def _entropy_control(self, minibatches: list[tuple[RolloutBatch, list[PackedBatch]]]) -> dict[str, float]:
        """QwenLong-L1.5's negative-gradient clipping and AEPO (``rl.entropy_control``): the step's batch
        entropy (every rank's responses) sets AEPO's mode; each token's ``loss_keep`` token value says whether
        it stays in the loss. The loss's denominators are unchanged: a dropped token's term is just 0.

        A response is what an advantage belongs to: one sequence in GRPO, a whole trajectory (every policy call
        of it) for the memory agent, whose mean entropy then covers all its steps' tokens (summed over the
        micro-batches and ranks they were packed into) and which counts once in the batch entropy."""
        ec = self.cfg.entropy_control
        owners = [torch.tensor(rollout.owners, dtype=torch.long, device=self.device) for rollout, _ in minibatches]
        local = []  # per mini-batch: [2, responses], entropy and loss tokens of this rank's micro-batches
        for (rollout, batches), owner in zip(minibatches, owners, strict=True):
            parts = torch.zeros(2, rollout.num_responses, dtype=torch.float64, device=self.device)
            for batch in batches:
                parts += response_entropy_sums(batch.token_values["entropy"], batch.mask, batch.cu_seqlens,
                                               owner[batch.sequence_ids], rollout.num_responses)
            local.append(parts.tolist())
        shares = self.ctx.gather(local)[::self.ctx.sp_size]  # one exchange per step; SP peers hold the same batches
        sums = [torch.tensor([share[i] for share in shares], dtype=torch.float64, device=self.device).sum(0)
                for i in range(len(minibatches))]  # over every rank's micro-batches
        means = [s[0] / s[1].clamp(min=1) for s in sums]  # every response's mean token entropy
        with_tokens = torch.cat([m[s[1] > 0] for m, s in zip(means, sums, strict=True)])
        entropy = float(with_tokens.mean()) if with_tokens.numel() else 0.0
        mode_before = self.aepo_mode
        if ec.aepo:
            self.aepo_mode = aepo_mode(self.aepo_mode, entropy, ec.entropy_low, ec.entropy_high)
        kept = [0.0, 0.0]
        for (_, batches), owner, mean in zip(minibatches, owners, means, strict=True):
            for batch in batches:
                values = batch.token_values
                # the sequences' response means (0 for padding sequences past the real ones)
                sequence_mean = torch.zeros(batch.cu_seqlens.numel() - 1, dtype=torch.float32, device=self.device)
                sequence_mean[:len(batch.sequence_ids)] = mean[owner[batch.sequence_ids]].float()
                keep = negative_gradient_keep(values["advantages"], values["entropy"],
                                              broadcast_to_tokens(sequence_mean, batch.cu_seqlens), ec.tau_token,
                                              ec.tau_sequence)
                keep &= aepo_keep(self.aepo_mode, values["advantages"],
                                  values["rewards"] if ec.positive_reward else None)
                values["loss_keep"] = keep.float()
                kept = [kept[0] + float((keep & batch.mask).sum()), kept[1] + float(batch.mask.sum())]
        kept = [sum(k) for k in zip(*self.ctx.gather(kept)[::self.ctx.sp_size], strict=True)]
        responses = [aepo_keep(self.aepo_mode, *_response_values(rollout, ec.positive_reward))
                     for rollout, _ in minibatches]
        return {"entropy_control/steps": 1.0,  # summed over a logged row's steps: the steps the means cover
                "entropy_control/batch_entropy": entropy,
                "entropy_control/positive_only": float(self.aepo_mode == "positive-only"),
                "entropy_control/mode_switched": float(self.aepo_mode != mode_before),
                "entropy_control/responses_kept": float(sum(int(r.sum()) for r in responses)),
                "entropy_control/responses": float(sum(len(r) for r in responses)),
                "entropy_control/tokens_kept": kept[0], "entropy_control/tokens": kept[1]}

    def _engine_mismatch(self, batches: list[PackedBatch]) -> dict[str, float]:
        """``logprob_mismatch`` of the engine's log-probs against the trainer's pre-update (old) log-probs of
        the same tokens, over every rank's micro-batches (each rank's rollouts come from its own engine: one
        that missed a weight sync shows here): means weighted by response tokens, the max over ranks."""
        mask = torch.cat([b.mask for b in batches])
        local = logprob_mismatch(torch.cat([b.token_values["engine_logprobs"] for b in batches]),
                                 torch.cat([b.token_values["old_logprobs"] for b in batches]), mask)
        shares = self.ctx.gather((int(mask.sum()), local))
        tokens = max(1, sum(count for count, _ in shares))
        return {key: (max(m[key] for _, m in shares) if key.endswith("_max")
                      else sum(count * m[key] for count, m in shares) / tokens) for key in local}

    def accumulate(self, batches: list[PackedBatch], num_tokens: int, num_sequences: int) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches (gradients accumulate); returns the loss
        (summed over every rank) and the loss metrics (means over every rank's tokens left in the loss)."""
        # summed on the device: one host sync per update, not one per micro-batch
        sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=self.device)}
        metric_tokens = torch.zeros((), device=self.device)  # the tokens the metrics average over (kept ones)
        with self.backend.output_weight(self.model) as weight:
            for batch in batches:
                hidden, local = policy_hidden(self.model, batch, self.ctx.sp_group)
                values = local.token_values
                mask = local.mask & values["loss_keep"].bool() if "loss_keep" in values else local.mask
                normalizer = loss_normalizer(self.cfg.loss_aggregation, num_tokens, num_sequences,
                                             values["response_tokens"])
                loss, metrics = grpo_loss(hidden, weight, local.targets, values["advantages"], values["old_logprobs"],
                                          mask, ref_logprobs=values.get("ref_logprobs"),
                                          kl_coef=self.cfg.kl_coef, clip_low=self.cfg.clip_low,
                                          clip_high=self.cfg.clip_high, dual_clip=self.cfg.clip_ratio_c,
                                          entropy_coef=self.cfg.entropy_coef, temperature=self.cfg.temperature,
                                          num_tokens=normalizer)
                self.backend.backward(loss)
                sums["loss"] += loss.detach()
                # the metrics are means over ``mask``: weighted by its tokens, divided by all ranks' count below
                kept = mask.sum()
                metric_tokens += kept
                for key, value in metrics.items():  # every rank sums the same keys (no loss tokens: empty means)
                    sums[key] = sums.get(key, 0.0) + value.detach() * kept
        totals = self.ctx.sum({"metric_tokens": float(metric_tokens), **{key: float(v) for key, v in sums.items()}})
        count = max(1.0, totals.pop("metric_tokens"))
        return {key: value if key == "loss" else value / count for key, value in totals.items()}

    def _optimizer_step(self, batches: list[PackedBatch], num_tokens: int, num_sequences: int) -> dict[str, float]:
        metrics = self.accumulate(batches, num_tokens, num_sequences)
        lr = self.backend.lr  # the rate this update uses: after the step the schedule has moved on
        grad_norm = self.backend.step()
        return {"loss": metrics.pop("loss"), "grad_norm": grad_norm, "lr": lr, **metrics}

    # ------------------------------------------------------------------ phases

    def _sync_engine(self) -> None:
        """Give the policy's weights to an engine that holds its own copy (vLLM); HF generates with the policy."""
        if getattr(self.engine, "model", None) is not self.model:
            self.engine.update_weights(self.backend.full_parameters())

    def _checkpoint_name(self, phase: Phase, step: int) -> str:
        return f"rl-{phase.name}-step{step:06d}"

    def phase_steps(self, phase: Phase, num_examples: int) -> int:
        """RL steps of ``phase``: its ``steps``, or ``epochs`` passes over ``num_examples`` prompts."""
        if phase.steps is not None:
            return phase.steps
        return max(1, round(phase.epochs * num_examples / self.cfg.train_prompts_per_step))

    def train_phase(self, phase: Phase, examples: Sequence[PromptExample], *, resume: bool = False,
                    extra_state: dict[str, Any] | None = None,
                    after_step: Callable[[int], None] | None = None) -> list[dict]:
        """Run the phase's RL steps on ``examples`` (prompts that fit the phase).

        ``extra_state`` is stored in every checkpoint of the phase (e.g. the retrospectively carried
        examples); ``after_step(step)`` runs after each step's checkpoint (e.g. an in-phase evaluation), and for the
        step a resumed phase starts from (it skips what it recorded).
        """
        if not examples:
            raise ValueError(f"examples: phase {phase.name!r} has no prompt within {phase.max_input_tokens} tokens")
        steps = self.phase_steps(phase, len(examples))
        updates_per_step = -(-self.cfg.train_prompts_per_step // self.cfg.mini_batch_size) * self.cfg.ppo_epochs
        self.backend.start(lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, total_steps=steps * updates_per_step,
                           warmup_steps=self.cfg.warmup_steps, schedule=self.cfg.lr_schedule,
                           grad_clip=self.cfg.grad_clip)
        if self.cfg.kl_reference == "phase_start":  # the weights the phase starts from, resumed or not
            self.set_reference()
        sampler = PromptSampler([e.data_source for e in examples], key=f"rl:{self.seed}:{phase.name}",
                                balanced=self.task_balanced)
        step = 0
        checkpoints = self.output_dir / "checkpoints"
        latest = latest_checkpoint(checkpoints, prefix=f"rl-{phase.name}-") if resume else None
        if latest is not None:
            state = self.backend.load(latest)
            step = state["step"]
            self.history = RewardHistory.from_json(state["history"])
            sampler.load_state_dict(state["sampler"])
            self.aepo_mode = state.get("aepo_mode", self.aepo_mode)
            self._sync_engine()  # an engine with its own copy still holds the weights the phase started from
            if after_step is not None:  # a run killed between the checkpoint and what follows it (an evaluation)
                after_step(step)
        history = []
        stage = f"rl/{phase.name}"
        with tqdm(total=steps, initial=step, desc=f"rl {phase.name}", unit="step", dynamic_ncols=True,
                  disable=not self.ctx.is_main) as bar:
            while step < steps:
                t0 = time.perf_counter()
                groups, metrics = self.collect(phase, examples, step, sampler)
                t1 = time.perf_counter()
                if groups:
                    metrics.update(self.update(groups))
                    self._sync_engine()
                t2 = time.perf_counter()
                step += 1
                tokens = sum(len(g.example.prompt_ids) + len(r) for g in groups for r in g.responses)
                metrics.update({"time_rollout": t1 - t0, "time_train": t2 - t1, "groups_trained": len(groups),
                                "train_tokens_per_s": tokens / max(t2 - t1, 1e-9)})
                if self.ctx.is_main:
                    self.logger.log(stage, step, metrics, flush=step == steps)
                history.append(metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}")
                bar.update(1)
                if (self.save_every_steps and step % self.save_every_steps == 0) or step == steps:
                    if self.ctx.is_main:
                        self.logger.flush(stage)  # a checkpoint never holds steps the log lacks
                    self.backend.save(checkpoints / self._checkpoint_name(phase, step),
                                      state={"stage": "rl", "phase": phase.name, "step": step,
                                             "history": self.history.to_json(), "sampler": sampler.state_dict(),
                                             "aepo_mode": self.aepo_mode,
                                             **(extra_state or {})}, keep=self.keep_checkpoints)
                if after_step is not None:
                    after_step(step)
        return history
