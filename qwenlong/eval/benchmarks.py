"""The seven DocQA benchmarks of method.md section 5, and how their files are found and read.

Each benchmark is a DocQA file (JSONL or Parquet) that the user obtains from the
benchmark's own release; we read the published field names directly
(see qwenlong.data.records for the aliases):

=============  ======================  ===============================================================
benchmark      data_source (rule)      expected rows
=============  ======================  ===============================================================
DocMath        docmath (numeric)       DocMath-Eval test rows: ``question``, ``paragraphs`` (list of
                                       str), ``ground_truth`` (number); the paper's 200-item subset
Frames         frames (free-form)      Frames test rows: ``Prompt``, ``Answer``, ``wiki_items``
                                       (list of {title, text}: the linked Wikipedia pages)
2WikiMQA       2wikimqa (free-form)    LongBench v1 ``2wikimqa.jsonl``: ``input``, ``context``,
HotpotQA       hotpotqa (free-form)    ``answers`` (list), ``_id``; likewise ``hotpotqa.jsonl``,
Musique        musique (free-form)     ``musique.jsonl``, ``narrativeqa.jsonl``, ``qasper.jsonl``
NarrativeQA    narrativeqa (free-form)
Qasper         qasper (free-form)
=============  ======================  ===============================================================

Our own record rows (``id, data_source, document, question, answers``) and verl rows load too.
A directory holding ``<key>.jsonl`` or ``<key>.parquet`` per benchmark (keys below) is found
by :func:`find_benchmark_files`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qwenlong.data import DocQARecord, load_records


@dataclass(frozen=True)
class Benchmark:
    key: str  # file stem and CLI name
    title: str  # column title in the results table
    data_source: str  # routes to the reward rule


BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in (
    Benchmark("docmath", "DocMath", "docmath"),
    Benchmark("frames", "Frames", "frames"),
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
    return load_records(path, data_source=BENCHMARKS[key].data_source, skip_malformed=skip_malformed,
                        limit=limit).records
