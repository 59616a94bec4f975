"""RL of the memory agent (QwenLong-L1.5's memory expert) on the GRPO trainer.

Only the rollouts differ from plain GRPO: each drawn prompt's ``group_size`` trajectories come
from :class:`~qwenlong.agents.memory.MemoryAgent` (chunk by chunk, then an answer), each trajectory
is scored once from its final answer, and every step of every trajectory becomes one training
sequence carrying the trajectory's group advantage. The trajectory stays one response for entropy
control: its mean token entropy covers every step's tokens (sequence-level clipping drops all of a
negative trajectory or none of it) and it counts once in AEPO's batch entropy and kept responses.
Advantages, entropy control, mini-batches, old log-probs, the fused loss (token-mean over all
steps' tokens), checkpoints and resumption are the GRPO trainer's own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from qwenlong.agents.memory import (
    AgentQuery,
    MemoryAgent,
    MemoryAgentConfig,
    Trajectory,
    score_trajectories,
    trajectory_sequences,
)
from qwenlong.curriculum import Phase, PromptSampler
from qwenlong.trainers.grpo import GRPOTrainer, PromptExample, RolloutBatch


@dataclass
class AgentGroup:
    """One question's trajectories and their rewards (what :class:`GRPOTrainer` reads of a group)."""

    example: PromptExample
    trajectories: list[Trajectory]
    task_rewards: list[float]
    rewards: list[float]

    @property
    def responses(self) -> list[list[int]]:
        """Every token each trajectory generated, over all its steps."""
        return [[token for step in t.steps for token in step.response_ids] for t in self.trajectories]


class MemoryAgentTrainer(GRPOTrainer):
    """:class:`GRPOTrainer` whose rollouts are memory-agent trajectories.

    ``queries`` maps each example id to its :class:`AgentQuery` (the whole document and the split
    question); ``agent_config`` sets chunk and memory budgets (the phase's ``max_output_tokens`` is the
    answer's budget). ``tokenizer`` renders and decodes the agent's prompts. Rewards come from
    ``reward`` on the final answers (no overlong penalty: a trajectory has no single length limit).
    """

    def __init__(self, *args, queries: Mapping[str, AgentQuery], tokenizer, agent_config: MemoryAgentConfig,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.queries, self.tokenizer, self.agent_config = queries, tokenizer, agent_config

    def _generate_round(self, phase: Phase, examples: Sequence[PromptExample], sampler: PromptSampler,
                        drawn: set[int], rng: random.Random) -> list[AgentGroup]:
        picks = sampler.draw(self.cfg.gen_prompts_per_step, exclude=drawn)
        drawn.update(picks)
        if not picks:
            return []
        prompts = [examples[i] for i in picks]
        seed = rng.randrange(2**31)
        ctx = self.ctx
        # a synced engine (ZeRO-3 lockstep HF generate, placed vLLM engines): every rank drives the agent
        # together, those without prompts (SP ranks > 0, surplus data-parallel ranks) included, with one seed
        # (the ranks of a vLLM tensor-parallel slice must sample alike); otherwise each rank its own
        synced = ctx.world_size > 1 and self.engine.synced
        mine = prompts[ctx.dp_rank::ctx.dp_size] if ctx.sp_rank == 0 else []
        trajectories = self._rollouts(mine, phase, seed if synced else seed + ctx.dp_rank) if mine or synced else []
        if ctx.world_size > 1:  # every rank gets every group, in prompt order
            shares = ctx.gather(trajectories)[::ctx.sp_size]
            by_prompt = [None] * len(prompts)
            for dp_rank, share in enumerate(shares):
                for k, group in enumerate(share):
                    by_prompt[dp_rank + k * ctx.dp_size] = group
            trajectories = by_prompt
        groups = []
        for example, group in zip(prompts, trajectories, strict=True):
            rewards = [t.reward for t in group]
            self.history.record(example.id, rewards, [t.generated_tokens for t in group], phase=phase.name)
            groups.append(AgentGroup(example, group, rewards, list(rewards)))
        return groups

    def _rollouts(self, prompts: list[PromptExample], phase: Phase, seed: int) -> list[list[Trajectory]]:
        """This rank's trajectories, each with its reward; timings go to the step's metrics."""
        missing = [p.id for p in prompts if p.id not in self.queries]
        if missing:
            raise ValueError(f"queries: no agent query for examples {missing[:4]}")
        config = replace(self.agent_config, answer_tokens=phase.max_output_tokens, temperature=self.cfg.temperature,
                         top_p=self.cfg.top_p)
        agent = MemoryAgent(self.engine, self.tokenizer, config, gather=self.ctx.gather)
        t0 = time.perf_counter()
        groups = agent.rollout([self.queries[p.id] for p in prompts], self.cfg.group_size, seed=seed)
        t1 = time.perf_counter()
        score_trajectories(groups, self.reward)
        t2 = time.perf_counter()
        for key, seconds in (("time_generate", t1 - t0), ("time_score", t2 - t1)):
            self._timings[key] = self._timings.get(key, 0.0) + seconds
        self._timings["agent_steps_per_trajectory"] = float(
            sum(len(t.steps) for g in groups for t in g) / max(1, sum(len(g) for g in groups)))
        return groups

    def _rollout_batch(self, groups: Sequence[AgentGroup], advantages: torch.Tensor) -> RolloutBatch:
        """Every step of every trajectory as a sequence with its trajectory's advantage and reward."""
        sequences, prompt_lengths, response_values, values = trajectory_sequences(
            [g.trajectories for g in groups], advantages)
        rewards = [r for g in groups for r in g.rewards]
        return RolloutBatch(sequences, prompt_lengths, response_values["engine_logprobs"], values["advantages"],
                            values["response_tokens"], [rewards[t] for t in values["trajectory"]],
                            response_of=values["trajectory"])
