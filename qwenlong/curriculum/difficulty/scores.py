"""Pre-inference: n answers per item from the base model, each scored with the RL reward, one JSONL row
per item (``id``, ``data_source``, ``n``, ``c`` accurate, ``k``, ``pass_at_k``, ``accuracy`` = c/n,
``mean_score``).

"Accurate" is what it means in RL and in the evaluation: the hybrid reward of the answer is 1.0
(``RewardResult.accurate``), scored from the same ``RewardItem`` (data source, response, every gold
answer, the question) the RL trainer builds. A long pre-inference survives being stopped: rows are
appended, flushed and synced after every batch of items, so a run that dies loses at most the batch in
flight, and a run started again on the same file generates only for the items it does not hold. A last
line cut off mid-write (the process killed during the append) is dropped and its item scored again;
any other unreadable line is a :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenlong.curriculum.difficulty.bins import pass_at_k
from qwenlong.data.loaders import DataError
from qwenlong.data.prompt import question_text, record_prompt
from qwenlong.data.records import DocQARecord

Key = tuple[str, str]  # (data_source, id): ids need only be unique within a source


@dataclass(frozen=True)
class ItemScore:
    """One item's pre-inference: ``c`` of its ``n`` answers accurate; ``mean_score`` the mean reward."""

    id: str
    data_source: str
    n: int
    c: int
    mean_score: float

    @property
    def key(self) -> Key:
        return (self.data_source, self.id)

    @property
    def accuracy(self) -> float:
        return self.c / self.n

    def pass_at(self, k: int) -> float:
        return pass_at_k(self.n, self.c, k)

    def to_row(self, k: int) -> dict[str, Any]:
        """The results file's row; ``pass_at_k`` with this run's k (binning recomputes it from n and c)."""
        return {"id": self.id, "data_source": self.data_source, "n": self.n, "c": self.c, "k": k,
                "pass_at_k": self.pass_at(k), "accuracy": self.accuracy, "mean_score": self.mean_score}


def score_from_row(row: Any) -> ItemScore:
    """An :class:`ItemScore` from a results row; a ValueError naming the field that is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    for key in ("id", "data_source"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{key}: expected text, got {row.get(key)!r}")
    n, c, mean = row.get("n"), row.get("c"), row.get("mean_score")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a count >= 1, got {n!r}")
    if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= n:
        raise ValueError(f"c: expected a count in [0, n={n}], got {c!r}")
    if not isinstance(mean, (int, float)) or isinstance(mean, bool):
        raise ValueError(f"mean_score: expected a number, got {mean!r}")
    return ItemScore(row["id"], row["data_source"], n, c, float(mean))


def read_scores(path: str | os.PathLike) -> tuple[dict[Key, ItemScore], int]:
    """The scores in a results file (none when it does not exist) and the length in bytes of its complete
    lines: an unterminated last line is what an interrupted append leaves, and is not counted."""
    path = Path(path)
    if not path.exists():
        return {}, 0
    data = path.read_bytes()
    scores: dict[Key, ItemScore] = {}
    lines_at: dict[Key, int] = {}
    complete = 0
    for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
        if not line.endswith(b"\n"):
            break  # torn by an interrupted write: its item is scored again
        complete += len(line)
        if not line.strip():
            continue
        try:
            score = score_from_row(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            raise DataError(f"{path}: line {lineno}: {' '.join(str(error).split())[:300]}") from None
        if score.key in scores:
            raise DataError(f"{path}: line {lineno}: id {score.id!r} of {score.data_source!r} is already scored on "
                            f"line {lines_at[score.key]}")
        scores[score.key], lines_at[score.key] = score, lineno
    return scores, complete


def check_unique(records: Sequence[DocQARecord]) -> None:
    """Records are matched to their scores by (data_source, id): a repeated id would be ambiguous."""
    seen: set[Key] = set()
    for record in records:
        key = (record.data_source, record.id)
        if key in seen:
            raise DataError(f"id: {record.id!r} appears twice in data source {record.data_source!r} (scores are "
                            "kept per id; give the items distinct ids)")
        seen.add(key)


def pending_records(records: Sequence[DocQARecord], scores: dict[Key, ItemScore]) -> list[DocQARecord]:
    """The records the results do not hold yet, in their order."""
    return [r for r in records if (r.data_source, r.id) not in scores]


def pre_infer(records: Sequence[DocQARecord], generate: Callable[[Sequence[str]], list[str]], reward: Any,
              path: str | os.PathLike, *, samples: int, k: int, prompt: Callable[[DocQARecord], str] = record_prompt,
              batch_size: int = 8, progress: bool = True) -> dict[Key, ItemScore]:
    """Score every record not yet in the results file ``path``, appending its row; the scores of all the
    records (those read back and those just made).

    generate: prompts -> responses (``qwenlong.eval.generation``'s ``hf_generate_fn`` / ``openai_generate_fn``),
        called with ``batch_size`` items, each repeated ``samples`` times in a row.
    reward: a ``HybridReward`` (``score(items) -> results`` with ``.accurate`` and ``.score``): the run's.
    prompt: the text an item is asked with (the method's prompt; ``fit_prompt`` to cut it to a budget).
    k: the pass@k written in each row (n and c are what binning reads back).
    """
    from tqdm import tqdm

    from qwenlong.rewards import RewardItem

    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples, batch_size: expected >= 1, got {samples}, {batch_size}")
    if not 1 <= k <= samples:
        raise ValueError(f"k: expected 1 <= k <= samples={samples}, got {k}")
    check_unique(records)
    path = Path(path)
    scores, complete = read_scores(path)
    wanted = {(r.data_source, r.id) for r in records}
    pending = pending_records(records, scores)
    bar = tqdm(total=len(records), initial=len(records) - len(pending), desc="pre-infer", unit="item",
               disable=not progress)
    if pending:
        if path.exists() and path.stat().st_size != complete:
            with open(path, "r+b") as f:  # drop the torn last line before appending after it
                f.truncate(complete)
        with open(path, "ab") as out:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                asked = [prompt(r) for r in batch for _ in range(samples)]  # item i's answers: i*n .. i*n+n-1
                responses = generate(asked)
                if len(responses) != len(asked):
                    raise ValueError(f"generate: returned {len(responses)} responses for {len(asked)} prompts")
                items = [RewardItem(r.data_source, response, list(r.answers), question_text(r))
                         for r, response in zip((r for r in batch for _ in range(samples)), responses, strict=True)]
                results = reward.score(items)
                rows = []
                for i, record in enumerate(batch):
                    group = results[i * samples:(i + 1) * samples]
                    score = ItemScore(record.id, record.data_source, samples, sum(bool(g.accurate) for g in group),
                                      sum(g.score for g in group) / samples)
                    scores[score.key] = score
                    rows.append(json.dumps(score.to_row(k), ensure_ascii=False) + "\n")
                out.write("".join(rows).encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    bar.close()
    return {key: score for key, score in scores.items() if key in wanted}
