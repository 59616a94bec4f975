"""Model merging (QwenLong-L1.5 merges its memory-agent expert into the full-context policy with SCE)."""

from qwenlong.merge.inplace import merge_into_model
from qwenlong.merge.sce import sce_merge_tensor, sce_select_mask, sce_weights
from qwenlong.merge.streaming import merge_checkpoints, sce_merge_checkpoints

METHODS = ("sce",)

__all__ = ["METHODS", "merge_checkpoints", "merge_into_model", "sce_merge_checkpoints", "sce_merge_tensor",
           "sce_select_mask", "sce_weights"]
