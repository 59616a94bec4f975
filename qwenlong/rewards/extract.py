"""Find the answer in a response (method.md section 3, "Extraction").

Only the text after the last ``</think>`` counts; the answer is what follows the last
"the answer is", with markdown emphasis stripped. Multiple-choice answers are the letter
after "The correct answer is" (or after "the answer is", which our prompt asks for).

Every step is linear in the response's length, whatever the model writes: a response is
untrusted input that can be as long as the output budget (50K tokens). The two rewrites that
a regular expression would do in quadratic time are done by hand, with the regex's exact
result (``tests/test_rewards_hostile.py`` checks both against the regexes):

* underscore emphasis ``_x_`` / ``__x__`` (the regex ``_EMPHASIS_REFERENCE``, which scans to the
  end of the line from every unmatched ``_``), and
* ``\\boxed{}`` / ``\\text{}`` / ``\\textbf{}`` / ``\\mathrm{}`` unwrapped from the inside out until
  none is left (one regex pass per nesting level).
"""

from __future__ import annotations

import re
from bisect import bisect_left

THINK_END = "</think>"
# "is" must end its word ("the answer isn't X" states no answer); a digit may follow (``is\boxed{5}`` unwrapped)
_ANSWER_IS = re.compile(r"the answer is(?![^\W\d_])", re.IGNORECASE)
# End-of-turn markers some chat models print after the answer.
_END_MARKERS = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<｜Assistant｜>|<｜end▁of▁sentence｜>")
# "(B)", "(b)", "B", "B.", "option B"; a bare letter is a capital that does not start a word ("the answer is
# a dog") and is not the pronoun "I" starting a clause, after which a letter in parentheses within 40 characters
# on the line is the answer ("the answer is I think (C)").
_CHOICE = re.compile(r"(?i:the correct answer is|the answer is)\s*:?\s*(?i:option\s+)?"
                     r"(?:(?:I\s+(?=[a-z])[^()\n]{0,40}?)?\(([A-Za-z])\)|(?!I\s+[a-z])([A-Z])(?![\w']))")

# What strip_markdown computes, as regexes (quadratic on hostile input; kept as the specification).
_EMPHASIS_REFERENCE = re.compile(r"(?<![\w\\])(__|_)(?=\S)(.+?)(?<=\S)\1(?!\w)")
_BOXED_REFERENCE = re.compile(r"\\(?:boxed|text|textbf|mathrm)\{([^{}]*)\}")

_OPENER = re.compile(r"(?<![\w\\])_")  # where an emphasis can start
_CLOSERS = {mark: re.compile(rf"(?<=\S)(?={mark}(?!\w))") for mark in ("__", "_")}  # where one can end
_WRAPPERS = ("\\boxed", "\\textbf", "\\text", "\\mathrm")


def final_segment(response: str, require_think: bool = True) -> str | None:
    """Text after the last ``</think>``; None when it is missing and required."""
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1]
    return None if require_think else response


def _strip_emphasis(text: str) -> str:
    """``_EMPHASIS_REFERENCE.sub(r"\\2", text)`` in O(n log n): for each possible opener, left to right,
    the nearest closer of the same mark on the same line (what the lazy ``.+?`` finds)."""
    if "_" not in text:
        return text
    closers = {mark: [m.start() for m in pattern.finditer(text)] for mark, pattern in _CLOSERS.items()}
    newlines = [m.start() for m in re.finditer("\n", text)]
    n, out, done = len(text), [], 0
    for opener in _OPENER.finditer(text):
        p = opener.start()
        if p < done:
            continue
        for mark in ("__", "_"):  # the regex tries "__" first
            start = p + len(mark)
            if not text.startswith(mark, p) or start >= n or text[start].isspace():
                continue
            line = bisect_left(newlines, start)
            line_end = newlines[line] if line < len(newlines) else n
            positions = closers[mark]
            k = bisect_left(positions, start + 1)  # the content is at least one character
            if k < len(positions) and positions[k] < line_end:
                q = positions[k]
                out += (text[done:p], text[start:q])
                done = q + len(mark)
                break
    out.append(text[done:])
    return "".join(out)


