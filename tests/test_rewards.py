"""Rule-based rewards: a table of cases written from method.md section 3, plus properties."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlong.data.sources import RuleKind, rule_kind
from qwenlong.rewards import compute_score, trl_reward
from qwenlong.rewards.extract import extract_answer, extract_choice, final_segment
from qwenlong.rewards.normalize import normalize_answer, sub_exact_match
from qwenlong.rewards.numeric import numbers_match, parse_number
from qwenlong.rewards.rules import RuleConfig, rule_score


def said(answer: str, thinking: str = "Let me look at the document.") -> str:
    """A response in the method's format."""
    return f"<think>\n{thinking}\n</think>\n\nTherefore, the answer is {answer}."


FREE, NUM, MC = RuleKind.FREE_FORM, RuleKind.NUMERIC, RuleKind.CHOICE

# (kind, response, gold, expected score) — every rule of method.md section 3.
CASES = [
    # extraction: </think> required, last "the answer is", emphasis stripped
    (FREE, "Therefore, the answer is Paris.", "Paris", 0.0),
    (FREE, "<think>the answer is Paris</think>", "Paris", 0.0),
    (FREE, "", "Paris", 0.0),
    (FREE, "<think></think>", "Paris", 0.0),
    (FREE, "<think>a</think> I am not sure.", "Paris", 0.0),
    (FREE, said("Paris"), "Paris", 1.0),
    (FREE, "<think>x</think> the answer is London. Wait, no: the answer is Paris.", "Paris", 1.0),
    (FREE, "<think>x</think> the answer is Paris. Hmm, the answer is London.", "Paris", 0.0),
    (FREE, "<think>the answer is Paris</think><think>y</think> Therefore, the answer is Rome.", "Paris", 0.0),
    (FREE, said("**Paris**"), "Paris", 1.0),
    (FREE, "<think>x</think> **Therefore, the answer is Paris.**", "Paris", 1.0),
    (FREE, said("__Marie Curie__"), "Marie Curie", 1.0),
    (FREE, said("`Paris`"), "Paris", 1.0),
    (FREE, said("\\boxed{Paris}"), "Paris", 1.0),
    (FREE, "<think>x</think> The Answer Is paris", "Paris", 1.0),
    (FREE, said("Paris") + "<|im_end|>", "Paris", 1.0),
    # normalization: case, punctuation, articles, white space
    (FREE, said("THE EIFFEL TOWER"), "Eiffel Tower", 1.0),
    (FREE, said("an   apple,"), "Apple", 1.0),
    (FREE, said("St. John's"), "st johns", 1.0),
    (FREE, said("the"), "the", 0.0),  # normalizes to nothing: never a match
    (FREE, said("a"), "Paris", 0.0),
    (FREE, said("."), "Paris", 0.0),
    # sub-EM both directions, near misses
    (FREE, said("Barack Obama"), "Obama", 1.0),
    (FREE, said("Obama"), "Barack Obama", 1.0),
    (FREE, said("Lyon"), "Paris", 0.0),
    (FREE, said("Parisian"), "Paris", 1.0),  # character containment, as the method defines it
    (FREE, said("1990"), "1991", 0.0),
    (FREE, said("Zürich"), "Zürich", 1.0),
    (FREE, said("東京"), "東京", 1.0),
    (FREE, said("Jean-Paul Sartre"), "JeanPaul Sartre", 1.0),
    # gold answers in "the answer is" form and as lists
    (FREE, said("Paris"), "Therefore, the answer is Paris.", 1.0),
    (FREE, said("Anne"), ["Ann Smith", "Anne"], 1.0),
    # numeric: tolerance 0.15% relative to the gold, both sides of the boundary
    (NUM, said("100.15"), "100", 1.0),
    (NUM, said("100.16"), "100", 0.0),
    (NUM, said("99.85"), "100", 1.0),
    (NUM, said("99.84"), "100", 0.0),
    (NUM, said("2003"), "2000", 1.0),
    (NUM, said("2004"), "2000", 0.0),
    (NUM, said("-100.1"), "-100", 1.0),
    # power of ten and x100 / x1000 / x100000 scales
    (NUM, said("0.25"), "25", 1.0),
    (NUM, said("2500000"), "2.5", 1.0),
    (NUM, said("5 million"), "5000000", 1.0),
    (NUM, said("25.3%"), "0.2531", 1.0),
    (NUM, said("25.36%"), "0.2531", 0.0),
    (NUM, said("1.2346"), "1234.6", 1.0),
    (NUM, said("3.45"), "345000", 1.0),
    (NUM, said("3.46"), "345000", 0.0),
    (NUM, said("20"), "2", 1.0),
    (NUM, said("21"), "2", 0.0),
    # rounding up to 3 decimals
    (NUM, said("0.1231"), "0.1234", 1.0),
    (NUM, said("0.1229"), "0.1234", 0.0),
    (NUM, said("3.14159"), "3.1416", 1.0),
    # currency, separators, percent, approximately, =, ≈
    (NUM, said("$1,234,567"), "1234567", 1.0),
    (NUM, said("€1,5"), "1.5", 0.0),  # a decimal comma is not read as a decimal point
    (NUM, said("€1.234,5"), "1234.5", 1.0),  # read as 1.234: the x1000 rule accepts it
    (NUM, said("USD 45.2 million"), "45.2", 1.0),
    (NUM, said("£7"), "7", 1.0),
    (NUM, said("approximately 12.5%"), "12.5", 1.0),
    (NUM, said("120 - 100 = 20"), "20", 1.0),
    (NUM, said("1/3 ≈ 0.333"), "0.333", 1.0),
    (NUM, said("−42"), "-42", 1.0),
    (NUM, said("1.5 × 10^3"), "1500", 1.0),
    (NUM, said("1.5e3"), "1500", 1.0),
    (NUM, said("3/4"), "0.75", 1.0),
    (NUM, said("$\\frac{3}{4}$"), "0.75", 1.0),
    (NUM, said("\\boxed{\\dfrac{1}{8}}"), "0.125", 1.0),
    (NUM, said("**2,000**"), "Therefore, the answer is 2000.", 1.0),
    (NUM, said("not stated"), "12", 0.0),
    (NUM, said("__import__('os').system('echo pwned')"), "12", 0.0),  # parsed, never evaluated
    (NUM, said("0"), "0", 1.0),
    (NUM, said("0.0004"), "0", 0.0),
    (NUM, said("yes"), "Yes", 1.0),  # non-numeric gold falls back to the free-form rule
    # multiple choice
    (MC, "<think>x</think> The correct answer is (B).", "B", 1.0),
    (MC, "<think>x</think> The correct answer is B", "(B)", 1.0),
    (MC, "<think>x</think> The correct answer is **(C)**", "The correct answer is (C)", 1.0),
    (MC, said("(D)"), "D", 1.0),
    (MC, "<think>x</think> The correct answer is (A). No wait, the correct answer is (B).", "B", 1.0),
    (MC, "<think>x</think> The correct answer is (A).", "B", 0.0),
    (MC, said("a dog"), "A", 0.0),
    (MC, said("Paris"), "B", 0.0),
    (MC, "The correct answer is (B).", "B", 0.0),
]


