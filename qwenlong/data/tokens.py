"""Token lengths and middle truncation, measured with the model's own tokenizer.

The evaluation protocol cuts inputs longer than the budget in the middle, keeping the
first and last halves (the question and the format instruction sit at the end, the
document's opening at the start). We truncate the *document* so the template, question and
instruction always survive intact; the result has the same token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.data.prompt import apply_chat_template, record_prompt
from qwenlong.data.records import DocQARecord


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text, without special tokens (works for any HF tokenizer)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text))


def truncate_middle_ids(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keep the first ``ceil(max/2)`` and the last ``floor(max/2)`` ids when too long."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens: must be >= 0, got {max_tokens}")
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids
    head = (max_tokens + 1) // 2
    tail = max_tokens - head
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut in the middle to at most ``max_tokens`` tokens (unchanged when it fits)."""
    ids = encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(truncate_middle_ids(ids, max_tokens))


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    num_tokens: int
    truncated: bool


def fit_prompt_report(tokenizer: Any, record: DocQARecord, max_input_tokens: int, *, chat: bool = True) -> FittedPrompt:
    """The record's prompt (chat-templated when ``chat``), its document cut in the middle so
    the whole input is at most ``max_input_tokens`` tokens; with its length and whether it was cut.

    Records that arrive as a rendered prompt (no separate document) are cut as a whole.
    """
    def render(document: str | None) -> str:
        prompt = record_prompt(record, document)
        return apply_chat_template(tokenizer, prompt) if chat else prompt

    full = render(None)
    total = count_tokens(tokenizer, full)
    if total <= max_input_tokens:
        return FittedPrompt(full, total, False)
    if record.prompt is not None:
        # a cut through a character or a merge can encode to more tokens than it kept: shrink until it fits
        budget = max_input_tokens
        while True:
            text = truncate_middle(tokenizer, full, budget)
            length = count_tokens(tokenizer, text)
            if length <= max_input_tokens:
                return FittedPrompt(text, length, True)
            if budget == 0:  # nothing left to cut (the tokenizer adds tokens to an empty text)
                raise ValueError(f"max_input_tokens: {max_input_tokens} is too small for any prompt")
            budget = max(0, budget - (length - max_input_tokens))
    overhead = count_tokens(tokenizer, render(""))
    doc_budget = max_input_tokens - overhead
    if doc_budget <= 0:
        raise ValueError(f"max_input_tokens: {max_input_tokens} leaves no room for the document "
                         f"(template and question take {overhead} tokens)")
    # Token counts are not exactly additive at the seams; shrink until the whole fits.
    while True:
        fitted = render(truncate_middle(tokenizer, record.document, doc_budget))
        length = count_tokens(tokenizer, fitted)
        if length <= max_input_tokens:
            return FittedPrompt(fitted, length, True)
        doc_budget = max(0, doc_budget - (length - max_input_tokens))  # 0: the empty document, which fits


def fit_prompt(tokenizer: Any, record: DocQARecord, max_input_tokens: int, *, chat: bool = True) -> str:
    """The text of :func:`fit_prompt_report`."""
    return fit_prompt_report(tokenizer, record, max_input_tokens, chat=chat).text
