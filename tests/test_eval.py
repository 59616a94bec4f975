"""The DocQA evaluation harness: files -> fitted prompts -> generate -> hybrid reward -> table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qwenlong.data import (
    SyntheticConfig,
    apply_chat_template,
    count_tokens,
    extract_question,
    generate_records,
    reference_response,
    write_jsonl,
    write_parquet,
)
from qwenlong.eval import (
    BENCHMARKS,
    evaluate,
    find_benchmark_files,
    load_benchmark,
    openai_generate_fn,
    sharded_generate_fn,
)
from qwenlong.eval.generation import Sampling
from qwenlong.rewards import HybridReward
from qwenlong.rewards.judge import Judge
from qwenlong.rewards.judge.server import ChatServer

ROOT = Path(__file__).resolve().parents[1]


def oracle(records, wrong_ids=(), paraphrase_ids=()):
    """A generate function that answers from the records: right, wrong, or right in other words."""
    def generate(prompts):
        out = []
        for prompt in prompts:  # the document's opening survives middle truncation
            record = next(r for r in records if r.document[:100] in prompt)
            if record.id in wrong_ids:
                out.append("<think>\nguess\n</think>\n\nTherefore, the answer is 7777.")
            elif record.id in paraphrase_ids:
                out.append("<think>\nhmm\n</think>\n\nTherefore, the answer is the same as the gold.")
            else:
                out.append(reference_response(record))
        return out

    return generate


def recording_oracle(records):
    """The oracle, plus the list of prompts it was given."""
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return oracle(records)(prompts)

    return generate, seen


def test_benchmark_files_to_table(tmp_path, qwen):
    hotpot = list(generate_records(5, SyntheticConfig(task="retrieval", document_tokens=300), seed=1, tokenizer=qwen))
    docmath = list(generate_records(4, SyntheticConfig(task="arithmetic", document_tokens=300), seed=2,
                                    tokenizer=qwen))
    write_jsonl(hotpot, tmp_path / "hotpotqa.jsonl")
    write_parquet(docmath, tmp_path / "docmath.parquet")
    files = find_benchmark_files(tmp_path)
    assert set(files) == {"hotpotqa", "docmath"}
    datasets = {BENCHMARKS[k].title: load_benchmark(k, p) for k, p in files.items()}
    assert all(r.data_source == "docmath" for r in datasets["DocMath"])  # routed to the numeric rule

    generate = oracle(hotpot + docmath, wrong_ids={hotpot[0].id, docmath[1].id, docmath[2].id})
    report = evaluate(datasets, generate, qwen, batch_size=3, progress=False)
    accuracy = {b.name: b.accuracy for b in report.benchmarks}
    assert accuracy == {"HotpotQA": 80.0, "DocMath": 50.0}
    assert report.average == 65.0
    assert all(b.truncated == 0 and b.judge_rescued == 0 for b in report.benchmarks)

    report.write(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["average"] == 65.0 and [b["name"] for b in saved["benchmarks"]] == ["DocMath", "HotpotQA"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| DocMath | HotpotQA | avg |" in table and "| 50.0 | 80.0 | 65.0 |" in table  # the paper's order
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and sum(r["score"] for r in rows) == 6
    wrong = {hotpot[0].id, docmath[1].id, docmath[2].id}
    assert {r["id"] for r in rows if not r["accurate"]} == wrong  # per item, for paired comparisons


def test_several_answers_per_item_average_and_stay_paired(qwen):
    records = list(generate_records(5, SyntheticConfig(task="retrieval", document_tokens=200), seed=8, tokenizer=qwen))
    calls = []

    def generate(prompts):  # item i's sample j (counted within the call) is right when j < i
        calls.append(prompts)
        out, seen = [], {}
        for prompt in prompts:
            i = next(n for n, r in enumerate(records) if r.document[:100] in prompt)
            j = seen[i] = seen.get(i, -1) + 1
            out.append(reference_response(records[i]) if j < i else "Therefore, the answer is 7777.")
        return out

    report = evaluate({"Musique": records}, generate, qwen, batch_size=2, samples_per_prompt=3, progress=False)
    assert [len(c) for c in calls] == [6, 6, 3]  # 2 items x 3 answers per call, the rest last
    assert all(c[k] == c[k - k % 3] for c in calls for k in range(len(c)))  # an item's answers are adjacent
    (result,) = report.benchmarks
    expected = sum(min(i, 3) for i in range(5)) / 15
    assert result.num_items == 5 and result.samples_per_item == 3
    assert result.accuracy == pytest.approx(100 * expected)
    rows = report.predictions
    assert [(r["id"], r["sample"]) for r in rows] == [(rec.id, j) for rec in records for j in range(3)]
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate({"Musique": records}, generate, qwen, samples_per_prompt=0, progress=False)


def test_inputs_are_cut_to_the_budget(qwen):
    records = list(generate_records(3, SyntheticConfig(task="retrieval", document_tokens=3000), seed=4,
                                    tokenizer=qwen))
    generate, seen = recording_oracle(records)
    report = evaluate({"Musique": records}, generate, qwen, max_input_tokens=1000, progress=False)
    assert all(count_tokens(qwen, p) <= 1000 for p in seen)
    assert [extract_question(p) for p in seen] == [r.question for r in records]
    (result,) = report.benchmarks
    assert result.truncated == 3 and result.mean_input_tokens <= 1000


def test_chat_template_in_budget_keeps_prompts_raw(qwen):
    """generate() applies the chat template itself: prompts arrive raw, and with the template
    counted the templated input still fits the budget."""
    records = list(generate_records(2, SyntheticConfig(task="retrieval", document_tokens=3000), seed=6,
                                    tokenizer=qwen))
    generate, seen = recording_oracle(records)
    evaluate({"Musique": records}, generate, qwen, max_input_tokens=1000, chat_template_in_budget=True,
             progress=False)
    assert seen and all("<|im_start|>" not in p for p in seen)
    assert all(count_tokens(qwen, apply_chat_template(qwen, p)) <= 1000 for p in seen)
    assert [extract_question(p) for p in seen] == [r.question for r in records]


class AgreeableJudge(Judge):
    """An in-process judge that accepts one phrasing."""

    async def _ask(self, session, messages):
        return "[[YES]]" if 'Answer 1: "the same as the gold"' in messages[-1]["content"] else "[[NO]]"


def test_judge_rescues_count_as_accurate(qwen):
    records = list(generate_records(4, SyntheticConfig(task="retrieval", document_tokens=200), seed=5,
                                    tokenizer=qwen))
    generate = oracle(records, wrong_ids={records[0].id}, paraphrase_ids={records[1].id})
    report = evaluate({"Qasper": records}, generate, qwen, reward=HybridReward(AgreeableJudge()), progress=False)
    (result,) = report.benchmarks
    assert (result.accuracy, result.rule_accuracy, result.judge_rescued) == (75.0, 50.0, 1)
    assert report.judge_metrics["yes"] == 1 and report.judge_metrics["no"] == 1


def test_an_empty_benchmark_is_refused_before_generating(qwen):
    records = list(generate_records(2, SyntheticConfig(task="retrieval", document_tokens=100), seed=3, tokenizer=qwen))
    generate, seen = recording_oracle(records)
    with pytest.raises(ValueError, match=r"no records for benchmark 'Empty', 'None either' \("):
        evaluate({"Musique": records, "Empty": [], "None either": ()}, generate, qwen, progress=False)
    assert seen == []  # nothing was generated
    report = evaluate({"Musique": records}, generate, qwen, progress=False)  # without it: 100% over 2 items
    assert [(b.name, b.num_items, b.accuracy) for b in report.benchmarks] == [("Musique", 2, 100.0)]
    assert report.average == 100.0


def test_generate_must_return_one_response_per_prompt(qwen):
    records = list(generate_records(2, SyntheticConfig(document_tokens=100), tokenizer=qwen))
    with pytest.raises(ValueError, match="generate"):
        evaluate({"x": records}, lambda prompts: ["only one"], qwen, progress=False)


@pytest.mark.parametrize("num_prompts", [0, 2, 7, 12])
def test_sharded_generate_answers_each_prompt_once_in_order(num_prompts):
    """Three ranks, simulated: each generates only its share, and every rank gets all answers in order."""
    import random

    prompts = [f"prompt {random.random():.6f} #{i}" for i in range(num_prompts)]
    world, asked = 3, {}

    def generate_on(rank):
        def generate(share):
            asked[rank] = list(share)
            return [f"answer to {p} by {rank}" for p in share]
        return generate

    blocks = [prompts[len(prompts) * r // world:len(prompts) * (r + 1) // world] for r in range(world)]
    shares = [generate_on(rank)(blocks[rank]) for rank in range(world)]
    owner = [r for r in range(world) for _ in blocks[r]]
    for rank in range(world):
        answers = sharded_generate_fn(generate_on(rank), rank, world, lambda mine: shares)(prompts)
        assert answers == [f"answer to {p} by {owner[i]}" for i, p in enumerate(prompts)]
        assert asked[rank] == blocks[rank]
    with pytest.raises(ValueError, match="rank"):
        sharded_generate_fn(generate_on(0), 3, world, lambda mine: shares)


def test_sharded_samples_of_an_item_are_independent():
    """k samples of an item sit side by side (as evaluate lays them out): split over ranks that seed alike, they
    are still k draws, not one answer k times (dealt out round robin, two ranks got the same prompt list)."""
    from qwenlong.data import SyntheticConfig, generate_records, record_prompt, train_demo_tokenizer
    from qwenlong.data.synthetic import reference_response
    from qwenlong.eval.generation import Sampling, hf_generate_fn
    from qwenlong.pipeline.eval_command import tiny_random_model

    records = list(generate_records(4, SyntheticConfig(task="mixed", document_tokens=64), seed=0))
    tokenizer = train_demo_tokenizer([record_prompt(r) + reference_response(r) for r in records], vocab_size=512)
    base = hf_generate_fn(tiny_random_model(tokenizer, 0), tokenizer,
                          Sampling(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=7))
    world, k = 2, 2
    prompts = [record_prompt(r) for r in records[:2] for _ in range(k)]
    shares = []  # each rank answers its share with a generate seeded as every rank's is
    for rank in range(world):
        sharded_generate_fn(base, rank, world, lambda mine: shares.append(mine) or [mine] * world)(prompts)
    answers = sharded_generate_fn(lambda share: None, 0, world, lambda mine: shares)(prompts)
    assert all(answers[i * k] != answers[i * k + 1] for i in range(2)), answers


def test_openai_generate_sends_protocol_sampling():
    seen = []

    def reply(messages, params):
        seen.append(params)
        return "<think>x</think> Therefore, the answer is " + messages[-1]["content"][-3:]

    with ChatServer(reply, model="policy") as server:
        generate = openai_generate_fn(server.url, "policy", sampling=Sampling(max_new_tokens=100), max_concurrency=2)
        responses = generate(["p-1", "p-2", "p-3"])
    assert responses == [f"<think>x</think> Therefore, the answer is p-{i}" for i in (1, 2, 3)]
    assert {(p["temperature"], p["top_p"], p["max_tokens"], p["model"]) for p in seen} == {(0.7, 0.95, 100, "policy")}


def test_openai_generate_gives_repeated_prompts_their_own_seeds():
    seen = []

    def reply(messages, params):
        seen.append((messages[-1]["content"], params["seed"]))
        return "Therefore, the answer is x."

    with ChatServer(reply, model="policy") as server:
        generate = openai_generate_fn(server.url, "policy", sampling=Sampling(max_new_tokens=8, seed=5))
        generate(["a", "a", "b", "a"])
    assert sorted(seen) == [("a", 5), ("a", 6), ("a", 7), ("b", 5)]


def test_openai_generate_puts_the_servers_reasoning_back_in_think_tags():
    """vLLM returns the thinking as message.reasoning (older servers: reasoning_content)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    messages = {
        "new": {"role": "assistant", "content": "The answer is 4.", "reasoning": "2 + 2"},
        "old": {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 + 3"},
        "both": {"role": "assistant", "content": "The answer is 6.", "reasoning": "3 + 3", "reasoning_content": None},
        "none": {"role": "assistant", "content": "The answer is 7.", "reasoning": None},
        "empty": {"role": "assistant", "content": None, "reasoning": "thinking only"},
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

        def do_POST(self):
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
            body = json.dumps({"choices": [{"index": 0, "message": messages[prompt]}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        generate = openai_generate_fn(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "policy")
        responses = generate(["new", "old", "both", "none", "empty"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert responses == ["<think>\n2 + 2\n</think>\n\nThe answer is 4.",
                         "<think>\n2 + 3\n</think>\n\nThe answer is 5.",
                         "<think>\n3 + 3\n</think>\n\nThe answer is 6.",
                         "The answer is 7.",
                         "<think>\nthinking only\n</think>\n\n"]


@pytest.mark.slow
def test_cli_synthetic_smoke_with_tiny_model(tmp_path):
    from qwenlong.pipeline import eval_command as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--synthetic", "1", "--max-new-tokens", "4", "--out", str(tmp_path), "--no-progress",
                              "--no-judge"])
    assert cli.run(args) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [b["name"] for b in saved["benchmarks"]] == ["synthetic_copy", "synthetic_retrieval", "synthetic_choice",
                                                       "synthetic_arithmetic"]
    assert all(b["num_items"] == 1 and 0 <= b["accuracy"] <= 100 for b in saved["benchmarks"])
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="exactly one"):
        cli.run(parser.parse_args(["--api-url", "http://127.0.0.1:1/v1", "--synthetic", "1"]))


def _pairs(improved: int, regressed: int, both_right: int, both_wrong: int):
    before = [False] * improved + [True] * regressed + [True] * both_right + [False] * both_wrong
    after = [True] * improved + [False] * regressed + [True] * both_right + [False] * both_wrong
    return before, after


def test_paired_gain_exact_mcnemar_by_hand():
    from qwenlong.eval.stats import paired_gain

    # 8 improved, 2 regressed of 20: P(X <= 2 | Bin(10, 1/2)) = (1 + 10 + 45) / 1024, doubled
    got = paired_gain(*_pairs(8, 2, 5, 5))
    assert (got.num_items, got.improved, got.regressed) == (20, 8, 2)
    assert got.before == pytest.approx(35.0) and got.after == pytest.approx(65.0) and got.gain == pytest.approx(30.0)
    assert got.p_value == pytest.approx(112 / 1024)
    assert got.ci_low < 0 < got.gain < got.ci_high < 50  # p > 0.05: the interval reaches below zero
    # 5 improved, none regressed: p = 2 / 2^5; Clopper-Pearson on 5/5 is [0.025^(1/5), 1]
    got = paired_gain(*_pairs(5, 0, 10, 5))
    assert got.p_value == pytest.approx(0.0625)
    assert got.ci_low == pytest.approx(100 * 5 * (2 * 0.025 ** 0.2 - 1) / 20) and got.ci_high == pytest.approx(25.0)
    # nothing changed: no evidence either way
    got = paired_gain(*_pairs(0, 0, 3, 4))
    assert (got.gain, got.ci_low, got.ci_high, got.p_value) == (0.0, 0.0, 0.0, 1.0)
    # a clear gain: 30 improved, 3 regressed of 64
    got = paired_gain(*_pairs(30, 3, 20, 11))
    assert got.gain == pytest.approx(100 * 27 / 64)
    assert got.p_value < 1e-5 and 0 < got.ci_low < got.gain < got.ci_high


def test_paired_gain_on_fractional_scores_against_a_plain_computation():
    import random
    import statistics

    from qwenlong.eval.stats import binomial_tail, paired_gain

    rng = random.Random()
    k, n = 4, 300
    before = [rng.randint(0, k) / k for _ in range(n)]
    after = [min(1.0, b + rng.choice([-1, 0, 0, 1, 1, 2]) / k) if b > 0 else rng.randint(0, 1) / k for b in before]
    got = paired_gain(before, after)
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    assert (got.improved, got.regressed) == (up, down)
    assert got.gain == pytest.approx(100 * statistics.fmean(diffs))
    assert got.before == pytest.approx(100 * statistics.fmean(before))
    half = 1.959964 * statistics.stdev(diffs) / n ** 0.5
    assert got.ci_low == pytest.approx(100 * (statistics.fmean(diffs) - half), abs=1e-4)
    assert got.ci_high == pytest.approx(100 * (statistics.fmean(diffs) + half), abs=1e-4)
    assert got.p_value == pytest.approx(min(1.0, 2 * binomial_tail(min(up, down), up + down, 0.5)))
    with pytest.raises(ValueError, match="scores"):
        paired_gain([0.5, 1.2], [0.0, 1.0])


def test_clopper_pearson_ends_leave_the_stated_tail():
    from qwenlong.eval.stats import binomial_tail, clopper_pearson

    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.187086, abs=1e-6) and high == pytest.approx(0.812914, abs=1e-6)  # tabulated
    for successes, trials in [(3, 17), (0, 9), (9, 9), (40, 64)]:
        low, high = clopper_pearson(successes, trials, confidence=0.9)
        if successes > 0:  # P(X >= s | low) = 0.05
            assert 1 - binomial_tail(successes - 1, trials, low) == pytest.approx(0.05, abs=1e-9)
        else:
            assert low == 0.0
        if successes < trials:  # P(X <= s | high) = 0.05
            assert binomial_tail(successes, trials, high) == pytest.approx(0.05, abs=1e-9)
        else:
            assert high == 1.0
    assert clopper_pearson(0, 9)[1] == pytest.approx(1 - 0.025 ** (1 / 9))  # 95%: 2.5% in the tail


def test_binomial_tail_stays_exact_past_a_thousand_changed_items():
    """The terms' factors overflow a float past m ~ 1030 (C(1100, 550) ~ 1e329): the tail is summed in log
    space, equal to exact rational arithmetic at any m and to the plain sum where that one works."""
    from fractions import Fraction
    from math import comb

    from qwenlong.eval.stats import binomial_tail, clopper_pearson, paired_gain

    def exact(k: int, m: int, q: Fraction) -> float:
        return float(sum(comb(m, i) * q**i * (1 - q) ** (m - i) for i in range(k + 1)))

    got = paired_gain([0] * 600 + [1] * 500, [1] * 600 + [0] * 500)  # an OverflowError before
    assert (got.improved, got.regressed) == (600, 500)
    assert got.p_value == pytest.approx(2 * exact(500, 1100, Fraction(1, 2)), rel=1e-12)
    assert 0 < got.ci_low < got.gain < got.ci_high
    low, high = clopper_pearson(600, 1100)
    assert 1 - binomial_tail(599, 1100, low) == pytest.approx(0.025, abs=1e-9)
    assert binomial_tail(600, 1100, high) == pytest.approx(0.025, abs=1e-9)
    for k, m, q in [(500, 1100, Fraction(1, 2)), (2400, 5000, Fraction(1, 2)), (1500, 3001, Fraction(1, 2)),
                    (400, 2000, Fraction(3, 16)), (1700, 2000, Fraction(7, 8)), (0, 1500, Fraction(1, 1024))]:
        assert binomial_tail(k, m, float(q)) == pytest.approx(exact(k, m, q), rel=1e-12), (k, m, q)
    # where the plain sum worked (its terms far from underflow), the same value
    for k, m, q in [(3, 10, 0.5), (40, 64, 0.3), (150, 300, 0.55), (500, 1000, 0.5), (10, 1000, 0.01),
                    (990, 1000, 0.99), (5, 17, 0.123)]:
        plain = sum(comb(m, i) * q**i * (1 - q) ** (m - i) for i in range(k + 1))
        assert binomial_tail(k, m, q) == pytest.approx(plain, rel=1e-12), (k, m, q)
    assert (binomial_tail(-1, 5, 0.3), binomial_tail(5, 5, 0.3), binomial_tail(2, 5, 0.0),
            binomial_tail(2, 5, 1.0)) == (0.0, 1.0, 1.0, 0.0)


def test_eval_argument_mistakes_are_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import transformers

    from qwenlong.cli import main
    from qwenlong.pipeline import eval_command

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(eval_command, "_load_tokenizer", no_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    mistakes = [([], "give exactly one of --model, --api-url or --synthetic"),
                (["--data", "foo", "--model", str(tmp_path)], "--data: expected KEY=PATH"),
                (["--data", "docmath", "--model", str(tmp_path)], "--data: expected KEY=PATH"),
                (["--data-dir", str(tmp_path / "nowhere"), "--model", str(tmp_path)], "--data-dir: "),
                (["--data", f"docmath={tmp_path / 'missing.jsonl'}", "--model", str(tmp_path)], "path: "),
                (["--model", str(tmp_path)], "no data: "),
                (["--api-url", "http://127.0.0.1:1/v1", "--data-dir", str(tmp_path)], "--api-model: "),
                (["--run", str(tmp_path / "nowhere")], "--run: ")]
    for args, message in mistakes:
        capsys.readouterr()
        assert main(["eval", *args]) == 2, args
        error = capsys.readouterr().err
        assert error.startswith(f"qwenlong eval: error: {message}") and error.count("\n") == 1, error


def test_eval_of_a_run_on_benchmarks_writes_into_the_run(tmp_path, monkeypatch, qwen):
    """``--run RUN --data-dir D``: results under RUN/eval/exported/<model>, as --help says (not results/eval)."""
    from qwenlong.cli import main
    from qwenlong.config import load_config, save_config
    from qwenlong.eval import generation
    from qwenlong.pipeline import eval_command

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(ROOT / "configs" / "tiny.yaml"), run / "config.yaml")
    records = list(generate_records(3, SyntheticConfig(task="retrieval", document_tokens=200), seed=3,
                                    tokenizer=qwen))
    (tmp_path / "docqa").mkdir()
    write_jsonl(records, tmp_path / "docqa" / "hotpotqa.jsonl")
    monkeypatch.setattr(eval_command, "_load_tokenizer", lambda path: qwen)
    monkeypatch.setattr(generation, "openai_generate_fn", lambda *args, **kwargs: oracle(records))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--run", str(run), "--api-url", "http://127.0.0.1:1/v1", "--api-model", "org/served",
                 "--tokenizer", "qwen", "--data-dir", str(tmp_path / "docqa"), "--no-judge", "--no-progress"]) == 0
    results = json.loads((run / "eval" / "exported" / "org_served" / "results.json").read_text())
    assert results["average"] == 100.0 and not (tmp_path / "results").exists()


def test_paired_gain_bad_input():
    from qwenlong.eval.stats import clopper_pearson, paired_gain

    with pytest.raises(ValueError, match="after"):
        paired_gain([True, False], [True])
    with pytest.raises(ValueError, match="before"):
        paired_gain([], [])
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(4, 3)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(1, 3, confidence=1.0)
