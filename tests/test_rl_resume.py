"""An RL phase killed with SIGKILL mid-phase and resumed with --resume ends with the weights of an
uninterrupted run (rollouts, rewards, reward history, optimizer and schedule all continue exactly):
in one process, and under ZeRO-3 on two."""

from __future__ import annotations

import sys

import pytest
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
