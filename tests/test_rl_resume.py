"""An RL phase killed with SIGKILL mid-phase and resumed with --resume ends with the weights of an
uninterrupted run (rollouts, rewards, reward history, optimizer and schedule all continue exactly):
in one process, and under ZeRO-3 on two."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_pipeline import SMALL, TINY, _env, kill_once_written

pytest.importorskip("transformers")

ARGS = [*SMALL, "rl.phases.0.steps=4", "output.save_every_steps=1", "eval.enabled=false"]
FINAL = ("checkpoints", "rl-long-docs-step000001", "model.pt")


def _rl(out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qwenlong", "rl", "--config", TINY, *ARGS, *extra, f"output.dir={out}"]


@pytest.mark.slow
def test_rl_killed_mid_phase_and_resumed_matches_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    result = subprocess.run(_rl(straight), capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # output.keep_checkpoints (default 2): the newest two of each phase's series stay
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "rl-long-docs-step000001", "rl-short-docs-step000003", "rl-short-docs-step000004"]

    killed = tmp_path / "killed"
    kill_once_written(_rl(killed), killed / "checkpoints" / "rl-short-docs-step000002" / "state.json")
    assert not (killed / "checkpoints" / "rl-short-docs-step000004").exists(), "killed too late: not mid-phase"

    result = subprocess.run(_rl(killed, "--resume"), capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    a = torch.load(straight.joinpath(*FINAL), weights_only=True)
    b = torch.load(killed.joinpath(*FINAL), weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


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
    final = ("checkpoints", "rl-long-docs-step000003", "model.pt")

    def rl(out, *extra):
        return [*launcher, "-m", "qwenlong", "rl", "--config", TINY, *args, *extra, f"output.dir={out}"]

    straight = tmp_path / "straight"
    result = subprocess.run(rl(straight), capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    killed = tmp_path / "killed"
    kill_once_written(rl(killed), killed / "checkpoints" / "rl-long-docs-step000001" / "state.json")
    assert not (killed / "checkpoints" / "rl-long-docs-step000003").exists(), "killed too late: not mid-phase"

    result = subprocess.run(rl(killed, "--resume"), capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    a = torch.load(straight.joinpath(*final), weights_only=True)
    b = torch.load(killed.joinpath(*final), weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
