"""The DocQA evaluation (method.md section 5): fit each input to 120K tokens by cutting the
document in the middle, generate, score with max(rule, judge), report accuracy.

A response is accurate when its reward is 1.0. The average is the mean of the per-benchmark
accuracies, as in the paper's table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qwenlong.data import DocQARecord, apply_chat_template, count_tokens, fit_prompt_report
from qwenlong.data.prompt import question_text
from qwenlong.eval.generation import GenerateFn
from qwenlong.rewards import HybridReward, RewardItem


@dataclass
class BenchmarkResult:
    name: str
    num_items: int
    accuracy: float  # percent of items whose reward is 1.0
    rule_accuracy: float  # percent accurate by the rules alone
    judge_rescued: int  # items the judge turned from wrong to right
    truncated: int  # inputs cut to the budget
    mean_input_tokens: float


@dataclass
class EvalReport:
    benchmarks: list[BenchmarkResult]
    judge_metrics: dict[str, int] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def average(self) -> float:
        return sum(b.accuracy for b in self.benchmarks) / len(self.benchmarks) if self.benchmarks else 0.0

    def to_markdown(self) -> str:
        """One row of accuracies (percent) with an average column, then per-benchmark details."""
        titles = [b.name for b in self.benchmarks] + ["avg"]
        values = [f"{b.accuracy:.1f}" for b in self.benchmarks] + [f"{self.average:.1f}"]
        lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles), "| " + " | ".join(values) + " |", "",
                 "| benchmark | items | accuracy | rules only | judge rescued | truncated | mean input tokens |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {b.name} | {b.num_items} | {b.accuracy:.1f} | {b.rule_accuracy:.1f} | {b.judge_rescued} | "
                  f"{b.truncated} | {b.mean_input_tokens:.0f} |" for b in self.benchmarks]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"average": self.average, "benchmarks": [asdict(b) for b in self.benchmarks],
                "judge_metrics": self.judge_metrics}

    def write(self, directory: str | os.PathLike) -> None:
        """``results.json``, ``results.md`` and ``predictions.jsonl`` (one line per item, with ``accurate``:
        what paired comparisons between stages read) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        (directory / "results.md").write_text(self.to_markdown())
        with open(directory / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in self.predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate(datasets: Mapping[str, Sequence[DocQARecord]], generate: GenerateFn, tokenizer: Any, *,
             reward: HybridReward | None = None, max_input_tokens: int = 120_000, batch_size: int = 8,
             chat_template_in_budget: bool = False, progress: bool = True) -> EvalReport:
    """Evaluate ``generate`` on each named dataset.

    tokenizer: the model's tokenizer, which measures the input budget.
    chat_template_in_budget: count the chat template's tokens against the budget too (the
        release counts the raw prompt only).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    reward = reward or HybridReward()
    # generate() applies the chat template itself, so prompts stay raw; the template's own
    # tokens are taken off the budget instead when they must count
    template_tokens = count_tokens(tokenizer, apply_chat_template(tokenizer, "")) if chat_template_in_budget else 0
    budget = max_input_tokens - template_tokens
    report = EvalReport(benchmarks=[])
    total = sum(len(records) for records in datasets.values())
    bar = tqdm(total=total, desc="eval", unit="item", disable=not progress)
    for name, records in datasets.items():
        accurate = rule_accurate = rescued = truncated = input_tokens = 0
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            fitted = [fit_prompt_report(tokenizer, r, budget, chat=False) for r in batch]
            responses = generate([f.text for f in fitted])
            if len(responses) != len(batch):
                raise ValueError(f"generate: returned {len(responses)} responses for {len(batch)} prompts")
            items = [RewardItem(r.data_source, response, list(r.answers), question_text(r))
                     for r, response in zip(batch, responses, strict=True)]
            for record, response, result, fit in zip(batch, responses, reward.score(items), fitted, strict=True):
                accurate += result.accurate
                rule_accurate += result.rule_score == 1.0
                rescued += result.accurate and result.rule_score < 1.0
                truncated += fit.truncated
                input_tokens += fit.num_tokens
                report.predictions.append({"benchmark": name, "id": record.id, "answers": list(record.answers),
                                           "accurate": bool(result.accurate),
                                           "prediction": result.prediction, "score": result.score,
                                           "rule_score": result.rule_score, "judge_score": result.judge_score,
                                           "input_tokens": fit.num_tokens, "response": response})
            bar.update(len(batch))
        count = max(len(records), 1)
        report.benchmarks.append(BenchmarkResult(name, len(records), 100.0 * accurate / count,
                                                 100.0 * rule_accurate / count, rescued, truncated,
                                                 input_tokens / count))
    bar.close()
    report.judge_metrics = reward.metrics()
    return report

