"""Score rollouts while they are still being generated.

The engine reports each prompt's group as soon as it is complete (``on_complete``); the group
is decoded at once and queued, and one background thread scores everything queued in a single
``reward.score`` call, again and again until generation ends. A slow LLM judge thus runs while
the engine generates the next groups, and each call asks it about as many answers as have
piled up, up to ``judge_concurrency`` requests in flight (one call per group would cap that at
the group size). With one worker, the reward and its judge's cache and counters are only ever
used by one thread at a time. Scores do not depend on how the groups were batched.

The reward's counters (responses whose scoring failed, judge calls, judge failures by reason,
fallbacks to the rule score; see ``qwenlong.rewards.stats``) are returned with the timings, as
this call's share, so the trainer logs them per step in ``metrics.jsonl``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qwenlong.rewards import HybridReward, RewardItem, counter_delta
from qwenlong.rollout import Completion, RolloutEngine, SamplingParams


class _BatchingScorer:
    """Scores the groups handed to ``add`` in a background thread, all queued groups in one call."""

    def __init__(self, reward: HybridReward):
        self.reward = reward
        self.reported: set[int] = set()
        self.queued: list[tuple[int, list[RewardItem]]] = []
        self.scores: dict[int, list[float]] = {}
        self.seconds = 0.0  # scoring time, overlapped or not
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenlong-score")
        self.runs: list[Future] = []

    def add(self, index: int, items: list[RewardItem]) -> None:
        with self.lock:
            if index in self.reported:
                raise RuntimeError(f"on_complete: prompt {index} was reported twice")
            self.reported.add(index)
            self.queued.append((index, items))
            if len(self.queued) == 1:  # no run pending yet takes it
                self.runs.append(self.worker.submit(self._score_queued))

    def _score_queued(self) -> None:
        with self.lock:
            batch, self.queued = self.queued, []
        if not batch:
            return
        start = time.perf_counter()
        results = self.reward.score([item for _, items in batch for item in items])
        self.seconds += time.perf_counter() - start
        flat = iter(result.score for result in results)
        with self.lock:
            for index, items in batch:
                self.scores[index] = [next(flat) for _ in items]

    def finish(self) -> dict[int, list[float]]:
        """Wait for the queued groups' scores (re-raising a scoring error); returns them by prompt index."""
        for run in self.runs:
            run.result()
        self.worker.shutdown()
        return self.scores

    def cancel(self) -> None:
        self.worker.shutdown(cancel_futures=True)


def generate_and_score(engine: RolloutEngine, reward: HybridReward, decode: Callable[[list[int]], str],
                       prompts: Sequence[Any], params: SamplingParams,
                       ) -> tuple[list[list[Completion]], list[float], dict[str, float]]:
    """Generate ``params.n`` responses per prompt (objects with ``prompt_ids``, ``data_source``,
    ``ground_truth`` and ``question``) and score them with ``reward``, overlapped.

    Returns the completions per prompt, their scores flat in prompt order, and metrics to sum over a step:
    timings in seconds, ``time_generate`` (the engine's wall time), ``time_score`` (time spent scoring,
    hidden or not) and ``time_score_wait`` (scoring still running once generation ended: what the overlap
    did not hide), and the reward's counters that this call moved (``score/...``, ``judge/...``).
    """
    counters = getattr(reward, "counters", None)
    before = counters() if counters is not None else {}
    scorer = _BatchingScorer(reward)

    def on_complete(index: int, group: list[Completion]) -> None:
        prompt = prompts[index]
        scorer.add(index, [RewardItem(prompt.data_source, decode(c.token_ids), prompt.ground_truth, prompt.question)
                           for c in group])

    start = time.perf_counter()
    try:
        completions = engine.generate([p.prompt_ids for p in prompts], params, on_complete=on_complete)
        generated = time.perf_counter()
        unreported = sorted(set(range(len(prompts))) - scorer.reported)
        if unreported:
            raise RuntimeError(f"{type(engine).__name__}.generate never reported prompts {unreported[:8]} "
                               "through on_complete")
    except BaseException:
        scorer.cancel()
        raise
    by_prompt = scorer.finish()
    scores = [score for index in range(len(prompts)) for score in by_prompt[index]]
    timings = {"time_generate": generated - start, "time_score": scorer.seconds,
               "time_score_wait": time.perf_counter() - generated}
    if counters is not None:
        timings.update(counter_delta(before, counters()))
    return completions, scores, timings
