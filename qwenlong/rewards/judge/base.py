"""The judge interface: batched async verdicts with a concurrency bound, a cache and counters.

A backend implements :meth:`Judge._ask` (one chat -> reply text, raising :class:`JudgeError`
on failure). Everything else lives here: identical (question, gold, prediction) requests in a
batch are asked once, answers are cached (LRU), at most ``max_concurrency`` requests are in
flight, and a failed request yields ``None`` (the caller falls back to the rule score) and is
counted in :attr:`Judge.stats` by reason. Failures never raise: training continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.rewards.judge.prompt import judge_messages, parse_verdict


class JudgeError(Exception):
    """A judge request failed; ``reason`` is a short label counted in the stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    gold: str
    prediction: str


class Judge:
    """Base class of judge backends (see the module docstring)."""

    def __init__(self, *, max_concurrency: int = 8, cache_size: int = 65536):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.cache_size = cache_size
        self._cache: OrderedDict[JudgeRequest, bool] = OrderedDict()
        self._lock = threading.Lock()  # the cache and stats are shared by every event loop
        self.stats: Counter[str] = Counter()

    async def _ask(self, session: Any, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        """Per-batch resources (e.g. an HTTP connection pool) passed to ``_ask``."""
        yield None

    def _cached(self, request: JudgeRequest) -> bool | None:
        with self._lock:
            verdict = self._cache.get(request)
            if verdict is not None:
                self._cache.move_to_end(request)
            return verdict

    def _store(self, request: JudgeRequest, verdict: bool) -> None:
        with self._lock:
            self._cache[request] = verdict
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _count(self, *keys: str) -> None:
        with self._lock:
            self.stats.update(keys)

    async def _verdict(self, session: Any, semaphore: asyncio.Semaphore, request: JudgeRequest) -> bool | None:
        async with semaphore:
            self._count("calls")
            try:
                reply = await self._ask(session, judge_messages(request.question, request.gold, request.prediction))
            except JudgeError as e:
                self._count("failures", f"failures/{e.reason}")
                return None
        verdict = parse_verdict(reply)
        if verdict is None:
            self._count("failures", "failures/unparseable")
            return None
        self._count("yes" if verdict else "no")
        self._store(request, verdict)
        return verdict

    async def verdicts(self, requests: Sequence[JudgeRequest]) -> list[bool | None]:
        """One verdict per request: True (same answer), False, or None (the judge failed)."""
        self._count(*["requests"] * len(requests))
        results: dict[JudgeRequest, bool | None] = {}
        for request in requests:
            if request not in results and (cached := self._cached(request)) is not None:
                results[request] = cached
        self._count(*["cache_hits"] * sum(r in results for r in requests))
        todo = list(dict.fromkeys(r for r in requests if r not in results))
        if todo:
            semaphore = asyncio.Semaphore(self.max_concurrency)
            async with self._session() as session:
                answers = await asyncio.gather(*(self._verdict(session, semaphore, r) for r in todo))
            results.update(zip(todo, answers, strict=True))
        return [results[r] for r in requests]

    def verdicts_sync(self, requests: Sequence[JudgeRequest]) -> list[bool | None]:
        """:meth:`verdicts` from synchronous code (also inside a running event loop)."""
        return run_sync(self.verdicts(requests))


def run_sync(coroutine: Any) -> Any:
    """Run a coroutine to completion from sync code, in a worker thread if a loop is running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: list[Any] = []

    def target():
        try:
            box.append((True, asyncio.run(coroutine)))
        except BaseException as e:  # re-raised in the caller's thread
            box.append((False, e))

    thread = threading.Thread(target=target, name="qwenlong-judge")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