@pytest.mark.parametrize("kind,response,gold,expected", CASES)
def test_rule_table(kind, response, gold, expected):
    assert rule_score(kind, response, gold, RuleConfig.faithful()).score == expected


def test_table_covers_at_least_sixty_cases():
    assert len(CASES) >= 60


# Cases where the anti-gaming guard (on by default) changes the decision.
GUARD_CASES = [
    (said("Paris, London, Berlin, Rome, Madrid, Vienna, Prague, Oslo, Bern, Lisbon"), "Paris", 1.0, 0.0),
    (said("e"), "Eiffel Tower", 1.0, 0.0),
    (said("Parisian"), "Paris", 1.0, 0.0),
    (said("the capital city of France, Paris"), "Paris", 1.0, 1.0),
    (said("Obama"), "Barack Obama", 1.0, 1.0),
]


@pytest.mark.parametrize("response,gold,faithful,guarded", GUARD_CASES)
def test_length_guard(response, gold, faithful, guarded):
    assert rule_score(FREE, response, gold, RuleConfig.faithful()).score == faithful
    assert rule_score(FREE, response, gold).score == guarded


def test_require_think_can_be_relaxed_for_non_reasoning_models():
    assert rule_score(FREE, "Therefore, the answer is Paris.", "Paris", RuleConfig(require_think=False)).score == 1


def test_extraction_helpers():
    assert final_segment("a</think>b</think>c") == "c"
    assert final_segment("no tags") is None
    assert extract_answer("so the answer is: 42.") == "42"
    assert extract_answer("nothing here") is None
    assert extract_choice("The correct answer is option C") == "C"
    assert normalize_answer("  The  Quick, Brown fox! ") == "quick brown fox"


def test_the_answer_is_must_end_its_word():
    text = "the answer is Paris. Note that the answer isn't Lyon."
    assert extract_answer(text) == "Paris. Note that the answer isn't Lyon"
    assert rule_score(FREE, f"<think>x</think> {text}", "Paris").score == 1.0
    assert rule_score(FREE, f"<think>x</think> {text}", "Paris", RuleConfig.faithful()).score == 1.0
    assert extract_answer("The answer isn't known. The answer isnt known either.") is None
    assert extract_answer("the answer is\\boxed{5}.") == "5"  # a digit may follow "is"
    assert extract_answer("So the answer is: 42.") == "42"


