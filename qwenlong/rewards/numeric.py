"""The numeric rule (DocMath): parse a number from an answer and compare it with the gold.

Numbers are parsed, never evaluated as code, into exact ``Fraction`` values, so the
tolerance boundaries are exact. Two numbers match (method.md section 3) when any of:

* they differ by an exact power of ten, 10**k for integer k >= 0 (units vs thousands, ...);
* one is 100, 1000 or 100000 times the other within the tolerance (percent vs fraction);
* they are equal after rounding up to 3 decimals;
* ``|pred - gold| <= 0.0015 * |gold|``.

The first three compare magnitudes, as the public release does, so a sign difference
("a decrease of 5" vs "-5") is accepted.

Parsing is linear in the answer's length and the numbers are bounded: a number written with more
than ``MAX_DIGITS`` digits raises :class:`ScoringFailure` ("number_too_long"), exponents have at
most 3 digits, and math-verify only sees short LaTeX built from a fixed set of commands
(``_LATEX_ALLOWED``), so ``\\binom{10000000}{5000000}`` or ``99!`` is never evaluated.
math-verify's own timeout is not used: it is a SIGALRM alarm (main thread only, whole seconds,
and it cancels any other alarm such as pytest-timeout's), while scoring runs in a worker thread.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from qwenlong.rewards.stats import ScoringFailure

MAX_DIGITS = 100  # digits in one written number; a longer one is a degenerate answer
REL_TOL = Fraction(15, 10000)
_SCALES = ((100, 50), (1000, 500), (100000, 50000))  # (factor, the smaller must be <= larger / this)

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
# A match starting right after a digit (or a digit and "," / ".") can never be the earliest number (see
# parse_number), so these patterns skip such starts: that keeps each search linear in a run of digits.
_START = r"(?<!\d)(?<!\d[,.])"
_POWER = re.compile(rf"{_START}(?:({_NUM})\s*(?:x|×|\*|\\times|\\cdot)\s*)?10\s*\^\s*\{{?\s*([-+]?\d{{1,3}})\s*\}}?")
_SCIENTIFIC = re.compile(rf"{_START}({_NUM})[eE]([-+]?\d{{1,3}})(?![\w.])")
_FRACTION = re.compile(r"(?<![\d.,])(\d+)\s*/\s*(\d+)(?![\d.,])")
_NUMBER = re.compile(_NUM)
_LATEX_HINT = re.compile(r"\\(?:d?t?frac|sqrt|times|cdot|boxed|left|right|pi)")
_LATEX_ALLOWED = frozenset({"frac", "dfrac", "tfrac", "sqrt", "times", "cdot", "div", "left", "right", "pi", "boxed",
                            "text", "textbf", "textrm", "mathrm", "mathbf", "mbox", "displaystyle", "approx", "quad"})
_LATEX_POWER = re.compile(r"\^\s*\{?\s*[-+]?\d{3}")  # exponents of 3+ digits: sympy's float of pi^999 takes 0.5 s
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+|.?)")
_DIGIT_RUN = re.compile(r"\d+")


def _to_fraction(number: str) -> Fraction:
    digits = number.replace(",", "")
    if sum(c.isdigit() for c in digits) > MAX_DIGITS:
        raise ScoringFailure("number_too_long", f"a number with more than {MAX_DIGITS} digits")
    return Fraction(digits)


def _safe_latex(text: str) -> bool:
    """Short, one power at most, only whitelisted commands, no factorial or subscript, short numbers:
    what sympy then does with it is cheap whatever the values."""
    if len(text) > 100 or text.count("^") > 1 or "!" in text or "_" in text or text.count("\\sqrt") > 2:
        return False
    if _LATEX_POWER.search(text):
        return False
    if any(len(run) > 30 for run in _DIGIT_RUN.findall(text)):
        return False
    return all(m.group(1) in _LATEX_ALLOWED or (len(m.group(1)) <= 1 and not m.group(1).isalpha())
               for m in _LATEX_COMMAND.finditer(text))


def _from_latex(text: str) -> Fraction | None:
    """A number from a short LaTeX expression, through math-verify (no code evaluation)."""
    if not _safe_latex(text):
        return None
    try:
        import sympy
        from math_verify import parse
    except ImportError:
        return None
    for value in parse(f"${text}$", parsing_timeout=None):
        if isinstance(value, sympy.Basic) and value.is_number and value.is_real:
            try:
                return Fraction(repr(float(value)))
            except (TypeError, ValueError, OverflowError):
                return None
    return None


def parse_number(text: str) -> Fraction | None:
    """The number an answer states, or None.

    Handles currency symbols and units (ignored), thousands separators, "%" (the number as
    written: 12.5% -> 12.5), "approximately" and other words before the number, the value
    after the last "=" or "≈", scientific and ``x 10^k`` notation, simple fractions, and
    LaTeX through math-verify. The first number of what remains is the answer.
    """
    text = text.replace("−", "-").replace("–", "-").replace("$", " ").replace("`", "")
    for sign in ("=", "≈"):
        if sign in text:
            text = text.rsplit(sign, 1)[1]
    if _LATEX_HINT.search(text) and (value := _from_latex(text.strip())) is not None:
        return value
    candidates = []
    for pattern in (_POWER, _SCIENTIFIC, _FRACTION, _NUMBER):
        match = pattern.search(text)
        if match:
            candidates.append((match.start(), -len(match.group(0)), pattern, match))
    if not candidates:
        return None
    _, _, pattern, match = min(candidates, key=lambda c: c[:2])  # earliest, then longest
    if pattern is _POWER:
        mantissa = _to_fraction(match.group(1)) if match.group(1) else Fraction(1)
        return mantissa * Fraction(10) ** int(match.group(2))
    if pattern is _SCIENTIFIC:
        return _to_fraction(match.group(1)) * Fraction(10) ** int(match.group(2))
    if pattern is _FRACTION:
        numerator, denominator = _to_fraction(match.group(1)), _to_fraction(match.group(2))
        return numerator / denominator if denominator else None
    return _to_fraction(match.group(0))


def _is_power_of_ten(ratio: Fraction) -> bool:
    """ratio == 10**k for an integer k >= 0 (arithmetic: str() of a huge integer raises)."""
    if ratio.denominator != 1 or ratio.numerator < 1:
        return False
    k = round(math.log10(ratio.numerator))
    return any(e >= 0 and ratio.numerator == 10 ** e for e in (k - 1, k, k + 1))


def _ceil3(value: Fraction) -> int:
    return math.ceil(value * 1000)


def within_tolerance(pred: Fraction, gold: Fraction, rel_tol: Fraction = REL_TOL) -> bool:
    return abs(pred - gold) <= abs(gold) * rel_tol


def numbers_match(pred: Fraction, gold: Fraction, rel_tol: Fraction = REL_TOL) -> bool:
    """The method's numeric equivalence (see the module docstring)."""
    large, small = max(abs(pred), abs(gold)), min(abs(pred), abs(gold))
    if small != 0 and _is_power_of_ten(large / small):
        return True
    for factor, gap in _SCALES:
        if small <= large / gap and within_tolerance(small * factor, large, rel_tol):
            return True
    if _ceil3(large) == _ceil3(small):
        return True
    return within_tolerance(pred, gold, rel_tol)
