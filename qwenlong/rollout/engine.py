"""The interface between the RL trainer and whatever generates responses.

An engine turns tokenised prompts into sampled responses with the log-prob of every sampled
token, and accepts new policy weights after each update. Log-probs follow the trainer's
definition, ``log_softmax(logits / temperature)`` at the sampled token (no top-p
renormalisation), so they can be compared with the trainer's own recomputation
(``logprob_mismatch``) and, when they match, stand in for the old-policy log-probs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from qwenlong.algorithms import kl_estimate


@dataclass
class SamplingParams:
    """How to sample. ``n`` responses per prompt form one GRPO group."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy decoding, log-probs of the untempered distribution
    top_p: float = 1.0
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)  # stop after any of these, besides EOS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature: expected >= 0 (0 decodes greedily), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n: expected >= 1, got {self.n}")


@dataclass
class Completion:
    """One sampled response.

    Attributes:
        token_ids: response tokens, ending with the EOS/stop token when one was sampled.
        logprobs: ``log_softmax(logits / temperature)`` of each token in ``token_ids``.
        finish_reason: ``"stop"`` (EOS or a stop token) or ``"length"`` (hit ``max_new_tokens``).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


OnComplete = Callable[[int, list[Completion]], None]


def report_all(groups: list[list[Completion]], on_complete: OnComplete | None) -> list[list[Completion]]:
    """``on_complete`` for every group, in prompt order, for an engine that finishes all prompts at once;
    returns ``groups``."""
    if on_complete is not None:
        for index, group in enumerate(groups):
            on_complete(index, group)
    return groups


class RolloutEngine(ABC):
    """Generates responses for the trainer; implemented by HF ``generate`` and vLLM."""

    # True when every rank must call ``generate`` together, even with no prompts of its own
    # (generation on ZeRO-3-partitioned weights gathers each layer from all ranks)
    synced: bool = False

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 on_complete: OnComplete | None = None) -> list[list[Completion]]:
        """Sample ``params.n`` responses for each prompt (token ids, no padding).

        Returns one list of ``n`` completions per prompt, in prompt order. ``on_complete(i, group)``
        is called once per prompt, from the calling thread, as soon as prompt ``i``'s group is ready
        (an engine that finishes all prompts at once calls it for each at the end), so that scoring
        can overlap the rest of the generation.
        """

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights, given as (parameter name, tensor) pairs in the policy's naming.

        Pairs may come in several calls (e.g. one layer at a time) to bound peak memory.
        """


def logprob_mismatch(
    engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's for the same tokens.

    Both are per-token log-probs of the same sampled tokens (e.g. packed ``[total_tokens]``);
    ``mask`` selects the response tokens. Returns the mean and max absolute log-prob
    difference, the mean absolute probability difference and the k3 estimate of
    KL(engine || trainer). Large values mean the rollouts are off-policy for the trainer.
    """
    if engine_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(
            f"trainer_logprobs: shape {tuple(trainer_logprobs.shape)} differs from {tuple(engine_logprobs.shape)}"
        )
    engine, trainer = engine_logprobs.double().flatten(), trainer_logprobs.double().flatten()
    if mask is not None:
        if mask.shape != engine_logprobs.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} differs from {tuple(engine_logprobs.shape)}")
        keep = mask.flatten().bool()
        engine, trainer = engine[keep], trainer[keep]
    if engine.numel() == 0:
        return dict.fromkeys(("logprob_abs_diff_mean", "logprob_abs_diff_max", "prob_abs_diff_mean", "kl_k3"), 0.0)
    diff = (engine - trainer).abs()
    return {
        "logprob_abs_diff_mean": diff.mean().item(),
        "logprob_abs_diff_max": diff.max().item(),
        "prob_abs_diff_mean": (engine.exp() - trainer.exp()).abs().mean().item(),
        "kl_k3": kl_estimate(engine, trainer, "k3").mean().item(),
    }
