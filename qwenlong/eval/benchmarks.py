"""The benchmarks of method.md section 5 and l15.md section 6, and how their files are found and read.

Each benchmark is a DocQA file (JSONL or Parquet) that the user obtains from the
benchmark's own release; we read the published field names directly
(see qwenlong.data.records for the aliases):

=============  ======================  ===============================================================
benchmark      data_source (rule)      expected rows
=============  ======================  ===============================================================
DocMath        docmath (numeric)       DocMath-Eval test rows: ``question``, ``paragraphs`` (list of
                                       str), ``ground_truth`` (number); the paper's 200-item subset
LBV2           longbench_v2            LongBench v2 ``data.json`` (a JSON array; or its Parquet copy):
               (multiple choice)       ``_id``, ``question``, ``choice_A`` .. ``choice_D``, ``answer``
                                       (a letter), ``context``; ``domain``, ``difficulty``, ``length``
                                       kept as metadata
Frames         frames (free-form)      Frames test rows: ``Prompt``, ``Answer``, ``wiki_items``
                                       (list of {title, text}: the linked Wikipedia pages)
MRCR           mrcr (similarity,       OpenAI MRCR Parquet (``2needle.parquet``, ...): ``prompt`` (JSON
               qwenlong.eval.scoring)  text of the chat messages, the last the user's request),
                                       ``answer``, ``random_string_to_prepend``; ``n_needles``,
                                       ``desired_msg_index``, ``total_messages``, ``n_chars`` kept
2WikiMQA       2wikimqa (free-form)    LongBench v1 ``2wikimqa.jsonl``: ``input``, ``context``,
HotpotQA       hotpotqa (free-form)    ``answers`` (list), ``_id``; likewise ``hotpotqa.jsonl``,
Musique        musique (free-form)     ``musique.jsonl``, ``narrativeqa.jsonl``, ``qasper.jsonl``
NarrativeQA    narrativeqa (free-form)
Qasper         qasper (free-form)
=============  ======================  ===============================================================

Our own record rows (``id, data_source, document, question, answers``, with ``choices`` for LBV2)
and verl rows load too. A directory holding ``<key>.jsonl``, ``<key>.parquet`` or ``<key>.json`` per
benchmark (keys below) is found by :func:`find_benchmark_files`.

LBV2 is asked in the method's prompt with its options lettered (A) to (D) and scored by the
multiple-choice rule on the letter.
An MRCR record is a conversation (:mod:`qwenlong.eval.chat`): its earlier turns stay turns, its
request is the question. CorpusQA is not here: its release publishes no data file format yet.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenlong.data import DataError, DocQARecord, load_records, record_from_mapping
from qwenlong.data.loaders import file_rows
from qwenlong.data.prompt import CHOICE_LETTERS
from qwenlong.eval.chat import CHAT_HISTORY, chat_history, parse_messages
from qwenlong.eval.scoring import MRCR_PREFIX, MRCR_SOURCE


@dataclass(frozen=True)
class Benchmark:
    key: str  # file stem and CLI name
    title: str  # column title in the results table
    data_source: str  # routes to the reward rule


BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in (
    Benchmark("docmath", "DocMath", "docmath"),
    Benchmark("lbv2", "LBV2", "longbench_v2"),
    Benchmark("frames", "Frames", "frames"),
    Benchmark("mrcr", "MRCR", MRCR_SOURCE),
    Benchmark("2wikimqa", "2Wiki", "2wikimqa"),
    Benchmark("hotpotqa", "HotpotQA", "hotpotqa"),
    Benchmark("musique", "Musique", "musique"),
    Benchmark("narrativeqa", "NarrativeQA", "narrativeqa"),
    Benchmark("qasper", "Qasper", "qasper"),
)}


def find_benchmark_files(directory: str | os.PathLike) -> dict[str, Path]:
    """``{key: path}`` for each benchmark file present in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"directory: {directory} is not a directory")
    found = {}
    for key in BENCHMARKS:
        for suffix in (".jsonl", ".parquet", ".json"):
            if (directory / f"{key}{suffix}").is_file():
                found[key] = directory / f"{key}{suffix}"
                break
    return found


def load_benchmark(key: str, path: str | os.PathLike, *, limit: int | None = None,
                   skip_malformed: bool = False) -> list[DocQARecord]:
    """A benchmark's records, routed to the benchmark's rule whatever the rows say."""
    if key not in BENCHMARKS:
        raise ValueError(f"benchmark: unknown {key!r}; expected one of {sorted(BENCHMARKS)}")
    if key == "mrcr":
        return load_mrcr(path, limit=limit, skip_malformed=skip_malformed)
    records = load_records(path, data_source=BENCHMARKS[key].data_source, skip_malformed=skip_malformed,
                           limit=limit).records
    return with_lettered_choices(path, records, skip_malformed) if key == "lbv2" else records