class _Chunks:
    """The result being built, as chunks that can be emptied in place; emptied chunks are skipped in
    near-constant time (union-find over "the nearest non-empty chunk at or before j")."""

    def __init__(self, keep: int):
        self.chunks: list[str] = []
        self.parent: list[int] = []
        self.keep = keep  # how many trailing characters tail() serves
        self._last: str | None = ""  # the last ``keep`` characters, None when a change made it stale

    def append(self, chunk: str) -> int:
        self.chunks.append(chunk)
        self.parent.append(len(self.parent))
        if self._last is not None:
            self._last = (self._last + chunk)[-self.keep:]
        return len(self.chunks) - 1

    def clear(self, j: int) -> None:
        self.chunks[j] = ""
        self.parent[j] = j - 1
        self._last = None

    def _find(self, j: int) -> int:
        root = j
        while root >= 0 and self.parent[root] != root:
            root = self.parent[root]
        while j >= 0 and self.parent[j] != j:
            self.parent[j], j = root, self.parent[j]
        return root

    def tail(self) -> str:
        """The last ``keep`` characters."""
        if self._last is None:
            tail, j = "", self._find(len(self.chunks) - 1)
            while len(tail) < self.keep and j >= 0:
                tail = self.chunks[j] + tail
                j = self._find(j - 1)
            self._last = tail[-self.keep:]
        return self._last

    def drop_tail(self, count: int) -> None:
        """Remove the last ``count`` characters."""
        j = self._find(len(self.chunks) - 1)
        while count:
            cut = min(count, len(self.chunks[j]))
            self.chunks[j] = self.chunks[j][:len(self.chunks[j]) - cut]
            count -= cut
            if not self.chunks[j]:
                self.clear(j)
            j = self._find(j - 1)
        self._last = None

    def text(self) -> str:
        return "".join(self.chunks)


def _unwrap_commands(text: str) -> str:
    """``_BOXED_REFERENCE.sub(r"\\1", ...)`` repeated until nothing changes, in one pass with a stack:
    a wrapper is unwrapped when it closes with no brace left inside (every group in it unwrapped)."""
    if "{" not in text:
        return text
    out = _Chunks(keep=max(map(len, _WRAPPERS)))
    stack: list[list] = []  # per open "{": [its chunk, is a wrapper, a brace is left inside]
    for piece in re.split(r"([{}])", text):
        if piece == "{":
            tail = out.tail()
            name = next(w for w in _WRAPPERS if tail.endswith(w)) if tail.endswith(_WRAPPERS) else ""
            if name:
                out.drop_tail(len(name))
            stack.append([out.append(name + "{"), bool(name), False])
        elif piece == "}" and stack:
            index, wrapper, braced = stack.pop()
            if wrapper and not braced:
                out.clear(index)
            else:
                out.append("}")
                if stack:
                    stack[-1][2] = True
        elif piece:
            out.append(piece)
    return out.text()


def strip_markdown(text: str) -> str:
    """Drop emphasis markers (``**``, ``*``, ``__``, ``_``, backticks) and unwrap ``\\boxed{}``."""
    return _unwrap_commands(_strip_emphasis(text.replace("*", "").replace("`", "")))


def strip_markdown_reference(text: str) -> str:
    """:func:`strip_markdown` with the regexes it replaces (quadratic time; for tests)."""
    text = _EMPHASIS_REFERENCE.sub(r"\2", text.replace("*", "").replace("`", ""))
    previous = None
    while previous != text:
        previous, text = text, _BOXED_REFERENCE.sub(r"\1", text)
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
    """The letter (upper case) of the last "The correct answer is (X)" / "the answer is X"."""
    matches = list(_CHOICE.finditer(strip_markdown(text)))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) or last.group(2)).upper()


def gold_answer(ground_truth: str) -> str:
    """A gold answer given bare or in "Therefore, the answer is X." form."""
    extracted = extract_answer(ground_truth)
    return ground_truth.strip() if extracted is None else extracted
