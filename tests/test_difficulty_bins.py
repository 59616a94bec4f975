"""``qwenlong data-bins``: pass@k per item from a pre-inference, bins per source, an equal draw from each bin."""

from __future__ import annotations

import itertools
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from qwenlong.curriculum.difficulty import (
    DEFAULT_BINS,
    bin_index,
    bin_label,
    draw_counts,
    pass_at_k,
    pending_records,
    pre_infer,
    read_scores,
    select_balanced,
)
from qwenlong.data import (
    SyntheticConfig,
    generate_records,
    load_records,
    record_prompt,
    reference_response,
    write_jsonl,
)
from qwenlong.data.loaders import DataError
from qwenlong.rewards import HybridReward

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
WRONG = "<think>\nguess\n</think>\n\nTherefore, the answer is zzzqqq."


# ---------------------------------------------------------------- pass@k


def enumerated_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of all k-subsets of n answers (c of them accurate) that hold an accurate one."""
    answers = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(answers, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_equals_the_enumeration_of_every_k_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == float(enumerated_pass_at_k(n, c, k)), (n, c, k)


def test_pass_at_k_between_the_ends_never_lands_in_an_end_bin():
    """1 - C(32, 32) / C(64, 32) is 1 - 5e-19, which fp64 rounds to 1: the item is solved by some 32-subsets
    of its answers, not all, so it belongs to the last inner bin, not to "always solved"."""
    for n, c, k in ((64, 32, 32), (100, 45, 50), (64, 1, 1)):
        value = pass_at_k(n, c, k)
        assert 0.0 < value < 1.0 and 0 < bin_index(value) < DEFAULT_BINS - 1, (n, c, k, value)
    assert pass_at_k(64, 33, 32) == 1.0 and pass_at_k(64, 0, 32) == 0.0  # the true ends stay exact


def test_pass_at_k_agrees_with_the_rl_metric_and_its_special_cases():
    import torch

    from qwenlong.algorithms import pass_at_k as rl_pass_at_k

    for n, k in ((8, 1), (8, 3), (8, 8), (16, 5)):
        counts = torch.arange(n + 1)
        assert rl_pass_at_k(counts, n, k).tolist() == pytest.approx([pass_at_k(n, c, k) for c in range(n + 1)],
                                                                     abs=1e-12)
    assert [pass_at_k(8, c, 1) for c in range(9)] == [c / 8 for c in range(9)]  # pass@1 is c/n
    assert [pass_at_k(4, c, 4) for c in range(5)] == [0.0, 1.0, 1.0, 1.0, 1.0]  # k = n: any answer accurate
    for n, c, k in ((4, 0, 5), (4, 0, 0), (4, 5, 1), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------- bins


def test_bins_hold_the_exact_ends_apart_and_split_the_rest_in_equal_widths():
    # five bins: 0 | (0, 1/3) | [1/3, 2/3) | [2/3, 1) | 1; pass@1 of 8 answers is c/8
    assert [bin_index(c / 8) for c in range(9)] == [0, 1, 1, 2, 2, 2, 3, 3, 4]
    assert [bin_index(v) for v in (1e-12, 1 / 3, 2 / 3, 1 - 1e-12)] == [1, 2, 3, 3]
    assert bin_index(3 / 9) == 2 and bin_index(6 / 9) == 3  # c/n on an edge: the upper bin
    assert [bin_index(v, 3) for v in (0.0, 0.01, 0.5, 0.99, 1.0)] == [0, 1, 1, 1, 2]
    assert [bin_label(i) for i in range(5)] == ["0", "(0, 0.333)", "[0.333, 0.667)", "[0.667, 1)", "1"]
    with pytest.raises(ValueError, match="num_bins"):
        bin_index(0.5, 2)
    with pytest.raises(ValueError, match="pass@k"):
        bin_index(float("nan"))


def test_draw_counts_are_equal_over_the_non_empty_bins():
    assert draw_counts([5, 0, 3, 9, 4]) == [3, 0, 3, 3, 3]  # default: the smallest non-empty bin's size
    assert draw_counts([5, 0, 3, 9, 4], target=12) == [3, 0, 3, 3, 3]
    assert draw_counts([5, 0, 1, 9, 4], target=12) == [4, 0, 1, 4, 3]  # bin 2's shortfall shared by the rest
    assert draw_counts([2, 2, 2], target=100) == [2, 2, 2]  # more than the source holds: all of it
    assert draw_counts([0, 0, 0]) == [0, 0, 0] and draw_counts([0, 0, 0], target=4) == [0, 0, 0]
    rng = random.Random(0)
    for _ in range(500):
        sizes = [rng.choice([0, 0, 1, 2, 5, 20]) for _ in range(rng.randint(3, 7))]
        target = rng.choice([None, rng.randint(0, 60)])
        counts = draw_counts(sizes, target)
        filled = [i for i, s in enumerate(sizes) if s]
        want = min(sizes[i] for i in filled) * len(filled) if target is None and filled else (target or 0)
        assert sum(counts) == min(want, sum(sizes)) and all(0 <= c <= s for c, s in zip(counts, sizes, strict=True))
        # as equal as the bins allow: a bin below its size has at most one fewer than any other bin
        for i in filled:
            if counts[i] < sizes[i]:
                assert all(counts[i] >= counts[j] - 1 for j in range(len(sizes))), (sizes, target, counts)


def fabricated(source: str, per_bin: list[int]) -> list[tuple[str, str, float]]:
    """``per_bin[b]`` items of ``source`` whose pass@1 (of 6 answers) lies in bin b of five."""
    values = [0.0, 1 / 6, 3 / 6, 5 / 6, 1.0]
    return [(source, f"{source}-{b}-{i}", values[b]) for b, count in enumerate(per_bin) for i in range(count)]


def test_each_bin_of_each_source_gives_the_same_number():
    items = fabricated("docmath", [10, 4, 7, 0, 6]) + fabricated("musique", [3, 5, 5, 5, 8])
    selection = select_balanced(items, 5, seed=1)
    summary = selection.summary()
    docmath, musique = summary["sources"]["docmath"], summary["sources"]["musique"]
    assert [b["items"] for b in docmath["bins"]] == [10, 4, 7, 0, 6]
    assert [b["drawn"] for b in docmath["bins"]] == [4, 4, 4, 0, 4]  # the empty bin gives nothing
    assert [b["drawn"] for b in musique["bins"]] == [3, 3, 3, 3, 3]
    assert summary["items"] == 53 and summary["drawn"] == 31
    # the drawn ids come from the bins that reported them
    for bins, source in ((docmath, "docmath"), (musique, "musique")):
        for number, (entry, draw) in enumerate(zip(bins["bins"], selection.sources[source], strict=True)):
            assert len(draw.drawn) == entry["drawn"] and all(item.startswith(f"{source}-{number}-")
                                                             for item in draw.drawn)
    target = select_balanced(items, 5, target=10, seed=1).summary()["sources"]
    # 10 over four bins: 2 each, the 2 left one each to the bins with the most left
    assert [b["drawn"] for b in target["docmath"]["bins"]] == [3, 2, 3, 0, 2]
    assert [b["drawn"] for b in target["musique"]["bins"]] == [2, 2, 2, 2, 2]


def test_the_draw_is_seeded_and_each_source_draws_on_its_own():
    a, b = fabricated("docmath", [30, 20, 25, 30, 40]), fabricated("musique", [9, 9, 9, 9, 9])
    both = select_balanced(a + b, 5, target=20, seed=7)
    assert both.selected() == select_balanced(a + b, 5, target=20, seed=7).selected()
    assert both.selected() != select_balanced(a + b, 5, target=20, seed=8).selected()
    alone = select_balanced(a, 5, target=20, seed=7)
    assert {key for key in both.selected() if key[0] == "docmath"} == alone.selected()
    assert select_balanced(list(reversed(b)) + a, 5, target=20, seed=7).sources["docmath"] == alone.sources["docmath"]


def test_a_source_with_fewer_items_than_the_target_gives_them_all():
    items = fabricated("frames", [1, 0, 2, 0, 0]) + fabricated("hotpotqa", [6, 6, 6, 6, 6])
    summary = select_balanced(items, 5, target=10).summary()["sources"]
    assert summary["frames"]["drawn"] == 3 and [b["drawn"] for b in summary["frames"]["bins"]] == [1, 0, 2, 0, 0]
    assert summary["hotpotqa"]["drawn"] == 10
    with pytest.raises(ValueError, match="twice"):
        select_balanced(items + items[:1], 5)


# ---------------------------------------------------------------- pre-inference and its resume


def make_records(count: int = 6):
    return list(generate_records(count, SyntheticConfig(task="mixed", document_tokens=64), seed=3))


def oracle(records, right: dict[str, int], calls: list[list[str]] | None = None):
    """A generate function: item ``id`` gets ``right[id]`` accurate answers among its repeats in a call."""
    by_prompt = {record_prompt(record): record for record in records}

    def generate(prompts):
        if calls is not None:
            calls.append(list(prompts))
        seen: dict[str, int] = {}
        out = []
        for prompt in prompts:
            record = by_prompt[prompt]
            j = seen.get(record.id, 0)
            seen[record.id] = j + 1
            out.append(reference_response(record) if j < right.get(record.id, 0) else WRONG)
        return out

    return generate


def test_pre_inference_counts_accurate_answers_with_the_reward(tmp_path):
    records = make_records(4)
    right = {records[0].id: 0, records[1].id: 1, records[2].id: 3, records[3].id: 4}
    scores = pre_infer(records, oracle(records, right), HybridReward(), tmp_path / "results.jsonl", samples=4, k=2,
                       batch_size=3, progress=False)
    assert {key[1]: s.c for key, s in scores.items()} == right
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["n"], r["c"]) for r in rows] == [(r.id, 4, right[r.id]) for r in records]
    assert [r["pass_at_k"] for r in rows] == [0.0, 0.5, 1.0, 1.0] and [r["accuracy"] for r in rows] == [0, .25, .75, 1]


def test_a_partial_results_file_resumes_without_generating_its_items_again(tmp_path):
    records = make_records(6)
    right = {r.id: i % 3 for i, r in enumerate(records)}
    path = tmp_path / "results.jsonl"
    pre_infer(records[:3], oracle(records, right), HybridReward(), path, samples=2, k=1, progress=False)
    # killed in the middle of appending the next row: a torn line without its newline
    torn = json.dumps({"id": records[3].id, "data_source": records[3].data_source, "n": 2, "c": 2})
    with open(path, "a", encoding="utf-8") as f:
        f.write(torn[:25])
    scored, _ = read_scores(path)
    assert [r.id for r in pending_records(records, scored)] == [r.id for r in records[3:]]

    calls: list[list[str]] = []
    scores = pre_infer(records, oracle(records, right, calls), HybridReward(), path, samples=2, k=1, batch_size=2,
                       progress=False)
    asked = [prompt for call in calls for prompt in call]
    assert asked == [record_prompt(r) for r in records[3:] for _ in range(2)]  # only the unscored, twice each
    assert len(calls) == 2  # three items, two per call
    assert {key[1]: s.c for key, s in scores.items()} == right
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)  # the torn line is gone

    calls.clear()
    again = pre_infer(records, oracle(records, right, calls), HybridReward(), path, samples=2, k=1, progress=False)
    assert calls == [] and again == scores


def test_a_corrupt_results_line_is_named(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "data_source": "docmath", "n": 2, "c": 1, "mean_score": 0.5}\n'
                    '{"id": "b", "data_source": "docmath", "n": 2, "c": 3, "mean_score": 0.5}\n')
    with pytest.raises(DataError, match=r"results.jsonl: line 2: c: expected a count in \[0, n=2\]"):
        read_scores(path)
    records = make_records(2)
    with pytest.raises(DataError, match="appears twice"):
        pre_infer(records + records[:1], oracle(records, {}), HybridReward(), tmp_path / "other.jsonl", samples=1,
                  k=1, progress=False)


# ---------------------------------------------------------------- the command


def bins_main(*args: str) -> int:
    from qwenlong.cli import main

    return main(["data-bins", *args, "--no-progress"])


def test_command_bins_a_served_model_and_draws_again_without_generating(tmp_path, monkeypatch, capsys):
    """--api-url with the generate function stubbed: the known answers give known bins; the output loads with
    the pipeline's loader; a second run with another --bins only draws again."""
    from qwenlong.config import load_config
    from qwenlong.eval import generation
    from qwenlong.pipeline import build

    records = list(generate_records(24, SyntheticConfig(task="mixed", document_tokens=64), seed=5))
    write_jsonl(records, tmp_path / "train-in.jsonl")
    right = {r.id: i % 5 for i, r in enumerate(records)}  # 0..4 of 4 answers: every bin of five
    calls: list[list[str]] = []
    asked_with = []

    def fake_openai(url, model, *, api_key=None, sampling=None):
        asked_with.append(sampling)
        return oracle(records, right, calls)

    monkeypatch.setattr(generation, "openai_generate_fn", fake_openai)
    out = tmp_path / "bins"
    common = ["--data", str(tmp_path / "train-in.jsonl"), "--api-url", "http://127.0.0.1:1/v1", "--api-model", "base",
              "--no-judge", "--samples", "4", "--out", str(out)]
    assert bins_main(*common) == 0
    assert (asked_with[0].temperature, asked_with[0].top_p) == (0.7, 0.95)  # the L1.5 RL sampling without --config
    assert sum(len(c) for c in calls) == 24 * 4
    summary = json.loads((out / "summary.json").read_text())
    for source, entry in summary["sources"].items():
        # c of 4 answers accurate: pass@1 = c/4 lies in bin c of 0 | (0, 1/3) | [1/3, 2/3) | [2/3, 1) | 1
        held = [sum(r.data_source == source and right[r.id] == b for r in records) for b in range(5)]
        assert [b["items"] for b in entry["bins"]] == held
        smallest = min(h for h in held if h)
        assert [b["drawn"] for b in entry["bins"]] == [smallest if h else 0 for h in held]
    cfg = load_config(TINY, [f"data.train_files=[{out / 'train.jsonl'}]"])
    loaded = build.load_split(cfg, "train")
    assert len(loaded) == summary["drawn"] > 0
    assert {(r.id, r.answers) for r in loaded} <= {(r.id, r.answers) for r in records}

    calls.clear()
    capsys.readouterr()
    assert bins_main(*common, "--bins", "3", "--seed", "4") == 0  # everything scored: no generation
    assert calls == []
    summary3 = json.loads((out / "summary.json").read_text())
    assert summary3["bin_edges"] == ["0", "(0, 1)", "1"] and summary3["items"] == 24
    assert len(load_records(out / "train.jsonl")) == summary3["drawn"]

    # scores made at another temperature are not mixed in: one line, exit 2
    capsys.readouterr()
    assert bins_main(*common, "--temperature", "1.0") == 2
    error = capsys.readouterr().err
    assert error.startswith("qwenlong data-bins: error: --out: ") and "temperature=0.7" in error
    assert error.count("\n") == 1


