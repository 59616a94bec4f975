"""Score rollouts while they are still being generated.

The engine reports each prompt's group as soon as it is complete (``on_complete``); the group
is decoded at once and its reward computed in one background thread, so a slow LLM judge
(which batches its own requests, up to ``judge_concurrency`` in flight) runs while the engine
generates the next groups. With one worker, the reward and its judge's cache and counters are
only ever used by one thread at a time. Scores do not depend on the order or the overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qwenlong.rewards import HybridReward, RewardItem
from qwenlong.rollout import Completion, RolloutEngine, SamplingParams


def generate_and_score(engine: RolloutEngine, reward: HybridReward, decode: Callable[[list[int]], str],
                       prompts: Sequence[Any], params: SamplingParams,
                       ) -> tuple[list[list[Completion]], list[float], dict[str, float]]:
    """Generate ``params.n`` responses per prompt (objects with ``prompt_ids``, ``data_source``,
    ``ground_truth`` and ``question``) and score them with ``reward``, overlapped.

    Returns the completions per prompt, their scores flat in prompt order, and timings in seconds:
    ``time_generate`` (the engine's wall time), ``time_score`` (time spent scoring, hidden or not) and
    ``time_score_wait`` (scoring still running once generation ended: what the overlap did not hide).
    """
    scoring_seconds = 0.0

    def score(items: list[RewardItem]) -> list[float]:
        nonlocal scoring_seconds
        start = time.perf_counter()
        scores = [result.score for result in reward.score(items)]
        scoring_seconds += time.perf_counter() - start
        return scores

    futures: dict[int, Future] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenlong-score") as scorer:

        def on_complete(index: int, group: list[Completion]) -> None:
            prompt = prompts[index]
            items = [RewardItem(prompt.data_source, decode(c.token_ids), prompt.ground_truth, prompt.question)
                     for c in group]
            futures[index] = scorer.submit(score, items)

        start = time.perf_counter()
        try:
            completions = engine.generate([p.prompt_ids for p in prompts], params, on_complete=on_complete)
        except BaseException:
            scorer.shutdown(cancel_futures=True)
            raise
        generated = time.perf_counter()
        unreported = sorted(set(range(len(prompts))) - set(futures))
        if unreported:
            raise RuntimeError(f"{type(engine).__name__}.generate never reported prompts {unreported[:8]} "
                               "through on_complete")
        scores = [s for index in range(len(prompts)) for s in futures[index].result()]
    timings = {"time_generate": generated - start, "time_score": scoring_seconds,
               "time_score_wait": time.perf_counter() - generated}
    return completions, scores, timings
