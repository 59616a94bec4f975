"""Find the answer in a response (method.md section 3, "Extraction").

Only the text after the last ``</think>`` counts; the answer is what follows the last
"the answer is", with markdown emphasis stripped. Multiple-choice answers are the letter
after "The correct answer is" (or after "the answer is", which our prompt asks for).
"""

from __future__ import annotations

import re

THINK_END = "</think>"
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
# End-of-turn markers some chat models print after the answer.
_END_MARKERS = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<｜Assistant｜>|<｜end▁of▁sentence｜>")
_EMPHASIS = re.compile(r"(?<![\w\\])(__|_)(?=\S)(.+?)(?<=\S)\1(?!\w)")
_BOXED = re.compile(r"\\(?:boxed|text|textbf|mathrm)\{([^{}]*)\}")
# "(B)", "B", "B.", "option B"; a bare letter must not start a word ("the answer is a dog").
_CHOICE = re.compile(r"(?i:the correct answer is|the answer is)\s*:?\s*(?i:option\s+)?(?:\(([A-Z])\)|([A-Z])(?![\w']))")


def final_segment(response: str, require_think: bool = True) -> str | None:
    """Text after the last ``</think>``; None when it is missing and required."""
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1]
    return None if require_think else response


def strip_markdown(text: str) -> str:
    """Drop emphasis markers (``**``, ``*``, ``__``, ``_``, backticks) and unwrap ``\\boxed{}``."""
    text = text.replace("*", "").replace("`", "")
    text = _EMPHASIS.sub(r"\2", text)
    previous = None
    while previous != text:  # unwrap nested \boxed{\text{...}}
        previous, text = text, _BOXED.sub(r"\1", text)
    return text


def extract_answer(text: str) -> str | None:
    """The text after the last "the answer is" (emphasis stripped, trailing period dropped)."""
    text = _END_MARKERS.sub("", strip_markdown(text))
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end():].strip()
    answer = answer.removeprefix(":").strip().rstrip(".").strip()
    return answer


def extract_choice(text: str) -> str | None:
    """The letter of the last "The correct answer is (X)" / "the answer is X"."""
    matches = list(_CHOICE.finditer(strip_markdown(text)))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) or last.group(2)


def gold_answer(ground_truth: str) -> str:
    """A gold answer given bare or in "Therefore, the answer is X." form."""
    extracted = extract_answer(ground_truth)
    return ground_truth.strip() if extracted is None else extracted
