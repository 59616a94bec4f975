"""Deterministic synthetic long-document QA: the default data for tests and the CPU demo.

A document is filler prose with a few *facts* spread through it; the question needs one or
two of them. Tasks, from easiest to hardest for a tiny model trained from scratch:

* ``copy_marked_fact``: one fact is marked (``[KEY FACT] The password is river.``); the
  answer copies its value. Distractor facts are unmarked, so no key->value binding is needed.
* ``retrieval``: 1 + ``num_distractor_facts`` facts ``The code of the amber falcon is river.``;
  the question names one key (binding a key to its value among several).
* ``multiple_choice``: retrieval with lettered options; the gold answer is a letter.
* ``arithmetic``: two numeric facts about one company (DocMath-style); the answer is their
  sum or difference.

Everything is drawn from ``random.Random`` seeded per record, so record ``i`` of a seed is
the same whatever the batch size. Document length is measured with the given tokenizer
and lands within a few tokens of ``document_tokens``.

``teacher_response`` writes warm-up SFT traces as a distilling teacher would, right only with a
given probability. A wrong trace either follows a distractor from the start (``evidence``: quotes
it and answers its value; for arithmetic, misreads a number) or quotes the right evidence and
then concludes with a distractor's answer anyway (``conclusion``).
``reference_response`` is the always-right teacher.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qwenlong.data.records import DocQARecord

TASKS = ("copy_marked_fact", "retrieval", "multiple_choice", "arithmetic")
TEACHER_ERRORS = ("evidence", "conclusion")
DISTRACTOR_VALUES = ("shared", "other")
DATA_SOURCES = {"copy_marked_fact": "synthetic_copy", "retrieval": "synthetic_retrieval",
                "multiple_choice": "synthetic_choice", "arithmetic": "synthetic_arithmetic"}

ANSWER_WORDS = ("river", "apple", "stone", "cloud", "maple", "tiger", "amber", "ocean", "lemon", "violet",
                "copper", "falcon", "meadow", "silver", "harbor", "canyon", "pepper", "willow", "marble",
                "comet", "garnet", "lantern", "orchid", "quartz", "saddle", "timber", "velvet", "walnut",
                "zephyr", "basil", "cedar", "ember")
_COLORS = ("amber", "azure", "crimson", "golden", "ivory", "jade", "scarlet", "silver", "teal", "violet")
_ANIMALS = ("falcon", "otter", "lynx", "heron", "badger", "panther", "raven", "salmon", "walrus", "gecko")
_COMPANIES = ("Northwind", "Bluepeak", "Redstone", "Greenfield", "Ironbay", "Lakeside", "Oakmont", "Silverline")
_SUBJECTS = ("The committee", "A farmer", "The old clerk", "Our neighbor", "The engineer", "A traveler",
             "The council", "The teacher", "A merchant", "The captain")
_VERBS = ("reviewed", "painted", "carried", "described", "ignored", "repaired", "measured", "counted",
          "visited", "borrowed")
_OBJECTS = ("the wooden bridge", "a quiet garden", "the long report", "several boxes", "the narrow road",
            "an empty barn", "the village map", "a heavy ledger", "the north tower", "some fresh bread")
_TIMES = ("in the morning", "after lunch", "last winter", "before the storm", "on Tuesday", "at dusk",
          "during the fair", "for an hour", "without a word", "with great care")
_SHORT = ("It rained.", "Time passed.", "All was calm.", "Nobody spoke.", "Birds sang.")


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.

    task: one of TASKS, or "mixed" to cycle through them record by record.
    document_tokens: target document length in tokens of the tokenizer passed to the generator.
    num_distractor_facts: facts that are not asked about (the difficulty knob).
    answer_vocab_size: values are drawn from the first this-many ANSWER_WORDS.
    num_choices: options per multiple-choice question.
    fact_position: where the asked fact sits, as a fraction of the document; None = random.
    distractor_values: "shared": distractor facts draw their values from the answer words too, so
        a reader must tell which fact holds the answer (for ``copy_marked_fact``, the marked one: a
        key->value binding a tiny model learns slowly); "other": from the remaining ANSWER_WORDS,
        never an answer, so copying the one answer word of the document is enough.
    """

    task: str = "retrieval"
    document_tokens: int = 512
    num_distractor_facts: int = 3
    answer_vocab_size: int = 16
    num_choices: int = 4
    fact_position: float | None = None
    distractor_values: str = "shared"

    def __post_init__(self):
        if self.task not in TASKS + ("mixed",):
            raise ValueError(f"task: expected one of {TASKS + ('mixed',)}, got {self.task!r}")
        if self.document_tokens < 64:
            raise ValueError(f"document_tokens: must be >= 64, got {self.document_tokens}")
        if self.num_distractor_facts < 0:
            raise ValueError(f"num_distractor_facts: must be >= 0, got {self.num_distractor_facts}")
        if not 2 <= self.answer_vocab_size <= len(ANSWER_WORDS):
            raise ValueError(f"answer_vocab_size: must be in [2, {len(ANSWER_WORDS)}], got {self.answer_vocab_size}")
        if not 2 <= self.num_choices <= self.answer_vocab_size:
            raise ValueError(f"num_choices: must be in [2, answer_vocab_size], got {self.num_choices}")
        if self.fact_position is not None and not 0.0 <= self.fact_position <= 1.0:
            raise ValueError(f"fact_position: must be in [0, 1] or None, got {self.fact_position}")
        if self.distractor_values not in DISTRACTOR_VALUES:
            raise ValueError(f"distractor_values: expected one of {DISTRACTOR_VALUES}, got {self.distractor_values!r}")
        if self.distractor_values == "other" and self.answer_vocab_size == len(ANSWER_WORDS):
            raise ValueError(f"answer_vocab_size: must be below {len(ANSWER_WORDS)} to leave words for "
                             "distractor_values='other'")


