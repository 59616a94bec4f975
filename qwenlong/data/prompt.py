"""The method's prompt (method.md section 4) and its inverse.

The document sits between ``<text>`` tags; the question follows ``</text>``; the prompt ends
with the answer-format instruction. The LLM judge recovers the question as the text between
``</text>`` and that instruction, so :func:`split_prompt` is the exact inverse of
:func:`build_prompt`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwenlong.data.records import CHOICE_LETTERS, DocQARecord

FORMAT_INSTRUCTION = 'Format your response as follows: "Therefore, the answer is (insert answer here)".'
_HEAD = "Please read the following text and answer the question below.\n\n<text>\n"
_MIDDLE = "\n</text>\n\n"
_TAIL = "\n\n" + FORMAT_INSTRUCTION


def build_prompt(document: str, question: str) -> str:
    """Render the method's prompt for one document and question."""
    return f"{_HEAD}{document.strip()}{_MIDDLE}{question.strip()}{_TAIL}"


def question_text(record: DocQARecord) -> str:
    """The question (for a record given as a rendered prompt only, the prompt's), followed by lettered
    options for multiple-choice records."""
    if not record.question and record.prompt is not None:
        return extract_question(record.prompt)
    if not record.choices:
        return record.question
    options = "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(record.choices))
    return f"{record.question}\n{options}"


def record_prompt(record: DocQARecord, document: str | None = None) -> str:
    """The prompt of a record; ``document`` replaces the record's (e.g. a truncated copy)."""
    if record.prompt is not None:
        return record.prompt
    return build_prompt(record.document if document is None else document, question_text(record))


_FORMAT_LINE = re.compile(r"format\s+your\s+response", re.IGNORECASE)


def extract_question(prompt: str) -> str:
    """The question of a rendered prompt, by the release's rule: the text after the last ``</text>`` and
    before "Format your response" (any case and spacing, whatever the rest of that line says), so
    prompts that differ from ours in white space or in the format line still yield it. Without
    ``</text>``, the whole prompt up to the format line; "" when nothing is left.
    """
    start = prompt.rfind("</text>")
    rest = prompt[start + len("</text>"):] if start >= 0 else prompt
    end = _FORMAT_LINE.search(rest)
    return (rest[:end.start()] if end else rest).strip()


def split_prompt(prompt: str) -> tuple[str, str] | None:
    """(document, question) of a prompt rendered by :func:`build_prompt`, or None."""
    if not prompt.startswith(_HEAD) or _MIDDLE not in prompt or not prompt.endswith(_TAIL):
        return None
    document, _, rest = prompt[len(_HEAD):].rpartition(_MIDDLE)
    return document, rest[: -len(_TAIL)]


def chat_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The prompt as a chat: text as one user turn (the method uses no system prompt), a conversation
    (MRCR's, see ``qwenlong.eval.chat``) as its own turns."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def apply_chat_template(tokenizer: Any, prompt: str | Sequence[Mapping[str, str]], *, tokenize: bool = False) -> Any:
    """The prompt wrapped in the tokenizer's chat template, ready for generation.

    Returns text (``tokenize=False``) or a list of token ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer: has no chat_template; set one (see qwenlong.data.tokenizers.CHATML_TEMPLATE)")
    out = tokenizer.apply_chat_template(chat_messages(prompt), tokenize=tokenize, add_generation_prompt=True)
    if not isinstance(out, (str, list)):  # newer transformers return a BatchEncoding
        out = list(out["input_ids"])
    return out
