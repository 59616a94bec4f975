"""Rollouts scored while they are generated: right scores in prompt order, real overlap, clear failures."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import pytest

from qwenlong.rewards import HybridReward
from qwenlong.rollout.engine import Completion, RolloutEngine, SamplingParams, report_all
from qwenlong.trainers.scoring import generate_and_score


@dataclass
class Prompt:
    prompt_ids: list[int]
    ground_truth: str
    data_source: str = "hotpotqa"
    question: str = "q"


def decode(ids: list[int]) -> str:
    return f"</think> The answer is {ids[0]}."


class BatchedEngine(RolloutEngine):
    """Completes prompts in batches of ``batch`` and reports each batch's groups; before batch k > 0 it can
    wait until scoring of batch k-1 has started, which only happens if scoring overlaps generation."""

    def __init__(self, batch: int, scoring_started: threading.Event | None = None, report: bool = True):
        self.batch, self.scoring_started, self.report = batch, scoring_started, report

    def generate(self, prompts, params, on_complete=None):
        groups = []
        for start in range(0, len(prompts), self.batch):
            if start and self.scoring_started is not None:
                assert self.scoring_started.wait(timeout=30), "nothing was scored while generating"
            for i in range(start, min(start + self.batch, len(prompts))):
                rng = random.Random(f"{prompts[i]}:{params.seed}")
                groups.append([Completion([rng.randrange(4)], [-0.5], "stop") for _ in range(params.n)])
                if on_complete is not None and self.report:
                    on_complete(i, groups[i])
        return groups

    def update_weights(self, named_tensors):
        raise AssertionError("not used")


class RecordingReward(HybridReward):
    def __init__(self, started: threading.Event | None = None):
        super().__init__()
        self.started, self.threads = started, set()

    def score(self, items):
        self.threads.add(threading.current_thread().name)
        if self.started is not None:
            self.started.set()
        return super().score(items)


def test_scores_follow_prompt_order_and_match_scoring_afterwards():
    prompts = [Prompt([i, i + 1], str(i % 4)) for i in range(7)]
    params = SamplingParams(max_new_tokens=4, n=3, seed=5)
    engine = BatchedEngine(batch=2)
    completions, scores, timings = generate_and_score(engine, HybridReward(), decode, prompts, params)
    assert completions == engine.generate([p.prompt_ids for p in prompts], params)
    expected = [HybridReward().score_one("hotpotqa", decode(c.token_ids), p.ground_truth).score
                for p, group in zip(prompts, completions, strict=True) for c in group]
    assert scores == expected and 0 < sum(scores) < len(scores)
    times = {key: value for key, value in timings.items() if key.startswith("time_")}
    assert set(times) == {"time_generate", "time_score", "time_score_wait"}
    assert all(seconds >= 0 for seconds in times.values())
    assert timings["score/items"] == len(scores) and timings["judge/calls"] == 0  # this call's counters


def test_scoring_runs_in_the_background_while_the_engine_generates():
    started = threading.Event()
    reward = RecordingReward(started)
    prompts = [Prompt([i], "1") for i in range(6)]
    generate_and_score(BatchedEngine(batch=2, scoring_started=started), reward, decode, prompts,
                       SamplingParams(max_new_tokens=2, n=2, seed=0))
    assert reward.threads and all(name.startswith("qwenlong-score") for name in reward.threads)


def test_an_engine_that_never_reports_a_prompt_is_an_error():
    with pytest.raises(RuntimeError, match=r"never reported prompts \[0, 1, 2\]"):
        generate_and_score(BatchedEngine(batch=2, report=False), HybridReward(), decode,
                           [Prompt([i], "1") for i in range(3)], SamplingParams(max_new_tokens=2, seed=0))


def test_a_scoring_error_reaches_the_caller():
    class Broken(HybridReward):
        def score(self, items):
            raise ValueError("judge exploded")

    with pytest.raises(ValueError, match="judge exploded"):
        generate_and_score(BatchedEngine(batch=2), Broken(), decode, [Prompt([i], "1") for i in range(3)],
                           SamplingParams(max_new_tokens=2, seed=0))


def test_report_all_reports_every_group_in_order():
    seen = []
    groups = [[Completion([1], [-1.0], "stop")], [Completion([2], [-1.0], "length")]]
    assert report_all(groups, lambda i, g: seen.append((i, g))) is groups
    assert seen == list(enumerate(groups))


def test_groups_that_pile_up_are_scored_in_one_call():
    """While the scorer is busy, newly completed groups queue up and the next call takes them all, so a
    judge sees many answers per call (its concurrency applies within a call), not one group's worth."""
    started, release = threading.Event(), threading.Event()

    class Gated(HybridReward):
        def __init__(self):
            super().__init__()
            self.calls = []

        def score(self, items):
            self.calls.append(len(items))
            started.set()
            assert release.wait(timeout=30)
            return super().score(items)

    class FirstThenRest(BatchedEngine):  # the first group, then (once it is being scored) the other four
        def generate(self, prompts, params, on_complete=None):
            groups = super().generate(prompts, params)
            on_complete(0, groups[0])
            assert started.wait(timeout=30)
            for index in range(1, len(groups)):
                on_complete(index, groups[index])
            release.set()
            return groups

    reward = Gated()
    prompts = [Prompt([i], "1") for i in range(5)]
    _, scores, _ = generate_and_score(FirstThenRest(batch=5), reward, decode, prompts, SamplingParams(2, n=2, seed=0))
    assert reward.calls == [2, 8] and len(scores) == 10