def _count(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of texts; without a tokenizer, whitespace-separated words."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(_COLORS)} {rng.choice(_ANIMALS)}"
        if key not in used:
            used.add(key)
            return key


def _facts(task: str, config: SyntheticConfig, rng: random.Random) -> dict[str, Any]:
    """The asked fact(s), distractors, question, answer and a short worked reasoning."""
    vocab = ANSWER_WORDS[: config.answer_vocab_size]
    keys: set[str] = set()
    if task == "arithmetic":
        company = rng.choice(_COMPANIES)
        year = rng.randint(2001, 2020)
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        asked = [f"In {year}, {company} reported revenue of {a} million dollars.",
                 f"In {year + 1}, {company} reported revenue of {b} million dollars."]
        distractors = []
        for _ in range(config.num_distractor_facts):
            other = rng.choice([c for c in _COMPANIES if c != company])
            distractors.append(f"In {rng.randint(2001, 2021)}, {other} reported revenue of "
                               f"{rng.randint(100, 999)} million dollars.")
        # a wrong trace misreads one number by 100, in the direction that moves the result away from
        # the gold (a sign flip or a factor of ten would pass the numeric rule)
        if rng.random() < 0.5:
            question = f"What was the total revenue of {company} in {year} and {year + 1}, in million dollars?"
            answer, reasoning = str(a + b), f"{a} + {b} = {a + b}"
            wrong = {"reasoning": f"{a + 100} + {b} = {a + b + 100}", "answer": str(a + b + 100)}
        else:
            question = f"By how much did the revenue of {company} change from {year} to {year + 1}, in million dollars?"
            answer, reasoning = str(b - a), f"{b} - {a} = {b - a}"
            wrong = ({"reasoning": f"{b + 100} - {a} = {b - a + 100}", "answer": str(b - a + 100)} if b >= a
                     else {"reasoning": f"{b} - {a + 100} = {b - a - 100}", "answer": str(b - a - 100)})
        return {"asked": asked, "distractors": distractors, "question": question, "answers": (answer,),
                "choices": (), "reasoning": reasoning, "wrong_traces": [wrong]}

    if config.distractor_values == "other":
        others = ANSWER_WORDS[config.answer_vocab_size:]
        values = [rng.choice(vocab)] + [rng.choice(others) for _ in range(config.num_distractor_facts)]
    else:
        values = rng.sample(vocab, min(len(vocab), 1 + config.num_distractor_facts))
        values += [rng.choice(vocab) for _ in range(1 + config.num_distractor_facts - len(values))]
    value = values[0]
    distractors = [f"The code of the {_key(rng, keys)} is {v}." for v in values[1:]]
    if task == "copy_marked_fact":
        asked = [f"[KEY FACT] The password is {value}."]
        question = "What is the password given in the key fact?"
    else:
        key = _key(rng, keys)
        asked = [f"The code of the {key} is {value}."]
        question = f"What is the code of the {key}?"
    choices: tuple[str, ...] = ()
    answers: tuple[str, ...] = (value,)
    wrong = [(f"The document says: {fact}", v) for fact, v in zip(distractors, values[1:], strict=True) if v != value]
    if task == "multiple_choice":
        options = [value] + rng.sample([v for v in vocab if v != value], config.num_choices - 1)
        rng.shuffle(options)
        choices = tuple(options)
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        answers = (letters[options.index(value)],)
        # a teacher misled by a distractor picks the option naming its value, else the first wrong one
        first_wrong = letters[next(i for i, option in enumerate(options) if option != value)]
        wrong = [(reasoning, letters[options.index(v)] if v in options else first_wrong) for reasoning, v in wrong]
    return {"asked": asked, "distractors": distractors, "question": question, "answers": answers,
            "choices": choices, "reasoning": f"The document says: {asked[0]}",
            "wrong_traces": [{"reasoning": reasoning, "answer": answer} for reasoning, answer in wrong]}


def _fill(tokenizer: Any, budget: int, rng: random.Random) -> list[str]:
    """Filler sentences totalling about ``budget`` tokens (each counted with a leading space)."""
    sentences: list[str] = []
    remaining = budget
    while True:
        batch = [_filler_sentence(rng) for _ in range(max(1, remaining // 12 + 1))]
        fitted = False
        for sentence, n in zip(batch, _count(tokenizer, [" " + s for s in batch]), strict=True):
            if n > remaining:
                break
            sentences.append(sentence)
            remaining -= n
            fitted = True
        if not fitted:
            break
    for short, n in zip(_SHORT, _count(tokenizer, [" " + s for s in _SHORT]), strict=True):  # close the last gap
        while n <= remaining:
            sentences.append(short)
            remaining -= n
    rng.shuffle(sentences)
    return sentences


def make_record(index: int, config: SyntheticConfig, seed: int = 0, tokenizer: Any = None) -> DocQARecord:
    """Record ``index`` of the stream for ``seed`` (independent of every other record)."""
    rng = random.Random(f"qwenlong-synthetic:{seed}:{index}")
    task = TASKS[index % len(TASKS)] if config.task == "mixed" else config.task
    spec = _facts(task, config, rng)
    facts = spec["asked"] + spec["distractors"]
    fact_tokens = sum(_count(tokenizer, [" " + f for f in facts]))
    if fact_tokens > config.document_tokens:
        raise ValueError(f"document_tokens: {config.document_tokens} is too small for {len(facts)} facts "
                         f"({fact_tokens} tokens); lower num_distractor_facts or raise document_tokens")
    filler = _fill(tokenizer, config.document_tokens - fact_tokens, rng)

    # Insert facts at distinct positions; the asked fact(s) at fact_position when given.
    positions = sorted(rng.sample(range(len(filler) + 1), k=min(len(facts), len(filler) + 1)))
    rng.shuffle(positions)
    if config.fact_position is not None:
        target = round(config.fact_position * len(filler))
        positions = [target] + [p for p in positions if p != target][: len(facts) - 1]
    positions += [len(filler)] * (len(facts) - len(positions))
    slots: dict[int, list[str]] = {}
    for fact, position in zip(facts, positions, strict=True):
        slots.setdefault(position, []).append(fact)
    sentences: list[str] = []
    for i in range(len(filler) + 1):
        sentences.extend(slots.get(i, []))
        if i < len(filler):
            sentences.append(filler[i])
    document = " ".join(sentences)
    return DocQARecord(
        id=f"synthetic-{seed}-{index}",
        data_source=DATA_SOURCES[task],
        document=document,
        question=spec["question"],
        answers=spec["answers"],
        choices=spec["choices"],
        metadata={"task": task, "evidence": spec["asked"], "reasoning": spec["reasoning"],
                  "wrong_traces": spec["wrong_traces"], "document_tokens": sum(_count(tokenizer, [document]))},
    )


def generate_records(num_records: int, config: SyntheticConfig | None = None, *, seed: int = 0,
                     tokenizer: Any = None, document_tokens_range: tuple[int, int] | None = None,
                     start: int = 0) -> Iterator[DocQARecord]:
    """Records ``start .. start + num_records - 1`` (lengths measured with ``tokenizer``; words when None).

    ``document_tokens_range=(lo, hi)`` draws each record's length uniformly from [lo, hi]
    (reproducibly per index) instead of ``config.document_tokens``.
    """
    if num_records < 0:
        raise ValueError(f"num_records: must be >= 0, got {num_records}")
    config = config or SyntheticConfig()
    if document_tokens_range is not None and not 64 <= document_tokens_range[0] <= document_tokens_range[1]:
        raise ValueError(f"document_tokens_range: expected 64 <= lo <= hi, got {document_tokens_range}")
    for index in range(start, start + num_records):
        if document_tokens_range is not None:
            length = random.Random(f"qwenlong-synthetic-length:{seed}:{index}").randint(*document_tokens_range)
            yield make_record(index, dataclasses.replace(config, document_tokens=length), seed, tokenizer)
        else:
            yield make_record(index, config, seed, tokenizer)


def _trace(record: DocQARecord, reasoning: str, answer: str) -> str:
    answer = f"({answer})" if record.choices else answer
    return f"<think>\n{reasoning}\n</think>\n\nTherefore, the answer is {answer}."


def reference_response(record: DocQARecord) -> str:
    """A correct reasoning trace in the method's format, for warm-up SFT and reward tests."""
    return _trace(record, record.metadata.get("reasoning", ""), record.answer)


def teacher_response(record: DocQARecord, accuracy: float = 1.0, seed: int = 0, error: str = "evidence") -> str:
    """A warm-up SFT trace from a teacher that is right with probability ``accuracy``.

    Distilled warm-up data is not all correct, and imitation copies the teacher's mistakes along
    with its skill; removing them is what RL on a verifiable reward is for. A wrong trace takes
    one of the record's ``wrong_traces`` (a distractor, or a misread number): all of it for
    ``error="evidence"``, only its final answer after the right reasoning for ``"conclusion"``.
    The draw is reproducible per (seed, record id); records without a wrong trace are always right.
    """
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy: must be in [0, 1], got {accuracy}")
    if error not in TEACHER_ERRORS:
        raise ValueError(f"error: expected one of {TEACHER_ERRORS}, got {error!r}")
    rng = random.Random(f"qwenlong-teacher:{seed}:{record.id}")
    wrong = record.metadata.get("wrong_traces") or []
    if rng.random() < accuracy or not wrong:
        return reference_response(record)
    trace = rng.choice(wrong)
    reasoning = trace["reasoning"] if error == "evidence" else record.metadata.get("reasoning", "")
    return _trace(record, reasoning, trace["answer"])


TWO_CHUNK_SOURCE = "synthetic_copy_two_chunk"  # routes to the free-form rule (contains "synthetic_copy")


def make_two_chunk_record(index: int, document_tokens: int, seed: int = 0, tokenizer: Any = None,
                          num_distractor_facts: int = 2, answer_vocab_size: int = 16) -> DocQARecord:
    """A record whose answer needs two facts from opposite halves of the document (the memory agent's task).

    ``[KEY FACT] The first word of the password is river.`` sits in about the first quarter of the document,
    ``[KEY FACT] The second word of the password is stone.`` in about the last quarter; the answer is
    ``river stone``. Cut in two at its middle token, the two facts land in different chunks, so a
    reader that sees one chunk at a time must carry the first word in its memory to the end.
    Distractor facts draw their values from words that are never answers.
    """
    if not 2 <= answer_vocab_size < len(ANSWER_WORDS):
        raise ValueError(f"answer_vocab_size: must be in [2, {len(ANSWER_WORDS) - 1}], got {answer_vocab_size}")
    rng = random.Random(f"qwenlong-synthetic-two-chunk:{seed}:{index}")
    first, second = rng.sample(ANSWER_WORDS[:answer_vocab_size], 2)
    keys: set[str] = set()
    asked = [f"[KEY FACT] The first word of the password is {first}.",
             f"[KEY FACT] The second word of the password is {second}."]
    distractors = [f"The code of the {_key(rng, keys)} is {rng.choice(ANSWER_WORDS[answer_vocab_size:])}."
                   for _ in range(num_distractor_facts)]
    facts = asked + distractors
    fact_tokens = sum(_count(tokenizer, [" " + f for f in facts]))
    if fact_tokens > document_tokens:
        raise ValueError(f"document_tokens: {document_tokens} is too small for {len(facts)} facts ({fact_tokens} "
                         "tokens); lower num_distractor_facts or raise document_tokens")
    # two halves of filler; the first word in the first half of the first, the second in the second half of the second
    halves = [_fill(tokenizer, (document_tokens - fact_tokens) // 2, rng) for _ in range(2)]
    halves[0].insert(rng.randint(0, len(halves[0]) // 2), asked[0])
    halves[1].insert(rng.randint(len(halves[1]) - len(halves[1]) // 2, len(halves[1])), asked[1])
    for fact in distractors:
        half = halves[rng.randrange(2)]
        half.insert(rng.randint(0, len(half)), fact)
    sentences = halves[0] + halves[1]
    document = " ".join(sentences)
    return DocQARecord(
        id=f"synthetic-two-chunk-{seed}-{index}", data_source=TWO_CHUNK_SOURCE, document=document,
        question="What is the password given by the two key facts (its first word, then its second word)?",
        answers=(f"{first} {second}",),
        metadata={"task": "two_chunk", "evidence": asked,
                  "reasoning": f"The first key fact gives {first}; the second gives {second}.",
                  "document_tokens": sum(_count(tokenizer, [document]))})
