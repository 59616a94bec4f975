"""The judge interface: batched async verdicts with a concurrency bound, a cache, counters, a
deadline and a circuit breaker.

A backend implements :meth:`Judge._ask` (one chat -> reply text, raising :class:`JudgeError`
on failure). Everything else lives here: identical (question, gold, prediction) requests in a
batch are asked once, answers are cached (LRU), at most ``max_concurrency`` requests are in
flight, and a failed request yields ``None`` (the caller falls back to the rule score) and is
counted in :attr:`Judge.stats` by reason. Failures never raise: training continues.

Bounded time: one :meth:`Judge.verdicts` call ends within ``deadline_s`` (requests still waiting
or running then fail with reason ``deadline``), and after ``breaker_failures`` failed requests in
a row the circuit opens: for ``breaker_cooldown_s`` requests fail at once (``circuit_open``)
without reaching the judge, then one probe request decides whether it closes again. A reply
without a verdict is the judge's answer, not an outage: it does not count towards the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.rewards.judge.prompt import judge_messages, parse_verdict, quote


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

    def __init__(self, *, max_concurrency: int = 8, cache_size: int = 65536, deadline_s: float | None = 600.0,
                 breaker_failures: int = 8, breaker_cooldown_s: float = 30.0, max_answer_chars: int = 2000,
                 max_question_chars: int = 16000):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s: must be > 0 or None, got {deadline_s}")
        if breaker_failures < 1 or not breaker_cooldown_s >= 0:
            raise ValueError(f"breaker_failures must be >= 1 and breaker_cooldown_s >= 0, got {breaker_failures} "
                             f"and {breaker_cooldown_s}")
        if max_answer_chars < 1 or max_question_chars < 1:
            raise ValueError(f"max_answer_chars and max_question_chars: must be >= 1, got {max_answer_chars}, "
                             f"{max_question_chars}")
        self.max_concurrency = max_concurrency
        self.cache_size = cache_size
        self.deadline_s = deadline_s
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.max_answer_chars = max_answer_chars
        self.max_question_chars = max_question_chars
        self._cache: OrderedDict[JudgeRequest, bool] = OrderedDict()
        self._lock = threading.Lock()  # the cache, stats and breaker are shared by every event loop
        self.stats: Counter[str] = Counter()
        self._failures_in_a_row = 0
        self._open_until = 0.0  # monotonic time until which the circuit is open
        self._probing = False

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

    def _fail(self, reason: str) -> None:
        self._count("failures", f"failures/{reason}")

    def snapshot(self) -> dict[str, int]:
        """The counters, copied consistently."""
        with self._lock:
            return dict(self.stats)

    # ---------------------------------------------------------------- circuit breaker

    def _admit(self) -> bool:
        """May a request go to the judge now? (closed circuit, or the one probe of a half-open one)"""
        with self._lock:
            if self._failures_in_a_row < self.breaker_failures:
                return True
            if time.monotonic() < self._open_until or self._probing:
                return False
            self._probing = True
            return True

    def _outcome(self, ok: bool) -> None:
        with self._lock:
            self._probing = False
            if ok:
                self._failures_in_a_row = 0
                return
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.breaker_failures:
                self._open_until = time.monotonic() + self.breaker_cooldown_s

    @property
    def circuit_open(self) -> bool:
        with self._lock:
            return self._failures_in_a_row >= self.breaker_failures and time.monotonic() < self._open_until

    # ---------------------------------------------------------------- verdicts

    async def _verdict(self, session: Any, semaphore: asyncio.Semaphore, request: JudgeRequest) -> bool | None:
        if len(request.prediction) > self.max_answer_chars or len(request.question) > self.max_question_chars:
            self._fail("too_long")  # never sent: a policy's ramble, or a "question" that holds a whole document
            return None
        async with semaphore:
            if not self._admit():
                self._fail("circuit_open")
                return None
            self._count("calls")
            messages = judge_messages(request.question, request.gold, request.prediction)
            try:
                reply = await self._ask(session, messages)
            except JudgeError as e:
                self._outcome(False)
                self._fail(e.reason)
                return None
            except asyncio.CancelledError:  # the deadline: neither a success nor the judge's fault
                with self._lock:
                    self._probing = False
                raise
            self._outcome(True)
        verdict = parse_verdict(reply, quoted=(quote(request.prediction), request.prediction.strip()))
        if verdict is None:
            self._fail("unparseable")
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
                tasks = [asyncio.ensure_future(self._verdict(session, semaphore, r)) for r in todo]
                done, pending = await asyncio.wait(tasks, timeout=self.deadline_s)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            for request, task in zip(todo, tasks, strict=True):
                if task in pending:
                    self._fail("deadline")
                    results[request] = None
                else:
                    results[request] = task.result()
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