def test_command_warns_when_the_judge_fails(tmp_path, monkeypatch, capsys):
    """A judge that cannot be reached (the documented recipe once served the base model on the judge's port)
    leaves every answer to the rules: the run says so instead of binning by the rules silently."""
    from qwenlong.eval import generation

    records = list(generate_records(4, SyntheticConfig(task="mixed", document_tokens=64), seed=6))
    write_jsonl(records, tmp_path / "train-in.jsonl")
    monkeypatch.setattr(generation, "openai_generate_fn", lambda *a, **kw: oracle(records, {}))  # all wrong
    args = ["--data", str(tmp_path / "train-in.jsonl"), "--api-url", "http://127.0.0.1:1/v1", "--api-model", "base",
            "--samples", "2", "--out", str(tmp_path / "bins")]
    assert bins_main(*args, "--judge-url", "http://127.0.0.1:1/v1", "--judge-model", "judge") == 0
    error = capsys.readouterr().err
    failed = re.search(r"warning: the judge failed on (\d+) of the (\d+) answers it was asked to judge", error)
    assert failed and failed[1] == failed[2] != "0", error  # every answer it was asked about
    assert bins_main(*args[:-1], str(tmp_path / "again"), "--no-judge") == 0
    assert "judge failed" not in capsys.readouterr().err


