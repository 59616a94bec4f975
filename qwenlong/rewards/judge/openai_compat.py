"""A judge behind any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, a hosted
API, or ``qwenlong serve-judge``), over httpx.

Temperature 0. Timeouts, connection errors, HTTP 408, 429 and 5xx are retried up to
``max_retries`` times with exponential backoff; other HTTP errors and malformed bodies fail
at once. ``timeout`` bounds each attempt as a whole (connect, send, every byte of the reply), not
each read: a server that drips one byte a second cannot hold a request longer than ``timeout``.
A reply body over ``max_response_bytes`` is refused. Configuration comes from arguments or the
environment: ``QWENLONG_JUDGE_URL`` (base URL ending in /v1), ``QWENLONG_JUDGE_MODEL``,
``QWENLONG_JUDGE_API_KEY``, ``QWENLONG_JUDGE_TIMEOUT`` (seconds per attempt) and
``QWENLONG_JUDGE_RETRIES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from qwenlong.rewards.judge.base import Judge, JudgeError

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _env_number(name: str, kind: type, minimum: float, strictly: bool) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {raw!r}") from None
    if not (value > minimum if strictly else value >= minimum) or value != value or value == float("inf"):
        raise ValueError(f"{name}: must be {'>' if strictly else '>='} {minimum} and finite, got {raw!r}")
    return value


class OpenAIJudge(Judge):
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_tokens: int = 1024,
                 max_response_bytes: int = 1 << 20, **judge_options: Any):
        super().__init__(**judge_options)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("model: must be non-empty")
        if not timeout > 0 or max_retries < 0 or not backoff >= 0:
            raise ValueError(f"timeout must be > 0, max_retries and backoff >= 0; got {timeout}, {max_retries}, "
                             f"{backoff}")
        if max_tokens < 1 or max_response_bytes < 1:
            raise ValueError(f"max_tokens and max_response_bytes: must be >= 1, got {max_tokens}, "
                             f"{max_response_bytes}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.max_response_bytes = max_response_bytes

    @classmethod
    def from_env(cls, **overrides: Any) -> OpenAIJudge | None:
        """The judge configured by QWENLONG_JUDGE_URL / _MODEL / _API_KEY / _TIMEOUT / _RETRIES, or None
        when QWENLONG_JUDGE_URL is unset."""
        url = os.environ.get("QWENLONG_JUDGE_URL")
        if not url:
            return None
        model = os.environ.get("QWENLONG_JUDGE_MODEL")
        if not model:
            raise ValueError("QWENLONG_JUDGE_MODEL: must be set when QWENLONG_JUDGE_URL is")
        options: dict[str, Any] = {"api_key": os.environ.get("QWENLONG_JUDGE_API_KEY") or None}
        timeout = _env_number("QWENLONG_JUDGE_TIMEOUT", float, 0, strictly=True)
        retries = _env_number("QWENLONG_JUDGE_RETRIES", int, 0, strictly=False)
        if timeout is not None:
            options["timeout"] = timeout
        if retries is not None:
            options["max_retries"] = retries
        return cls(url, model, **{**options, **overrides})

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[httpx.AsyncClient]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                     limits=limits) as client:
            yield client

    async def _post(self, session: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, bytes]:
        """Status and body of one attempt, the body read up to ``max_response_bytes``."""
        async with session.stream("POST", "/chat/completions", json=body) as response:
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > self.max_response_bytes:
                    raise JudgeError("response_too_large", f"over {self.max_response_bytes} bytes")
            return response.status_code, bytes(data)

    async def _ask(self, session: httpx.AsyncClient, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        reason = "unknown"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with asyncio.timeout(self.timeout):
                    status, data = await self._post(session, body)
            except (TimeoutError, httpx.TimeoutException):
                reason = "timeout"
                continue
            except httpx.TransportError:
                reason = "connection"
                continue
            if status in _RETRY_STATUS:
                reason = f"http_{status}"
                continue
            if status != 200:
                raise JudgeError(f"http_{status}", data[:200].decode("utf-8", "replace"))
            try:
                content = json.loads(data)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise JudgeError("malformed", str(e)[:200]) from None
            if not isinstance(content, str):
                raise JudgeError("malformed", "message content is not text")
            return content
        raise JudgeError(reason, f"after {self.max_retries + 1} attempts")
