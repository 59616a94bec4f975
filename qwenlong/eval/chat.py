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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.data import DocQARecord, apply_chat_template, fit_prompt_report
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


def fit_input(tokenizer: Any, record: DocQARecord, max_input_tokens: int,
              template_tokens: int | None = None) -> FittedInput:
    """The record's input cut in the middle to ``max_input_tokens``: the method's prompt (its document
    cut, see :func:`qwenlong.data.fit_prompt_report`) or, for a chat record, its conversation.

    ``template_tokens``: the chat template counts in the budget (None: it does not). A prompt, one user turn,
    gets the budget less that many tokens (the template of one turn); a conversation, whose every turn adds
    its own role markers, is measured with the template applied to all its turns."""
    history = chat_history(record)
    if history is None:
        fitted = fit_prompt_report(tokenizer, record, max_input_tokens - (template_tokens or 0), chat=False)
        return FittedInput(fitted.text, fitted.num_tokens, fitted.truncated)
    length = None
    if template_tokens is not None:
        def length(messages: Sequence[Message]) -> int:
            return len(encode(tokenizer, apply_chat_template(tokenizer, messages)))
    return fit_chat(tokenizer, history, record.question, max_input_tokens, length)


def _tokens(tokenizer: Any, messages: Sequence[Message]) -> int:
    """A chat's input tokens: its contents' (how MRCR counts; the template's role markers aside)."""
    return sum(len(encode(tokenizer, m["content"])) for m in messages)


def fit_chat(tokenizer: Any, history: Sequence[Message], request: str, max_tokens: int,
             length: Callable[[Sequence[Message]], int] | None = None) -> FittedInput:
    """``history`` then the user's ``request``, at most ``max_tokens`` tokens by ``length`` (default: the
    contents' tokens, as MRCR counts): the history's middle tokens dropped (first half and last half kept, as
    for a document), the request whole."""
    if length is None:
        def length(messages: Sequence[Message]) -> int:
            return _tokens(tokenizer, messages)
    messages = [*history, {"role": "user", "content": request}]
    total = length(messages)
    if total <= max_tokens:
        return FittedInput(messages, total, False)
    ids = [encode(tokenizer, m["content"]) for m in history]
    history_tokens = sum(map(len, ids))
    keep = max_tokens - (total - history_tokens)  # what the turns the cut drops took besides their contents
    # decoded pieces can re-encode to a few more tokens than were kept, and dropped turns take their template
    # markers along: step the kept history tokens by the miss until the whole fits closely
    best = None
    for _ in range(FIT_STEPS):
        keep = min(keep, history_tokens - 1)
        if keep <= 0:
            break
        messages = [*_cut_middle(tokenizer, history, ids, keep), {"role": "user", "content": request}]
        size = length(messages)
        if size > max_tokens:
            keep -= size - max_tokens
            continue
        if best is None or size > best.num_tokens:
            best = FittedInput(messages, size, True)
        if max_tokens - size <= FIT_SLACK:
            break
        keep += max_tokens - size
    if best is not None:
        return best
    raise ValueError(f"max_input_tokens: {max_tokens} leaves no room for the conversation (its last request "
                     f"takes {len(encode(tokenizer, request))} tokens)")


FIT_STEPS = 8  # tries of fit_chat's kept-token count
FIT_SLACK = 16  # tokens under the budget a fitted conversation may stay


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
