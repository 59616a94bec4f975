"""SQuAD-style answer normalization and sub-exact-match (the free-form rule).

The release strips ASCII punctuation only. With ``unicode_punctuation`` every Unicode punctuation
character goes too (curly quotes, dashes, ellipsis, CJK punctuation: categories P*), so
"“Paris”" or "Paris —" normalizes like "Paris".
"""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class _UnicodePunctuation(dict):
    """``str.translate`` table deleting Unicode punctuation (categories P*) and ASCII's, each
    character's category looked up once, when first seen (a full table takes 0.3 s to build)."""

    def __missing__(self, codepoint: int) -> int | None:
        char = chr(codepoint)
        value = None if char in string.punctuation or unicodedata.category(char).startswith("P") else codepoint
        self[codepoint] = value
        return value


_UNICODE_PUNCTUATION = _UnicodePunctuation()


def normalize_answer(text: str, unicode_punctuation: bool = False) -> str:
    """Lower-case, drop punctuation (ASCII, or all of Unicode's), drop a/an/the, collapse white space."""
    table = _UNICODE_PUNCTUATION if unicode_punctuation else _PUNCTUATION
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(table)).split())


def contains_words(haystack: str, needle: str, suffixes: bool = False) -> bool:
    """``needle`` occurs in ``haystack`` on word boundaries (both normalized, words separated by one
    space); with ``suffixes`` its last word may carry a plural or possessive "s" / "es" ("Obama's"
    normalizes to "obamas", which then contains "obama")."""
    if not suffixes:
        return f" {needle} " in f" {haystack} "
    return re.search(rf"(?:^| ){re.escape(needle)}(?:e?s)?(?: |$)", haystack) is not None


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
    return contains_words(pred, ref) or contains_words(ref, pred)
