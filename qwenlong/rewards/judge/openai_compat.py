"""A judge behind any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, a hosted
API, or ``qwenlong serve-judge``), over httpx.

Temperature 0. Timeouts, connection errors, HTTP 429 and 5xx are retried up to
``max_retries`` times with exponential backoff; other HTTP errors and malformed bodies fail
at once. Configuration comes from arguments or the environment:
``QWENLONG_JUDGE_URL`` (base URL ending in /v1), ``QWENLONG_JUDGE_MODEL``, ``QWENLONG_JUDGE_API_KEY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from qwenlong.rewards.judge.base import Judge, JudgeError

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class OpenAIJudge(Judge):
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_tokens: int = 1024,
                 max_concurrency: int = 8, cache_size: int = 65536):
        super().__init__(max_concurrency=max_concurrency, cache_size=cache_size)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("model: must be non-empty")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError("timeout must be > 0, max_retries and backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_tokens = max_tokens

    @classmethod
    def from_env(cls, **overrides: Any) -> OpenAIJudge | None:
        """The judge configured by QWENLONG_JUDGE_URL / _MODEL / _API_KEY, or None when unset."""
        url = os.environ.get("QWENLONG_JUDGE_URL")
        if not url:
            return None
        model = os.environ.get("QWENLONG_JUDGE_MODEL")
        if not model:
            raise ValueError("QWENLONG_JUDGE_MODEL: must be set when QWENLONG_JUDGE_URL is")
        return cls(url, model, api_key=os.environ.get("QWENLONG_JUDGE_API_KEY"), **overrides)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[httpx.AsyncClient]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                     limits=limits) as client:
            yield client

    async def _ask(self, session: httpx.AsyncClient, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        reason = "unknown"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = await session.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                reason = "timeout"
                continue
            except httpx.TransportError:
                reason = "connection"
                continue
            if response.status_code in _RETRY_STATUS:
                reason = f"http_{response.status_code}"
                continue
            if response.status_code != 200:
                raise JudgeError(f"http_{response.status_code}", response.text[:200])
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise JudgeError("malformed", str(e)) from e
            if not isinstance(content, str):
                raise JudgeError("malformed", "message content is not text")
            return content
        raise JudgeError(reason, f"after {self.max_retries + 1} attempts")
