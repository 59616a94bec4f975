"""Reward functions with the signatures users already know.

* verl: ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float``
  (point verl's ``custom_reward_function.path`` at this module, ``name`` at ``compute_score``).
* TRL: ``trl_reward(prompts, completions, **columns) -> list[float]``, the dataset's
  ``data_source`` and ``answer`` (or ``ground_truth``) columns passed through by GRPOTrainer.

Both use the process-wide default :class:`HybridReward`: rules alone, plus the judge of
QWENLONG_JUDGE_URL / _MODEL / _API_KEY (/ _TIMEOUT / _RETRIES) when set; :func:`set_default_reward`
replaces it. The judge's question comes from the row (``qwenlong.data.extract_question`` for a prompt).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from qwenlong.data.prompt import extract_question as question_from_prompt
from qwenlong.rewards.hybrid import HybridReward, RewardItem

_default: HybridReward | None = None
_default_lock = threading.Lock()


def default_reward() -> HybridReward:
    global _default
    with _default_lock:
        if _default is None:
            from qwenlong.rewards.judge import make_judge

            _default = HybridReward(judge=make_judge(None))
        return _default


def set_default_reward(reward: HybridReward | None) -> None:
    """Use ``reward`` in the adapters (None: rebuild from the environment on next use)."""
    global _default
    with _default_lock:
        _default = reward


def _text(value: Any) -> str:
    """A prompt or completion given as text or as chat messages (the last message's content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[-1], Mapping):
        return str(value[-1].get("content", ""))
    raise ValueError(f"expected text or a list of chat messages, got {type(value).__name__}")


def _question(extra_info: Mapping[str, Any] | None) -> str:
    if not extra_info:
        return ""
    if not isinstance(extra_info, Mapping):
        raise ValueError(f"extra_info: expected a mapping, got {type(extra_info).__name__}")
    if str(extra_info.get("question") or "").strip():
        return str(extra_info["question"]).strip()
    if extra_info.get("prompt"):
        return question_from_prompt(_text(extra_info["prompt"]))
    return ""


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: Mapping[str, Any] | None = None) -> float:
    """verl's reward signature: a float in [0, 1].

    ``ground_truth`` is a bare answer, "Therefore, the answer is X." or a list of answers;
    the judge sees ``extra_info["question"]`` (or the question inside ``extra_info["prompt"]``).
    With a judge configured, a row without a question is a ValueError naming the row.
    """
    reward = default_reward()
    question = _question(extra_info)
    if reward.judge is not None and not question:
        row = (extra_info or {}).get("index", "?") if isinstance(extra_info, Mapping) else "?"
        raise ValueError(f"extra_info: row {row} (data_source {data_source!r}, ground truth "
                         f"{str(ground_truth)[:80]!r}) has no question: the judge needs extra_info['question'] "
                         "or a prompt with the question between </text> and 'Format your response'")
    item = RewardItem(data_source, solution_str, ground_truth, question)
    return reward.score([item])[0].score


def trl_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """TRL's reward signature; needs the ``data_source`` and ``answer`` (or ``ground_truth``) columns."""
    answers = columns.get("answer", columns.get("ground_truth"))
    if answers is None:
        raise ValueError("answer: TRL reward needs an 'answer' or 'ground_truth' dataset column")
    sources = columns.get("data_source")
    if sources is None:
        raise ValueError("data_source: TRL reward needs a 'data_source' dataset column")
    if not len(prompts) == len(completions) == len(answers) == len(sources):
        raise ValueError(f"completions: lengths differ (prompts {len(prompts)}, completions {len(completions)}, "
                         f"answer {len(answers)}, data_source {len(sources)})")
    items = [RewardItem(source, _text(completion), answer, question_from_prompt(_text(prompt)))
             for prompt, completion, answer, source in zip(prompts, completions, answers, sources, strict=True)]
    return [r.score for r in default_reward().score(items)]
