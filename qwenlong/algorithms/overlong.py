"""DAPO's soft overlong punishment.

Responses that run into the last ``buffer`` tokens before the response limit L are penalised
linearly, from 0 at length L - buffer to -1 (times ``penalty_factor``) at length L:

    penalty(len) = -penalty_factor * clamp((len - (L - buffer)) / buffer, 0, 1)

The penalty is added to the task reward; it teaches the policy to finish before truncation
instead of punishing every long answer equally hard.
"""

from __future__ import annotations

import torch


def overlong_penalty(
    response_lengths: torch.Tensor, max_response_tokens: int, buffer: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """Penalty (<= 0) for each response length; float32 tensor of the same shape.

    Args:
        response_lengths: integer tensor of response lengths in tokens.
        max_response_tokens: the response limit L.
        buffer: width of the penalty ramp in tokens (0 disables the penalty).
        penalty_factor: penalty at (or beyond) the limit is ``-penalty_factor``.
    """
    if not 0 <= buffer <= max_response_tokens:
        raise ValueError(f"buffer: expected 0 <= buffer <= max_response_tokens={max_response_tokens}, got {buffer}")
    lengths = response_lengths.to(torch.float32)
    if buffer == 0:
        return torch.zeros_like(lengths)
    excess = (lengths - (max_response_tokens - buffer)) / buffer
    return -penalty_factor * excess.clamp(0.0, 1.0)
