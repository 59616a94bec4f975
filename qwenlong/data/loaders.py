"""Load DocQA records from JSONL, Parquet, and verl-style Parquet rows.

verl rows carry ``prompt`` (chat messages), ``data_source`` and
``reward_model.ground_truth``; their prompt is split back into document and question when it
follows the method's template, else kept as a rendered prompt. A malformed row raises
ValueError naming the file and row (1-based line for JSONL, 0-based item or row for JSON arrays and Parquet), or,
with ``skip_malformed=True``, is skipped and counted in :attr:`LoadResult.skipped`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenlong.data.prompt import split_prompt
from qwenlong.data.records import DocQARecord, answer_tuple, record_from_mapping


@dataclass
class LoadResult:
    """Loaded records, plus what was skipped (``errors`` holds one message per skipped row)."""

    records: list[DocQARecord]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[DocQARecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def _is_verl_row(row: Mapping[str, Any]) -> bool:
    return "prompt" in row and "reward_model" in row


def record_from_verl_row(row: Mapping[str, Any], *, default_id: str) -> DocQARecord:
    """A record from a verl row: prompt (messages or text), data_source, reward_model.ground_truth."""
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or reward_model.get("ground_truth") is None:
        raise ValueError("reward_model.ground_truth: missing")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        users = [m.get("content") for m in (prompt or []) if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError("prompt: expected text or chat messages with a user turn")
        prompt = users[-1]
    if not row.get("data_source"):
        raise ValueError("data_source: missing")
    extra = dict(row.get("extra_info") or {})
    answers = answer_tuple(reward_model["ground_truth"])
    parts = split_prompt(prompt)
    return DocQARecord(
        id=str(extra.get("id", extra.get("index", default_id))),
        data_source=str(row["data_source"]),
        document=parts[0] if parts else "",
        question=parts[1] if parts else "",
        answers=answers,
        metadata=extra,
        prompt=None if parts else prompt,
    )


def to_verl_row(record: DocQARecord) -> dict[str, Any]:
    """The record as a verl training row (the inverse of :func:`record_from_verl_row`).

    ``extra_info.question`` reaches ``compute_score``, so the judge sees the question.
    """
    from qwenlong.data.prompt import chat_messages, question_text, record_prompt

    return {"data_source": record.data_source, "prompt": chat_messages(record_prompt(record)),
            "ability": "docqa", "reward_model": {"style": "rule", "ground_truth": record.answer},
            "extra_info": {"id": record.id, "question": question_text(record)}}


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {lineno}", ValueError(f"invalid JSON: {e.msg}")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A .json file: a JSON array of rows, or JSON Lines under a .json name."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        yield from _jsonl_rows(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        yield f"line {e.lineno}", ValueError(f"invalid JSON: {e.msg}")
        return
    for index, row in enumerate(rows):
        yield f"item {index}", row


def _parquet_rows(path: Path, batch_size: int = 1024) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for item in batch.to_pylist():
            yield f"row {row}", item
            row += 1


def load_records(path: str | os.PathLike, *, data_source: str | None = None,
                 skip_malformed: bool = False, limit: int | None = None) -> LoadResult:
    """Records from a ``.jsonl``/``.json`` or ``.parquet`` file (verl rows detected per row).

    ``data_source`` overrides the rows' own (needed for benchmark files that lack one).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[tuple[str, Any]] = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"path: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")
    result = LoadResult(records=[])
    for where, row in rows:
        if limit is not None and len(result.records) >= limit:
            break
        try:
            if isinstance(row, Exception):
                raise row
            default_id = f"{path.stem}-{where.split()[-1]}"
            if isinstance(row, Mapping) and _is_verl_row(row):
                record = record_from_verl_row(row, default_id=default_id)
                if data_source:
                    record = dataclasses.replace(record, data_source=data_source)
            else:
                record = record_from_mapping(row, default_id=default_id, data_source=data_source)
        except ValueError as e:
            message = f"{path}: {where}: {e}"
            if not skip_malformed:
                raise ValueError(message) from e
            result.skipped += 1
            result.errors.append(message)
            continue
        result.records.append(record)
    return result


def write_jsonl(records: Iterable[DocQARecord], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def write_parquet(records: Iterable[DocQARecord], path: str | os.PathLike, *, verl: bool = False) -> None:
    """Records as Parquet: our own columns, or verl rows when ``verl``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def columns(record: DocQARecord) -> dict[str, Any]:
        # Fixed columns for every row; metadata as JSON text (its keys vary row to row).
        row = record.to_dict()
        return {**row, "choices": list(record.choices), "prompt": record.prompt,
                "metadata": json.dumps(dict(record.metadata), ensure_ascii=False)}

    rows = [to_verl_row(r) if verl else columns(r) for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path)
