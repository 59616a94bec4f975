"""Difficulty-balanced training data (QwenLong-L1.5's task-balanced sampling, before training):
pre-infer the base model, bin each source's items by pass@k, draw equally from every bin.
``qwenlong data-bins`` (``command``) runs it; the functions here are its parts."""

from qwenlong.curriculum.difficulty.bins import (
    DEFAULT_BINS,
    BinDraw,
    Selection,
    bin_index,
    bin_label,
    draw_counts,
    pass_at_k,
    select_balanced,
    selected_in_order,
)
from qwenlong.curriculum.difficulty.scores import ItemScore, check_unique, pending_records, pre_infer, read_scores

__all__ = ["DEFAULT_BINS", "BinDraw", "ItemScore", "Selection", "bin_index", "bin_label", "check_unique",
           "draw_counts", "pass_at_k", "pending_records", "pre_infer", "read_scores", "select_balanced",
           "selected_in_order"]
