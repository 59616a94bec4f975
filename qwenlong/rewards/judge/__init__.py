"""LLM-as-a-judge: one interface (:class:`Judge`), backends for an OpenAI-compatible endpoint
and a local HF model, and a small OpenAI-compatible server (``qwenlong serve-judge``)."""

from __future__ import annotations

from typing import Any

from qwenlong.rewards.judge.base import Judge, JudgeError, JudgeRequest, run_sync
from qwenlong.rewards.judge.openai_compat import OpenAIJudge
from qwenlong.rewards.judge.prompt import SYSTEM_PROMPT, judge_messages, parse_verdict

__all__ = ["Judge", "JudgeError", "JudgeRequest", "OpenAIJudge", "SYSTEM_PROMPT", "judge_messages", "make_judge",
           "parse_verdict", "run_sync"]


def make_judge(config: dict[str, Any] | None) -> Judge | None:
    """A judge from a config dict: ``{"backend": "openai", "base_url", "model", "api_key", ...}``,
    ``{"backend": "local", "model": PATH, ...}`` or ``{"backend": "none"}``; the other keys are the
    backend's options (``timeout``, ``max_retries``, ``max_concurrency``, ``deadline_s``,
    ``breaker_failures``, ...). With no config, the environment decides (QWENLONG_JUDGE_URL set:
    OpenAI-compatible, see :meth:`OpenAIJudge.from_env`; else none). An evaluation judge is the same
    call with its own endpoint and model."""
    if config is None:
        return OpenAIJudge.from_env()
    options = dict(config)
    backend = options.pop("backend", "openai")
    if backend == "none":
        return None
    if backend == "openai":
        if not options.get("base_url") or not options.get("model"):
            raise ValueError("judge config: the openai backend needs base_url and model")
        return OpenAIJudge(options.pop("base_url"), options.pop("model"), **options)
    if backend == "local":
        if not options.get("model"):
            raise ValueError("judge config: the local backend needs model (a path)")
        from qwenlong.rewards.judge.local_hf import LocalHFJudge

        return LocalHFJudge.from_pretrained(options.pop("model"), **options)
    raise ValueError(f"judge config: backend must be 'openai', 'local' or 'none', got {backend!r}")
