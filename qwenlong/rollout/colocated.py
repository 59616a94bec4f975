"""Rollout engines that share the trainer's GPUs: one per tensor-parallel slice of ranks, asleep while
the policy trains.

``PlacedEngine``: every rank calls ``generate`` together (``synced``); the prompts the trainer hands
out (to SP rank 0 of each data-parallel group) are pooled and spread round-robin over the engines of
``qwenlong.plan.placement``, every rank of an engine's slice generates the same share (vLLM's
``external_launcher`` tensor parallelism: one worker per rank), and each rank gets back its own
prompts' groups. So an SP group of 8 ranks on TP-4 engines runs two engines, not one rank.

``SleepBetweenRollouts``: vLLM's sleep mode (level 1: weights to CPU, KV cache dropped) after each
``generate``; new weights are loaded into the woken weights only, and the KV cache comes back just
before the next ``generate``. Each wake-up first empties PyTorch's cache of the memory the trainer freed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from qwenlong.plan.placement import RolloutPlacement
from qwenlong.rollout.engine import Completion, OnComplete, RolloutEngine, SamplingParams, report_all

log = logging.getLogger(__name__)


class PlacedEngine(RolloutEngine):
    """``engine`` (this rank's member of its slice) driven collectively: see the module docstring.

    ``gather(obj)`` returns every rank's ``obj`` in rank order (``DistributedContext.gather``).
    """

    synced = True

    def __init__(self, engine: RolloutEngine, placement: RolloutPlacement, rank: int,
                 gather: Callable[[Any], list[Any]]) -> None:
        self.engine, self.placement, self.rank, self.gather = engine, placement, rank, gather
        self.engine_index = placement.engine_of(rank)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_complete: OnComplete | None = None) -> list[list[Completion]]:
        pooled = [(rank, i, list(prompt)) for rank, share in enumerate(self.gather([list(p) for p in prompts]))
                  for i, prompt in enumerate(share)]
        mine = self.placement.share(pooled, self.engine_index)
        if params.seed is not None:
            # an engine seeds its requests from the seed by position (VLLMEngine: prompt i's sample j takes
            # seed + i * n + j), so identical prompts dealt to two engines (a memory-agent group) would sample
            # alike at the same position: each engine starts past the seeds of the engines before it
            params = replace(params, seed=params.seed + self.engine_index * len(pooled) * params.n)
        groups = self.engine.generate([prompt for _, _, prompt in mine], params) if mine else []
        leader = self.placement.is_leader(self.rank)
        results = self.gather([((rank, i), group) for (rank, i, _), group in zip(mine, groups, strict=True)]
                              if leader else [])
        own = {i: group for share in results for (rank, i), group in share if rank == self.rank}
        return report_all([own[i] for i in range(len(prompts))], on_complete)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.update_weights(named_tensors)


class SleepBetweenRollouts(RolloutEngine):
    """Puts ``engine`` (with ``sleep(level)`` and ``wake_up(tags)``, e.g. ``VLLMEngine(sleep_mode=True)``)
    to sleep after each ``generate``; see the module docstring."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.synced = engine.synced
        self.asleep: set[str] = set()

    def _wake(self, *tags: str) -> None:
        tags = tuple(tag for tag in tags if tag in self.asleep)
        if tags:
            if torch.cuda.is_available():
                # the blocks the trainer freed stay reserved by PyTorch's caching allocator, out of reach of
                # vLLM's own allocations: without this, waking up runs out of GPU memory
                torch.cuda.empty_cache()
            self.engine.wake_up(tags=list(tags))
            self.asleep -= set(tags)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_complete: OnComplete | None = None) -> list[list[Completion]]:
        self._wake("weights", "kv_cache")
        try:
            return self.engine.generate(prompts, params, on_complete=on_complete)
        finally:
            self.engine.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake("weights")  # the KV cache stays released until the next rollout
        self.engine.update_weights(named_tensors)


_said_no_sleep = False


def sleep_between_phases(setting: bool | None, engine: str, cuda: bool) -> bool:
    """Whether the rollout engine sleeps while the policy trains: ``setting`` (``rollout.sleep_between_phases``),
    or by default for vLLM on CUDA. vLLM's sleep mode needs CUDA: without it, False, said once."""
    wanted = (engine == "vllm") if setting is None else setting
    if not wanted:
        return False
    if engine != "vllm":
        raise ValueError("rollout.sleep_between_phases: only the vllm engine sleeps (the hf engine is the policy)")
    if not cuda:
        global _said_no_sleep
        if not _said_no_sleep:
            log.warning("rollout.sleep_between_phases: vLLM's sleep mode needs CUDA; this CPU build keeps the "
                        "engine's weights and KV cache in memory while the policy trains")
            _said_no_sleep = True
        return False
    return True


def colocate(engine: RolloutEngine, placement: RolloutPlacement, rank: int, gather: Callable[[Any], list[Any]],
             sleep: bool) -> RolloutEngine:
    """``engine`` wrapped to sleep between rollouts (``sleep``) and, with several ranks, driven by the placement."""
    if sleep:
        engine = SleepBetweenRollouts(engine)
    if placement.world_size > 1:
        engine = PlacedEngine(engine, placement, rank, gather)
    return engine