def test_command_argument_mistakes_are_one_line_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(make_records(2), data)
    mistakes = [([], "no data"),
                (["--data", str(data)], "no base model"),
                (["--data", str(data), "--model", "m", "--api-url", "http://x/v1"], "give at most one"),
                (["--data", str(data), "--api-url", "http://x/v1"], "--api-model"),
                (["--data", str(data), "--api-url", "http://x/v1", "--api-model", "m", "--bins", "2"], "--bins"),
                (["--data", str(data), "--api-url", "http://x/v1", "--api-model", "m", "--samples", "2",
                  "--pass-k", "3"], "--pass-k 3"),
                (["--data", str(data), "--api-url", "http://x/v1", "--api-model", "m", "--temperature", "0"],
                 "--samples 8 with --temperature 0"),
                (["--data", str(tmp_path / "missing.jsonl"), "--api-url", "http://x/v1", "--api-model", "m"], "path: "),
                (["--data", str(data), "x.y=1", "--api-url", "http://x/v1", "--api-model", "m"], "x.y=1"),
                ]
    for args, message in mistakes:
        capsys.readouterr()
        assert bins_main(*args, "--out", str(tmp_path / "out")) == 2, args
        error = capsys.readouterr().err
        assert error.startswith(f"qwenlong data-bins: error: {message}") and error.count("\n") == 1, (args, error)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_command_end_to_end_with_the_tiny_model_of_a_config(tmp_path, monkeypatch):
    """--config configs/tiny.yaml: its synthetic train split, its tiny model, its RL sampling, really generated;
    the drawn file is a training file of the pipeline's; a rerun generates nothing."""
    from qwenlong.config import load_config
    from qwenlong.eval import generation
    from qwenlong.pipeline import build

    real_generate_fn, asked = generation.hf_generate_fn, []

    def counted_generate_fn(*args, **kwargs):
        generate = real_generate_fn(*args, **kwargs)
        return lambda prompts: asked.extend(prompts) or generate(prompts)

    monkeypatch.setattr(generation, "hf_generate_fn", counted_generate_fn)
    out = tmp_path / "bins"
    overrides = ["data.synthetic.num_train=10", "data.synthetic.task=mixed", "data.synthetic.max_document_tokens=96",
                 "rl.phases.0.max_output_tokens=8"]
    assert bins_main("--config", TINY, *overrides, "--samples", "3", "--out", str(out)) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["samples"], settings["temperature"], settings["max_new_tokens"]) == (3, 1.0, 8)  # tiny.yaml's rl
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(asked) == 10 * 3  # every item, 3 times, through the tiny model
    assert len(rows) == 10 and all(r["n"] == 3 and 0 <= r["c"] <= 3 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sources"]) == {r["data_source"] for r in rows}  # binned per source
    for source, entry in summary["sources"].items():
        values = [r["pass_at_k"] for r in rows if r["data_source"] == source]
        assert [b["items"] for b in entry["bins"]] == [sum(bin_index(v) == b for v in values) for b in range(5)]
        held = [b["items"] for b in entry["bins"] if b["items"]]
        assert all(b["drawn"] in (0, min(held)) and bool(b["drawn"]) == bool(b["items"]) for b in entry["bins"])
    cfg = load_config(TINY, [f"data.train_files=[{out / 'train.jsonl'}]"])
    assert len(build.load_split(cfg, "train")) == summary["drawn"]

    def no_generation(*args, **kwargs):
        raise AssertionError("a scored item was generated again")

    monkeypatch.setattr(generation, "hf_generate_fn", no_generation)
    monkeypatch.setattr(build, "build_model", no_generation)
    assert bins_main("--config", TINY, *overrides, "--samples", "3", "--per-source", "1", "--out", str(out)) == 0
    assert json.loads((out / "summary.json").read_text())["drawn"] == len(summary["sources"])
