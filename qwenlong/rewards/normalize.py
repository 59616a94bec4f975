"""SQuAD-style answer normalization and sub-exact-match (the free-form rule)."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse white space."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def sub_exact_match(prediction: str, gold: str, *, max_length_ratio: float | None = None,
                    length_slack: int = 5) -> bool:
    """True when the normalized gold is contained in the normalized prediction or the reverse.

    An answer that normalizes to nothing never matches (plain sub-EM would find "" inside
    every gold). With ``max_length_ratio`` set (the anti-gaming guard), containment must be
    on word boundaries and a prediction may have at most ``ratio * gold words + slack`` words,
    so listing many candidates, or answering with a single letter, does not score.
    """
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if not pred or not ref:
        return False
    if max_length_ratio is None:
        return ref in pred or pred in ref
    if len(pred.split()) > max_length_ratio * len(ref.split()) + length_slack:
        return False
    return f" {ref} " in f" {pred} " or f" {pred} " in f" {ref} "
