"""Scoring a batch of benchmark answers: the hybrid reward for DocQA items, MRCR's own similarity score.

The DocQA benchmarks (LongBench v2's letters included) are scored by the training reward's rules (and
judge), whose scores are 0 or 1. MRCR is not a right-or-wrong task: its release grades a reproduced
passage by how closely it matches the reference (``difflib.SequenceMatcher``'s ratio, in [0, 1]), and
only if the answer opens with the random string the request asked to prepend, the check that the model
answered the request at all rather than quoting some passage. A benchmark's score is the mean over its
answers, which for 0/1 scores is the accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher

from qwenlong.data import DocQARecord
from qwenlong.data.prompt import question_text
from qwenlong.rewards import HybridReward, RewardItem, RewardResult
from qwenlong.rewards.extract import THINK_END

MRCR_SOURCE = "mrcr"
MRCR_PREFIX = "random_string_to_prepend"  # the release's field, kept in the record's metadata


def final_answer(response: str) -> str:
    """What a response answers: a thinking model's text after its last ``</think>``, less the blank lines
    that separate it from the reasoning (the chat format's, and what ``openai_generate_fn`` puts back
    between a server's reasoning and content); a response without reasoning, as it is."""
    if THINK_END not in response:
        return response
    return response.rsplit(THINK_END, 1)[1].lstrip()


def mrcr_ratio(answer: str, reference: str, prefix: str) -> float:
    """MRCR's grade: 0 unless ``answer`` starts with ``prefix``; else the SequenceMatcher ratio of
    ``answer`` and ``reference``, each without the prefix (the reference opens with it too)."""
    if not answer.startswith(prefix):
        return 0.0
    return SequenceMatcher(None, answer.removeprefix(prefix), reference.removeprefix(prefix)).ratio()


def mrcr_result(record: DocQARecord, response: str) -> RewardResult:
    """One MRCR answer scored; its rule score is the same ratio (no judge is asked)."""
    prefix = record.metadata.get(MRCR_PREFIX)
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"metadata.{MRCR_PREFIX}: record {record.id!r} has no random string to check the "
                         "answer against")
    answer = final_answer(response)
    score = mrcr_ratio(answer, record.answer, prefix)
    return RewardResult(score, score, None, answer)


def score_responses(reward: HybridReward, records: Sequence[DocQARecord],
                    responses: Sequence[str]) -> list[RewardResult]:
    """Each response scored against its record, in order: MRCR records by their ratio, the others in one
    call to ``reward`` (so its judge sees them as one batch)."""
    if len(records) != len(responses):
        raise ValueError(f"responses: {len(responses)} for {len(records)} records")
    docqa = [i for i, r in enumerate(records) if r.data_source != MRCR_SOURCE]
    scored = reward.score([RewardItem(records[i].data_source, responses[i], list(records[i].answers),
                                      question_text(records[i])) for i in docqa])
    results = dict(zip(docqa, scored, strict=True))
    return [results[i] if i in results else mrcr_result(record, responses[i])
            for i, record in enumerate(records)]
