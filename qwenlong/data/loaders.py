"""Load DocQA records from JSONL, Parquet, and verl-style Parquet rows.

verl rows carry ``prompt`` (chat messages), ``data_source`` and
``reward_model.ground_truth``; their prompt is split back into document and question when it
follows the method's template, else kept as a rendered prompt. A malformed row (wrong types, a line
that is not UTF-8 or not JSON, nesting deeper than ``MAX_NESTING``, a blank or placeholder gold answer,
a ``data_source`` no reward rule knows, a record the caller's ``check`` refuses) raises :class:`DataError`
naming the file and row (1-based line for JSONL, 0-based item or row for JSON arrays and Parquet), or, with
``skip_malformed=True``, is skipped and counted in :attr:`LoadResult.skipped`; the rows around it load
either way. A file that cannot be read as a whole (a corrupt Parquet file) is a ``DataError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenlong.data.prompt import split_prompt
from qwenlong.data.records import DocQARecord, answer_tuple, metadata_mapping, record_from_mapping
from qwenlong.data.sources import rule_kind

MAX_NESTING = 64  # lists and objects inside one another; real rows need a handful


class DataError(ValueError):
    """A data file or one of its rows cannot be loaded; the message names the file (and row)."""


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
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt: expected text or a list of chat messages, got {type(prompt).__name__}")
        users = [m.get("content") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError("prompt: expected text or chat messages with a user turn")
        prompt = users[-1]
    if not row.get("data_source"):
        raise ValueError("data_source: missing")
    if not isinstance(row["data_source"], str):
        raise ValueError(f"data_source: expected text, got {type(row['data_source']).__name__}")
    extra = metadata_mapping(row.get("extra_info"), key="extra_info")
    answers = answer_tuple(reward_model["ground_truth"])
    parts = split_prompt(prompt)
    record_id = next((extra[key] for key in ("id", "index") if extra.get(key) is not None), default_id)
    return DocQARecord(
        id=str(record_id),
        data_source=str(row["data_source"]),
        document=parts[0] if parts else "",
        question=parts[1] if parts else "",
        answers=answers,
        metadata=extra,
        prompt=None if parts else prompt,
    )


def to_verl_row(record: DocQARecord) -> dict[str, Any]:
    """The record as a verl training row (the inverse of :func:`record_from_verl_row`).

    ``extra_info.question`` reaches ``compute_score``, so the judge sees the question. ``ground_truth`` is
    the list of every gold answer (one or more): ``compute_score`` takes the best match over them, and a
    column of one type stays one Parquet type.
    """
    from qwenlong.data.prompt import chat_messages, question_text, record_prompt

    return {"data_source": record.data_source, "prompt": chat_messages(record_prompt(record)),
            "ability": "docqa", "reward_model": {"style": "rule", "ground_truth": list(record.answers)},
            "extra_info": {"id": record.id, "question": question_text(record)}}


def _parse_json(data: bytes) -> Any:
    """One JSON value from UTF-8 bytes; a ValueError saying what is wrong with them."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_NESTING} levels") from None


_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark: Windows editors and exports start files with it


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Each line on its own (read as bytes: one line that is not UTF-8 spoils only itself)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", _parse_json(line)
            except ValueError as e:
                yield f"line {lineno}", e


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A .json file: a JSON array of rows, or JSON Lines under a .json name."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_rows(path)
        return
    try:
        rows = _parse_json(path.read_bytes().removeprefix(_BOM))
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    for index, row in enumerate(rows):
        yield f"item {index}", row


def file_rows(path: str | os.PathLike, parquet_batch: int = 1024) -> Iterable[tuple[str, Any]]:
    """``(where, row)`` of a ``.jsonl`` / ``.json`` / ``.parquet`` data file, read as it goes (Parquet
    ``parquet_batch`` rows at a time: fewer for rows of megabytes). A JSON Lines line that is not JSON arrives as
    its ValueError, so that a caller can skip only it. A missing file or another type is a DataError at once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"path: {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path, parquet_batch)
    raise DataError(f"path: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")


def _parquet_rows(path: Path, batch_size: int) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            for item in batch.to_pylist():
                yield f"row {row}", item
                row += 1
    except (pa.ArrowException, OSError) as e:
        where = f" after row {row - 1}" if row else ""
        raise DataError(f"{path}: not a readable Parquet file{where} ({' '.join(str(e).split())[:300]})") from None


def _check_nesting(row: Any) -> None:
    """A ValueError when ``row`` nests lists and objects deeper than ``MAX_NESTING`` (iterative: any depth)."""
    stack = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth > MAX_NESTING:
            raise ValueError(f"nested deeper than {MAX_NESTING} levels")
        stack.extend((child, depth + 1) for child in children)


def _check_data_source(data_source: str) -> None:
    """A ValueError when no reward rule routes ``data_source`` (it would fail at the first score, mid-run)."""
    rule_kind(data_source)


def load_records(path: str | os.PathLike, *, data_source: str | None = None, skip_malformed: bool = False,
                 limit: int | None = None, check: Callable[[DocQARecord], None] | None = None) -> LoadResult:
    """Records from a ``.jsonl``/``.json`` or ``.parquet`` file (verl rows detected per row).

    ``data_source`` overrides the rows' own (needed for benchmark files that lack one). Every row's
    data source must be one a reward rule routes (``qwenlong.data.sources.rule_kind``). ``check`` runs on
    every record: a ValueError from it makes the row malformed (e.g. the reward's check of its gold answers,
    ``qwenlong.rewards.check_record_answers``, which training data loads with).
    """
    path = Path(path)
    if data_source is not None:
        try:
            _check_data_source(data_source)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
    rows = file_rows(path)
    result = LoadResult(records=[])
    for where, row in rows:
        if limit is not None and len(result.records) >= limit:
            break
        try:
            if isinstance(row, Exception):
                raise row
            _check_nesting(row)
            default_id = f"{path.stem}-{where.split()[-1]}"
            if isinstance(row, Mapping) and _is_verl_row(row):
                record = record_from_verl_row(row, default_id=default_id)
                if data_source:
                    record = dataclasses.replace(record, data_source=data_source)
            else:
                record = record_from_mapping(row, default_id=default_id, data_source=data_source)
            if data_source is None:
                _check_data_source(record.data_source)
            if check is not None:
                check(record)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            # ValueError: a check of ours; the others: a row shaped in a way no check foresaw
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            message = f"{path}: {where}: {' '.join(reason.split())[:500]}"
            if not skip_malformed:
                raise DataError(message) from e
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
