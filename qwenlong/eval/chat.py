"""Benchmark inputs that are conversations, and every item's input fitted to the input budget.

Most benchmarks ask one question about one document: the prompt is the method's template, one user
turn. MRCR instead gives a long multi-turn chat and asks about it in a last user turn; flattening that
chat into one user message would tell the model it wrote none of the assistant turns. Such a record
keeps the earlier turns in ``metadata["chat_history"]`` and the last request as its ``question``, so
it stays a :class:`DocQARecord` that files round-trip, and :func:`fit_input` hands the generate
function the message list, which the chat template renders turn by turn.

Fitting follows the evaluation protocol (cut in the middle, the request kept whole): where a document
loses its middle, a conversation loses its middle turns; the turns at the cut are shortened to the
token, and two turns of one speaker left side by side are joined so the turns still alternate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.data import DocQARecord, fit_prompt_report
from qwenlong.data.tokens import encode

CHAT_HISTORY = "chat_history"  # metadata key of a record's turns before its question
ROLES = ("system", "user", "assistant")

Message = dict[str, str]


def parse_messages(value: Any, field: str = "prompt") -> list[Message]:
    """Chat messages given as a list of ``{role, content}`` or as JSON text of one (MRCR stores its
    conversations as text); a ValueError naming ``field`` and the message when one is malformed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{field}: expected chat messages or JSON text of them, got invalid JSON "
                             f"({error.msg})") from None
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{field}: expected a non-empty list of chat messages, got {type(value).__name__}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"{field}: message {index} needs a role in {ROLES}, got {str(message)[:80]!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{field}: message {index} ({message['role']}) has no text content")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def chat_history(record: DocQARecord) -> list[Message] | None:
    """The turns before the record's question (none when the request opens the chat), or None for a
    one-turn record."""
    history = record.metadata.get(CHAT_HISTORY)
    if history is None or (isinstance(history, list) and not history):
        return history
    return parse_messages(history, f"metadata.{CHAT_HISTORY}")


@dataclass(frozen=True)
class FittedInput:
    """What a generate function is given for one item: prompt text (one user turn) or chat messages."""

    prompt: str | list[Message]
    num_tokens: int
    truncated: bool


def fit_input(tokenizer: Any, record: DocQARecord, max_input_tokens: int) -> FittedInput:
    """The record's input cut in the middle to ``max_input_tokens``: the method's prompt (its document
    cut, see :func:`qwenlong.data.fit_prompt_report`) or, for a chat record, its conversation."""
    history = chat_history(record)
    if history is None:
        fitted = fit_prompt_report(tokenizer, record, max_input_tokens, chat=False)
        return FittedInput(fitted.text, fitted.num_tokens, fitted.truncated)
    return fit_chat(tokenizer, history, record.question, max_input_tokens)


def _tokens(tokenizer: Any, messages: Sequence[Message]) -> int:
    """A chat's input tokens: its contents' (how MRCR counts; the template's role markers aside)."""
    return sum(len(encode(tokenizer, m["content"])) for m in messages)


def fit_chat(tokenizer: Any, history: Sequence[Message], request: str, max_tokens: int) -> FittedInput:
    """``history`` then the user's ``request``, at most ``max_tokens`` tokens: the history's middle
    tokens dropped (first half and last half kept, as for a document), the request whole."""
    messages = [*history, {"role": "user", "content": request}]
    total = _tokens(tokenizer, messages)
    if total <= max_tokens:
        return FittedInput(messages, total, False)
    ids = [encode(tokenizer, m["content"]) for m in history]
    keep = max_tokens - (total - sum(map(len, ids)))
    # decoded pieces can re-encode to a few more tokens than were kept: shrink until the whole fits
    while keep > 0:
        messages = [*_cut_middle(tokenizer, history, ids, keep), {"role": "user", "content": request}]
        length = _tokens(tokenizer, messages)
        if length <= max_tokens:
            return FittedInput(messages, length, True)
        keep -= length - max_tokens
    raise ValueError(f"max_input_tokens: {max_tokens} leaves no room for the conversation (its last request "
                     f"takes {len(encode(tokenizer, request))} tokens)")


def _pieces(ids: Sequence[list[int]], budget: int, from_end: bool) -> list[tuple[int, list[int]]]:
    """(turn index, kept ids) for the first (``from_end``: last) ``budget`` tokens of the turns, in turn order."""
    order = range(len(ids) - 1, -1, -1) if from_end else range(len(ids))
    pieces = []
    for index in order:
        if budget <= 0:
            break
        part = ids[index][-budget:] if from_end else ids[index][:budget]
        pieces.append((index, part))
        budget -= len(part)
    return pieces[::-1] if from_end else pieces


def _cut_middle(tokenizer: Any, history: Sequence[Message], ids: Sequence[list[int]], keep: int) -> list[Message]:
    """The history's first ``ceil(keep / 2)`` and last ``floor(keep / 2)`` tokens (``keep`` is less than it
    holds), as turns: a turn kept whole keeps its text, a turn at the cut its kept tokens decoded, the
    turns between are dropped; the two turns meeting at the cut are joined when one speaker wrote both."""
    head, tail = _pieces(ids, (keep + 1) // 2, False), _pieces(ids, keep // 2, True)
    if head and tail and head[-1][0] == tail[0][0]:  # the cut falls inside one turn
        head[-1] = (head[-1][0], head[-1][1] + tail.pop(0)[1])

    def turn(index: int, part: list[int]) -> Message:
        whole = len(part) == len(ids[index])
        return {"role": history[index]["role"],
                "content": history[index]["content"] if whole else tokenizer.decode(part)}

    first, last = [turn(*p) for p in head], [turn(*p) for p in tail]
    if first and last and first[-1]["role"] == last[0]["role"]:
        joined = {"role": last[0]["role"], "content": first[-1]["content"] + last[0]["content"]}
        return [*first[:-1], joined, *last[1:]]
    return [*first, *last]
