"""Model-side integrations: Hugging Face causal LMs run on qwenlong kernels (sequence parallel, fused loss)."""

from __future__ import annotations

from .sequence_parallel import ATTENTION_NAME, SequenceParallelCausalLM, ulysses_attention_forward

__all__ = ["ATTENTION_NAME", "SequenceParallelCausalLM", "ulysses_attention_forward"]
