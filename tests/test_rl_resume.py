"""An RL phase killed with SIGKILL mid-phase and resumed with --resume ends with the weights of an
uninterrupted run (rollouts, rewards, reward history, optimizer and schedule all continue exactly):
in one process, and under ZeRO-3 on two."""

from __future__ import annotations

import sys

import pytest
import torch
from test_pipeline import SMALL, TINY, assert_killed_run_resumes_exactly

pytest.importorskip("transformers")


@pytest.mark.slow
def test_rl_killed_mid_phase_and_resumed_matches_uninterrupted(tmp_path):
    args = [*SMALL, "rl.phases.0.steps=4", "output.save_every_steps=1", "eval.enabled=false"]

    def rl(out, *extra):
        return [sys.executable, "-m", "qwenlong", "rl", "--config", TINY, *args, *extra, f"output.dir={out}"]

    straight = assert_killed_run_resumes_exactly(rl, tmp_path, kill_at="rl-short-docs-step000002",
                                                 not_yet="rl-short-docs-step000004", final="rl-long-docs-step000001")
    # output.keep_checkpoints (default 2): the newest two of each phase's series stay
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "rl-long-docs-step000001", "rl-short-docs-step000003", "rl-short-docs-step000004"]


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_rl_killed_in_second_phase_and_resumed_matches_uninterrupted(tmp_path, free_port):
    """``torchrun`` with two ZeRO-3 processes, killed (launcher and workers) in the second phase: the resumed
    run reads the first phase's weights back into the partitioned model (rank 0 scatters them) and DeepSpeed's
    partitioned optimizer state from the second phase's checkpoint, and ends as the uninterrupted run."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port)]
    args = [*SMALL, "rl.phases.1.steps=3", "output.save_every_steps=1", "eval.enabled=false",
            "distributed.deepspeed_stage=3"]

    def rl(out, *extra):
        return [*launcher, "-m", "qwenlong", "rl", "--config", TINY, *args, *extra, f"output.dir={out}"]

    assert_killed_run_resumes_exactly(rl, tmp_path, kill_at="rl-long-docs-step000001",
                                      not_yet="rl-long-docs-step000003", final="rl-long-docs-step000003")


class _EngineWithItsOwnWeights:
    """Random responses, like an engine that generates from its own copy of the weights (vLLM): it records,
    at each generate, whether its copy equals the policy's weights at that moment."""

    synced = False

    def __init__(self, policy, vocab: int):
        self.policy, self.vocab = policy, vocab
        self.weights = {name: p.detach().clone() for name, p in policy.named_parameters()}
        self.in_sync: list[bool] = []

    def update_weights(self, named_tensors):
        for name, tensor in named_tensors:
            self.weights[name] = tensor.detach().clone()

    def generate(self, prompts, params, on_complete=None):
        import random

        from qwenlong.rollout import Completion

        self.in_sync.append(all(torch.equal(self.weights[n], p) for n, p in self.policy.named_parameters()))
        rng = random.Random(params.seed)
        groups = [[Completion([rng.randrange(self.vocab) for _ in range(3)], [-1.0] * 3, "length")
                   for _ in range(params.n)] for _ in prompts]
        for index, group in enumerate(groups):
            on_complete(index, group)
        return groups


def test_resumed_phase_gives_an_engine_with_its_own_weights_the_checkpoint(tmp_path, monkeypatch):
    """The engine of a resumed run starts from the phase's start weights (the pipeline builds it from the last
    finished stage); the checkpoint's weights must reach it before its first rollout."""
    from types import SimpleNamespace

    from helpers import tiny_causal_lm

    from qwenlong.config import RLConfig
    from qwenlong.curriculum import Phase
    from qwenlong.trainers import GRPOTrainer
    from qwenlong.trainers.grpo import PromptExample

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    examples = [PromptExample(f"ex{i}", [i + 1, i + 2, i + 3], "a", ["x"]) for i in range(6)]
    alternating = SimpleNamespace(score=lambda items: [SimpleNamespace(score=float(i % 2 == 0))
                                                       for i in range(len(items))])

    after = []

    def run(steps: int, resume: bool) -> list[bool]:
        cfg = RLConfig(group_size=4, gen_prompts_per_step=2, train_prompts_per_step=2, mini_batch_size=2, lr=1e-2,
                       phases=[Phase("p", 64, 3, steps=steps)])
        model = tiny_causal_lm(seed=3, vocab_size=37, max_positions=32, attention="qwenlong")
        engine = _EngineWithItsOwnWeights(model, vocab=37)
        GRPOTrainer(model, engine, alternating, cfg, decode=str, output_dir=tmp_path,
                    save_every_steps=1).train_phase(cfg.phases[0], examples, resume=resume, after_step=after.append)
        return engine.in_sync

    assert run(2, resume=False) == [True, True]
    assert run(3, resume=True) == [True]  # the one step left, generated with the step-2 weights
    # what follows a step (an in-phase evaluation) runs for the step the phase resumed from too: a run killed
    # between step 2's checkpoint and its evaluation evaluates it on resume (the pipeline skips recorded ones)
    assert after == [1, 2, 2, 3]
