"""What the judge is asked, and how its reply is read.

The judge compares the predicted answer with the gold answer for a question and ends its
reply with [[YES]] or [[NO]]. Only the *last* verdict of the reply counts, after removing
any copy of the instruction itself, so a judge that echoes the prompt does not score YES.
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = """You are an expert in verifying if two answers are the same.
You are given a problem and two answers to it, Answer 1 and Answer 2. Decide whether they are equivalent:
whether they state the same value or meaning, even when written in different forms, notations or units.
Do not try to solve the problem yourself.

Reply in this format:
1) A short explanation of why the answers are or are not equivalent.
2) Your final verdict, exactly [[YES]] or [[NO]]."""

USER_TEMPLATE = "Problem: {question}\nAnswer 1: {prediction}\nAnswer 2: {gold}"

_INSTRUCTION_ECHO = re.compile(r"\[\[YES\]\]\s*or\s*\[\[NO\]\]", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)


def judge_messages(question: str, gold: str, prediction: str) -> list[dict[str, str]]:
    """The chat sent to the judge."""
    user = USER_TEMPLATE.format(question=question.strip(), prediction=prediction.strip(), gold=gold.strip())
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> bool | None:
    """True for a final [[YES]], False for [[NO]], None when the reply has no verdict."""
    verdicts = _VERDICT.findall(_INSTRUCTION_ECHO.sub(" ", reply))
    if not verdicts:
        return None
    return verdicts[-1].upper() == "YES"