def lettered_choices(record: DocQARecord) -> DocQARecord:
    """A LongBench v2 record with its options as ``choices`` (the release names them ``choice_A`` ..
    ``choice_D``) and its gold answer checked to be one of their letters; a record that already has
    ``choices`` (our own rows) is only checked."""
    metadata = dict(record.metadata)
    choices = record.choices
    if not choices:
        letters = CHOICE_LETTERS[:4]
        missing = [f"choice_{letter}" for letter in letters if not isinstance(metadata.get(f"choice_{letter}"), str)]
        if missing:
            raise ValueError(f"{', '.join(missing)}: missing or not text (LongBench v2 gives four options)")
        choices = tuple(metadata.pop(f"choice_{letter}").strip() for letter in letters)
    answer = record.answer.strip()
    if len(record.answers) != 1 or len(answer) != 1 or answer not in CHOICE_LETTERS[:len(choices)]:
        raise ValueError(f"answer: expected one letter of {CHOICE_LETTERS[:len(choices)]}, got {record.answers!r}")
    return dataclasses.replace(record, choices=choices, answers=(answer,), metadata=metadata)


def with_lettered_choices(path: str | os.PathLike, records: list[DocQARecord],
                          skip_malformed: bool) -> list[DocQARecord]:
    """:func:`lettered_choices` of each record; a bad one is a DataError naming the file and the record's
    id, or skipped with ``skip_malformed``."""
    out = []
    for record in records:
        try:
            out.append(lettered_choices(record))
        except ValueError as error:
            if not skip_malformed:
                raise DataError(f"{path}: record {record.id!r}: {error}") from None
    return out


def mrcr_record(row: Any, default_id: str) -> DocQARecord:
    """One MRCR row as a chat record: the conversation's earlier turns in ``metadata["chat_history"]``,
    its last turn (the user's request to reproduce one passage, prefixed) as the question, ``answer`` the
    reference; the other fields (``random_string_to_prepend``, ``n_needles``, ...) kept as metadata.
    Our own rows of such records (``write_jsonl`` / ``write_parquet``: a subset saved) load back."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row: expected an object, got {type(row).__name__}")
    if row.get("prompt") is None and "question" in row:
        record = record_from_mapping(row, default_id=default_id, data_source=MRCR_SOURCE)
        if chat_history(record) is None:
            raise ValueError(f"metadata.{CHAT_HISTORY}: missing (an MRCR record is a conversation)")
        _check_prefix(record.metadata.get(MRCR_PREFIX))
        return record
    *history, request = parse_messages(row.get("prompt"))
    if request["role"] != "user" or not request["content"].strip():
        raise ValueError(f"prompt: the last message must be the user's request, got a {request['role']} turn"
                         f"{'' if request['content'].strip() else ' without text'}")
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"answer: expected the reference text, got {str(answer)[:80]!r}")
    _check_prefix(row.get(MRCR_PREFIX))
    metadata = {k: v for k, v in row.items() if k not in ("id", "prompt", "answer")}
    return DocQARecord(id=str(row.get("id", default_id)), data_source=MRCR_SOURCE, document="",
                       question=request["content"], answers=(answer,),
                       metadata={**metadata, CHAT_HISTORY: history})


def _check_prefix(prefix: Any) -> None:
    """MRCR scores 0 any answer not opening with this string: without it nothing can be scored."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"{MRCR_PREFIX}: expected the string the answer must start with, got {prefix!r}")


def load_mrcr(path: str | os.PathLike, *, limit: int | None = None,
              skip_malformed: bool = False) -> list[DocQARecord]:
    """MRCR's records from a ``.parquet`` file (the release's), ``.jsonl`` or ``.json``; a malformed row is a
    DataError naming the file and row (0-based for Parquet and JSON arrays, the line for JSONL), or skipped
    with ``skip_malformed``. Ids are ``<file stem>-<row>`` (the release has none)."""
    path = Path(path)
    records = []
    for where, row in file_rows(path, parquet_batch=16):  # an MRCR row holds up to megabytes of chat
        if limit is not None and len(records) >= limit:
            break
        try:
            if isinstance(row, ValueError):
                raise row
            records.append(mrcr_record(row, f"{path.stem}-{where.split()[-1]}"))
        except ValueError as error:
            if not skip_malformed:
                raise DataError(f"{path}: {where}: {error}") from None
    return records