def test_the_pronoun_i_is_not_a_choice():
    assert extract_choice("Therefore, the answer is I think (C).") == "C"
    assert rule_score(MC, "<think>x</think> Therefore, the answer is I think (C).", "C").score == 1.0
    assert rule_score(MC, "<think>x</think> Therefore, the answer is I think (C).", "I").score == 0.0
    assert extract_choice("The correct answer is I believe option (d), not (A)") == "D"
    assert extract_choice("The correct answer is I think B") is None  # after the pronoun only "(X)" counts
    assert extract_choice("The correct answer is (A). Well, the answer is I am not sure") == "A"
    assert extract_choice("The correct answer is I.") == "I"  # a ninth option is still a letter
    assert extract_choice("The correct answer is I") == "I"
    assert extract_choice("The correct answer is (I) because") == "I"


def test_lowercase_choices_in_parentheses():
    assert extract_choice("The correct answer is (b).") == "B"
    for gold in ("b", "B", "(b)", "The correct answer is (b)"):
        assert rule_score(MC, "<think>x</think> The correct answer is (b).", gold).score == 1.0
    assert rule_score(MC, "<think>x</think> The correct answer is (b).", "C").score == 0.0
    assert extract_choice("the answer is a dog") is None  # a bare lowercase letter is still no choice
    assert extract_choice("the answer is b") is None


def test_numbers_match_is_symmetric_in_scale_rules():
    assert numbers_match(Fraction(1), Fraction(1000)) and numbers_match(Fraction(1000), Fraction(1))
    assert not numbers_match(Fraction(3), Fraction(1000))


def test_data_source_routing():
    assert rule_kind("docmath") is NUM and rule_kind("DocMath_simplong") is NUM
    assert rule_kind("long_toc_choices") is MC
    for name in ("multihoprag", "musique", "frames", "2wikimqa", "hotpotqa", "narrativeqa", "qasper"):
        assert rule_kind(name) is FREE
    with pytest.raises(ValueError, match="data_source: unknown 'gsm8k'"):
        rule_kind("gsm8k")
    with pytest.raises(ValueError, match="ground_truth"):
        rule_score(MC, said("(B)"), "Paris")


# --- adapters ---------------------------------------------------------------------------------

def test_verl_compute_score_signature():
    assert compute_score("docmath", said("25.3%"), "0.253") == 1.0
    assert compute_score("musique", said("Lyon"), "Paris", extra_info={"question": "q"}) == 0.0
    assert compute_score("long_toc_choices", "<think>x</think>The correct answer is (B)", "B") == 1.0
    with pytest.raises(ValueError, match="data_source"):
        compute_score("unknown", said("x"), "x")


def test_trl_reward_signature():
    prompts = ["p1", "p2", "p3"]
    completions = [said("Paris"), said("12"), [{"role": "assistant", "content": said("(A)")}]]
    scores = trl_reward(prompts, completions, data_source=["hotpotqa", "docmath", "long_toc_choices"],
                        answer=["Paris", "13", "A"])
    assert scores == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        trl_reward(prompts, completions, data_source=["hotpotqa"] * 3)


# --- properties -------------------------------------------------------------------------------

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=8).filter(
    lambda w: w not in ("an", "the"))
_wrappers = st.sampled_from(["{}", "**{}**", "*{}*", "__{}__", "`{}`", "{}.", "\"{}\"", "({})", "{}!", "  {}  ",
                             "\\boxed{{{}}}"])


@settings(max_examples=60, deadline=None)
@given(words=st.lists(_words, min_size=1, max_size=4), wrap=_wrappers, upper=st.booleans(),
       article=st.sampled_from(["", "the ", "a ", "An "]))
def test_correct_free_form_answer_in_any_formatting_scores_one(words, wrap, upper, article):
    gold = " ".join(words)
    shown = (article + gold).upper() if upper else article + gold
    assert rule_score(FREE, said(wrap.format(shown)), gold).score == 1.0


def test_an_article_before_a_gold_made_of_alternatives_is_no_extra_item():
    """Found by the property above: the gold "or aa or aa" answered as "the or aa or aa" is not a longer list."""
    assert rule_score(FREE, said("the or aa or aa"), "or aa or aa").score == 1.0


@settings(max_examples=60, deadline=None)
@given(value=st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
       style=st.sampled_from(["{:,}", "${:,}", "{} units", "approximately {}", "x = {}", "≈ {}", "**{}**"]))
def test_correct_number_in_any_formatting_scores_one(value, style):
    assert rule_score(NUM, said(style.format(value)), str(value)).score == 1.0


@settings(max_examples=60, deadline=None)
@given(gold=st.integers(min_value=1, max_value=10**6), bump=st.integers(min_value=2, max_value=9))
def test_number_off_by_more_than_tolerance_scores_zero(gold, bump):
    # a change of 1% to 9%: outside 0.15%, and no power-of-ten or x100/x1000/x100000 ratio
    wrong = Fraction(gold) * (100 + bump) / 100
    assert not numbers_match(wrong, Fraction(gold))
    assert parse_number(f"{float(wrong):.6f}") is not None


@settings(max_examples=40, deadline=None)
@given(words=st.lists(_words, min_size=1, max_size=3))
def test_sub_em_is_symmetric(words):
    a = " ".join(words)
    b = a + " extra"
    assert sub_exact_match(a, b) == sub_exact_match(b, a)
