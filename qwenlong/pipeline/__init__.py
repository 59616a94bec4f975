"""The QwenLong-L1 recipe end to end: warm-up SFT -> phased RL with retrospective
sampling -> evaluation, driven by one config (``qwenlong pipeline --config ...``)."""

from qwenlong.pipeline.run import run_pipeline, run_rl, run_sft

__all__ = ["run_pipeline", "run_rl", "run_sft"]
