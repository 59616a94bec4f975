"""The DocQA evaluation (method.md section 5): fit each input to 120K tokens by cutting the
document (a conversation's middle turns, see qwenlong.eval.chat) in the middle, generate, score with
max(rule, judge) (MRCR by its similarity, see qwenlong.eval.scoring), report each benchmark's mean score.

A response is accurate when its reward is 1.0; the rules and the judge score 0 or 1, so a DocQA
benchmark's mean score is its accuracy (MRCR's is its mean similarity). The average is the mean of
the per-benchmark scores, as in the paper's table. With ``samples_per_prompt = k > 1`` each item is answered
k times and its accuracy is the mean over them (avg@k): sampled decoding's own noise shrinks by
about sqrt(k), which the paired comparisons between stages need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qwenlong.data import DocQARecord, apply_chat_template, count_tokens
from qwenlong.eval.chat import fit_input
from qwenlong.eval.generation import GenerateFn
from qwenlong.eval.scoring import score_responses
from qwenlong.rewards import HybridReward


@dataclass
class BenchmarkResult:
    name: str
    num_items: int
    accuracy: float  # mean score in percent over every sample of every item (MRCR: similarity)
    rule_accuracy: float  # the same by the rules alone
    judge_rescued: int  # answers the judge turned from wrong to right
    truncated: int  # inputs cut to the budget
    mean_input_tokens: float
    samples_per_item: int = 1


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
                 "| benchmark | items | answers per item | accuracy | rules only | judge rescued | truncated "
                 "| mean input tokens |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {b.name} | {b.num_items} | {b.samples_per_item} | {b.accuracy:.1f} | {b.rule_accuracy:.1f} | "
                  f"{b.judge_rescued} | {b.truncated} | {b.mean_input_tokens:.0f} |" for b in self.benchmarks]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"average": self.average, "benchmarks": [asdict(b) for b in self.benchmarks],
                "judge_metrics": self.judge_metrics}

    def write(self, directory: str | os.PathLike) -> None:
        """``results.json``, ``results.md`` and ``predictions.jsonl`` (one line per answer, with ``id``,
        ``sample`` and ``accurate``: what paired comparisons between stages read) in ``directory``."""
        from qwenlong.state.checkpoint import write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # each file whole or not replaced: the run's report reads predictions.jsonl back
        write_text(directory / "predictions.jsonl",
                   "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.predictions))
        write_text(directory / "results.json", json.dumps(self.to_json(), indent=2) + "\n")
        write_text(directory / "results.md", self.to_markdown())


def evaluate(datasets: Mapping[str, Sequence[DocQARecord]], generate: GenerateFn, tokenizer: Any, *,
             reward: HybridReward | None = None, max_input_tokens: int = 120_000, batch_size: int = 8,
             chat_template_in_budget: bool = False, progress: bool = True,
             samples_per_prompt: int = 1) -> EvalReport:
    """Evaluate ``generate`` on each named dataset.

    tokenizer: the model's tokenizer, which measures the input budget.
    batch_size: items per ``generate`` call (each repeated ``samples_per_prompt`` times in it).
    chat_template_in_budget: count the chat template's tokens against the budget too (the
        release counts the raw prompt only).
    samples_per_prompt: answers per item (k of avg@k); more than 1 needs sampled decoding.

    A benchmark without records is a ValueError, raised before anything is generated: it has no
    accuracy, and counting it as 0 would pull the average down.
    """
    empty = [name for name, records in datasets.items() if not len(records)]
    if empty:
        raise ValueError(f"datasets: no records for benchmark {', '.join(map(repr, empty))} (an empty benchmark has "
                         "no accuracy; leave it out)")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: must be >= 1, got {samples_per_prompt}")
    reward = reward or HybridReward()
    # generate() applies the chat template itself, so prompts stay raw; the template's own
    # tokens are taken off the budget instead when they must count
    template_tokens = count_tokens(tokenizer, apply_chat_template(tokenizer, "")) if chat_template_in_budget else None
    report = EvalReport(benchmarks=[])
    total = sum(len(records) for records in datasets.values())
    bar = tqdm(total=total, desc="eval", unit="item", disable=not progress)
    for name, records in datasets.items():
        accurate = rule_accurate = rescued = truncated = input_tokens = 0
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            fitted = [fit_input(tokenizer, r, max_input_tokens, template_tokens) for r in batch]
            truncated += sum(f.truncated for f in fitted)
            input_tokens += sum(f.num_tokens for f in fitted)
            # sample j of every item, item by item: answers[i * k + j]
            asked = [(r, f, j) for r, f in zip(batch, fitted, strict=True) for j in range(samples_per_prompt)]
            responses = generate([f.prompt for _, f, _ in asked])
            if len(responses) != len(asked):
                raise ValueError(f"generate: returned {len(responses)} responses for {len(asked)} prompts")
            results = score_responses(reward, [r for r, _, _ in asked], responses)
            for (record, fit, sample), response, result in zip(asked, responses, results, strict=True):
                accurate += result.score
                rule_accurate += result.rule_score
                rescued += result.accurate and result.rule_score < 1.0
                report.predictions.append({"benchmark": name, "id": record.id, "sample": sample,
                                           "answers": list(record.answers), "accurate": bool(result.accurate),
                                           "prediction": result.prediction, "score": result.score,
                                           "rule_score": result.rule_score, "judge_score": result.judge_score,
                                           "input_tokens": fit.num_tokens, "response": response})
            bar.update(len(batch))
        answers = len(records) * samples_per_prompt
        report.benchmarks.append(BenchmarkResult(name, len(records), 100.0 * accurate / answers,
                                                 100.0 * rule_accurate / answers, rescued, truncated,
                                                 input_tokens / len(records), samples_per_prompt))
    bar.close()
    report.judge_metrics = reward.metrics()
    return report