def test_a_prompt_reported_twice_is_an_error():
    class Twice(BatchedEngine):
        def generate(self, prompts, params, on_complete=None):
            groups = super().generate(prompts, params, on_complete)
            on_complete(0, groups[0])
            return groups

    with pytest.raises(RuntimeError, match="prompt 0 was reported twice"):
        generate_and_score(Twice(batch=2), HybridReward(), decode, [Prompt([i], "1") for i in range(2)],
                           SamplingParams(max_new_tokens=2, seed=0))


def test_a_failing_judge_is_counted_per_call_and_summarised_in_the_report():
    from types import SimpleNamespace

    from qwenlong.pipeline.report import _scoring_lines, scoring_counts
    from qwenlong.rewards.judge import Judge, JudgeError

    class DownJudge(Judge):
        async def _ask(self, session, messages):
            raise JudgeError("timeout")

    reward = HybridReward(DownJudge())
    prompts = [Prompt([i], "3") for i in range(4)]

    def hostile(ids):
        return "</think> The answer is " + ("9" * 5000 if ids[0] == 0 else str(ids[0]))

    rows = []
    for step in range(2):
        _, scores, metrics = generate_and_score(BatchedEngine(batch=2), reward, hostile, prompts,
                                                SamplingParams(max_new_tokens=2, n=2, seed=step))
        rows.append({"step": step, **metrics})
    assert [row["score/items"] for row in rows] == [8, 8]  # each call's share, not running totals
    for row in rows:
        assert row["judge/calls"] == row["judge/failures"] == row["judge/failures/timeout"] > 0
        assert row["judge/fallbacks"] >= row["judge/calls"]  # identical answers are asked once, each falls back
        assert row["score/rejected/too_long"] > 0  # the 5,000 digits: never judged
    counts = scoring_counts(rows + [rows[-1]])  # a step logged again after a resume counts once
    assert counts["judge/failures/timeout"] == sum(row["judge/failures"] for row in rows)
    run = SimpleNamespace(cfg=SimpleNamespace(rl=SimpleNamespace(phases=[SimpleNamespace(name="short-docs")])),
                          logger=SimpleNamespace(records=lambda stage: rows if stage == "rl/short-docs" else []))
    table = "\n".join(_scoring_lines(run))
    assert "## Judge failures" in table
    assert f"| judge failures by reason | timeout: {counts['judge/failures/timeout']} |" in table
    assert f"| fallbacks to the rule score | {counts['judge/fallbacks']} |" in table
