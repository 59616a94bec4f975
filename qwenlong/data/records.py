"""One DocQA example: a document, a question about it, and the gold answer(s).

Files in the wild name these fields differently (LongBench's ``context``/``input``/``answers``,
DocMath's ``paragraphs``/``ground_truth``, Frames' ``wiki_items``/``Prompt``/``Answer``);
:func:`record_from_mapping` accepts those aliases so benchmark files load without conversion.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Field aliases, in order of preference.
_ID_KEYS = ("id", "_id", "uid")
_SOURCE_KEYS = ("data_source", "dataset", "source")
_QUESTION_KEYS = ("question", "input", "Prompt", "query")
_ANSWER_KEYS = ("answer", "answers", "ground_truth", "Answer", "gold")
_DOCUMENT_KEYS = ("document", "context", "paragraphs", "wiki_items")
# a gold answer that is blank or only dots ("...", "…") is a placeholder left in the data, not an answer
_PLACEHOLDER_ANSWER = re.compile(r"[\s.\u2026]*")
CHOICE_LETTERS = string.ascii_uppercase  # options are lettered in the prompt: at most 26


@dataclass(frozen=True)
class DocQARecord:
    """A document question-answering example.

    ``answers`` holds every accepted gold answer (LongBench lists several); a response is
    scored against each and keeps the best. ``choices`` is set for multiple-choice items,
    whose gold answer is then a letter. ``prompt`` is set only for rows that arrive already
    rendered (verl parquet whose prompt does not follow the method's template).
    """

    id: str
    data_source: str
    document: str
    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    prompt: str | None = None

    def __post_init__(self):
        if not self.data_source:
            raise ValueError("data_source: must be a non-empty string")
        if not self.answers or any(not isinstance(a, str) for a in self.answers):
            raise ValueError(f"answers: must be a non-empty tuple of strings, got {self.answers!r}")
        if self.prompt is None and not self.question:
            raise ValueError("question: must be non-empty when no rendered prompt is given")
        if len(self.choices) > len(CHOICE_LETTERS):
            raise ValueError(f"choices: at most {len(CHOICE_LETTERS)} options (A-Z), got {len(self.choices)}")

    @property
    def answer(self) -> str:
        """The first (canonical) gold answer."""
        return self.answers[0]

    def to_dict(self) -> dict[str, Any]:
        row = {"id": self.id, "data_source": self.data_source, "document": self.document,
               "question": self.question, "answers": list(self.answers)}
        if self.choices:
            row["choices"] = list(self.choices)
        if self.metadata:
            row["metadata"] = dict(self.metadata)
        if self.prompt is not None:
            row["prompt"] = self.prompt
        return row


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def _document_text(value: Any) -> str:
    """A document given as text, a list of paragraphs, or a list of {title, text} items."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        parts = []
        for item in value:
            if item is None:  # a null paragraph (Parquet lists hold them): nothing to read
                continue
            if isinstance(item, Mapping):
                parts.append("\n".join(str(item[k]) for k in ("title", "text") if item.get(k)))
            else:
                parts.append(str(item))
        return "\n".join(parts)
    raise ValueError(f"document: expected text or a list of paragraphs, got {type(value).__name__}")


def _gold(value: Any) -> str | None:
    """One gold answer as text, or None when it is not a string or a finite number."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    return None


def answer_tuple(value: Any) -> tuple[str, ...]:
    """Gold answer(s) as strings: a string, a number or a list of them. A blank or placeholder answer
    (``""``, ``"..."``) is an error: it would score every response wrong, or match anything."""
    if value is None:
        raise ValueError("answer: missing (looked for " + ", ".join(_ANSWER_KEYS) + ")")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    answers = [_gold(item) for item in items]
    if not answers or any(a is None for a in answers):
        raise ValueError(f"answer: expected a string, a number or a non-empty list of them, got {_short(value)}")
    for answer in answers:
        if _PLACEHOLDER_ANSWER.fullmatch(answer):
            raise ValueError(f"answer: {answer!r} is blank or a placeholder, not a gold answer")
    return tuple(answers)


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a bad value for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit] + '...'}"


def metadata_mapping(value: Any, key: str = "metadata") -> dict[str, Any]:
    """A row's metadata: an object, JSON text of one (how ``write_parquet`` stores it), or absent."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{key}: expected an object or JSON text of one, got invalid JSON ({error.msg})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected an object, got {_short(value)}")
    return dict(value)


def record_from_mapping(row: Mapping[str, Any], *, default_id: str, data_source: str | None = None) -> DocQARecord:
    """Build a record from a dict with any of the known field aliases.

    ``data_source`` overrides (or supplies) the row's own; ``default_id`` is used when the
    row has no id. Raises ValueError naming the missing or malformed field.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"row: expected an object, got {type(row).__name__}")
    source = data_source or _first(row, _SOURCE_KEYS)
    if not source:
        raise ValueError("data_source: missing (pass data_source= for files without it)")
    if not isinstance(source, str):
        raise ValueError(f"data_source: expected text, got {_short(source)}")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt: expected the rendered prompt as text, got {_short(prompt)}")
    question = _first(row, _QUESTION_KEYS) or ("" if prompt else None)
    if question is not None and not isinstance(question, str):
        raise ValueError(f"question: expected text, got {_short(question)}")
    if question is None or not (question.strip() or prompt):
        raise ValueError("question: missing or empty (looked for " + ", ".join(_QUESTION_KEYS) + ")")
    choices = row.get("choices")
    if choices is None:
        choices = ()
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices: expected a list of strings, got {_short(choices)}")
    known = {*_ID_KEYS, *_SOURCE_KEYS, *_QUESTION_KEYS, *_ANSWER_KEYS, *_DOCUMENT_KEYS, "choices", "metadata", "prompt"}
    metadata = metadata_mapping(row.get("metadata"))
    metadata.update({k: v for k, v in row.items() if k not in known})
    record_id = _first(row, _ID_KEYS)
    return DocQARecord(
        id=str(record_id) if record_id is not None else default_id,
        data_source=str(source),
        document=_document_text(_first(row, _DOCUMENT_KEYS)),
        question=question.strip(),
        answers=answer_tuple(_first(row, _ANSWER_KEYS)),
        choices=tuple(choices),
        metadata=metadata,
        prompt=prompt,
    )
